"""kill -9 of the satellite process at random points during uploads and commits (real process, real gRPC, real
MQTT): after every restart each acknowledged update is present and the store passes `check_integrity`."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from satellite_node import export
from satellite_node.store import Store
from satellite_node.testing import Client, OrbitStub, SatelliteProcess, encode, expert_update, write_tiny_base
from testbed.broker import BrokerProcess, free_port

pytestmark = pytest.mark.slow

TOPOLOGY = """
strategy: emsfl
clusters:
  - {id: c0, capacity_experts: 2}
  - {id: c1, capacity_experts: 2}
"""
CHUNK = 2048
KILLS = 20


def wait_ok(call: Callable[[], object], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            call()
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Uploader(threading.Thread):
    """Uploads fresh updates back to back (some in two pushes) until the server dies; records what was acked."""

    def __init__(self, target: str, cluster: str, base: Path, experts: list[tuple[int, int]], seed: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(target, cluster)
        self.base, self.experts, self.seed = base, experts, seed
        self.acked: dict[str, dict[str, np.ndarray]] = {}

    def run(self) -> None:
        seed = self.seed
        try:
            while True:
                seed += 1
                tensors = expert_update(self.base, self.experts, seed=seed)
                blob = encode(tensors)
                reply = self.client.offer(blob, tensors, 1, CHUNK)
                missing = list(reply.missing)
                if not reply.committed:
                    half = len(missing) // 2 if seed % 2 else len(missing)
                    self.client.push(blob, missing[:half], CHUNK)
                    rest = list(self.client.offer(blob, tensors, 1, CHUNK).missing)
                    if not self.client.push(blob, rest, CHUNK).committed:
                        continue
                self.acked[sha(blob)] = tensors
        except grpc.RpcError:
            return
        finally:
            self.client.close()


def sha(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def test_kill_minus_nine_never_loses_an_acknowledged_update(tmp_path: Path, broker: BrokerProcess) -> None:
    base = write_tiny_base(tmp_path / "base", hidden=48, inter=48, rank=8)
    sat = SatelliteProcess(tmp_path, (broker.host, broker.port), TOPOLOGY, free_port(), ["--insecure"], base=base)
    orbit = OrbitStub(broker.host, broker.port).start()
    for c in ("c0", "c1"):
        orbit.set_link(c, True)
    rng = random.Random(20260320)
    acked: dict[str, dict[str, np.ndarray]] = {}
    try:
        sat.start()
        clients = {c: Client(sat.target, c) for c in ("c0", "c1")}
        pref = np.array([[0.4, 0.3, 0.2, 0.1]] * 2, dtype=np.float32)
        for c, p in (("c0", pref), ("c1", pref[:, ::-1].copy())):
            wait_ok(clients[c].status)
            clients[c].join(2, 100)
            clients[c].report(p)
        owned = {
            c: [(i, e) for i, layer in enumerate(clients[c].assignment().layers) for e in layer.experts]
            for c in clients
        }
        for client in clients.values():
            client.close()
        for kill in range(KILLS):
            uploaders = [
                Uploader(sat.target, c, base, owned[c], seed=1000 * kill + 10 * i) for i, c in enumerate(owned)
            ]
            for u in uploaders:
                u.start()
            time.sleep(rng.uniform(0.05, 0.6))  # somewhere in an offer, a push, an fsync or a commit
            sat.kill()
            for u in uploaders:
                u.join(timeout=20)
                acked.update(u.acked)
            sat.start()
            probe = Client(sat.target, "c0")
            wait_ok(probe.status)
            probe.close()
            committed = {c["content_hash"] for c in export.commits(sat.state)}
            lost = set(acked) - committed
            assert not lost, f"after kill {kill}: acknowledged updates lost: {sorted(h[:12] for h in lost)}"
            with Store(sat.state, create=False) as store:
                store.check_integrity()
        assert len(acked) >= KILLS  # the kills really hit a busy server
        for i, c in enumerate(owned):  # one last, uninterrupted upload per cluster
            final = Client(sat.target, c)
            tensors = expert_update(base, owned[c], seed=99_000 + i)
            blob = encode(tensors)
            reply = final.offer(blob, tensors, 1, CHUNK)
            assert reply.committed or final.push(blob, list(reply.missing), CHUNK).committed
            acked[sha(blob)] = tensors
            final.close()
        # every expert is at its newest acknowledged update or at a later commit (one acked by nobody, the kill
        # having cut the reply); where it is an acknowledged one, the global model holds exactly its parameters
        glob = export.global_tensors(sat.state, base)
        order = {c["content_hash"]: i for i, c in enumerate(export.commits(sat.state))}
        with Store(sat.state, create=False) as store:
            newest = store.newest_versions()
        checked = 0
        for key, row in newest.items():
            prefix = f"expert/{key.layer}/{key.expert}/"
            touching = [h for h, t in acked.items() if any(n.startswith(prefix) for n in t)]
            if touching:
                assert order[row.commit_hash] >= max(order[h] for h in touching)
            if row.commit_hash in acked:
                checked += 1
                for name, array in acked[row.commit_hash].items():
                    if name.startswith(prefix):
                        np.testing.assert_array_equal(glob[name], array)
        assert checked > 0
    finally:
        sat.kill()
        orbit.stop()
