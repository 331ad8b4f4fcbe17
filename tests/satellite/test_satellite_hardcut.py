"""A hard cut in the middle of an upload (a TCP proxy that stops forwarding and closes nothing, as when a link
drops) against the satellite as a real process: with PushChunksWindowed and a window of W chunks, the re-offer at
the next contact lists at most W chunks that were already sent, and the upload then completes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from emsfl.runtime.client import push_windowed
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import chunk_messages
from satellite_node.testing import (
    Client,
    CutProxy,
    OrbitStub,
    SatelliteProcess,
    encode,
    expert_update,
    wait_until,
    write_tiny_base,
)
from testbed.broker import BrokerProcess, free_port
from tests.helpers import satellite_topology

CHUNK = 2048
UPLOAD_S = 4.0  # the proxy's rate makes the whole upload last about this long
TOPOLOGY = satellite_topology("hardcut", {"c0": 4})

pytestmark = pytest.mark.slow


@pytest.fixture
def satellite(broker: BrokerProcess, tmp_path: Path) -> Iterator[SatelliteProcess]:
    base = write_tiny_base(tmp_path / "base", hidden=64, inter=64, rank=8)
    sat = SatelliteProcess(tmp_path / "sat", (broker.host, broker.port), TOPOLOGY, free_port(), base=base)
    orbit = OrbitStub(broker.host, broker.port).start()
    orbit.set_link("c0", True)
    sat.start()
    try:
        yield sat
    finally:
        sat.kill()
        orbit.stop()


@pytest.mark.parametrize("window", [1, 4])
def test_hard_cut_resends_at_most_the_window(satellite: SatelliteProcess, window: int) -> None:
    direct = Client(satellite.target, "c0")
    wait_until("the link gate opens", direct.link_up, 30)
    direct.join(4, 100)
    direct.report(np.ones((2, 4), dtype=np.float32))
    assert direct.assignment().ready
    tensors = expert_update(satellite.base, [(la, e) for la in range(2) for e in range(4)], seed=1)
    blob = encode(tensors)
    total = -(-len(blob) // CHUNK)
    assert total >= 32
    assert list(direct.offer(blob, tensors, 1, CHUNK).missing) == list(range(total))

    proxy = CutProxy(("127.0.0.1", satellite.port), rate_Bps=len(blob) / UPLOAD_S)
    via = Client(f"127.0.0.1:{proxy.port}", "c0")
    sent: list[int] = []

    def messages() -> Iterator[pb.Chunk]:
        for message in chunk_messages(blob, list(range(total)), CHUNK):
            sent.append(message.index)
            yield message

    def cut_half_way() -> None:
        wait_until("half the upload passes the proxy", lambda: proxy.upstream_bytes >= len(blob) // 2, 30)
        proxy.cut()

    cutter = threading.Thread(target=cut_half_way, daemon=True)
    cutter.start()
    try:
        with pytest.raises(grpc.RpcError):  # no keepalive on this channel: the deadline ends the hanging call
            push_windowed(via.stub.PushChunksWindowed, messages(), window, metadata=via.md, timeout=UPLOAD_S + 4)
        cutter.join(5)
        assert sent and len(sent) < total, "the cut must fall in the middle of the upload"

        # the next contact: the re-offer takes over the hanging stream and lists only what never arrived
        missing = list(direct.offer(blob, tensors, 1, CHUNK).missing)
        resent = sorted(set(missing) & set(sent))
        assert set(range(len(sent), total)) <= set(missing)
        assert len(resent) <= window, f"{len(resent)} chunks sent before the cut must go again: {resent}"
        reply = direct.push_windowed(blob, missing, CHUNK, window=window)
        assert reply.committed
        assert sorted((v.layer, v.expert) for v in reply.versions) == [(la, e) for la in range(2) for e in range(4)]
    finally:
        via.close()
        direct.close()
        proxy.close()


def test_windowed_push_refuses_bad_chunks_like_pushchunks(satellite: SatelliteProcess) -> None:
    direct = Client(satellite.target, "c0")
    wait_until("the link gate opens", direct.link_up, 30)
    direct.join(4, 100)
    direct.report(np.ones((2, 4), dtype=np.float32))
    tensors = expert_update(satellite.base, [(0, 0)], seed=2)
    blob = encode(tensors)
    total = len(direct.offer(blob, tensors, 1, CHUNK).missing)
    (bad,) = chunk_messages(blob, [0], CHUNK)
    bad.sha256 = "0" * 64
    try:
        with pytest.raises(grpc.RpcError) as info:
            push_windowed(direct.stub.PushChunksWindowed, [bad], 1, metadata=direct.md, timeout=20)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "chunk 0" in (info.value.details() or "") and "SHA-256" in (info.value.details() or "")
        assert len(direct.offer(blob, tensors, 1, CHUNK).missing) == total  # nothing was kept
    finally:
        direct.close()
