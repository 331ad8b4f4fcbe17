from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from emsfl.runtime.events import read_events
from ground_node.agent import AgentOptions, GroundAgent
from ground_node.federation.outbox import Outbox
from ground_node.records import Affinity
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import CLUSTER_METADATA_KEY, sha256_hex
from tests.helpers import FixedLink, serve_fake_satellite, wait_for


class FakeSatellite(pb_grpc.FederationServicer):  # type: ignore[misc]
    """Just enough of the satellite node: assigns fixed experts, stores chunks, cuts links on demand."""

    def __init__(self) -> None:
        self.link_up = True
        self.cut_after_chunks: int | None = None
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.totals: dict[str, int] = {}
        self.committed: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.pushed: list[int] = []

    def _gate(self, context: Any, name: str) -> str:
        cluster = dict(context.invocation_metadata()).get(CLUSTER_METADATA_KEY, "")
        self.calls.append((name, cluster))
        if not self.link_up:
            context.abort(grpc.StatusCode.UNAVAILABLE, "link down")
        return str(cluster)

    def Join(self, request: Any, context: Any) -> Any:
        cluster = self._gate(context, "Join")
        return pb.JoinReply(cluster_id=cluster, strategy="emsfl")

    def ReportAffinity(self, request: Any, context: Any) -> Any:
        self._gate(context, "ReportAffinity")
        assert len(request.gate) == request.num_layers * request.num_experts
        return pb.AffinityAck(accepted=True)

    def GetAssignment(self, request: Any, context: Any) -> Any:
        self._gate(context, "GetAssignment")
        return pb.Assignment(
            ready=True,
            version=1,
            layers=[pb.LayerExperts(layer=0, experts=[0, 1]), pb.LayerExperts(layer=1, experts=[2])],
        )

    def GetStatus(self, request: Any, context: Any) -> Any:
        self._gate(context, "GetStatus")
        return pb.StatusReply(strategy="emsfl", assignment_version=1)  # no expert has a version yet

    def OfferUpdate(self, request: Any, context: Any) -> Any:
        self._gate(context, "OfferUpdate")
        if request.content_hash in self.committed:
            return pb.OfferReply(committed=True)
        have = self.chunks.setdefault(request.content_hash, {})
        self.totals[request.content_hash] = len(request.chunk_hashes)
        return pb.OfferReply(missing=[i for i in range(len(request.chunk_hashes)) if i not in have])

    def PushChunksWindowed(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        self._gate(context, "PushChunksWindowed")
        content = ""
        for chunk in request_iterator:
            if self.cut_after_chunks is not None and len(self.pushed) >= self.cut_after_chunks:
                self.cut_after_chunks = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "link cut mid-upload")
            assert sha256_hex(chunk.data) == chunk.sha256
            content = chunk.content_hash
            self.chunks[content][chunk.index] = chunk.data
            self.pushed.append(chunk.index)
            yield pb.PushProgress(taken_index=chunk.index)
        have = self.chunks[content]
        missing = [i for i in range(self.totals[content]) if i not in have]
        if not missing:
            blob = b"".join(have[i] for i in range(self.totals[content]))
            assert sha256_hex(blob) == content
            self.committed.add(content)
            yield pb.PushProgress(reply=pb.PushReply(committed=True))
        else:
            yield pb.PushProgress(reply=pb.PushReply(missing=missing))


@pytest.fixture
def satellite() -> Iterator[tuple[FakeSatellite, str]]:
    fake = FakeSatellite()
    server, target = serve_fake_satellite(fake)
    yield fake, target
    server.stop(0)


def test_cut_upload_resumes_with_only_missing_chunks(satellite: tuple[FakeSatellite, str], tmp_path: Path) -> None:
    from ground_node.federation.uplink import Uplink

    fake, target = satellite
    box = Outbox(tmp_path)
    big = np.random.default_rng(0).random((3 * 1024 * 1024 // 4 + 100,), dtype=np.float32)  # ~3 MiB: 4 chunks
    update = box.stage({"expert/0/0/gate_up_proj": big}, 1, 10)
    aff = Affinity(np.full((2, 4), 0.25, np.float32), np.full((2, 4), 0.25, np.float32), 100)
    link = FixedLink()
    up = Uplink(target, "c0", link, box, 2, 200, aff, poll_s=0.05)
    fake.cut_after_chunks = 2
    up.start()
    try:
        wait_for(lambda: box.pending() is None, 20)
    finally:
        up.stop()
    assert box.pending() is None and box.acked() == [update.content_hash]
    assert fake.pushed == [0, 1, 2, 3]  # the cut pass sent 0 and 1; the next pass only 2 and 3
    assert up.refusals >= 1 and up.uploads_acked == 1
    assert {c for _, c in fake.calls} == {"c0"}
    assert [n for n, _ in fake.calls].count("ReportAffinity") == 1
    assert up.assignment is not None and up.assignment.held(0) == (0, 1)


def test_down_link_refusals_never_crash(satellite: tuple[FakeSatellite, str], tmp_path: Path) -> None:
    from ground_node.federation.uplink import Uplink

    fake, target = satellite
    fake.link_up = False
    aff = Affinity(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), 1)
    up = Uplink(target, "c1", FixedLink(), Outbox(tmp_path), 2, 10, aff, poll_s=0.02)
    up.start()
    time.sleep(0.5)
    assert up.is_alive() and up.refusals >= 2 and not up.joined
    fake.link_up = True
    assert up.assigned.wait(10)
    up.stop()


def test_agent_trains_stages_uploads_and_reports(
    satellite: tuple[FakeSatellite, str], topology: dict[str, Any], base_dir: Path, tmp_path: Path
) -> None:
    fake, target = satellite
    opts = AgentOptions(topology, "c0", tmp_path / "w", base_dir, target)
    agent = GroundAgent(opts, FixedLink())
    stop = threading.Event()
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(agent.run(stop)))
    thread.start()
    wait_for(lambda: bool(fake.committed), 30, 0.1)
    stop.set()
    thread.join(30)
    agent.close()
    assert fake.committed and result["uploads_acked"] >= 1 and result["steps"] >= 5
    report = (tmp_path / "w" / "report.json").read_text()
    assert '"cluster": "c0"' in report and 0.0 <= result["coverage"] <= 1.0
    kinds = {event["event"] for event in read_events(tmp_path / "w" / "events.jsonl")}
    assert {"profiled", "assigned", "staged", "upload_acked"} <= kinds
    assert (tmp_path / "w" / "checkpoint.pt").exists()


def test_updates_of_an_older_assignment_never_go_up(satellite: tuple[FakeSatellite, str], tmp_path: Path) -> None:
    """After a re-assignment the uplink drops what was staged (or cut mid-upload) under the old version."""
    from ground_node.federation.uplink import Uplink
    from ground_node.records import Assignment

    fake, target = satellite
    box = Outbox(tmp_path)
    stale = box.stage({"expert/0/0/gate_up_proj": np.ones(4, np.float32)}, 1, 10)
    assert box.mark_inflight(stale)  # as if a pass had started to push it
    aff = Affinity(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32), 1)
    up = Uplink(target, "c0", FixedLink(), box, 2, 10, aff)
    up.assignment = Assignment(2, {0: (1,)})
    assert up.upload(stale) is False
    assert not [n for n, _ in fake.calls if n in ("OfferUpdate", "PushChunksWindowed")]
    assert up.rejected(stale.content_hash) and box._state["inflight"] is None
    fresh = box.stage({"expert/0/1/gate_up_proj": np.ones(4, np.float32)}, 2, 20)
    assert box.pending() == fresh and not stale.path.exists()
    up.stop()
