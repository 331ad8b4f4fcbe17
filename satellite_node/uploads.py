"""Uploads (ARCHITECTURE §5.2): offer, push, the chunk sink and the commit of one update, free of gRPC.

`server.py` admits a call (`SatelliteNode.admit`: identity, link gate) and hands the upload to `Uploads`, which
checks the offer, writes the pushed chunks through a `ChunkSink` (fsynced before they are recorded), and commits
a complete update: validation (`validate.py`), the strategy's effect (through the `Strategy` interface; this module
never names one) and the store's transaction (`store/`). Every refusal is a `Refusal` and changes no stored state.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from emsfl.runtime.events import NOW, EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import to_iso
from protos.wire import ExpertKey, sha256_hex
from satellite_node.admission import Pacer, gate
from satellite_node.context import NodeContext
from satellite_node.manifest import Manifest
from satellite_node.metrics import Metrics
from satellite_node.store import ExpertVersionRow, RoundUpload, Store, UploadRow
from satellite_node.strategy import AcceptedUpdate, Strategy
from satellite_node.validate import (
    Refusal,
    RefusalCode,
    Spec,
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
class Offer:
    content_hash: str
    size_bytes: int
    chunk_size: int
    chunk_hashes: tuple[str, ...]
    tensors: tuple[Spec, ...]
    assignment_version: int
    local_step: int = 0
    base_version: int = 0  # fedavg: the round; fedasync: the global version trained from


@dataclass(frozen=True)
class ChunkIn:
    content_hash: str
    index: int
    data: bytes | memoryview  # on the gRPC path a view into the received message (server.py: decode_chunk)
    sha256: str
    total_chunks: int = 0
    total_size: int = 0


@dataclass(frozen=True)
class PushResult:
    committed: bool
    missing: list[int] = field(default_factory=list)
    versions: list[ExpertVersionRow] = field(default_factory=list)


class ChunkSink:
    """Writes the chunks of one PushChunks stream on a helper thread, so that receiving the next chunk overlaps
    writing this one (pwrite and hashlib release the GIL).

    `deferred`: the stream started the upload at chunk 0; while its chunks come in order their data is hashed only
    into the running content hash. `close(complete=True)` records them all if that hash is the content hash (else
    nothing: the content is refused, `bad_content`); `close(complete=False)` first verifies each written chunk
    against its offered hash and records only those that match (`bad_chunks` lists the others).

    `supersede()` (another thread): a newer stream or offer of the same update takes over, e.g. after a hard cut
    that this stream's handler has not noticed yet. The chunks that already arrived are written, verified and
    recorded at once, so that the resumed upload sends only what is really missing; nothing is written after."""

    MAX_QUEUED = 16
    # Start writing back every this many bytes on another thread, so that the fsync before the record (and the
    # acknowledgement) finds little left to write; durability still rests on that final fsync alone.
    SYNC_AHEAD_BYTES = 32 << 20

    def __init__(self, store: Store, upload: UploadRow, deferred: bool) -> None:
        self.store = store
        self.upload = upload
        self.writer = store.chunk_writer(upload)
        self.deferred = deferred
        self.was_deferred = deferred
        self.running: Any = hashlib.sha256() if deferred else None  # chunks 0..next_index-1
        self.next_index = 0
        self.digest: str | None = None
        self.bad_content = False
        self.bad_chunks: list[int] = []
        self.superseded = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-sink")
        self._pending: deque[Future[None]] = deque()
        self._write_lock = threading.Lock()  # held by each write: once `superseded` is set, nothing is written
        self._record_lock = threading.Lock()  # the writer's record (verify, flush, finish) has one user at a time
        self._finished = False
        self._unsynced = 0
        self._syncer: ThreadPoolExecutor | None = None  # started by the first SYNC_AHEAD_BYTES
        self._sync: Future[None] | None = None

    def _write(self, index: int, data: bytes | memoryview) -> None:
        with self._write_lock:
            if self.superseded:
                return
            self.writer.write(index, data)
        if self.running is not None:
            self.running.update(data)
        self._unsynced += len(data)
        if self._unsynced >= self.SYNC_AHEAD_BYTES and (self._sync is None or self._sync.done()):
            self._unsynced = 0
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-sync")
            self._sync = self._syncer.submit(self.writer.sync_ahead)

    def add(self, index: int, data: bytes | memoryview) -> None:
        if self.superseded:
            raise Refusal(RefusalCode.ABORTED, "a newer stream or offer of this update took over from this one")
        if self.deferred:
            self.next_index = index + 1
        self._pending.append(self._pool.submit(self._write, index, data))
        while len(self._pending) > self.MAX_QUEUED:
            self._pending.popleft().result()

    def _wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def flush(self) -> None:
        """Wait for the queued writes, fsync, record them (a chunk is on record only once it is on disk)."""
        self._wait()
        with self._record_lock:
            if not self._finished:
                self.writer.flush()

    def verify_now(self) -> None:
        """Leave deferred mode: check the chunks written so far one by one (dropping bad ones from the record)."""
        self._wait()
        with self._record_lock:
            if not self._finished:
                self._verify_written()
        self.deferred = False
        self.running = None

    def _verify_written(self) -> None:
        good: list[int] = []
        for index in self.writer.pending:
            data = self.store.read_chunk(self.upload, index)
            if data is not None and sha256_hex(data) == self.upload.chunk_hashes[index]:
                good.append(index)
            else:
                self.bad_chunks.append(index)
        self.writer.pending = good

    def _finish(self, complete: bool) -> None:
        """Verify (if deferred), fsync and record what was written; once, by `close` or `supersede`."""
        with self._record_lock:
            if self._finished:
                return
            self._finished = True
            if self.deferred and complete and not self.superseded:
                digest = self.running.hexdigest()
                if digest == self.upload.content_hash:
                    self.digest = digest
                else:
                    self.bad_content = True
                    self.writer.pending = []
            elif self.deferred:
                self._verify_written()
            self.writer.flush()

    def supersede(self) -> None:
        try:  # on the writer thread, after the chunks that already arrived: they are kept
            self._pool.submit(self._mark_superseded).result()
        except RuntimeError:  # the stream is closing: its writer takes no more work
            self._mark_superseded()
        self._finish(complete=False)

    def _mark_superseded(self) -> None:
        with self._write_lock:
            self.superseded = True

    def close(self, complete: bool) -> None:
        try:
            self._wait()
            self._finish(complete)
        finally:
            self._pool.shutdown(wait=True)
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)
            self.writer.close()
        if self.superseded:
            return  # the stream that took over owns the upload now
        if (self.bad_content or self.bad_chunks) and not self.store.received_chunks(self.upload.content_hash):
            self.store.reset_upload(self.upload.content_hash)  # nothing of it on record: no trace either


@dataclass(eq=False)
class Uploads:
    """The upload service of one node: `offer` and `push` (called by `server.py` once a call is admitted).

    It shares the node's lock, which serialises every state change (joins, assignment, offers, commits); chunk
    writes run outside it. `commits` counts the commits it made (the node's pull cache is keyed on it)."""

    store: Store
    manifest: Manifest
    strategy: Strategy
    ctx: NodeContext
    links: LinkState
    pacer: Pacer
    lock: threading.RLock
    max_update_bytes: int
    metrics: Metrics
    events: EventLog | None
    commits: int = field(default=0, init=False)
    # content hash -> the PushChunks stream writing it
    _streams: dict[str, ChunkSink] = field(default_factory=dict, init=False)
    _streams_lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def _check_offer_shape(self, offer: Offer) -> None:
        if not _HEX64.match(offer.content_hash):
            raise invalid(f"content_hash {offer.content_hash!r}: not a lowercase hex SHA-256")
        if not 0 < offer.size_bytes <= self.max_update_bytes:
            raise invalid(f"size_bytes {offer.size_bytes}: must be in 1..{self.max_update_bytes}")
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

    def emit(self, event: str, t: datetime | object = NOW, **fields: Any) -> None:
        """`t`: the event's emulated time (default: the log's clock now)."""
        if self.events is not None:
            self.events.emit(event, t, **fields)

    def _admitted_at(self, cluster: str) -> datetime:
        """The link gate for the commit; the instant it admitted the commit at is the commit's time (read once, so
        a commit admitted just before LOS is never recorded after it)."""
        now = gate(self.links, cluster)
        if now is None:  # a link state with a clock refuses without one; this guards the commit path
            raise Refusal(RefusalCode.UNAVAILABLE, "no emulated clock received yet")
        return now

    def offer(self, cluster: str, offer: Offer) -> tuple[bool, list[int]]:
        """(committed, missing chunk indices). Validates specs and ownership before recording anything."""
        self._check_offer_shape(offer)
        if self.store.commit_cluster(offer.content_hash) == cluster:
            return True, []
        experts = check_specs(self.manifest, offer.tensors)
        self._check_whole_model(experts)
        self._take_over(offer.content_hash, cluster)  # a re-offer after a hard cut: keep what the old stream wrote
        with self.lock:
            self.strategy.check_base(self.ctx, cluster, offer.base_version)
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
                gate(self.links, cluster)  # nothing moves over a link that went down; what arrived stays
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
        with self.lock:
            h = upload.content_hash
            if self.store.is_committed(h):
                return PushResult(True, [], self.store.versions_of_commit(h))
            # The link may have gone down during the push: keep the chunks, commit at the next pass.
            now = self._admitted_at(cluster)
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
        # called by _commit, under self.lock
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
        effect = self.strategy.apply(self.ctx, update)  # may refuse (a FedAvg round closed meanwhile)
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
        self.metrics.committed(cluster, upload.size, effect.staleness)
        self.commits += 1
        self.metrics.versions_made(effect)
        self.emit(
            "upload_committed",
            now,
            cluster=cluster,
            content_hash=h,
            bytes=upload.size,
            experts=[[v.layer, v.expert, v.version] for v in rows],
            **({"global_version": effect.global_version} if effect.global_version is not None else {}),
            **({"round": entry.round} if entry is not None else {}),
        )
        if effect.global_version is not None and entry is not None:
            self.emit("round_closed", version=effect.global_version, cause=effect.cause, at="upload")
        return PushResult(True, [], rows)
