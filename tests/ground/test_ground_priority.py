"""Uplink priority: a contact too short for the whole update sends experts by largest change first, in parts."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from emsfl.runtime.linkstate import LinkState, wall_rate_bytes_of
from emsfl.runtime.timefmt import to_iso
from ground_node.federation.outbox import Outbox
from ground_node.federation.uplink import Uplink
from ground_node.records import Affinity
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import expert_name, parse_expert_name
from tests.helpers import serve_fake_satellite, wait_for

SIZE = 64 * 1024  # floats per expert part: 256 KiB


def _update(scales: dict[int, float], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        expert_name(0, e, "down_proj"): (rng.standard_normal(SIZE) * s).astype(np.float32) for e, s in scales.items()
    }


def _experts(blob: bytes) -> list[int]:
    keys = [parse_expert_name(n) for n in st_load(blob)]
    return sorted(k[0].expert for k in keys if k is not None)


def test_plan_sends_largest_change_first_then_the_rest(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    old = _update({0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    first = box.stage(old, 1, 10)
    box.record_acked(first.read())
    box.mark_acked(first.content_hash, first.size)
    new = {n: v.copy() for n, v in old.items()}
    for e, delta in ((0, 0.1), (1, 5.0), (2, 0.0), (3, 2.0)):  # expert 2 is unchanged
        new[expert_name(0, e, "down_proj")] += delta
    newest = box.stage(new, 1, 20)
    budget = 2 * SIZE * 4 + 8192  # room for two experts
    part = box.plan(newest, budget)
    assert part is not None and part.content_hash != newest.content_hash
    assert _experts(part.read()) == [1, 3]  # largest change first
    assert box.pending() == part  # in flight until acknowledged
    box.record_acked(part.read())
    box.mark_acked(part.content_hash, part.size)
    assert box.pending() == newest
    rest = box.plan(newest, None)  # next pass: the rest, without the unchanged expert 2
    assert rest is not None and _experts(rest.read()) == [0]
    box.record_acked(rest.read())
    box.mark_acked(rest.content_hash, rest.size)
    assert box.plan(newest, None) is None and box.pending() is None  # all of it is on the satellite


class _Satellite(pb_grpc.FederationServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.total: dict[str, int] = {}
        self.commits: list[bytes] = []

    def Join(self, request: Any, context: Any) -> Any:
        return pb.JoinReply(cluster_id="c0", strategy="emsfl")

    def ReportAffinity(self, request: Any, context: Any) -> Any:
        return pb.AffinityAck(accepted=True)

    def GetAssignment(self, request: Any, context: Any) -> Any:
        return pb.Assignment(ready=True, version=1, layers=[pb.LayerExperts(layer=0, experts=[0, 1, 2, 3])])

    def OfferUpdate(self, request: Any, context: Any) -> Any:
        have = self.chunks.setdefault(request.content_hash, {})
        self.total[request.content_hash] = len(request.chunk_hashes)
        return pb.OfferReply(missing=[i for i in range(len(request.chunk_hashes)) if i not in have])

    def PushChunksWindowed(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        h = ""
        for chunk in request_iterator:
            h = chunk.content_hash
            self.chunks[h][chunk.index] = chunk.data
            yield pb.PushProgress(taken_index=chunk.index)
        if len(self.chunks[h]) == self.total[h]:
            self.commits.append(b"".join(self.chunks[h][i] for i in range(self.total[h])))
            yield pb.PushProgress(reply=pb.PushReply(committed=True))
        else:
            yield pb.PushProgress(
                reply=pb.PushReply(missing=[i for i in range(self.total[h]) if i not in self.chunks[h]])
            )


class _ShortContact(LinkState):
    """Up, with a link payload whose `until` leaves room for about `room` bytes at `rate_bps`."""

    def __init__(self, room: int) -> None:
        self.now = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
        self.rate_bps = 8e6
        self.until = self.now + timedelta(seconds=room * 8 / self.rate_bps)

    def is_up(self, cluster: str) -> bool:
        return True

    def up_now(self, cluster: str) -> tuple[bool, datetime]:
        return True, self.now

    def wait_up(self, cluster: str, timeout_s: float) -> bool:
        return True

    def emulated_now(self) -> datetime:
        return self.now

    def link(self, cluster: str) -> dict[str, Any]:
        return {"state": "up", "until": to_iso(self.until), "rate_bps": self.rate_bps}

    def down_reason(self, cluster: str) -> str:
        return ""

    def wall_rate_bytes(self, cluster: str) -> float | None:
        return wall_rate_bytes_of(self.link(cluster), 1.0)


def test_uplink_splits_an_update_a_short_contact_cannot_carry(tmp_path: Path) -> None:
    fake = _Satellite()
    server, target = serve_fake_satellite(fake, max_workers=2)
    box = Outbox(tmp_path)
    update = box.stage(_update({0: 1.0, 1: 4.0, 2: 2.0, 3: 3.0}), 1, 10)
    link = _ShortContact(room=int(2.5 * SIZE * 4))  # with the 0.9 margin: two experts per part
    aff = Affinity(np.full((1, 4), 0.25, np.float32), np.full((1, 4), 0.25, np.float32), 10)
    up = Uplink(target, "c0", link, box, 4, 10, aff, poll_s=0.05)
    up.start()
    try:
        wait_for(lambda: box.pending() is None, 20)
    finally:
        up.stop()
        server.stop(0)
    assert box.pending() is None
    assert [_experts(b) for b in fake.commits] == [[1, 3], [0, 2]]  # two passes' worth, largest first
    assert update.content_hash in box.acked()


def test_rebase_acked_after_a_reassignment(tmp_path: Path) -> None:
    """Lost experts are forgotten; gained ones count as holding their handed-over parts (what the satellite has)."""
    box = Outbox(tmp_path)
    old = _update({0: 1.0, 1: 1.0, 2: 1.0})
    box.record_acked(box.stage(old, 1, 5).read())
    handed = _update({3: 2.0}, seed=4)
    box.rebase_acked({(0, 1), (0, 3), (0, 4)}, handed)
    acked = box.acked_tensors()
    assert sorted(acked) == [expert_name(0, 1, "down_proj"), expert_name(0, 3, "down_proj")]
    assert np.array_equal(acked[expert_name(0, 1, "down_proj")], old[expert_name(0, 1, "down_proj")])
    assert np.array_equal(acked[expert_name(0, 3, "down_proj")], handed[expert_name(0, 3, "down_proj")])
    # a trained gained expert differs from its handed-over parts: it goes up; an untouched kept one does not
    newest = {**{k: v for k, v in old.items() if "/1/" in k}, **_update({3: 2.0}, seed=5)}
    part = box.plan(box.stage(newest, 2, 10), budget_bytes=1.0)
    assert part is not None and _experts(part.read()) == [3]
