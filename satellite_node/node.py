"""The satellite node's behaviour, free of gRPC and MQTT: every RPC is a method here.

The server (server.py) turns protos into these calls and `Refusal`s into status codes; the link
state comes in through the `LinkState` protocol (emsfl/runtime/linkstate.py: a `LinkView` in production, a fake in
tests).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from emsfl.runtime.events import EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import to_iso
from protos.wire import CHUNK_SIZE, ExpertKey, sha256_hex, split_chunks
from satellite_node.admission import Pacer
from satellite_node.assignment import AFFINITY_KINDS, owners, solve_assignment
from satellite_node.context import NodeContext
from satellite_node.manifest import Manifest, load_base_tensors
from satellite_node.metrics import Metrics
from satellite_node.status import global_state, status_dict
from satellite_node.store import AffinityRow, ClusterRow, ExpertVersionRow, RoundUpload, Store, UploadRow
from satellite_node.strategy import AcceptedUpdate, Effect, Strategy, make_strategy
from satellite_node.uploads import ChunkIn, ChunkSink, Offer, PullBlob, PushResult
from satellite_node.validate import (
    Refusal,
    RefusalCode,
    check_ownership,
    check_specs,
    invalid,
    parse_safetensors,
    specs_of,
    validate_update,
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_CHUNK_SIZE = 16 << 20


@dataclass(frozen=True)
class NodeConfig:
    clusters: Mapping[str, int | None]  # topology cluster id -> its configured capacity_experts (None: not given)
    strategy: str = "emsfl"
    affinity: str = "gate"
    max_update_bytes: int = 4 << 30
    strategy_options: Mapping[str, Any] = field(default_factory=dict)  # satellite.<strategy> of the topology
    pace: bool = True  # satellite.pace: transfers paced to the link budget (ARCHITECTURE §5.4)


class SatelliteNode:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        base_dir: str,
        config: NodeConfig,
        links: LinkState,
        events: EventLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if config.affinity not in AFFINITY_KINDS:
            raise ValueError(f"affinity kind must be one of {AFFINITY_KINDS}, got {config.affinity!r}")
        self.store = store
        self.manifest = manifest
        self.base_dir = base_dir
        self.config = config
        self.links = links
        self.events = events
        self.metrics = metrics or Metrics(enabled=False)
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_options)
        self.pacer = Pacer(links, config.pace)
        self._ctx = NodeContext(store, manifest, self.base_tensors, list(config.clusters))
        # Serialises every state change (joins, assignment, offers, commits); chunk writes run outside it.
        self._lock = threading.RLock()
        self._base: dict[str, np.ndarray] | None = None
        self._pull_cache: tuple[tuple[Any, ...], PullBlob] | None = None
        self._streams: dict[str, ChunkSink] = {}  # content hash -> the PushChunks stream writing it
        self._streams_lock = threading.Lock()
        self._maybe_solve()

    def _maybe_solve(self) -> None:
        """Solve version 1 once every topology cluster has joined and reported (also after a crash in between)."""
        if self.store.assignment_version() != 0:
            return
        reported = self.store.affinities()
        if set(self.config.clusters) <= set(reported) and set(self.config.clusters) <= set(self.store.clusters()):
            self._solve(reported)

    def tick(self) -> None:
        """Time-driven work: open FedAvg round 0 once a clock is known; close a round whose deadline passed."""
        now = self.links.emulated_now()
        if now is None or not self.strategy.clocked:
            return
        with self._lock:
            if self.store.get_meta("round0_opened") is None:
                self.store.set_meta("round0_opened", now.timestamp())
            effect = self.strategy.tick(self._ctx, now.timestamp())
            if effect is None or effect.global_version is None:
                return
            self.store.record_derived(
                effect.versions, effect.global_version, effect.cause, to_iso(now), now.timestamp(), time.time()
            )
            self._pull_cache = None
        self._after_versions(effect)
        self._emit("round_closed", version=effect.global_version, cause=effect.cause, at="deadline")

    def _after_versions(self, effect: Effect) -> None:
        for v in effect.versions:
            self.metrics.expert_version(v.key.layer, v.key.expert, v.version)
        if effect.global_version is not None:
            self.metrics.global_version.set(effect.global_version)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(event, **fields)

    def _now(self) -> datetime:
        now = self.links.emulated_now()
        if now is None:  # the gate already refuses without a clock; this guards the commit path
            raise Refusal(RefusalCode.UNAVAILABLE, "no emulated clock received yet")
        return now

    # identity and the link gate

    def admit(self, cluster: str | None) -> str:
        """The caller's cluster if it may be served now, else a Refusal (no state change)."""
        if not cluster:
            raise Refusal(RefusalCode.UNAUTHENTICATED, "no cluster identity on the call")
        if cluster not in self.config.clusters:
            raise Refusal(RefusalCode.PERMISSION_DENIED, f"cluster {cluster!r} is not in the topology")
        self.gate(cluster)
        self.tick()
        return cluster

    def gate(self, cluster: str) -> None:
        if not self.links.is_up(cluster):
            raise Refusal(RefusalCode.UNAVAILABLE, self.links.down_reason(cluster), "link_down")

    def refused(self, cluster: str | None, refusal: Refusal) -> None:
        self.metrics.refused(refusal)
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
                raise Refusal(RefusalCode.FAILED_PRECONDITION, "join before reporting affinity")
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

    def _solve(self, reported: Mapping[str, AffinityRow], reason: str = "initial", requested_by: str = "") -> int:
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
        version = self.store.assignment_version() + 1
        now = self.links.emulated_now()
        self.store.record_assignment(
            version,
            self.config.affinity,
            owners(result),
            None if now is None else to_iso(now),
            time.time(),
            reason,
            requested_by,
        )
        experts = {c: [[layer, es] for layer, es in enumerate(layers)] for c, layers in result.items()}
        self.metrics.assignment_version.set(version)
        self._emit("assignment", version=version, experts=experts, reason=reason, requested_by=requested_by)
        return version

    def reassign(self, cluster: str, reason: str) -> tuple[int, list[ExpertVersionRow]]:
        """Solve a new assignment version from the newest affinities (on a cluster's request).

        Returns the new version and the experts `cluster` gained from another owner, each with its newest version
        (the hand-over: the new owner pulls those parameters and continues from them, never from the base)."""
        if not self.strategy.requires_ownership:
            raise Refusal(
                RefusalCode.FAILED_PRECONDITION,
                f"strategy {self.strategy.name} trains the whole model: there is no assignment to change",
            )
        if len(reason) > 500:
            raise invalid("reason: at most 500 characters")
        with self._lock:
            reported = self.store.affinities()
            if self.store.assignment_version() == 0 or not set(self.config.clusters) <= set(reported):
                raise Refusal(RefusalCode.FAILED_PRECONDITION, "no assignment yet: every cluster must report first")
            version = self._solve(reported, reason or "requested", cluster)
            return version, self.handed_over(cluster, version)

    def handed_over(self, cluster: str, version: int) -> list[ExpertVersionRow]:
        """Experts `cluster` owns under `version` but another cluster owned under `version - 1`, with their newest
        committed version (experts still at the base version are not listed: there is nothing to hand over)."""
        now_owners = self.store.owners(version) or {}
        before = self.store.owners(version - 1) or {}
        newest = self.store.newest_versions()
        out: list[ExpertVersionRow] = []
        for (layer, expert), owner in sorted(now_owners.items()):
            if owner == cluster and before.get((layer, expert)) not in (None, cluster):
                row = newest.get(ExpertKey(layer, expert))
                if row is not None:
                    out.append(row)
        return out

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

    def _check_whole_model(self, experts: tuple[ExpertKey, ...]) -> None:
        if self.strategy.whole_model and len(experts) != self.manifest.num_layers * self.manifest.num_experts:
            raise invalid(
                f"strategy {self.strategy.name} trains the whole model: an update carries all"
                f" {self.manifest.num_layers * self.manifest.num_experts} experts, this one {len(experts)}"
            )

    def offer(self, cluster: str, offer: Offer) -> tuple[bool, list[int]]:
        """(committed, missing chunk indices). Validates specs and ownership before recording anything."""
        self._check_offer_shape(offer)
        if self.store.commit_cluster(offer.content_hash) == cluster:
            return True, []
        experts = check_specs(self.manifest, offer.tensors)
        self._check_whole_model(experts)
        self._take_over(offer.content_hash, cluster)  # a re-offer after a hard cut: keep what the old stream wrote
        with self._lock:
            self.strategy.check_base(self._ctx, cluster, offer.base_version)
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
                offer.base_version,
            )
            self.store.put_upload(row, time.time())
            missing = sorted(set(range(len(row.chunk_hashes))) - self.store.received_chunks(row.content_hash))
            if missing:
                return False, missing
            # Everything already arrived (e.g. the process died between the last chunk and the commit).
            return self._commit(cluster, row).committed, []

    # A PushChunks stream fsyncs and records what it wrote at least every this many bytes (and at its end).
    FLUSH_BYTES = 64 << 20

    def push(self, cluster: str, chunks: Iterable[ChunkIn]) -> PushResult:
        """Store the verified chunks of one offered update; commit when all are present.

        Chunks are written at their offsets and recorded only after an fsync, so the reply never names a chunk as
        received that a crash could lose. A stream that starts an upload from chunk 0 in order is verified by its
        running content hash alone (one SHA-256 pass instead of two): when it carries every chunk the content hash
        proves every chunk, and a stream cut short has what it wrote verified chunk by chunk before it is recorded.
        Other streams verify each chunk as it comes and record every FLUSH_BYTES.
        """
        upload: UploadRow | None = None
        received: set[int] = set()
        sink: ChunkSink | None = None
        unflushed = 0
        ended = False
        try:
            for chunk in chunks:
                self.gate(cluster)  # nothing moves over a link that went down; what arrived stays
                if upload is None:
                    if self.store.commit_cluster(chunk.content_hash) == cluster:
                        return PushResult(True, [], self.store.versions_of_commit(chunk.content_hash))
                    upload = self.store.get_upload(chunk.content_hash)
                    if upload is None:
                        raise Refusal(
                            RefusalCode.FAILED_PRECONDITION, f"update {chunk.content_hash[:16]}: offer it first"
                        )
                    if upload.cluster != cluster:
                        raise Refusal(
                            RefusalCode.PERMISSION_DENIED,
                            f"update {chunk.content_hash[:16]} was offered by another cluster",
                        )
                    self._take_over(upload.content_hash, cluster)  # first: what an older stream wrote counts
                    received = self.store.received_chunks(upload.content_hash)
                elif chunk.content_hash != upload.content_hash:
                    raise invalid("one PushChunks stream carries chunks of one update only")
                if sink is not None and sink.deferred and chunk.index != sink.next_index:
                    sink.verify_now()  # out of order: verify what was deferred, then chunk by chunk
                    if sink.bad_chunks:
                        raise invalid(f"chunks {sink.bad_chunks[:5]} of {upload.content_hash[:16]}: SHA-256 mismatch")
                # a fresh upload streamed from chunk 0 defers data verification to its running content hash
                defer = sink.deferred if sink is not None else (not received and chunk.index == 0)
                self._check_chunk(upload, chunk, verify_data=not defer)
                self.pacer.pace(cluster, len(chunk.data))
                if chunk.index in received:
                    self.metrics.chunks_resent.labels(cluster).inc()
                    continue
                if sink is None:  # created only now: a refused first chunk leaves no file behind
                    sink = self._start_stream(upload, defer)
                sink.add(chunk.index, chunk.data)
                received.add(chunk.index)
                self.metrics.chunk_received(cluster, len(chunk.data))
                unflushed += len(chunk.data)
                if unflushed >= self.FLUSH_BYTES and not sink.deferred:
                    sink.flush()
                    unflushed = 0
            ended = True
        finally:
            if sink is not None:
                # fsync and record what arrived, also before a refusal or a cut; a deferred stream that ends
                # complete is proved by its content hash, one cut short is verified chunk by chunk
                complete = ended and upload is not None and sink.next_index == len(upload.chunk_hashes)
                try:
                    sink.close(complete)
                finally:
                    with self._streams_lock:
                        if self._streams.get(sink.upload.content_hash) is sink:
                            del self._streams[sink.upload.content_hash]
        if upload is None:
            raise invalid("PushChunks carried no chunk")
        digest = None
        if sink is not None and sink.superseded:
            raise Refusal(RefusalCode.ABORTED, "a newer stream or offer of this update took over from this one")
        if sink is not None and sink.was_deferred:
            if sink.bad_content:
                raise invalid(f"update {upload.content_hash[:16]}: the chunks do not hash to the offered content_hash")
            if sink.bad_chunks:
                raise invalid(f"chunks {sink.bad_chunks[:5]} of {upload.content_hash[:16]}: SHA-256 mismatch")
            digest = sink.digest
            received = self.store.received_chunks(upload.content_hash)
        missing = sorted(set(range(len(upload.chunk_hashes))) - received)
        if missing:
            return PushResult(False, missing)
        return self._commit(cluster, upload, digest)

    def _start_stream(self, upload: UploadRow, deferred: bool) -> ChunkSink:
        """A sink for a new PushChunks stream of `upload`; it supersedes any stream of the same update."""
        sink = ChunkSink(self.store, upload, deferred=deferred)
        with self._streams_lock:
            racing = self._streams.get(upload.content_hash)
            self._streams[upload.content_hash] = sink
        if racing is not None:  # another stream started in between: the newest one wins
            racing.supersede()
        return sink

    def _take_over(self, content_hash: str, cluster: str) -> None:
        """Supersede the stream still writing this update, if any (its handler may not have seen a hard cut yet):
        it stops writing, and what it wrote is verified and recorded now."""
        with self._streams_lock:
            old = self._streams.get(content_hash)
            if old is None or old.upload.cluster != cluster:
                return
            del self._streams[content_hash]
        old.supersede()

    def _check_chunk(self, upload: UploadRow, chunk: ChunkIn, verify_data: bool = True) -> None:
        n = len(upload.chunk_hashes)
        where = f"chunk {chunk.index} of {upload.content_hash[:16]}"
        if not 0 <= chunk.index < n:
            raise invalid(f"{where}: index out of range 0..{n - 1}")
        if (chunk.total_chunks and chunk.total_chunks != n) or (chunk.total_size and chunk.total_size != upload.size):
            raise invalid(f"{where}: total_chunks/total_size disagree with the offer")
        want_len = upload.chunk_size if chunk.index < n - 1 else upload.size - upload.chunk_size * (n - 1)
        if len(chunk.data) != want_len:
            raise invalid(f"{where}: {len(chunk.data)} bytes, expected {want_len}")
        if chunk.sha256 != upload.chunk_hashes[chunk.index]:
            raise invalid(f"{where}: SHA-256 mismatch")
        if verify_data and sha256_hex(chunk.data) != chunk.sha256:
            raise invalid(f"{where}: SHA-256 mismatch")

    def _commit(self, cluster: str, upload: UploadRow, digest: str | None = None) -> PushResult:
        with self._lock:
            h = upload.content_hash
            if self.store.is_committed(h):
                return PushResult(True, [], self.store.versions_of_commit(h))
            # The link may have gone down during the push: keep the chunks, commit at the next pass.
            self.gate(cluster)
            now = self._now()
            try:
                return self._validate_and_commit(cluster, upload, digest, now)
            except Refusal as refusal:
                if refusal.code != RefusalCode.UNAVAILABLE:
                    # The content itself is refused: it can never commit, so its chunks go and the upload is back
                    # to "offered, nothing received" (as before the push). A cut link keeps them for the next pass.
                    self.store.reset_upload(h)
                raise

    def _validate_and_commit(self, cluster: str, upload: UploadRow, digest: str | None, now: datetime) -> PushResult:
        h = upload.content_hash
        # called by _commit, under self._lock
        blob = self.store.map_partial(upload)
        if (digest or sha256_hex(blob)) != h:
            raise invalid(f"update {h[:16]}: the assembled chunks do not hash to the offered content_hash")
        tensors = parse_safetensors(blob, f"update {h[:16]}")
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
        self._check_whole_model(experts)
        update = AcceptedUpdate(cluster, h, tensors, experts, upload.base_version, now.timestamp())
        effect = self.strategy.apply(self._ctx, update)  # may refuse (a FedAvg round closed meanwhile)
        self.store.adopt_partial(upload)
        entry = effect.round_entry
        self.store.record_commit(
            h,
            cluster,
            upload.size,
            effect.versions,
            to_iso(now),
            now.timestamp(),
            time.time(),
            RoundUpload(entry.round, cluster, h, entry.weight) if entry is not None else None,
            effect.global_version,
            effect.cause or f"commit:{h[:16]}",
        )
        rows = self.store.versions_of_commit(h)
        self._pull_cache = None
        self.metrics.committed(cluster, upload.size, effect.staleness)
        self._after_versions(effect)
        self._emit(
            "upload_committed",
            cluster=cluster,
            content_hash=h,
            bytes=upload.size,
            experts=[[v.layer, v.expert, v.version] for v in rows],
            **({"global_version": effect.global_version} if effect.global_version is not None else {}),
            **({"round": entry.round} if entry is not None else {}),
        )
        if effect.global_version is not None and entry is not None:
            self._emit("round_closed", version=effect.global_version, cause=effect.cause, at="upload")
        return PushResult(True, [], rows)

    # pulls and status

    def base_tensors(self) -> dict[str, np.ndarray]:
        if self._base is None:
            self._base = load_base_tensors(self.base_dir)
        return self._base

    def pull(self, names: Iterable[str], chunk_size: int = CHUNK_SIZE) -> PullBlob:
        """The requested global tensors as one deterministic safetensors blob, split into chunks."""
        wanted = tuple(sorted(set(names)))
        key = (wanted, self.store.generation(), chunk_size)
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
        return status_dict(self.store, self.strategy, self.config.clusters, self.links)

    def global_version(self) -> int:
        """What a client must pull (the strategy says what counts as a new global model)."""
        return self.strategy.global_version(self.store.commit_count(), self.store.global_version())
