"""Uploads in flight (ARCHITECTURE §5.2): what an offer and a chunk carry, and the sink that writes one PushChunks
stream to the store on a helper thread."""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from protos.wire import sha256_hex
from satellite_node.store import ExpertVersionRow, Store, UploadRow
from satellite_node.validate import (
    Refusal,
    RefusalCode,
    Spec,
)


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
    data: bytes | memoryview  # a view into the received message on the gRPC path (satellite_node/chunkwire.py)
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
