"""Mutual TLS on every hop of a running testbed (`emsfl lab up --tls`), with real processes.

The lab runs the satellite, the orbit service, a single-node cluster c0 and a cluster c1 of a gateway and two
devices, against a Mosquitto with TLS and the deployed ACL, each role with its own certificate of a throwaway CA.
While it runs, this test tries what an attacker on the network would: certificates of another CA, a plaintext
client, another cluster's certificate and a device of another cluster, on each server; a cluster's MQTT
credentials publishing link state or another cluster's status. Afterwards: uploads of both clusters committed, and
every TCP connection the satellite and the gateway accepted (seen with `ss`) came from a role run with TLS files.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from emsfl import pki
from emsfl.runtime.bus import Bus
from emsfl.runtime.tls import TlsFiles
from protos import topics
from satellite_node.testing import Client, code_of, encode, expert_update, wait_until
from testbed.broker import free_port
from testbed.lab import LabRun, run_lab
from testbed.labtls import LabPki
from tests.helpers import QUICK_TWO_BY_TWO, lab_options, mqtt_connect, topology_with, write_topology

pytestmark = pytest.mark.slow

TOPOLOGY = Path(__file__).resolve().parents[2] / "testbed" / "topologies" / "two-by-two.yaml"
RUN_ID = "tls"
WAIT_S = 600.0  # the base model's warm-up comes first, on a loaded machine


def link_gated(call: Callable[[], object], timeout_s: float = 300.0) -> grpc.StatusCode | None:
    """The outcome of `call` once the caller's link is up (UNAVAILABLE for a down link is retried)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
        except grpc.RpcError as exc:
            if (
                exc.code() == grpc.StatusCode.UNAVAILABLE
                and "link" in (exc.details() or "")
                and time.monotonic() < deadline
            ):
                time.sleep(0.3)
                continue
            return exc.code()  # type: ignore[no-any-return]
        return None


def _rogue(tmp: Path) -> Path:
    rogue = tmp / "rogue"
    pki.init_ca(rogue)
    pki.issue(rogue, "c0", "client", cluster="c0")
    pki.issue(rogue, "c1-d0", "device", cluster="c1", device="d0")
    return rogue


def _files(directory: Path, name: str, ca: Path) -> TlsFiles:
    return TlsFiles(ca=ca, cert=directory / f"{name}.crt", key=directory / f"{name}.key")


def _mqtt(port: int, files: TlsFiles | None, seen: list[tuple[str, bytes]] | None = None) -> tuple[mqtt.Client, Any]:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{time.monotonic_ns()}")
    ctx = None
    if files is not None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        ctx.load_cert_chain(str(files.cert), str(files.key))
    on_message = None if seen is None else lambda topic, payload: seen.append((topic, payload))
    return client, mqtt_connect(client, port, ctx, on_message=on_message)


def _accepted_peers(port: int) -> list[int]:
    """Pids of the local processes holding an established connection to `port` (`ss -tnp`)."""
    out = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True, text=True, check=True).stdout
    peers: dict[str, int] = {}
    listening_side: set[str] = set()
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        local, remote = fields[2], fields[3]
        pid = int(line.split("pid=")[1].split(",")[0]) if "pid=" in line else -1
        if local.endswith(f":{port}"):
            listening_side.add(remote)
        else:
            peers[local] = pid
    return [peers.get(remote, -1) for remote in listening_side]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


@pytest.fixture(scope="module")
def tls_lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabRun, dict[str, Any]]:
    if shutil.which("mosquitto") is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto): `emsfl lab up --tls` needs it")
    tmp = tmp_path_factory.mktemp("labtls")
    topology = topology_with(TOPOLOGY, QUICK_TWO_BY_TWO)
    topology["clusters"][0]["devices"] = 1  # c0: a single node; c1: a gateway and two devices
    path = write_topology(tmp, topology)
    sat_port = free_port()
    opts = lab_options(tmp, path, RUN_ID, 90, satellite_port=sat_port, tls=True)
    findings: dict[str, Any] = {}
    errors: list[BaseException] = []  # the probe's own failures, raised once the lab stopped
    rogue = _rogue(tmp)

    def probe() -> None:
        try:
            _probe(tmp / "runs" / RUN_ID, sat_port, rogue, findings)
        except BaseException as exc:  # reported after the lab stopped
            errors.append(exc)

    thread = threading.Thread(target=probe, name="tls-probe", daemon=True)
    thread.start()
    lab = run_lab(opts)
    thread.join(60)
    if errors:
        raise errors[0]
    return lab, findings


