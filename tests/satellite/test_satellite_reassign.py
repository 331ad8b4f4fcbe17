"""Re-assignment on request with hand-over and history; Prometheus metrics; version retention and collection."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import load as st_load

from protos.wire import ExpertKey, chunk_hashes, sha256_hex, split_chunks
from satellite_node import export
from satellite_node.manifest import load_manifest
from satellite_node.metrics import Metrics
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.server import make_server
from satellite_node.store import Store
from satellite_node.testing import Client, FakeLinks, encode, expert_update, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer
from satellite_node.validate import specs_of
from testbed.broker import free_port

CHUNK = 256


def offer_of(tensors: dict[str, np.ndarray]) -> tuple[Offer, bytes]:
    blob = encode(tensors)
    specs = tuple(specs_of(tensors))
    return Offer(sha256_hex(blob), len(blob), CHUNK, tuple(chunk_hashes(blob, CHUNK)), specs, 1), blob


def chunks_of(blob: bytes) -> list[ChunkIn]:
    return [ChunkIn(sha256_hex(blob), i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, CHUNK))]


PREF = np.array([[0.4, 0.3, 0.2, 0.1]] * 2, dtype=np.float32)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, SatelliteNode, Metrics]]:
    base = write_tiny_base(tmp_path / "base")
    metrics = Metrics()
    store = Store(tmp_path / "state")
    node = SatelliteNode(
        store, load_manifest(base), str(base), NodeConfig({"c0": 2, "c1": 2}), FakeLinks(), None, metrics
    )
    server, port = make_server(node, "127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", node, metrics
    server.stop(0)
    store.close()


def upload(
    client: Client, base: Path, experts: list[tuple[int, int]], version: int, seed: int
) -> dict[str, np.ndarray]:
    tensors = expert_update(base, experts, seed=seed)
    blob = encode(tensors)
    reply = client.offer(blob, tensors, version, CHUNK)
    assert client.push(blob, list(reply.missing), CHUNK).committed
    return tensors


def _joined(target: str) -> tuple[Client, Client]:
    """Clients of c0 and c1, joined with two experts each; c0 prefers `PREF`, c1 the opposite."""
    c0, c1 = Client(target, "c0"), Client(target, "c1")
    for client, pref in ((c0, PREF), (c1, PREF[:, ::-1].copy())):
        client.join(2, 100)
        client.report(pref)
    return c0, c1


def test_reassignment_hands_over_newest_parameters(served: tuple[str, SatelliteNode, Metrics]) -> None:
    target, node, _ = served
    base = Path(node.base_dir)
    c0, c1 = _joined(target)
    assert c0.assignment().version == 1 and not c0.assignment().handed_over
    theirs = upload(c1, base, [(0, 2), (0, 3), (1, 2), (1, 3)], 1, seed=3)
    upload(c1, base, [(0, 2), (0, 3), (1, 2), (1, 3)], 1, seed=4)  # version 2 of c1's experts
    # the data of the clusters drifted: they swap preferences, re-profile and c0 asks for a new assignment
    c0.report(PREF[:, ::-1].copy())
    c1.report(PREF)
    reply = c0.reassign("re-profiled after drift")
    assert reply.version == 2 and [list(x.experts) for x in reply.layers] == [[2, 3], [2, 3]]
    assert sorted((v.layer, v.expert, v.version, v.owner) for v in reply.handed_over) == [
        (0, 2, 2, "c1"),
        (0, 3, 2, "c1"),
        (1, 2, 2, "c1"),
        (1, 3, 2, "c1"),
    ]
    assert len(c0.assignment().handed_over) == 4  # GetAssignment repeats the hand-over of the current version
    # the new owner continues from the handed-over parameters (never from the base)
    pulled = st_load(c0.pull(["expert/0/2/"]))
    newest = expert_update(base, [(0, 2), (0, 3), (1, 2), (1, 3)], seed=4)
    for name, array in newest.items():
        if name.startswith("expert/0/2/"):
            np.testing.assert_array_equal(pulled[name], array)
    assert not np.array_equal(pulled["expert/0/2/down_proj.lora_A"], theirs["expert/0/2/down_proj.lora_A"])
    # updates made under version 1 are refused, ownership follows version 2
    tensors = expert_update(base, [(0, 2)], seed=9)
    with pytest.raises(grpc.RpcError) as info:
        c0.offer(encode(tensors), tensors, 1, CHUNK)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        c1.offer(encode(tensors), tensors, 2, CHUNK)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    upload(c0, base, [(0, 2), (0, 3), (1, 2), (1, 3)], 2, seed=5)
    assert node.store.current_version(ExpertKey(0, 2)) == 3
    history = c1.status().assignment_history
    assert [(a.version, a.reason, a.requested_by) for a in history] == [
        (1, "initial", ""),
        (2, "re-profiled after drift", "c0"),
    ]
    assert (node.store.owners(1) or {})[(0, 2)] == "c1"  # past versions stay on record
    for client in (c0, c1):
        client.close()


def test_metrics(served: tuple[str, SatelliteNode, Metrics]) -> None:
    target, node, metrics = served
    base = Path(node.base_dir)
    c0, c1 = _joined(target)
    tensors = upload(c0, base, [(0, 0), (1, 1)], 1, seed=1)
    blob = encode(tensors)
    c0.push(blob, [0, 1], CHUNK)  # already committed: answered from the record, nothing stored
    other = expert_update(base, [(0, 0)], seed=2)
    with pytest.raises(grpc.RpcError):
        c1.offer(encode(other), other, 1, CHUNK)
    upload(c0, base, [(0, 1)], 1, seed=3)
    assert metrics.sample("emsfl_satellite_uploads_committed_total", {"cluster": "c0"}) == 2
    assert metrics.sample("emsfl_satellite_bytes_received_total", {"cluster": "c0"}) > len(blob)
    assert (
        metrics.sample("emsfl_satellite_refusals_total", {"code": "PERMISSION_DENIED", "reason": "permission_denied"})
        == 1
    )
    assert metrics.sample("emsfl_satellite_expert_version", {"layer": "0", "expert": "0"}) == 1
    assert metrics.sample("emsfl_satellite_assignment_version") == 1
    metrics.refresh_store(node.store)
    assert metrics.sample("emsfl_satellite_store_bytes") > 0
    port = free_port()
    metrics.serve(port, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "emsfl_satellite_chunks_received_total" in text and "emsfl_satellite_update_staleness" in text
    for client in (c0, c1):
        client.close()


def test_keep_versions_and_collection(tmp_path: Path) -> None:
    base = write_tiny_base(tmp_path / "base")
    links = FakeLinks()
    store = Store(tmp_path / "state", keep_versions=2)
    node = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 4, "c1": 4}), links)
    for c in ("c0", "c1"):
        node.join(c, "d", 4, 1)
        node.report_affinity(c, 1, 2, 4, np.ones(8) if c == "c0" else np.zeros(8), [])
    for seed in range(1, 5):
        offer, blob = offer_of(expert_update(base, [(0, 0)], seed=seed))
        node.uploads.offer("c0", offer)
        assert node.uploads.push("c0", chunks_of(blob)).committed
    rows = store._rows("SELECT version FROM expert_versions WHERE layer=0 AND expert=0 ORDER BY version")
    assert [r[0] for r in rows] == [3, 4]
    store.settle()  # pruned blobs are deleted off the commit path
    assert len(list(store.blobs.iterdir())) == 2  # the blobs of versions 1 and 2 were collected
    assert len(export.commits(tmp_path / "state")) == 4  # the commit history stays
    store.check_integrity()
    # an abandoned half upload is collected after its time to live; a crash leftover at the next open
    offer, blob = offer_of(expert_update(base, [(0, 0)], seed=9))
    node.uploads.offer("c0", offer)
    node.uploads.push("c0", chunks_of(blob)[:1])
    assert store.drop_stale_uploads(older_than_wall=0.0) == []
    assert store.drop_stale_uploads(older_than_wall=1e12) == [offer.content_hash]
    (store.blobs / ("ab" * 32 + ".safetensors")).write_bytes(b"orphan")
    with pytest.raises(AssertionError):
        store.check_integrity()
    store.close()
    with Store(tmp_path / "state", keep_versions=2) as reopened:
        reopened.check_integrity()
        assert reopened.uploads_in_flight() == 0
