"""Uploads in flight: the offer on record, and its verified chunks written at their offsets in
`<state>/partial/<sha256>/data`, so the completed file *is* the blob and a commit only links it into place.

A chunk is recorded in SQLite only after its bytes were fsynced, and a whole batch of chunks (one PushChunks stream)
shares one fsync and one transaction.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import uuid
from pathlib import Path

from emsfl.durable import fsync_dir
from satellite_node.store.blobs import BlobStore
from satellite_node.store.rows import UploadRow

PARTIAL_FILE = "data"


class PartialUploads(BlobStore):
    def _chunk_dir(self, content_hash: str) -> Path:
        return self.partial / content_hash

    def get_upload(self, content_hash: str) -> UploadRow | None:
        rows = self._rows("SELECT * FROM uploads WHERE content_hash=?", (content_hash,))
        if not rows:
            return None
        h, cluster, size, chunk_size, hashes, tensors, version, step, _, base_version = rows[0]
        specs = tuple((n, d, tuple(s)) for n, d, s in json.loads(tensors))
        return UploadRow(
            h,
            cluster,
            int(size),
            int(chunk_size),
            tuple(json.loads(hashes)),
            specs,
            int(version),
            int(step),
            int(base_version),
        )

    def put_upload(self, row: UploadRow, wall: float) -> None:
        """Record an offer; an offer of the same content with another chunk layout starts it over."""
        old = self.get_upload(row.content_hash)
        relayout = old is not None and (old.chunk_size, old.chunk_hashes, old.size) != (
            row.chunk_size,
            row.chunk_hashes,
            row.size,
        )
        with self._tx() as db:
            if relayout:
                db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (row.content_hash,))
            db.execute(
                "INSERT OR REPLACE INTO uploads VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    row.content_hash,
                    row.cluster,
                    row.size,
                    row.chunk_size,
                    json.dumps(list(row.chunk_hashes)),
                    json.dumps([[n, d, list(s)] for n, d, s in row.tensors]),
                    row.assignment_version,
                    row.local_step,
                    wall,
                    row.base_version,
                ),
            )
        if relayout:
            shutil.rmtree(self._chunk_dir(row.content_hash), ignore_errors=True)

    def received_chunks(self, content_hash: str) -> set[int]:
        return {int(r[0]) for r in self._rows("SELECT idx FROM upload_chunks WHERE content_hash=?", (content_hash,))}

    def partial_path(self, content_hash: str) -> Path:
        return self._chunk_dir(content_hash) / PARTIAL_FILE

    def chunk_writer(self, upload: UploadRow) -> ChunkWriter:
        """Writes verified chunks at their offsets; `flush()` fsyncs them and only then records them."""
        return ChunkWriter(self, upload)

    def put_chunk(self, content_hash: str, index: int, data: bytes | memoryview) -> None:
        """Durably store one verified chunk, then record it (a chunk on record is always on disk)."""
        upload = self.get_upload(content_hash)
        if upload is None:
            raise KeyError(f"no upload {content_hash[:16]} on record")
        with self.chunk_writer(upload) as writer:
            writer.write(index, data)

    def _record_chunks(self, content_hash: str, indices: list[int]) -> None:
        # only while the upload is in flight: a stream that ends after its update was committed (or forgotten)
        # through another stream must not leave chunk records that belong to no upload
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO upload_chunks SELECT ?, ? WHERE EXISTS"
                " (SELECT 1 FROM uploads WHERE content_hash=?)",
                [(content_hash, i, content_hash) for i in indices],
            )

    def read_chunk(self, upload: UploadRow, index: int) -> bytes | None:
        try:
            with open(self.partial_path(upload.content_hash), "rb") as handle:
                handle.seek(index * upload.chunk_size)
                want = min(upload.chunk_size, upload.size - index * upload.chunk_size)
                data = handle.read(want)
        except OSError:
            return None
        return data if len(data) == want else None

    def map_partial(self, upload: UploadRow) -> memoryview:
        """A read-only map of a completed partial upload (no copy)."""
        with open(self.partial_path(upload.content_hash), "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != upload.size:
                raise OSError(f"partial upload {upload.content_hash[:16]} has {size} bytes, expected {upload.size}")
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))

    def reset_upload(self, content_hash: str) -> None:
        """Back to "offered, nothing received": drop the chunks of an upload whose content was refused."""
        with self._tx() as db:
            db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (content_hash,))
        shutil.rmtree(self._chunk_dir(content_hash), ignore_errors=True)

    def forget_upload(self, content_hash: str) -> None:
        """Drop an upload in flight and its chunks (it can never commit)."""
        with self._tx() as db:
            db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (content_hash,))
            db.execute("DELETE FROM uploads WHERE content_hash=?", (content_hash,))
        shutil.rmtree(self._chunk_dir(content_hash), ignore_errors=True)

    def assemble(self, upload: UploadRow) -> bytes:
        return self.partial_path(upload.content_hash).read_bytes()

    def adopt_partial(self, upload: UploadRow) -> None:
        """Make the completed partial file of `upload` its blob: a hard link (no copy), so a crash before the commit
        is recorded leaves the partial upload intact (and an orphan blob that the next open collects)."""
        path = self.blob_path(upload.content_hash)
        if path.exists():
            return
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.link(self.partial_path(upload.content_hash), tmp)
        except OSError:  # a filesystem without hard links: copy
            shutil.copyfile(self.partial_path(upload.content_hash), tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(self.blobs)


class ChunkWriter:
    """Verified chunks of one upload go to their offsets in `partial/<hash>/data`; `flush` fsyncs the file once
    and records every written index in one transaction, so a chunk is never on record before it is on disk."""

    def __init__(self, store: PartialUploads, upload: UploadRow) -> None:
        self.store = store
        self.upload = upload
        folder = store._chunk_dir(upload.content_hash)
        created = not folder.exists()
        folder.mkdir(exist_ok=True)
        path = folder / PARTIAL_FILE
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            fsync_dir(store.partial)
        self._new_file = created
        self.pending: list[int] = []
        self._sync_error: OSError | None = None

    def write(self, index: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        offset = index * self.upload.chunk_size
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        self.pending.append(index)

    def sync_ahead(self) -> None:
        """Write back what was written so far, recording nothing (durability rests on `flush`). Linux reports a
        writeback error to one fsync of a descriptor only, so a failure here is kept and raised by `flush`."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._sync_error = exc

    def flush(self) -> list[int]:
        """fsync, then record what was written since the last flush; returns the indices recorded."""
        if not self.pending:
            return []
        if self._sync_error is not None:
            raise self._sync_error
        os.fsync(self._fd)
        if self._new_file:
            fsync_dir(self.store._chunk_dir(self.upload.content_hash))
            self._new_file = False
        done, self.pending = self.pending, []
        self.store._record_chunks(self.upload.content_hash, done)
        return done

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.flush()
        finally:
            self.close()
