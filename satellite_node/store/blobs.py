"""Content-addressed blobs: `<state>/blobs/<sha256>.safetensors`, written atomically, deleted off the commit path."""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from emsfl.durable import atomic_write_bytes
from protos.wire import sha256_hex
from satellite_node.store.base import StoreBase


class BlobStore(StoreBase):
    def __init__(self, state_dir: str | Path, create: bool = True) -> None:
        super().__init__(state_dir, create)
        self._reaper: ThreadPoolExecutor | None = None  # deletes pruned blobs off the commit path
        self._reaped: list[Future[None]] = []

    def close(self) -> None:
        self.settle()
        with self._lock:
            if self._reaper is not None:
                self._reaper.shutdown(wait=True)
        super().close()

    def blob_path(self, content_hash: str) -> Path:
        return self.blobs / f"{content_hash}.safetensors"

    def put_blob(self, blob: bytes) -> str:
        content_hash = sha256_hex(blob)
        path = self.blob_path(content_hash)
        if not path.exists():  # content-addressed: an existing blob is the same bytes
            atomic_write_bytes(path, blob)
        return content_hash

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        return self.put_blob(st_save(dict(tensors)))

    def read_blob(self, content_hash: str) -> bytes:
        return self.blob_path(content_hash).read_bytes()

    def map_blob(self, content_hash: str) -> memoryview:
        """A read-only memory map of a blob (no copy; stays valid after the file is unlinked)."""
        with open(self.blob_path(content_hash), "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))

    def _delete_later(self, path: Path) -> None:
        """Delete a blob off the commit path: freeing a large file takes tens of milliseconds that the
        acknowledgement need not wait for. The blob leaves its name at once (a rename), so the same content can
        be stored again right away; a crash before the deletion leaves a temporary file that the next open sweeps."""
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            os.replace(path, tmp)
        except FileNotFoundError:
            return
        with self._lock:
            if self._reaper is None:
                self._reaper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blob-reaper")
            self._reaped = [f for f in self._reaped if not f.done()]  # bounded: only deletions still due
            self._reaped.append(self._reaper.submit(tmp.unlink, True))

    def settle(self) -> None:
        """Wait until the deletions handed to the background are done."""
        with self._lock:
            pending, self._reaped = self._reaped, []
        for future in pending:
            future.result()
