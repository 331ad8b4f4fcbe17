"""A hard cut leaves a PushChunks stream hanging on the satellite (its handler has not seen the cut): the client's
re-offer or new stream takes over, what the old stream wrote is verified and kept, and the old stream, when it
finally ends or sends more, changes nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from protos.wire import chunk_hashes, sha256_hex, split_chunks
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import Store
from satellite_node.testing import FakeLinks, encode, expert_update, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer
from satellite_node.validate import Refusal, RefusalCode, specs_of

CHUNK = 512


class StreamCut(Exception):
    """What the gRPC request iterator raises when the connection finally turns out dead."""


class HangingStream:
    """Chunks of a push; after `stop_at` of them it hangs (a dead TCP connection) until `release()`, then raises
    StreamCut or, with `more`, delivers the rest first (a connection that came back)."""

    def __init__(self, chunks: list[ChunkIn], stop_at: int, more: bool = False) -> None:
        self.chunks, self.stop_at, self.more = chunks, stop_at, more
        self.hanging = threading.Event()
        self._release = threading.Event()

    def release(self) -> None:
        self._release.set()

    def __iter__(self) -> Iterator[ChunkIn]:
        yield from self.chunks[: self.stop_at]
        self.hanging.set()
        self._release.wait(30)
        if self.more:
            yield from self.chunks[self.stop_at :]
        raise StreamCut


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[SatelliteNode, Path]]:
    base = write_tiny_base(tmp_path / "base", hidden=32, inter=32, rank=8)
    store = Store(tmp_path / "state")
    sat = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 8}), FakeLinks())
    sat.join("c0", "d", 8, 100)
    sat.report_affinity("c0", 10, 2, 4, np.ones(8), [])
    yield sat, base
    store.close()


def _upload(base: Path, seed: int) -> tuple[Offer, bytes, list[ChunkIn]]:
    tensors = expert_update(base, [(0, 0), (0, 1), (1, 2)], seed=seed)
    blob = encode(tensors)
    h = sha256_hex(blob)
    offer = Offer(h, len(blob), CHUNK, tuple(chunk_hashes(blob, CHUNK)), tuple(specs_of(tensors)), 1)
    chunks = [ChunkIn(h, i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, CHUNK))]
    return offer, blob, chunks


def _run(target: Callable[..., object], *args: object) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target(*args)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("resumed", [False, True], ids=["fresh", "resumed"])
def test_reoffer_takes_over_a_hanging_stream(node: tuple[SatelliteNode, Path], resumed: bool) -> None:
    sat, base = node
    offer, blob, chunks = _upload(base, seed=3)
    n = len(chunks)
    assert n >= 8
    assert sat.uploads.offer("c0", offer) == (False, list(range(n)))
    first = 0
    if resumed:  # a stream that does not start at chunk 0 verifies chunk by chunk (not deferred)
        assert not sat.uploads.push("c0", chunks[:2]).committed
        first = 2
    zombie = HangingStream(chunks[first:], stop_at=3)
    thread, errors = _run(sat.uploads.push, "c0", zombie)
    assert zombie.hanging.wait(10)
    # the client saw the cut and offers again: the zombie's chunks are verified and kept, only the rest is missing
    committed, missing = sat.uploads.offer("c0", offer)
    assert not committed
    assert missing == list(range(first + 3, n))
    assert sat.uploads.push("c0", [chunks[i] for i in missing]).committed
    zombie.release()
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], StreamCut)
    sat.store.check_integrity()
    assert [c["content_hash"] for c in sat.store.commits()] == [offer.content_hash]
    assert sat.store.read_blob(offer.content_hash) == blob


def test_new_stream_takes_over_and_the_old_one_cannot_write(node: tuple[SatelliteNode, Path]) -> None:
    sat, base = node
    offer, blob, chunks = _upload(base, seed=4)
    sat.uploads.offer("c0", offer)
    # the old connection comes back after the new stream took over: what it still sends is refused, not written
    tampered = [ChunkIn(c.content_hash, c.index, bytes(len(c.data)), c.sha256) for c in chunks]
    zombie = HangingStream(chunks[:4] + tampered[4:], stop_at=4, more=True)
    thread, errors = _run(sat.uploads.push, "c0", zombie)
    assert zombie.hanging.wait(10)
    result = sat.uploads.push("c0", chunks[4:])  # a new stream, without a re-offer
    assert result.committed
    zombie.release()
    thread.join(10)
    assert len(errors) == 1
    assert isinstance(errors[0], Refusal) and errors[0].code == RefusalCode.ABORTED
    sat.store.check_integrity()
    assert sat.store.read_blob(offer.content_hash) == blob


def test_chunks_of_a_committed_upload_are_not_recorded(node: tuple[SatelliteNode, Path]) -> None:
    sat, base = node
    offer, _, chunks = _upload(base, seed=5)
    sat.uploads.offer("c0", offer)
    assert sat.uploads.push("c0", chunks).committed
    sat.store._record_chunks(offer.content_hash, [0, 1])  # a late writer of the committed update
    assert sat.store.received_chunks(offer.content_hash) == set()
    sat.store.check_integrity()