def _probe(run_dir: Path, sat_port: int, rogue: Path, findings: dict[str, Any]) -> None:
    lab_pki = LabPki(run_dir / "pki")
    ca = lab_pki.directory / pki.CA_CERT
    wait_until("the lab's PKI", lambda: (lab_pki.directory / "monitor.key").exists(), WAIT_S)
    argv = wait_until("the satellite process", lambda: _satellite_argv(run_dir), WAIT_S)
    topology = yaml.safe_load((run_dir / "topology.yaml").read_text(encoding="utf-8"))
    broker_port = int(argv[argv.index("--broker") + 1].rsplit(":", 1)[1])
    base = Path(argv[argv.index("--base") + 1])
    # the gateway announces where its devices reach it
    statuses: dict[str, dict[str, Any]] = {}
    monitor = Bus("127.0.0.1", broker_port, "lab", "tls-probe", tls=lab_pki.files("monitor"))
    monitor.subscribe(topics.node_status("ground", "c1"), "status", lambda t, p: statuses.__setitem__("c1", p))
    monitor.start()
    try:
        gateway = wait_until(
            "the gateway of c1", lambda: (statuses.get("c1") or {}).get("detail", {}).get("gateway"), WAIT_S
        )
    finally:
        monitor.stop()
    sat = f"127.0.0.1:{sat_port}"
    issued = lab_pki.directory
    pki.issue(issued, "c0-dx", "device", cluster="c0", device="dx")  # a device of cluster c0, for c1's gateway

    def refused(target: str, files: TlsFiles | None, call: str = "status") -> grpc.StatusCode | None:
        client = Client(target, "c1", tls=files)
        try:
            return code_of(getattr(client, call))
        finally:
            client.close()

    for name, target in (("satellite", sat), ("gateway", str(gateway))):
        findings[f"{name}_rogue_ca"] = refused(target, _files(rogue, "c0", ca))
        findings[f"{name}_rogue_device"] = refused(target, _files(rogue, "c1-d0", ca))
        findings[f"{name}_plaintext"] = refused(target, None)
    # a device certificate is no cluster identity at the satellite
    findings["satellite_device_cert"] = refused(sat, lab_pki.files("c1-d0"))
    # c0's certificate at c1's gateway: not a device; a device of c0 at c1's gateway: another cluster
    c0_at_gw = Client(str(gateway), "c1", tls=lab_pki.files("c0"))
    findings["gateway_cluster_cert_pull"] = code_of(lambda: c0_at_gw.pull_tensors(["expert/"], timeout_s=10))
    c0_at_gw.close()
    dx = Client(str(gateway), "c1", tls=lab_pki.files("c0-dx"))
    findings["gateway_other_cluster_device_pull"] = code_of(lambda: dx.pull_tensors(["expert/"], timeout_s=10))
    findings["gateway_other_cluster_device_status"] = code_of(dx.status)
    dx.close()
    # cluster c0 (its own certificate, metadata claiming c1) cannot upload experts it does not own
    c0 = Client(sat, "c1", tls=lab_pki.files("c0"))
    try:
        replies: list[Any] = []

        def ready() -> bool:
            code = link_gated(lambda: replies.append(c0.assignment()))
            assert code is None, code
            return bool(replies[-1].ready)

        wait_until("c0's assignment", ready, WAIT_S)
        assignment = replies[-1]
        mine = {(la.layer, e) for la in assignment.layers for e in la.experts}
        num_experts = int(topology["model"]["num_experts"])
        theirs = sorted((0, e) for e in range(num_experts) if (0, e) not in mine)[:1]
        tensors = expert_update(base, theirs)
        findings["satellite_foreign_experts"] = link_gated(
            lambda: c0.offer(encode(tensors), tensors, assignment.version)
        )
    finally:
        c0.close()
    # MQTT: a cluster's certificate may not publish link state nor another cluster's status
    seen: list[tuple[str, bytes]] = []
    watcher, reason = _mqtt(broker_port, lab_pki.files("monitor"), seen)
    assert not isinstance(reason, Exception) and not reason.is_failure, reason
    watcher.subscribe("emsfl/v1/#", qos=1)
    forger, reason = _mqtt(broker_port, lab_pki.files("c0"))
    assert not isinstance(reason, Exception) and not reason.is_failure, reason
    marker = f"forged-{time.monotonic_ns()}".encode()
    for topic in (topics.link("c1"), topics.link("c0"), topics.node_status("ground", "c1")):
        forger.publish(topic, marker, qos=1).wait_for_publish(5)
    forger.publish(topics.node_status("ground", "c0"), marker + b"-own", qos=1).wait_for_publish(5)
    wait_until("c0's own status publication", lambda: any(p == marker + b"-own" for _, p in seen), 30)
    time.sleep(1.5)
    findings["mqtt_forged_seen"] = sorted(t for t, p in seen if p == marker)
    findings["mqtt_traffic_seen"] = len(seen)
    for client in (forger, watcher):
        client.disconnect()
        client.loop_stop()
    _, findings["mqtt_plaintext"] = _mqtt(broker_port, None)
    _, findings["mqtt_rogue"] = _mqtt(broker_port, _files(rogue, "c0", ca))
    # every connection the servers hold now was accepted from a role that runs with TLS files
    gw_port = int(str(gateway).rsplit(":", 1)[1])
    findings["peers"] = {p: _cmdline(p) for port in (sat_port, gw_port) for p in _accepted_peers(port)}


