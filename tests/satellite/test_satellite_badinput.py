"""Bad input: a table of malformed requests, each refused with its status and no state change; and a property
test over random request sequences (offers, pushes, link drops, restarts): no acknowledged update is lost and no
cluster ever overwrites another's expert."""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos.wire import ExpertKey, chunk_hashes, sha256_hex, split_chunks
from satellite_node import export
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import DB_FILE, Store
from satellite_node.testing import FakeLinks, encode, expert_update, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer
from satellite_node.validate import Refusal, RefusalCode, Spec, specs_of

CHUNK = 256
MINE = [(0, 0), (1, 1)]  # c0 owns experts 0 and 1 of both layers; c1 owns 2 and 3


def new_node(state: Path, base: Path, links: FakeLinks) -> SatelliteNode:
    config = NodeConfig({"c0": 2, "c1": 2}, max_update_bytes=1 << 20)
    return SatelliteNode(Store(state), load_manifest(base), str(base), config, links)


def assign(node: SatelliteNode) -> None:
    pref = np.array([[0.4, 0.3, 0.2, 0.1]] * 2)
    for c, p in (("c0", pref), ("c1", pref[:, ::-1])):
        node.join(c, "d", 2, 100)
        node.report_affinity(c, 10, 2, 4, p.ravel(), [])


def offer_of(tensors: dict[str, np.ndarray], version: int = 1, blob: bytes | None = None) -> tuple[Offer, bytes]:
    blob = encode(tensors) if blob is None else blob
    specs = tuple(specs_of(tensors))
    return Offer(sha256_hex(blob), len(blob), CHUNK, tuple(chunk_hashes(blob, CHUNK)), specs, version), blob


def chunks_of(blob: bytes, indices: list[int] | None = None) -> list[ChunkIn]:
    h = sha256_hex(blob)
    parts = split_chunks(blob, CHUNK)
    return [ChunkIn(h, i, bytes(parts[i]), sha256_hex(parts[i])) for i in (indices or range(len(parts)))]


