"""Validation before acknowledgement: each bad update gets its status code and changes no state."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from protos.wire import chunk_hashes, sha256_hex, split_chunks
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import DB_FILE, Store
from satellite_node.testing import FakeLinks, encode, expert_update, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer
from satellite_node.validate import Refusal, RefusalCode, specs_of, validate_update

CHUNK = 256


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[SatelliteNode, FakeLinks, Path]]:
    base = write_tiny_base(tmp_path / "base")
    links = FakeLinks()
    store = Store(tmp_path / "state")
    node = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 2, "c1": 2}), links)
    node.join("c0", "d", 2, 100)
    node.join("c1", "d", 2, 100)
    # c0 prefers experts 0 and 1, c1 prefers 2 and 3, in both layers
    pref = np.array([[0.4, 0.3, 0.2, 0.1]] * 2)
    node.report_affinity("c0", 10, 2, 4, pref.ravel(), [])
    node.report_affinity("c1", 10, 2, 4, pref[:, ::-1].ravel(), [])
    assert node.assignment_for("c0") == (True, 1, [[0, 1], [0, 1]])
    yield node, links, base
    store.close()


def offer_of(tensors: dict[str, np.ndarray], version: int = 1) -> tuple[Offer, bytes]:
    blob = encode(tensors)
    offer = Offer(
        sha256_hex(blob), len(blob), CHUNK, tuple(chunk_hashes(blob, CHUNK)), tuple(specs_of(tensors)), version
    )
    return offer, blob


def push_all(node: SatelliteNode, cluster: str, blob: bytes) -> object:
    h = sha256_hex(blob)
    chunks = [ChunkIn(h, i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, CHUNK))]
    return node.uploads.push(cluster, chunks)


def dump(state: Path) -> list[str]:
    with sqlite3.connect(state / DB_FILE) as db:
        return list(db.iterdump())


def files(state: Path) -> list[str]:
    return sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file() and not p.name.startswith(DB_FILE))


Mutation = Callable[[dict[str, np.ndarray], Path], dict[str, np.ndarray]]


def _set(name: str, value: np.ndarray) -> Mutation:
    return lambda t, base: {**t, name: value}


def _drop(name: str) -> Mutation:
    return lambda t, base: {n: a for n, a in t.items() if n != name}


def _invalid(case: str, name: str, value: np.ndarray) -> tuple[str, Mutation, int, RefusalCode]:
    """A case whose update holds `value` under `name`: refused as an invalid argument."""
    return case, _set(name, value), 1, RefusalCode.INVALID_ARGUMENT


# (case, mutation of a valid c0 update of experts (0,0) and (1,1), offered version, expected code)
OFFER_CASES: list[tuple[str, Mutation, int, RefusalCode]] = [
    _invalid("wrong shape", "expert/0/0/down_proj.lora_A", np.zeros((3, 6), np.float32)),
    _invalid("wrong dtype", "expert/0/0/down_proj.lora_A", np.zeros((2, 6), np.float64)),
    _invalid("unknown name", "shared/embed_tokens.weight", np.zeros((16, 8), np.float32)),
    _invalid("unknown part", "expert/0/0/up_proj.lora_A", np.zeros((2, 8), np.float32)),
    _invalid("layer out of range", "expert/5/0/down_proj.lora_A", np.zeros((2, 6), np.float32)),
    ("missing part", _drop("expert/1/1/gate_up_proj.lora_B"), 1, RefusalCode.INVALID_ARGUMENT),
    (
        "foreign expert",
        lambda t, base: {**t, **expert_update(base, [(0, 2)], seed=9)},
        1,
        RefusalCode.PERMISSION_DENIED,
    ),
    ("stale assignment version", lambda t, base: t, 0, RefusalCode.FAILED_PRECONDITION),
    ("future assignment version", lambda t, base: t, 2, RefusalCode.FAILED_PRECONDITION),
]


@pytest.mark.parametrize(("case", "mutate", "version", "code"), OFFER_CASES, ids=[c[0] for c in OFFER_CASES])
def test_offer_refusals(
    setup: tuple[SatelliteNode, FakeLinks, Path], case: str, mutate: Mutation, version: int, code: RefusalCode
) -> None:
    node, _, base = setup
    tensors = mutate(expert_update(base, [(0, 0), (1, 1)]), base)
    offer, _ = offer_of(tensors, version)
    before, before_files = dump(node.store.dir), files(node.store.dir)
    with pytest.raises(Refusal) as info:
        node.uploads.offer("c0", offer)
    assert info.value.code == code, info.value.message
    assert dump(node.store.dir) == before and files(node.store.dir) == before_files
    # the pure check agrees with what the offer path said
    with pytest.raises(Refusal) as pure:
        validate_update(node.manifest, tensors, "c0", node.store.owners(), version, 1)
    assert pure.value.code == code


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_refused_at_commit(setup: tuple[SatelliteNode, FakeLinks, Path], bad: float) -> None:
    node, _, base = setup
    tensors = expert_update(base, [(0, 0)])
    tensors["expert/0/0/down_proj.lora_B"][1, 1] = bad
    offer, blob = offer_of(tensors)
    node.uploads.offer("c0", offer)  # the tensor list itself is fine
    versions = node.store.newest_versions()
    with pytest.raises(Refusal) as info:
        push_all(node, "c0", blob)
    assert info.value.code == RefusalCode.INVALID_ARGUMENT
    assert "expert/0/0/down_proj.lora_B" in info.value.message
    assert node.store.newest_versions() == versions and node.store.commits() == []
    assert not any(node.store.blobs.iterdir())


def test_lying_blob_refused(setup: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    """A blob whose tensors differ from the offered list (here: a foreign expert smuggled in) is refused."""
    node, _, base = setup
    honest = expert_update(base, [(0, 0)])
    offer, _ = offer_of(honest)
    smuggled = encode({**honest, **expert_update(base, [(0, 3)])})
    lying = Offer(sha256_hex(smuggled), len(smuggled), CHUNK, tuple(chunk_hashes(smuggled, CHUNK)), offer.tensors, 1)
    node.uploads.offer("c0", lying)
    with pytest.raises(Refusal) as info:
        push_all(node, "c0", smuggled)
    assert info.value.code == RefusalCode.INVALID_ARGUMENT
    assert node.store.commits() == []


def test_bad_chunks(setup: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    node, _, base = setup
    offer, blob = offer_of(expert_update(base, [(0, 0)]))
    node.uploads.offer("c0", offer)
    h = offer.content_hash
    data = blob[:CHUNK]
    for chunk in (
        ChunkIn(h, 0, data, "0" * 64),  # wrong sha
        ChunkIn(h, 99, data, sha256_hex(data)),  # index out of range
        ChunkIn(h, 1, data, sha256_hex(data)),  # content of another chunk
    ):
        with pytest.raises(Refusal) as info:
            node.uploads.push("c0", [chunk])
        assert info.value.code == RefusalCode.INVALID_ARGUMENT
    assert node.store.received_chunks(h) == set()
    with pytest.raises(Refusal) as info:
        node.uploads.push("c1", [ChunkIn(h, 0, data, sha256_hex(data))])
    assert info.value.code == RefusalCode.PERMISSION_DENIED
    with pytest.raises(Refusal) as info:
        node.uploads.push("c0", [ChunkIn("ab" * 32, 0, data, sha256_hex(data))])
    assert info.value.code == RefusalCode.FAILED_PRECONDITION


def test_gate_and_identity(setup: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    node, links, base = setup
    with pytest.raises(Refusal) as info:
        node.admit("c9")
    assert info.value.code == RefusalCode.PERMISSION_DENIED
    with pytest.raises(Refusal) as info:
        node.admit(None)
    assert info.value.code == RefusalCode.UNAUTHENTICATED
    assert node.admit("c0") == "c0"
    # the link drops after the last chunk arrived but before the commit: chunks stay, nothing commits
    offer, blob = offer_of(expert_update(base, [(0, 0)]))
    node.uploads.offer("c0", offer)
    h = offer.content_hash
    chunks = [ChunkIn(h, i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, CHUNK))]

    def cut_after_last() -> Iterator[ChunkIn]:
        yield from chunks
        links.down.add("c0")

    with pytest.raises(Refusal) as info:
        node.uploads.push("c0", cut_after_last())
    assert info.value.code == RefusalCode.UNAVAILABLE
    assert node.store.commits() == []
    assert node.store.received_chunks(h) == set(range(len(chunks)))
    links.down.clear()
    assert node.uploads.offer("c0", offer) == (True, [])  # all chunks were kept: the re-offer commits
    assert [c["content_hash"] for c in node.store.commits()] == [h]


def test_affinity_checks(setup: tuple[SatelliteNode, FakeLinks, Path]) -> None:
    node, _, _ = setup
    for gate, code in (
        ([0.1] * 7, RefusalCode.INVALID_ARGUMENT),
        ([0.1] * 7 + [float("nan")], RefusalCode.INVALID_ARGUMENT),
        ([0.1] * 7 + [-0.1], RefusalCode.INVALID_ARGUMENT),
        ([], RefusalCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(Refusal) as info:
            node.report_affinity("c0", 10, 2, 4, gate, [])
        assert info.value.code == code
    with pytest.raises(Refusal):
        node.report_affinity("c0", 10, 3, 4, [0.1] * 12, [])


@pytest.mark.parametrize("where", [0, 1_048_575, 1_048_576, 3_000_000 - 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_in_any_block(where: int, bad: float) -> None:
    from satellite_node.validate import all_finite

    array = np.ones(3_000_000, dtype=np.float32)
    assert all_finite(array) and all_finite(array.reshape(1000, 3000)) and all_finite(array[:0])
    array[where] = bad
    assert not all_finite(array) and not all_finite(array.reshape(1000, 3000))
