"""A pull cut by the link resumes where it stopped, against the satellite as a real process with paced transfers.

Regression: the hand-over pull of gained experts restarted from chunk 0 at every pass, so a pull longer than a
contact (full expert weights over a short pass) never finished.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from ground_node.federation.handover import ResumablePull
from protos.wire import CHUNK_SIZE, expert_name
from satellite_node.testing import (
    Client,
    OrbitStub,
    SatelliteProcess,
    encode,
    expert_update,
    wait_until,
    write_tiny_base,
)
from testbed.broker import BrokerProcess, free_port
from tests.helpers import satellite_topology

pytestmark = pytest.mark.slow

TOPOLOGY = satellite_topology("pullresume", {"c0": 1, "c1": 1})
RATE_BPS = 16e6  # 2 MB/s: each 1 MiB chunk takes about 0.5 s, time enough to cut the link in between
PARTS = ["gate_up_proj.lora_A", "gate_up_proj.lora_B", "down_proj.lora_A", "down_proj.lora_B"]
NAMES = [expert_name(0, 0, p) for p in PARTS]


class Lab:
    def __init__(self, sat: SatelliteProcess, orbit: OrbitStub, base: Path) -> None:
        self.sat, self.orbit, self.base = sat, orbit, base

    def link(self, cluster: str, up: bool) -> None:
        self.orbit.set_link(cluster, up, RATE_BPS)


@pytest.fixture
def lab(broker: BrokerProcess, tmp_path: Path) -> Iterator[Lab]:
    # LoRA factors of a 65536-wide model: 4 MiB per expert, so a pull of one expert is 5 chunks
    base = write_tiny_base(tmp_path / "base", num_layers=1, num_experts=2, hidden=65536, inter=4, rank=8)
    sat = SatelliteProcess(tmp_path / "sat", (broker.host, broker.port), TOPOLOGY, free_port(), base=base)
    orbit = OrbitStub(broker.host, broker.port).start()
    lab = Lab(sat, orbit, base)
    for cluster in ("c0", "c1"):
        lab.link(cluster, True)
    sat.start()
    try:
        yield lab
    finally:
        orbit.stop()
        sat.kill()


def _commit(owner: Client, base: Path, seed: int) -> dict[str, np.ndarray]:
    tensors = expert_update(base, [(0, 0)], seed=seed)
    blob = encode(tensors)
    offer = owner.offer(blob, tensors, 1)
    assert owner.push(blob, list(offer.missing)).committed
    return tensors


def _cut_after_first_chunk(lab: Lab, puller: ResumablePull, reader: Client) -> int:
    """Pull until the first chunk arrives, then take c0's link down; returns the bytes received before the cut."""
    got: list[int] = []

    def on_bytes(n: int) -> None:
        got.append(n)
        if len(got) == 1:
            lab.link("c0", False)

    with pytest.raises(grpc.RpcError) as cut:
        puller.fetch(reader.stub, reader.md, NAMES, 60, on_bytes)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    lab.link("c0", True)
    wait_until("the satellite to see c0's link up again", reader.link_up, 30)
    return sum(got)


def test_a_pull_cut_by_the_link_resumes_and_restarts_only_for_a_new_blob(lab: Lab) -> None:
    c0, c1 = Client(lab.sat.target, "c0"), Client(lab.sat.target, "c1")
    try:
        wait_until("the satellite", lambda: c0.try_join(1, 1000) and c1.try_join(1, 1000), 30)
        c0.report(np.array([[0.0, 1.0]], np.float32))
        c1.report(np.array([[1.0, 0.0]], np.float32))  # c1 owns expert 0
        first = _commit(c1, lab.base, seed=3)
        size = len(encode(first))
        assert size > 4 * CHUNK_SIZE

        # cut after the first chunk: the next fetch asks for the rest only, and the blob is exact
        puller = ResumablePull()
        before = _cut_after_first_chunk(lab, puller, c0)
        assert 0 < before < size and len(puller.parts) >= 1
        rest: list[int] = []
        pulled = puller.fetch(c0.stub, c0.md, NAMES, 60, rest.append)
        assert pulled is not None and set(pulled) == set(first)
        for name, value in first.items():
            assert np.array_equal(pulled[name], value), name
        assert before + sum(rest) == size  # nothing was received twice

        # cut again, then the owner commits a newer version: the satellite's blob changed, so the pull starts over
        puller = ResumablePull()
        _cut_after_first_chunk(lab, puller, c0)
        newer = _commit(c1, lab.base, seed=4)
        again: list[int] = []
        pulled = puller.fetch(c0.stub, c0.md, NAMES, 60, again.append)
        assert pulled is not None and sum(again) == size
        for name, value in newer.items():
            assert np.array_equal(pulled[name], value), name
    finally:
        c0.close()
        c1.close()
