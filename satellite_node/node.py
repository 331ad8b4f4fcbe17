"""The satellite node's behaviour, free of gRPC and MQTT: every RPC is a method here.

The server (server.py) turns protos into these calls and `Refusal`s into status codes; the link
state comes in through the `Links` protocol (a `protos.linkview.LinkView` in production, a stub in tests).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import grpc
import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protos.timefmt import to_iso
from protos.wire import CHUNK_SIZE, sha256_hex, split_chunks
from satellite_node.assignment import AFFINITY_KINDS, owners, solve_assignment
from satellite_node.events import EventLog
from satellite_node.manifest import Manifest, load_base_tensors
from satellite_node.store import AffinityRow, ClusterRow, ExpertVersionRow, Store, UploadRow
from satellite_node.strategy import AcceptedUpdate, Strategy, make_strategy
from satellite_node.validate import Refusal, Spec, check_ownership, check_specs, invalid, specs_of, validate_update

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNK_SIZE = 16 << 20


class Links(Protocol):
    def is_up(self, cluster: str) -> bool: ...
    def down_reason(self, cluster: str) -> str: ...
    def emulated_now(self) -> datetime | None: ...


@dataclass(frozen=True)
class NodeConfig:
    clusters: Mapping[str, int | None]  # topology cluster id -> its configured capacity_experts (None: not given)
    strategy: str = "emsfl"
    affinity: str = "gate"
    max_update_bytes: int = 4 << 30


@dataclass(frozen=True)
class Offer:
    content_hash: str
    size_bytes: int
    chunk_size: int
    chunk_hashes: tuple[str, ...]
    tensors: tuple[Spec, ...]
    assignment_version: int
    local_step: int = 0


@dataclass(frozen=True)
class ChunkIn:
    content_hash: str
    index: int
    data: bytes
    sha256: str
    total_chunks: int = 0
    total_size: int = 0


@dataclass(frozen=True)
class PushResult:
    committed: bool
    missing: list[int] = field(default_factory=list)
    versions: list[ExpertVersionRow] = field(default_factory=list)


@dataclass(frozen=True)
class PullBlob:
    content_hash: str
    size: int
    chunks: list[memoryview]


class SatelliteNode:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        base_dir: str,
        config: NodeConfig,
        links: Links,
        events: EventLog | None = None,
    ) -> None:
        if config.affinity not in AFFINITY_KINDS:
            raise ValueError(f"affinity kind must be one of {AFFINITY_KINDS}, got {config.affinity!r}")
        self.store = store
        self.manifest = manifest
        self.base_dir = base_dir
        self.config = config
        self.links = links
        self.events = events
        self.strategy: Strategy = make_strategy(config.strategy)
        # Serialises every state change (joins, assignment, offers, commits); chunk writes run outside it.
        self._lock = threading.RLock()
        self._base: dict[str, np.ndarray] | None = None
        self._pull_cache: tuple[tuple[Any, ...], PullBlob] | None = None
        self._maybe_solve()

    def _maybe_solve(self) -> None:
        """Solve version 1 once every topology cluster has joined and reported (also after a crash in between)."""
        if self.store.assignment_version() != 0:
            return
        reported = self.store.affinities()
        if set(self.config.clusters) <= set(reported) and set(self.config.clusters) <= set(self.store.clusters()):
            self._solve(reported)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)

    def _now(self) -> datetime:
        now = self.links.emulated_now()
        if now is None:  # the gate already refuses without a clock; this guards the commit path
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "no emulated clock received yet")
        return now

    # identity and the link gate

    def admit(self, cluster: str | None) -> str:
        """The caller's cluster if it may be served now, else a Refusal (no state change)."""
        if not cluster:
            raise Refusal(grpc.StatusCode.UNAUTHENTICATED, "no cluster identity on the call")
        if cluster not in self.config.clusters:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"cluster {cluster!r} is not in the topology")
        self.gate(cluster)
        return cluster

    def gate(self, cluster: str) -> None:
        if not self.links.is_up(cluster):
            raise Refusal(grpc.StatusCode.UNAVAILABLE, self.links.down_reason(cluster))

    def refused(self, cluster: str | None, refusal: Refusal) -> None:
        self._emit("refused", cluster=cluster, code=refusal.code.name, reason=refusal.message)

    # join, affinity, assignment

    def join(self, cluster: str, device_id: str, capacity: int, num_examples: int) -> None:
        if capacity < 0:
            raise invalid(f"capacity_experts must be >= 0, got {capacity}")
        if capacity == 0:  # proto3 default: fall back to the topology's value
            configured = self.config.clusters.get(cluster)
            if configured is None:
                raise invalid("capacity_experts missing and the topology gives none for this cluster")
            capacity = configured
        if num_examples < 0:
            raise invalid(f"num_examples must be >= 0, got {num_examples}")
        with self._lock:
            now = self.links.emulated_now()
            self.store.upsert_cluster(
                ClusterRow(cluster, device_id, capacity, num_examples),
                None if now is None else to_iso(now),
                time.time(),
            )
        self._emit("joined", cluster=cluster)

    def _matrix(self, name: str, values: Iterable[float]) -> np.ndarray | None:
        array = np.asarray(list(values), dtype=np.float64)
        if array.size == 0:
            return None
        shape = (self.manifest.num_layers, self.manifest.num_experts)
        if array.size != shape[0] * shape[1]:
            raise invalid(f"{name}: {array.size} values, expected num_layers x num_experts = {shape[0] * shape[1]}")
        if not np.isfinite(array).all():
            raise invalid(f"{name}: contains NaN or Inf")
        if (array < 0).any():
            raise invalid(f"{name}: contains negative values")
        return array.reshape(shape)

    def report_affinity(
        self,
        cluster: str,
        num_tokens: int,
        num_layers: int,
        num_experts: int,
        gate: Iterable[float],
        freq: Iterable[float],
    ) -> tuple[int, int]:
        """Store a cluster's affinity; solves assignment version 1 once every cluster has reported."""
        m = self.manifest
        if (num_layers, num_experts) != (m.num_layers, m.num_experts):
            raise invalid(f"affinity is {num_layers}x{num_experts}, the model has {m.num_layers}x{m.num_experts}")
        if num_tokens < 0:
            raise invalid(f"num_tokens must be >= 0, got {num_tokens}")
        gate_m, freq_m = self._matrix("gate", gate), self._matrix("freq", freq)
        if (gate_m if self.config.affinity == "gate" else freq_m) is None:
            raise invalid(
                f"{self.config.affinity}: required (the satellite assigns by {self.config.affinity} affinity)"
            )
        with self._lock:
            if cluster not in self.store.clusters():
                raise Refusal(grpc.StatusCode.FAILED_PRECONDITION, "join before reporting affinity")
            now = self.links.emulated_now()
            self.store.put_affinity(
                AffinityRow(cluster, num_tokens, m.num_layers, m.num_experts, gate_m, freq_m),
                None if now is None else to_iso(now),
                time.time(),
            )
            self._emit("affinity", cluster=cluster)
            self._maybe_solve()
            reported = set(self.store.affinities()) & set(self.config.clusters)
            return len(reported), len(self.config.clusters)

    def _solve(self, reported: Mapping[str, AffinityRow]) -> None:
        joined = self.store.clusters()
        matrices: dict[str, np.ndarray] = {}
        for c in self.config.clusters:
            row = reported[c]
            matrix = row.gate if self.config.affinity == "gate" else row.freq
            assert matrix is not None  # checked when the report came in
            matrices[c] = matrix
        result = solve_assignment(
            matrices, {c: joined[c].capacity for c in matrices}, {c: joined[c].num_examples for c in matrices}
        )
        version = 1
        now = self.links.emulated_now()
        self.store.record_assignment(
            version, self.config.affinity, owners(result), None if now is None else to_iso(now), time.time()
        )
        experts = {c: [[layer, es] for layer, es in enumerate(layers)] for c, layers in result.items()}
        self._emit("assignment", version=version, experts=experts)

    def assignment_for(self, cluster: str) -> tuple[bool, int, list[list[int]]]:
        """(ready, version, experts per layer) of the caller."""
        version = self.store.assignment_version()
        table = self.store.owners(version)
        layers: list[list[int]] = [[] for _ in range(self.manifest.num_layers)]
        if table is None:
            return False, 0, layers
        for (layer, expert), owner in sorted(table.items()):
            if owner == cluster:
                layers[layer].append(expert)
        return True, version, layers

    # uploads

    def _check_offer_shape(self, offer: Offer) -> None:
        if not _HEX64.match(offer.content_hash):
            raise invalid(f"content_hash {offer.content_hash!r}: not a lowercase hex SHA-256")
        if not 0 < offer.size_bytes <= self.config.max_update_bytes:
            raise invalid(f"size_bytes {offer.size_bytes}: must be in 1..{self.config.max_update_bytes}")
        if not 0 < offer.chunk_size <= MAX_CHUNK_SIZE:
            raise invalid(f"chunk_size {offer.chunk_size}: must be in 1..{MAX_CHUNK_SIZE}")
        expected = -(-offer.size_bytes // offer.chunk_size)
        if len(offer.chunk_hashes) != expected:
            raise invalid(
                f"chunk_hashes: {len(offer.chunk_hashes)} given, {expected} chunks of {offer.chunk_size} bytes expected"
            )
        for i, h in enumerate(offer.chunk_hashes):
            if not _HEX64.match(h):
                raise invalid(f"chunk_hashes[{i}]: not a lowercase hex SHA-256")

    def offer(self, cluster: str, offer: Offer) -> tuple[bool, list[int]]:
        """(committed, missing chunk indices). Validates specs and ownership before recording anything."""
        self._check_offer_shape(offer)
        if self.store.commit_cluster(offer.content_hash) == cluster:
            return True, []
        experts = check_specs(self.manifest, offer.tensors)
        with self._lock:
            check_ownership(
                experts,
                cluster,
                self.store.owners(),
                offer.assignment_version,
                self.store.assignment_version(),
                self.strategy.requires_ownership,
            )
            row = UploadRow(
                offer.content_hash,
                cluster,
                offer.size_bytes,
                offer.chunk_size,
                offer.chunk_hashes,
                tuple((s.name, s.dtype, tuple(s.shape)) for s in offer.tensors),
                offer.assignment_version,
                offer.local_step,
            )
            self.store.put_upload(row, time.time())
            missing = sorted(set(range(len(row.chunk_hashes))) - self.store.received_chunks(row.content_hash))
            if missing:
                return False, missing
            # Everything already arrived (e.g. the process died between the last chunk and the commit).
            return self._commit(cluster, row).committed, []

    def push(self, cluster: str, chunks: Iterable[ChunkIn]) -> PushResult:
        """Store the verified chunks of one offered update; commit when all are present."""
        upload: UploadRow | None = None
        received: set[int] = set()
        for chunk in chunks:
            self.gate(cluster)  # nothing moves over a link that went down; what arrived stays
            if upload is None:
                if self.store.commit_cluster(chunk.content_hash) == cluster:
                    return PushResult(True, [], self.store.versions_of_commit(chunk.content_hash))
                upload = self.store.get_upload(chunk.content_hash)
                if upload is None:
                    raise Refusal(
                        grpc.StatusCode.FAILED_PRECONDITION, f"update {chunk.content_hash[:16]}: offer it first"
                    )
                if upload.cluster != cluster:
                    raise Refusal(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"update {chunk.content_hash[:16]} was offered by another cluster",
                    )
                received = self.store.received_chunks(upload.content_hash)
            elif chunk.content_hash != upload.content_hash:
                raise invalid("one PushChunks stream carries chunks of one update only")
            self._check_chunk(upload, chunk)
            if chunk.index not in received:
                self.store.put_chunk(upload.content_hash, chunk.index, chunk.data)
                received.add(chunk.index)
        if upload is None:
            raise invalid("PushChunks carried no chunk")
        missing = sorted(set(range(len(upload.chunk_hashes))) - received)
        if missing:
            return PushResult(False, missing)
        return self._commit(cluster, upload)

    def _check_chunk(self, upload: UploadRow, chunk: ChunkIn) -> None:
        n = len(upload.chunk_hashes)
        where = f"chunk {chunk.index} of {upload.content_hash[:16]}"
        if not 0 <= chunk.index < n:
            raise invalid(f"{where}: index out of range 0..{n - 1}")
        if (chunk.total_chunks and chunk.total_chunks != n) or (chunk.total_size and chunk.total_size != upload.size):
            raise invalid(f"{where}: total_chunks/total_size disagree with the offer")
        want_len = upload.chunk_size if chunk.index < n - 1 else upload.size - upload.chunk_size * (n - 1)
        if len(chunk.data) != want_len:
            raise invalid(f"{where}: {len(chunk.data)} bytes, expected {want_len}")
        actual = sha256_hex(chunk.data)
        if chunk.sha256 != actual or actual != upload.chunk_hashes[chunk.index]:
            raise invalid(f"{where}: SHA-256 mismatch")

    def _commit(self, cluster: str, upload: UploadRow) -> PushResult:
        with self._lock:
            h = upload.content_hash
            if self.store.is_committed(h):
                return PushResult(True, [], self.store.versions_of_commit(h))
            # The link may have gone down during the push: keep the chunks, commit at the next pass.
            self.gate(cluster)
            now = self._now()
            blob = self.store.assemble(upload)
            if sha256_hex(blob) != h:
                raise invalid(f"update {h[:16]}: the assembled chunks do not hash to the offered content_hash")
            try:
                tensors: dict[str, np.ndarray] = st_load(blob)
            except Exception as exc:  # safetensors raises its own error types for malformed headers
                raise invalid(f"update {h[:16]}: not a safetensors blob: {exc}") from exc
            declared = sorted((n, d, tuple(s)) for n, d, s in upload.tensors)
            actual = sorted((s.name, s.dtype, s.shape) for s in specs_of(tensors))
            if declared != actual:
                raise invalid(f"update {h[:16]}: its tensors differ from the offered tensor list")
            experts = validate_update(
                self.manifest,
                tensors,
                cluster,
                self.store.owners(),
                upload.assignment_version,
                self.store.assignment_version(),
                self.strategy.requires_ownership,
            )
            self.store.put_blob(blob)
            versions = self.strategy.apply(self.store, AcceptedUpdate(cluster, h, tensors, experts))
            self.store.record_commit(h, cluster, len(blob), versions, to_iso(now), now.timestamp(), time.time())
            rows = self.store.versions_of_commit(h)
            self._pull_cache = None
        self._emit(
            "upload_committed",
            cluster=cluster,
            content_hash=h,
            bytes=len(blob),
            experts=[[v.layer, v.expert, v.version] for v in rows],
        )
        return PushResult(True, [], rows)

    # pulls and status

    def base_tensors(self) -> dict[str, np.ndarray]:
        if self._base is None:
            self._base = load_base_tensors(self.base_dir)
        return self._base

    def pull(self, names: Iterable[str], chunk_size: int = CHUNK_SIZE) -> PullBlob:
        """The requested global tensors as one deterministic safetensors blob, split into chunks."""
        wanted = tuple(sorted(set(names)))
        commits = self.store.commit_count()
        key = (wanted, commits, chunk_size)
        cached = self._pull_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        tensors = global_state(self.store, self.base_tensors())
        selected: dict[str, np.ndarray] = {}
        for name in wanted or ("",):
            if name.endswith("/") or name == "":
                hits = {n: a for n, a in tensors.items() if n.startswith(name)}
                if not hits:
                    raise invalid(f"names: no tensor under prefix {name!r}")
                selected.update(hits)
            elif name in tensors:
                selected[name] = tensors[name]
            else:
                raise invalid(f"names: unknown tensor {name!r}")
        blob = st_save({n: np.ascontiguousarray(selected[n]) for n in sorted(selected)})
        result = PullBlob(sha256_hex(blob), len(blob), split_chunks(blob, chunk_size))
        self._pull_cache = (key, result)
        return result

    def status(self) -> dict[str, Any]:
        return status_dict(self.store, self.strategy.name, self.config.clusters, self.links)


def global_state(store: Store, base: Mapping[str, np.ndarray], at_unix: float | None = None) -> dict[str, np.ndarray]:
    """Base tensors plus, for every expert, the parts of its newest version (committed at or before `at_unix`)."""
    tensors = dict(base)
    blobs: dict[str, dict[str, np.ndarray]] = {}
    for key, row in sorted(store.newest_versions(at_unix).items(), key=lambda kv: (kv[0].layer, kv[0].expert)):
        if row.source_hash not in blobs:
            blobs[row.source_hash] = st_load(store.read_blob(row.source_hash))
        prefix = f"expert/{key.layer}/{key.expert}/"
        tensors.update({n: a for n, a in blobs[row.source_hash].items() if n.startswith(prefix)})
    return tensors


def status_dict(store: Store, strategy: str, clusters: Iterable[str], links: Links | None = None) -> dict[str, Any]:
    """Clusters, assignment and expert versions as plain data (GetStatus and `emsfl satellite status`)."""
    joined = store.clusters()
    reported = store.affinities()
    version = store.assignment_version()
    table = store.owners(version) or {}
    stats = store.commit_stats()
    names = list(dict.fromkeys([*clusters, *joined]))
    now = links.emulated_now() if links is not None else None
    out_clusters = []
    for c in names:
        owned = sum(1 for owner in table.values() if owner == c)
        uploads, nbytes = stats.get(c, (0, 0))
        out_clusters.append(
            {
                "cluster_id": c,
                "link_up": bool(links.is_up(c)) if links is not None else None,
                "joined": c in joined,
                "affinity_reported": c in reported,
                "experts_owned": owned,
                "uploads_committed": uploads,
                "bytes_received": nbytes,
                "capacity_experts": joined[c].capacity if c in joined else None,
                "num_examples": joined[c].num_examples if c in joined else None,
            }
        )
    assignment: dict[str, list[list[Any]]] = {}
    for (layer, expert), owner in sorted(table.items()):
        per_layer = assignment.setdefault(owner, [])
        while len(per_layer) <= layer:
            per_layer.append([len(per_layer), []])
        per_layer[layer][1].append(expert)
    experts = [
        {"layer": k.layer, "expert": k.expert, "version": r.version, "owner": r.owner, "committed_at": r.t}
        for k, r in sorted(store.newest_versions().items(), key=lambda kv: (kv[0].layer, kv[0].expert))
    ]
    return {
        "strategy": strategy,
        "assignment_version": version,
        "assignment": assignment,
        "clusters": out_clusters,
        "experts": experts,
        "emulated_now": None if now is None else to_iso(now),
    }
