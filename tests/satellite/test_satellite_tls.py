"""Mutual TLS: identity from the client certificate only; foreign CAs refused; metadata never overrides it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from emsfl import pki
from emsfl.runtime.tls import TlsFiles
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from satellite_node.cli import main
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.server import make_server
from satellite_node.store import Store
from satellite_node.testing import (
    Client,
    FakeLinks,
    OrbitStub,
    SatelliteProcess,
    code_of,
    encode,
    expert_update,
    write_tiny_base,
)
from testbed.broker import BrokerProcess, free_port

CHUNK = 256


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root / "ca")
    pki.issue(root / "ca", "satellite", "server", sans=["localhost", "127.0.0.1"])
    for c in ("c0", "c1"):
        pki.issue(root / "ca", f"gw-{c}", "client", cluster=c)
    pki.issue(root / "ca", "orbit", "client")  # a service certificate: no cluster identity
    pki.init_ca(root / "rogue")
    pki.issue(root / "rogue", "gw-c0", "client", cluster="c0")
    return root


def creds(ca: Path, name: str, authority: str = "ca") -> TlsFiles:
    d = ca / authority
    return TlsFiles(ca=ca / "ca" / "ca.crt", cert=d / f"{name}.crt", key=d / f"{name}.key")


def tls_files(ca: Path) -> TlsFiles:
    return creds(ca, "satellite")


@pytest.fixture
def server(tmp_path: Path, ca: Path) -> Iterator[tuple[str, SatelliteNode]]:
    base = write_tiny_base(tmp_path / "base")
    store = Store(tmp_path / "state")
    node = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 2, "c1": 2}), FakeLinks())
    srv, port = make_server(node, "127.0.0.1:0", tls=tls_files(ca))
    srv.start()
    yield f"127.0.0.1:{port}", node
    srv.stop(0)
    store.close()


def test_identity_from_certificate(server: tuple[str, SatelliteNode], ca: Path) -> None:
    target, node = server
    # c0's certificate with metadata claiming c1: the server sees c0
    liar = Client(target, "c1", tls=creds(ca, "gw-c0"))
    assert liar.join(2, 100).cluster_id == "c0"
    assert set(node.store.clusters()) == {"c0"}
    c1 = Client(target, "c0", tls=creds(ca, "gw-c1"))  # metadata claims c0, certificate says c1
    assert c1.join(2, 100).cluster_id == "c1"
    pref = np.array([[0.4, 0.3, 0.2, 0.1]] * 2, dtype=np.float32)
    liar.report(pref)
    c1.report(pref[:, ::-1].copy())
    assert [list(x.experts) for x in liar.assignment().layers] == [[0, 1], [0, 1]]
    # c1, with a valid certificate and metadata naming c0, cannot upload c0's experts
    theirs = expert_update(node.base_dir, [(0, 0), (1, 1)])
    assert code_of(lambda: c1.offer(encode(theirs), theirs, 1, CHUNK)) == grpc.StatusCode.PERMISSION_DENIED
    mine = expert_update(node.base_dir, [(0, 2), (1, 3)])
    blob = encode(mine)
    missing = list(c1.offer(blob, mine, 1, CHUNK).missing)
    assert c1.push(blob, missing, CHUNK).committed
    assert [c["cluster"] for c in node.store.commits()] == ["c1"]
    for client in (liar, c1):
        client.close()


def test_foreign_or_missing_certificates_refused(server: tuple[str, SatelliteNode], ca: Path) -> None:
    target, node = server
    rogue = Client(target, "c0", tls=creds(ca, "gw-c0", authority="rogue"))
    assert code_of(lambda: rogue.join(2, 100)) == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    ca_pem = (ca / "ca" / "ca.crt").read_bytes()
    anonymous = grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=ca_pem),
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    stub = pb_grpc.FederationStub(anonymous)
    assert code_of(lambda: stub.GetStatus(pb.StatusRequest(), metadata=(("emsfl-cluster", "c0"),))) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
    )
    plaintext = Client(target, "c0")
    assert code_of(plaintext.status) == grpc.StatusCode.UNAVAILABLE
    service = Client(target, "c0", tls=creds(ca, "orbit"))  # valid, but names no cluster
    assert code_of(service.status) == grpc.StatusCode.UNAUTHENTICATED
    assert node.store.clusters() == {}
    for client in (rogue, plaintext, service):
        client.close()
    anonymous.close()


def test_cli_tls_flags(tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "t.yaml"
    topo.write_text("clusters:\n  - {id: c0, capacity_experts: 2}\n", encoding="utf-8")
    base = write_tiny_base(tmp_path / "base")
    common = ["run", "--topology", str(topo), "--broker", "127.0.0.1:1", "--listen", "127.0.0.1:50998"]
    common += ["--state", str(tmp_path / "s"), "--base", str(base)]
    d = ca / "ca"
    assert main([*common, "--tls-cert", str(d / "satellite.crt")]) == 2
    assert "--tls-key" in capsys.readouterr().err
    full = TlsFiles(d / "ca.crt", d / "satellite.crt", d / "satellite.key").flags()
    assert main([*common, *full, "--insecure"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert main([*common, *full[2:], "--tls-ca", str(tmp_path / "nope.crt")]) == 2  # full[2:]: cert and key
    assert "--tls-ca" in capsys.readouterr().err
    # neither TLS files nor --insecure: the node refuses to start rather than serve plaintext unasked
    assert main(common) == 2
    assert "--insecure" in capsys.readouterr().err
    # a topology that asks for mutual TLS (satellite.tls: true) is not served plaintext, --insecure or not
    topo.write_text("satellite: {tls: true}\nclusters:\n  - {id: c0, capacity_experts: 2}\n", encoding="utf-8")
    assert main([*common, "--insecure"]) == 2
    assert "satellite.tls" in capsys.readouterr().err
    # the topology's tls: keys stand for the flags (paths relative to the topology file)
    files = {k: str(d / n) for k, n in (("ca", "ca.crt"), ("cert", "satellite.crt"), ("key", "nope.key"))}
    topo.write_text(f"tls: {files}\nclusters:\n  - {{id: c0, capacity_experts: 2}}\n", encoding="utf-8")
    assert main(common) == 2
    assert "tls.key" in capsys.readouterr().err


@pytest.mark.slow
def test_satellite_process_with_mtls(tmp_path: Path, ca: Path, broker: BrokerProcess) -> None:
    d = ca / "ca"
    flags = TlsFiles(d / "ca.crt", d / "satellite.crt", d / "satellite.key").flags()
    sat = SatelliteProcess(
        tmp_path, (broker.host, broker.port), "clusters:\n  - {id: c0, capacity_experts: 2}\n", free_port(), flags
    )
    orbit = OrbitStub(broker.host, broker.port).start()
    orbit.set_link("c0", True)
    sat.start()
    try:
        good = Client(sat.target, "c1", tls=creds(ca, "gw-c0"))
        for _ in range(200):
            if code_of(good.status) is None:
                break
            time.sleep(0.05)
        assert good.join(2, 10).cluster_id == "c0"
        plaintext = Client(sat.target, "c0")
        assert code_of(plaintext.status) == grpc.StatusCode.UNAVAILABLE
        assert "mutual TLS" in sat.log.read_text(encoding="utf-8")
        assert "TLS is off" not in sat.log.read_text(encoding="utf-8")
        good.close()
        plaintext.close()
        assert sat.stop() == 0
    finally:
        sat.kill()
        orbit.stop()