def snapshot(state: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Every row of the database and every file (with its hash) under the state directory."""
    with sqlite3.connect(state / DB_FILE) as db:
        rows = list(db.iterdump())
    files = sorted(
        (str(p.relative_to(state)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in state.rglob("*")
        if p.is_file() and not p.name.startswith(DB_FILE) and p.name != "events.jsonl"
    )
    return rows, files


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[SatelliteNode, FakeLinks, Path]]:
    base = write_tiny_base(tmp_path / "base")
    links = FakeLinks()
    node = new_node(tmp_path / "state", base, links)
    assign(node)
    # some state to disturb: one committed update and one half-received upload of c0
    committed, blob = offer_of(expert_update(base, MINE, seed=1))
    node.uploads.offer("c0", committed)
    assert node.uploads.push("c0", chunks_of(blob)).committed
    half, blob2 = offer_of(expert_update(base, MINE, seed=2))
    node.uploads.offer("c0", half)
    node.uploads.push("c0", chunks_of(blob2, [0, 1]))
    yield node, links, base
    node.store.close()


Env = tuple[SatelliteNode, FakeLinks, Path]
# a case prepares (possibly changing state, e.g. a valid offer) and returns the refused action
Case = Callable[[Env], Callable[[], object]]


def _offer(mutate: Callable[[dict[str, np.ndarray], Path], dict[str, np.ndarray]], version: int = 1) -> Case:
    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        offer, _ = offer_of(mutate(expert_update(base, MINE, seed=5), base), version)
        return lambda: node.uploads.offer("c0", offer)

    return prepare


def _raw_offer(change: Callable[[Offer], Offer]) -> Case:
    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        offer, _ = offer_of(expert_update(base, MINE, seed=5))
        return lambda: node.uploads.offer("c0", change(offer))

    return prepare


def _commit_of(
    tensors_of: Callable[[Path], dict[str, np.ndarray]], blob_of: Callable[[bytes, Path], bytes] | None = None
) -> Case:
    """The offer passes; the full push is refused at commit and must leave the state as after the offer."""

    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        tensors = tensors_of(base)
        blob = encode(tensors)
        if blob_of is not None:
            blob = blob_of(blob, base)
        offer, _ = offer_of(tensors, blob=blob)
        node.uploads.offer("c0", offer)
        return lambda: node.uploads.push("c0", chunks_of(blob))

    return prepare


def _chunk(change: Callable[[ChunkIn, bytes], ChunkIn]) -> Case:
    """A chunk of the half-received upload, made bad."""

    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        blob = encode(expert_update(base, MINE, seed=2))
        good = chunks_of(blob, [2])[0]
        return lambda: node.uploads.push("c0", [change(good, blob)])

    return prepare


def _corrupt_stream(cut: bool) -> Case:
    """A fresh upload streamed from chunk 0 in order (its data verified only by the running content hash) with one
    chunk's bytes flipped but its declared hash kept; `cut`: the stream stops right after the bad chunk."""

    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        offer, blob = offer_of(expert_update(base, MINE, seed=11))
        node.uploads.offer("c0", offer)
        chunks = chunks_of(blob)
        bad = replace(chunks[3], data=bytes([chunks[3].data[0] ^ 1]) + chunks[3].data[1:])
        stream = [*chunks[:3], bad] if cut else [*chunks[:3], bad, *chunks[4:]]
        if cut:  # the three good chunks are kept: snapshot after a clean push of them
            node.uploads.push("c0", chunks[:3])
            stream = [bad]
        return lambda: node.uploads.push("c0", stream)

    return prepare


def _fresh_chunk(change: Callable[[ChunkIn], ChunkIn]) -> Case:
    """The first chunk of a freshly offered upload, made bad: not even its folder may appear."""

    def prepare(env: Env) -> Callable[[], object]:
        node, _, base = env
        offer, blob = offer_of(expert_update(base, MINE, seed=13))
        node.uploads.offer("c0", offer)
        return lambda: node.uploads.push("c0", [change(chunks_of(blob, [0])[0])])

    return prepare


def _nan(base: Path) -> dict[str, np.ndarray]:
    t = expert_update(base, MINE, seed=6)
    t["expert/0/0/down_proj.lora_A"][0, 0] = np.nan
    return t


def _inf(base: Path) -> dict[str, np.ndarray]:
    t = expert_update(base, MINE, seed=6)
    t["expert/1/1/gate_up_proj.lora_B"][1, 0] = np.inf
    return t


INVALID, DENIED, STALE = (
    RefusalCode.INVALID_ARGUMENT,
    RefusalCode.PERMISSION_DENIED,
    RefusalCode.FAILED_PRECONDITION,
)
CASES: list[tuple[str, Case, RefusalCode]] = [
    ("wrong shape", _offer(lambda t, b: {**t, "expert/0/0/down_proj.lora_A": np.zeros((3, 6), np.float32)}), INVALID),
    ("wrong dtype", _offer(lambda t, b: {**t, "expert/0/0/down_proj.lora_A": np.zeros((2, 6), np.float16)}), INVALID),
    ("NaN", _commit_of(_nan), INVALID),
    ("Inf", _commit_of(_inf), INVALID),
    ("unknown name", _offer(lambda t, b: {**t, "shared/lm_head.weight": np.zeros((2, 2), np.float32)}), INVALID),
    ("bad name syntax", _offer(lambda t, b: {**t, "expert/0/x/down_proj": np.zeros(1, np.float32)}), INVALID),
    ("expert out of range", _offer(lambda t, b: {**t, **expert_update(b, [(0, 9)])}), INVALID),
    ("foreign expert", _offer(lambda t, b: {**t, **expert_update(b, [(0, 3)])}), DENIED),
    ("stale assignment", _offer(lambda t, b: t, version=0), STALE),
    ("future assignment", _offer(lambda t, b: t, version=7), STALE),
    ("empty update", _offer(lambda t, b: {}), INVALID),
    ("missing part", _offer(lambda t, b: {n: a for n, a in t.items() if not n.endswith("lora_B")}), INVALID),
    ("oversize", _raw_offer(lambda o: replace(o, size_bytes=2 << 20)), INVALID),
    ("zero size", _raw_offer(lambda o: replace(o, size_bytes=0, chunk_hashes=())), INVALID),
    ("inconsistent chunk count", _raw_offer(lambda o: replace(o, chunk_hashes=o.chunk_hashes[:-1])), INVALID),
    ("chunk size too large", _raw_offer(lambda o: replace(o, chunk_size=1 << 30)), INVALID),
    ("content hash not hex", _raw_offer(lambda o: replace(o, content_hash="Z" * 64)), INVALID),
    ("chunk hash not hex", _raw_offer(lambda o: replace(o, chunk_hashes=("x", *o.chunk_hashes[1:]))), INVALID),
    ("duplicate tensor", _raw_offer(lambda o: replace(o, tensors=o.tensors + o.tensors[:1])), INVALID),
    ("spec dtype unknown", _raw_offer(lambda o: replace(o, tensors=(Spec(o.tensors[0].name, "Q4", (2, 8)),))), INVALID),
    ("wrong chunk hash", _chunk(lambda c, b: replace(c, sha256="0" * 64)), INVALID),
    ("truncated chunk", _chunk(lambda c, b: replace(c, data=c.data[:-1], sha256=sha256_hex(c.data[:-1]))), INVALID),
    ("chunk index out of range", _chunk(lambda c, b: replace(c, index=999)), INVALID),
    (
        "replayed chunk of another update",
        _chunk(lambda c, b: replace(c, data=(d := bytes(split_chunks(b, CHUNK)[0])), sha256=sha256_hex(d))),
        INVALID,
    ),
    ("corrupted chunk in a full in-order stream", _corrupt_stream(cut=False), INVALID),
    ("corrupted chunk in a stream cut short", _corrupt_stream(cut=True), INVALID),
    ("truncated first chunk of a fresh upload", _fresh_chunk(lambda c: replace(c, data=c.data[:-1])), INVALID),
    ("first chunk naming another chunk's hash", _fresh_chunk(lambda c: replace(c, sha256="0" * 64)), INVALID),
    (
        "corrupted first chunk of a fresh upload",
        _fresh_chunk(lambda c: replace(c, data=bytes([c.data[0] ^ 1]) + c.data[1:])),
        INVALID,
    ),
    ("chunk total_size disagrees", _chunk(lambda c, b: replace(c, total_size=3)), INVALID),
    ("chunk of an update never offered", _chunk(lambda c, b: replace(c, content_hash="ab" * 32)), STALE),
    (
        "blob that is not safetensors",
        _commit_of(lambda b: expert_update(b, MINE, seed=8), lambda blob, base: b"\xff" * len(blob)),
        INVALID,
    ),
    (
        "blob lying about its tensors",
        _commit_of(
            lambda b: expert_update(b, MINE, seed=8),
            lambda blob, base: encode({**expert_update(base, MINE, seed=8), **expert_update(base, [(0, 3)])}),
        ),
        INVALID,
    ),
    ("empty push stream", lambda env: lambda: env[0].uploads.push("c0", []), INVALID),
    ("unknown cluster", lambda env: lambda: env[0].admit("c9"), DENIED),
    ("no identity", lambda env: lambda: env[0].admit(None), RefusalCode.UNAUTHENTICATED),
    (
        "another cluster's upload",
        lambda env: (lambda c: lambda: env[0].uploads.push("c1", [c]))(
            chunks_of(encode(expert_update(env[2], MINE, seed=2)), [2])[0]
        ),
        DENIED,
    ),
    ("affinity with NaN", lambda env: lambda: env[0].report_affinity("c0", 1, 2, 4, [np.nan] * 8, []), INVALID),
    ("affinity of the wrong size", lambda env: lambda: env[0].report_affinity("c0", 1, 2, 4, [0.1] * 5, []), INVALID),
    ("negative capacity", lambda env: lambda: env[0].join("c0", "d", -1, 5), INVALID),
]


@pytest.mark.parametrize(("case", "prepare", "code"), CASES, ids=[c[0] for c in CASES])
def test_malformed_request_refused_without_state_change(env: Env, case: str, prepare: Case, code: RefusalCode) -> None:
    act = prepare(env)
    node = env[0]
    before = snapshot(node.store.dir)
    with pytest.raises(Refusal) as info:
        act()
    assert info.value.code == code, f"{case}: {info.value}"
    assert snapshot(node.store.dir) == before, case
    node.store.check_integrity()


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 15


# property: random request sequences


def _fingerprint(tensors: dict[str, np.ndarray], layer: int, expert: int) -> dict[str, bytes]:
    prefix = f"expert/{layer}/{expert}/"
    return {n: a.tobytes() for n, a in tensors.items() if n.startswith(prefix)}


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("upload"), st.sampled_from(["c0", "c1"]), st.integers(0, 3), st.booleans(), st.integers(1, 6)
        ),
        st.tuples(
            st.just("foreign"), st.sampled_from(["c0", "c1"]), st.integers(0, 3), st.booleans(), st.integers(1, 6)
        ),
        st.tuples(st.just("link"), st.sampled_from(["c0", "c1"]), st.integers(0, 0), st.booleans(), st.integers(0, 0)),
        st.tuples(st.just("restart"), st.just(""), st.integers(0, 0), st.booleans(), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_random_sequences_lose_nothing_acknowledged(ops: list[tuple[str, str, int, bool, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = write_tiny_base(root / "base")
        links = FakeLinks()
        node = new_node(root / "state", base, links)
        assign(node)
        owned = {"c0": [(0, 0), (0, 1), (1, 0), (1, 1)], "c1": [(0, 2), (0, 3), (1, 2), (1, 3)]}
        acked: dict[tuple[int, int], tuple[str, dict[str, bytes]]] = {}  # expert -> (cluster, newest acked parts)
        acked_hashes: set[str] = set()
        for kind, cluster, seed, flag, chunk_count in ops:
            if kind == "restart":
                node.store.close()
                node = new_node(root / "state", base, links)
                continue
            if kind == "link":
                (links.down.discard if flag else links.down.add)(cluster)
                continue
            other = "c1" if cluster == "c0" else "c0"
            experts = owned[cluster][:2] if flag else owned[cluster]
            if kind == "foreign":
                experts = [*experts[:1], owned[other][seed % 4]]
            tensors = expert_update(base, experts, seed=seed * 10 + len(experts))
            offer, blob = offer_of(tensors)
            try:
                node.admit(cluster)
                done, missing = node.uploads.offer(cluster, offer)
                if not done:
                    result = node.uploads.push(cluster, chunks_of(blob, missing[:chunk_count]))
                    done = result.committed
            except Refusal as refusal:
                if kind == "foreign":
                    assert refusal.code in (RefusalCode.PERMISSION_DENIED, RefusalCode.UNAVAILABLE)
                continue
            assert kind != "foreign", "a foreign expert was accepted"
            if done and offer.content_hash not in acked_hashes:
                acked_hashes.add(offer.content_hash)
                for layer, expert in experts:
                    acked[(layer, expert)] = (cluster, _fingerprint(tensors, layer, expert))
        node.store.close()
        Store(root / "state").check_integrity()
        committed = {c["content_hash"] for c in export.commits(root / "state")}
        assert acked_hashes <= committed
        glob = export.global_tensors(root / "state", base)
        with Store(root / "state", create=False) as store:
            newest = store.newest_versions()
        for (_layer, _expert), (cluster, parts) in acked.items():  # the newest acked parameters are the global ones
            assert {n: glob[n].tobytes() for n in parts} == parts
            assert newest[ExpertKey(_layer, _expert)].owner == cluster
        for key, row in newest.items():
            want = "c0" if key.expert in (0, 1) else "c1"
            assert row.owner == want, f"expert/{key.layer}/{key.expert} overwritten by {row.owner}"


def test_deferred_stream_cut_short_keeps_only_good_chunks(env: Env) -> None:
    node, _, base = env
    offer, blob = offer_of(expert_update(base, MINE, seed=12))
    node.uploads.offer("c0", offer)
    chunks = chunks_of(blob)
    bad = replace(chunks[3], data=bytes([chunks[3].data[0] ^ 1]) + chunks[3].data[1:])
    with pytest.raises(Refusal) as info:
        node.uploads.push("c0", [*chunks[:3], bad])  # from chunk 0 in order, then it stops: verified chunk by chunk
    assert info.value.code == INVALID
    assert node.store.received_chunks(offer.content_hash) == {0, 1, 2}
    node.store.check_integrity()
    assert node.uploads.push("c0", chunks[3:]).committed  # the resume sends only the rest
    node.store.check_integrity()


def test_deferred_stream_going_out_of_order_verifies_what_it_deferred(env: Env) -> None:
    node, _, base = env
    offer, blob = offer_of(expert_update(base, MINE, seed=14))
    node.uploads.offer("c0", offer)
    chunks = chunks_of(blob)
    bad = replace(chunks[1], data=bytes([chunks[1].data[0] ^ 1]) + chunks[1].data[1:])
    with pytest.raises(Refusal) as info:
        node.uploads.push("c0", [chunks[0], bad, chunks[4]])  # in order, then a jump: 0 and 1 are checked at the jump
    assert info.value.code == INVALID
    assert node.store.received_chunks(offer.content_hash) == {0}
    node.store.check_integrity()
    result = node.uploads.push("c0", [chunks[3], chunks[2]])  # out of order from the start: verified one by one
    assert not result.committed and result.missing == [1, *range(4, len(chunks))]
    assert node.uploads.push("c0", [chunks[i] for i in result.missing]).committed
    node.store.check_integrity()
