"""FedAvg and FedAsync behind the strategy interface, driven in-process (ARCHITECTURE §4.5, docs/STRATEGIES.md)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from protos.wire import chunk_hashes, sha256_hex, split_chunks
from satellite_node import export
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import Store
from satellite_node.strategy import FedAsyncStrategy
from satellite_node.testing import FakeLinks, encode, expert_update, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer, PushResult
from satellite_node.validate import Refusal, RefusalCode, specs_of

CHUNK = 512
ALL = [(layer, e) for layer in range(2) for e in range(4)]
EXAMPLES = {"c0": 100, "c1": 300, "c2": 600}


def make(tmp: Path, strategy: str, options: dict[str, Any] | None = None) -> tuple[SatelliteNode, FakeLinks, Path]:
    base = write_tiny_base(tmp / "base")
    links = FakeLinks()
    config = NodeConfig({c: 2 for c in EXAMPLES}, strategy, strategy_options=options or {})
    node = SatelliteNode(Store(tmp / "state"), load_manifest(base), str(base), config, links)
    for c, n in EXAMPLES.items():
        node.join(c, "d", 2, n)
    node.tick()
    return node, links, base


def upload(node: SatelliteNode, cluster: str, tensors: dict[str, np.ndarray], base_version: int) -> PushResult:
    blob = encode(tensors)
    h = sha256_hex(blob)
    offer = Offer(h, len(blob), CHUNK, tuple(chunk_hashes(blob, CHUNK)), tuple(specs_of(tensors)), 0, 0, base_version)
    committed, _ = node.uploads.offer(cluster, offer)
    assert not committed
    return node.uploads.push(
        cluster, [ChunkIn(h, i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, CHUNK))]
    )


def code(call: Any) -> RefusalCode:
    with pytest.raises(Refusal) as info:
        call()
    return info.value.code


@pytest.fixture
def fedavg(tmp_path: Path) -> Iterator[tuple[SatelliteNode, FakeLinks, Path]]:
    node, links, base = make(tmp_path, "fedavg", {"quorum": 2, "round_deadline_s": 600})
    yield node, links, base
    node.store.close()


def test_fedavg_round_closes_when_all_uploaded(fedavg: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    node, _, base = fedavg
    updates = {c: expert_update(base, ALL, seed=i + 1) for i, c in enumerate(EXAMPLES)}
    assert node.global_version() == 0 and node.status()["global_version"] == 0
    # ownership plays no part, but the whole model must come up
    assert code(lambda: upload(node, "c0", expert_update(base, [(0, 0)]), 0)) == RefusalCode.INVALID_ARGUMENT
    assert upload(node, "c0", updates["c0"], 0).versions == []  # buffered: the round is still open
    assert code(lambda: upload(node, "c0", expert_update(base, ALL, seed=9), 0)) == RefusalCode.FAILED_PRECONDITION
    assert code(lambda: upload(node, "c1", updates["c1"], 1)) == RefusalCode.FAILED_PRECONDITION  # future round
    assert node.status()["round_uploaded"] == ["c0"]
    assert upload(node, "c1", updates["c1"], 0).versions == []
    closing = upload(node, "c2", updates["c2"], 0)
    assert {(v.layer, v.expert, v.version, v.owner) for v in closing.versions} == {(*k, 1, "fedavg") for k in ALL}
    assert node.global_version() == 1 and node.status()["round_uploaded"] == []
    # the example-weighted average is the new model, pulled by everyone
    pulled = st_load(b"".join(bytes(c) for c in node.pull(["expert/"]).chunks))
    for name in updates["c0"]:
        want = sum(EXAMPLES[c] * updates[c][name].astype(np.float64) for c in EXAMPLES) / sum(EXAMPLES.values())
        np.testing.assert_allclose(pulled[name], want, rtol=1e-6)
    # a late upload for round 0 is refused; round 1 trains from version 1
    assert code(lambda: upload(node, "c0", expert_update(base, ALL, seed=7), 0)) == RefusalCode.FAILED_PRECONDITION
    assert upload(node, "c0", expert_update(base, ALL, seed=7), 1).versions == []
    assert [c["experts"] for c in export.commits(node.store.dir)][:2] == [[], []]
    node.store.check_integrity()


def test_fedavg_quorum_before_deadline(fedavg: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    node, links, base = fedavg
    upload(node, "c0", expert_update(base, ALL, seed=1), 0)
    links.now += timedelta(seconds=700)
    node.tick()
    assert node.global_version() == 0  # deadline passed but only 1 of quorum 2
    result = upload(node, "c1", expert_update(base, ALL, seed=2), 0)  # quorum reached after the deadline: closes
    assert node.global_version() == 1 and len(result.versions) == len(ALL)
    upload(node, "c2", expert_update(base, ALL, seed=3), 1)
    upload(node, "c0", expert_update(base, ALL, seed=4), 1)
    node.tick()
    assert node.global_version() == 1  # quorum, but the deadline of round 1 has not passed yet
    links.now += timedelta(seconds=601)
    node.tick()  # closed by the deadline alone, no upload involved
    assert node.global_version() == 2
    newest = node.store.newest_versions()
    assert {r.version for r in newest.values()} == {2}
    node.store.check_integrity()


def test_fedasync_mixing_and_staleness(tmp_path: Path) -> None:
    node, _, base = make(tmp_path, "fedasync", {"alpha": 0.6, "b": 1.0})
    first, second, third = (expert_update(base, ALL, seed=s) for s in (1, 2, 3))
    upload(node, "c0", first, 0)  # LoRA factors are not in the base: the first upload initialises them
    assert node.global_version() == 1
    upload(node, "c1", second, 1)  # fresh: a = 0.6
    upload(node, "c2", third, 1)  # one version stale: a = 0.6 / 2
    assert node.global_version() == 3
    glob = export.global_tensors(node.store.dir, base)
    for name in first:
        x = first[name].astype(np.float64)
        x = 0.4 * x + 0.6 * second[name]
        x = 0.7 * x + 0.3 * third[name]
        np.testing.assert_allclose(glob[name], x, rtol=1e-5, atol=1e-6)
    assert code(lambda: upload(node, "c0", expert_update(base, ALL, seed=8), 9)) == RefusalCode.FAILED_PRECONDITION
    assert FedAsyncStrategy(0.5, 0.5).mixing_weight(3) == pytest.approx(0.25)
    status = node.status()
    assert status["strategy"] == "fedasync" and status["global_version"] == 3
    node.store.check_integrity()
    node.store.close()


def test_emsfl_refuses_reassignment_for_whole_model_strategies(tmp_path: Path) -> None:
    node, _, _ = make(tmp_path, "fedasync")
    assert code(lambda: node.reassign("c0", "")) == RefusalCode.FAILED_PRECONDITION
    node.store.close()