def _satellite_argv(run_dir: Path) -> list[str] | None:
    """The command line of the lab's satellite process (its --broker and --base), once it runs."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            argv = _cmdline(int(proc.name))
            if "satellite" in argv and "--state" in argv and argv[argv.index("--state") + 1].startswith(str(run_dir)):
                return argv
    return None


def test_every_refusal(tls_lab: tuple[LabRun, dict[str, Any]]) -> None:
    _, f = tls_lab
    unavailable = grpc.StatusCode.UNAVAILABLE
    for server in ("satellite", "gateway"):
        assert f[f"{server}_rogue_ca"] == unavailable, f  # the handshake fails: no call reaches the service
        assert f[f"{server}_rogue_device"] == unavailable, f
        assert f[f"{server}_plaintext"] == unavailable, f
    assert f["satellite_device_cert"] == grpc.StatusCode.UNAUTHENTICATED
    assert f["gateway_cluster_cert_pull"] == grpc.StatusCode.UNAUTHENTICATED
    assert f["gateway_other_cluster_device_pull"] == grpc.StatusCode.PERMISSION_DENIED
    assert f["gateway_other_cluster_device_status"] == grpc.StatusCode.PERMISSION_DENIED
    assert f["satellite_foreign_experts"] == grpc.StatusCode.PERMISSION_DENIED


def test_mqtt_acl_and_tls(tls_lab: tuple[LabRun, dict[str, Any]]) -> None:
    _, f = tls_lab
    assert f["mqtt_traffic_seen"] > 0  # the watcher saw the orbit's and the roles' messages ...
    assert f["mqtt_forged_seen"] == []  # ... but none of c0's forgeries
    for key in ("mqtt_plaintext", "mqtt_rogue"):
        outcome = f[key]
        assert isinstance(outcome, Exception) or outcome.is_failure, (key, outcome)


def test_only_tls_roles_were_accepted(tls_lab: tuple[LabRun, dict[str, Any]]) -> None:
    _, f = tls_lab
    assert f["peers"], "no connection to the satellite or the gateway at all"
    for pid, argv in f["peers"].items():
        assert "--tls-cert" in argv, f"pid {pid} ({' '.join(argv)[:200]}) holds a connection without TLS files"


def test_uploads_commit_over_mutual_tls(tls_lab: tuple[LabRun, dict[str, Any]]) -> None:

    from satellite_node.export import commits

    lab, _ = tls_lab
    assert {c["cluster"] for c in commits(lab.state_dir)} == {"c0", "c1"}
    from testbed.outputs import write_outputs

    assert write_outputs(lab)["tls"] is True  # what `emsfl lab up --tls` writes to summary.json
    log = (lab.run_dir / "logs" / "satellite.log").read_text(encoding="utf-8")
    assert "mutual TLS" in log and "TLS is off" not in log
