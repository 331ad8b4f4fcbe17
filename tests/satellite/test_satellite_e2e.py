"""The satellite as a real process: real Mosquitto, real gRPC over loopback, link states over MQTT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load as st_load

from emsfl.runtime.events import read_events
from satellite_node import export
from satellite_node.testing import Client, OrbitStub, code_of, encode, expert_update, write_tiny_base
from testbed.broker import BrokerProcess, free_port, wait_for_port
from tests.helpers import satellite_topology

REPO = Path(__file__).resolve().parents[2]
CHUNK = 256
TOPOLOGY = satellite_topology("sat-test", {"c0": 2, "c1": 2})

pytestmark = pytest.mark.slow


class Satellite:
    def __init__(self, tmp: Path, broker: BrokerProcess) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.state = tmp / "state"
        self.base = write_tiny_base(tmp / "base")
        self.topology = tmp / "topology.yaml"
        self.topology.write_text(TOPOLOGY, encoding="utf-8")
        self.log = tmp / "satellite.log"
        self.broker = broker
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "emsfl", "satellite", "run", "--topology", str(self.topology)]
        argv += ["--broker", f"{self.broker.host}:{self.broker.port}", "--listen", self.target]
        argv += ["--state", str(self.state), "--base", str(self.base), "--insecure"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        wait_for_port("127.0.0.1", self.port, timeout_s=30)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=20)


def until(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def lab(tmp_path: Path, broker: BrokerProcess) -> Iterator[tuple[Satellite, OrbitStub]]:
    sat = Satellite(tmp_path, broker)
    sat.start()
    orbit = OrbitStub(broker.host, broker.port)
    yield sat, orbit
    orbit.stop()
    if sat.proc is not None and sat.proc.poll() is None:
        sat.proc.kill()
        sat.proc.wait()


def test_satellite_end_to_end(lab: tuple[Satellite, OrbitStub]) -> None:
    sat, orbit = lab
    c0, c1 = Client(sat.target, "c0"), Client(sat.target, "c1")
    stranger = Client(sat.target, "c9")

    # orbit service offline: every call is refused, with the reason
    with pytest.raises(grpc.RpcError) as info:
        c0.join(2, 100)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "orbit service offline" in (info.value.details() or "")
    assert code_of(stranger.status) == grpc.StatusCode.PERMISSION_DENIED

    orbit.start()
    orbit.set_link("c0", True)
    orbit.set_link("c1", False)
    until(lambda: code_of(c0.status) is None)
    assert code_of(lambda: c1.join(2, 100)) == grpc.StatusCode.UNAVAILABLE
    orbit.set_link("c1", True)
    until(lambda: code_of(c1.status) is None)

    joined = c0.join(2, 300)
    assert joined.cluster_id == "c0" and joined.strategy == "emsfl"
    assert joined.manifest.num_experts == 4 and len(joined.manifest.expert_parts) == 4
    c1.join(0, 100)  # 0: the topology's capacity applies
    pref = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    assert c0.assignment().ready is False
    ack = c0.report(pref)
    assert (ack.clusters_reported, ack.clusters_expected) == (1, 2)
    c1.report(pref[:, ::-1].copy())
    assignment = c0.assignment()
    assert assignment.ready and assignment.version == 1
    assert [list(layer.experts) for layer in assignment.layers] == [[0, 1], [2, 3]]
    assert [list(layer.experts) for layer in c1.assignment().layers] == [[2, 3], [0, 1]]

    # an upload in two halves: the re-offer lists only what is still missing
    mine = [(0, 0), (0, 1), (1, 2), (1, 3)]
    tensors = expert_update(sat.base, mine, seed=1)
    blob = encode(tensors)
    offer = c0.offer(blob, tensors, 1, CHUNK)
    total = (len(blob) + CHUNK - 1) // CHUNK
    assert not offer.committed and list(offer.missing) == list(range(total))
    half = total // 2
    reply = c0.push(blob, list(range(half)), CHUNK)
    assert not reply.committed and list(reply.missing) == list(range(half, total))
    assert list(c0.offer(blob, tensors, 1, CHUNK).missing) == list(range(half, total))
    reply = c0.push(blob, list(range(half, total)), CHUNK)
    assert reply.committed
    assert sorted((v.layer, v.expert, v.version, v.owner) for v in reply.versions) == [(*k, 1, "c0") for k in mine]
    again = c0.offer(blob, tensors, 1, CHUNK)  # idempotent: the same content is already committed
    assert again.committed and list(again.missing) == []

    # foreign experts and stale versions are refused
    foreign = expert_update(sat.base, [(0, 0)], seed=5)
    assert code_of(lambda: c1.offer(encode(foreign), foreign, 1, CHUNK)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: c0.offer(encode(foreign), foreign, 0, CHUNK)) == grpc.StatusCode.FAILED_PRECONDITION

    # a second version of c0's experts; global tensors follow the newest committed upload
    tensors2 = expert_update(sat.base, mine, seed=2)
    blob2 = encode(tensors2)
    c0.offer(blob2, tensors2, 1, CHUNK)
    assert c0.push(blob2, list(range((len(blob2) + CHUNK - 1) // CHUNK)), CHUNK).committed
    glob = export.global_tensors(sat.state, sat.base)
    for name, array in tensors2.items():
        np.testing.assert_array_equal(glob[name], array)
    pulled = st_load(c0.pull(["expert/0/0/", "shared/embed_tokens.weight"]))
    assert set(pulled) == {n for n in glob if n.startswith("expert/0/0/")} | {"shared/embed_tokens.weight"}
    for name, array in pulled.items():
        np.testing.assert_array_equal(array, glob[name])

    # the link goes down: calls are refused and nothing commits
    theirs = [(0, 2), (0, 3), (1, 0), (1, 1)]
    tensors3 = expert_update(sat.base, theirs, seed=3)
    blob3 = encode(tensors3)
    n3 = (len(blob3) + CHUNK - 1) // CHUNK
    c1.offer(blob3, tensors3, 1, CHUNK)
    c1.push(blob3, [0], CHUNK)
    orbit.set_link("c1", False)
    until(lambda: code_of(c1.status) == grpc.StatusCode.UNAVAILABLE)
    assert code_of(lambda: c1.push(blob3, list(range(1, n3)), CHUNK)) == grpc.StatusCode.UNAVAILABLE

    # kill -9 and restart: committed state and the half-received upload survive
    assert sat.stop(signal.SIGKILL) == -signal.SIGKILL
    sat.start()
    until(lambda: code_of(c0.status) is None)
    status = c0.status()
    assert status.assignment_version == 1
    assert sorted((e.layer, e.expert, e.version) for e in status.experts) == [(*k, 2) for k in mine]
    orbit.set_link("c1", True)
    until(lambda: code_of(c1.status) is None)
    assert list(c1.offer(blob3, tensors3, 1, CHUNK).missing) == list(range(1, n3))
    assert c1.push(blob3, list(range(1, n3)), CHUNK).committed
    assert sat.stop(signal.SIGTERM) == 0
    sat.start()
    until(lambda: code_of(c0.status) is None)  # the retained link state arrives just after the port opens
    assert sat.stop(signal.SIGINT) == 0

    commits = export.commits(sat.state)
    assert [(c["cluster"], c["bytes"]) for c in commits] == [("c0", len(blob)), ("c0", len(blob2)), ("c1", len(blob3))]
    assert commits[1]["experts"] == [[*k, 2] for k in mine]
    events = read_events(sat.state / "events.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds.count("joined") == 2 and kinds.count("affinity") == 2 and kinds.count("upload_committed") == 3
    assignment_event = next(e for e in events if e["event"] == "assignment")
    assert assignment_event["experts"]["c0"] == [[0, [0, 1]], [1, [2, 3]]]
    refused = [e for e in events if e["event"] == "refused"]
    assert {"UNAVAILABLE", "PERMISSION_DENIED", "FAILED_PRECONDITION"} <= {e["code"] for e in refused}
    assert all(e["role"] == "satellite" and e["id"] == "satellite" for e in events)
    # refusals while a restarted node has no clock yet carry t = null; every other event has its emulated time
    last = next(e for e in reversed(events) if e["event"] != "refused")
    assert last["t"] is not None and isinstance(last["wall"], float)
    assert "TLS is off" in sat.log.read_text(encoding="utf-8")
    for client in (c0, c1, stranger):
        client.close()
