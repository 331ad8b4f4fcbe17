"""Staged updates on disk (ARCHITECTURE §4.4, §5.5): the newest expert state, ready to go up at the next contact.

Layout: `<dir>/<content_hash>.safetensors` blobs and `<dir>/state.json`
({"newest": {hash, file, size, assignment_version, step}, "acked": [hash...], "bytes_uplinked"}).
Only the newest staged update matters: staging a new one deletes older unacknowledged blobs.
Every write is atomic (temporary file, fsync, rename), so the outbox survives a reboot.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save

from emsfl.durable import atomic_write_bytes, atomic_write_json
from ground_node.errors import GroundError
from protos.wire import parse_expert_name, sha256_hex

STATE = "state.json"


@dataclass(frozen=True)
class StagedUpdate:
    content_hash: str
    path: Path
    size: int
    assignment_version: int
    step: int

    def read(self) -> bytes:
        return self.path.read_bytes()


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._state = self._load()

    def _load(self) -> dict[str, Any]:
        path = self.dir / STATE
        if not path.exists():
            return {"newest": None, "acked": [], "bytes_uplinked": 0}
        try:
            state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise GroundError(f"outbox state {path} is corrupt: {exc}") from exc
        newest = state.get("newest")
        if newest is not None and not (self.dir / newest["file"]).exists():
            state["newest"] = None  # blob lost: nothing to send until the next stage
        return state

    def stage(self, tensors: Mapping[str, np.ndarray], assignment_version: int, step: int) -> StagedUpdate:
        """Write a new update (every held expert's complete parts, float32) and make it the newest."""
        if not tensors:
            raise GroundError("cannot stage an empty update")
        for name in tensors:
            if parse_expert_name(name) is None:
                raise GroundError(f"cannot stage {name!r}: not an expert/<l>/<e>/<part> name")
        arrays = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in sorted(tensors.items())}
        blob = save(arrays)  # no metadata: its order is not deterministic, and the hash must be
        content_hash = sha256_hex(blob)
        file = f"{content_hash}.safetensors"
        with self._lock:
            atomic_write_bytes(self.dir / file, blob)
            old = self._state.get("newest")
            self._state["newest"] = {
                "hash": content_hash,
                "file": file,
                "size": len(blob),
                "assignment_version": assignment_version,
                "step": step,
            }
            atomic_write_json(self.dir / STATE, self._state)
            inflight = self._state.get("inflight")
            if (
                old is not None
                and old["hash"] != content_hash
                and (inflight is None or inflight["hash"] != old["hash"])
            ):
                (self.dir / old["file"]).unlink(missing_ok=True)  # superseded, sent or not (unless mid-upload)
            return self._update(self._state["newest"])

    def stage_part(self, tensors: Mapping[str, np.ndarray], assignment_version: int, step: int) -> StagedUpdate:
        """Write a part of the newest update (some of its experts) and make it the in-flight upload."""
        arrays = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in sorted(tensors.items())}
        blob = save(arrays)
        content_hash = sha256_hex(blob)
        file = f"{content_hash}.safetensors"
        atomic_write_bytes(self.dir / file, blob)
        entry = {"hash": content_hash, "file": file, "size": len(blob), "assignment_version": assignment_version}
        update = self._update({**entry, "step": step})
        self.mark_inflight(update)  # its blob was just written: always marked
        return update

    def mark_inflight(self, update: StagedUpdate) -> bool:
        """The upload that starts: `pending()` returns it until it is acknowledged or dropped, even when a newer
        update is staged meanwhile (a cut upload is resumed, not restarted with new content). False when its blob
        is gone already (superseded between `pending()` and this call): send the newer one instead."""
        with self._lock:
            current = self._state.get("inflight")
            if current is not None and current["hash"] == update.content_hash:
                return True
            if not update.path.exists():
                return False
            self._drop_inflight_locked()
            self._state["inflight"] = {
                "hash": update.content_hash,
                "file": update.path.name,
                "size": update.size,
                "assignment_version": update.assignment_version,
                "step": update.step,
            }
            atomic_write_json(self.dir / STATE, self._state)
            return True

    def drop_inflight(self, content_hash: str) -> None:
        """Give up an in-flight upload (refused: stale or invalid)."""
        with self._lock:
            current = self._state.get("inflight")
            if current is not None and current["hash"] == content_hash:
                self._drop_inflight_locked()
                atomic_write_json(self.dir / STATE, self._state)

    def _drop_inflight_locked(self) -> None:
        current = self._state.get("inflight")
        self._state["inflight"] = None
        newest = self._state.get("newest")
        if current is not None and (newest is None or newest["hash"] != current["hash"]):
            (self.dir / current["file"]).unlink(missing_ok=True)

    def _update(self, entry: Mapping[str, Any]) -> StagedUpdate:
        return StagedUpdate(
            content_hash=entry["hash"],
            path=self.dir / entry["file"],
            size=int(entry["size"]),
            assignment_version=int(entry["assignment_version"]),
            step=int(entry["step"]),
        )

    def newest(self) -> StagedUpdate | None:
        with self._lock:
            entry = self._state.get("newest")
            return None if entry is None else self._update(entry)

    def pending(self) -> StagedUpdate | None:
        """The newest staged update if it has not been acknowledged yet."""
        with self._lock:
            inflight = self._state.get("inflight")
            if (
                inflight is not None
                and inflight["hash"] not in self._state["acked"]
                and (self.dir / inflight["file"]).exists()
            ):
                return self._update(inflight)
            entry = self._state.get("newest")
            if entry is None or entry["hash"] in self._state["acked"]:
                return None
            return self._update(entry)

    def mark_acked(self, content_hash: str, size: int) -> None:
        with self._lock:
            if content_hash in self._state["acked"]:
                return
            self._state["acked"].append(content_hash)
            self._state["bytes_uplinked"] = int(self._state["bytes_uplinked"]) + size
            inflight = self._state.get("inflight")
            if inflight is not None and inflight["hash"] == content_hash:
                self._drop_inflight_locked()
            atomic_write_json(self.dir / STATE, self._state)

    def add_bytes(self, size: int) -> None:
        """Count bytes pushed (chunks) toward the uplink total even before a commit."""
        with self._lock:
            self._state["bytes_sent"] = int(self._state.get("bytes_sent", 0)) + size
            atomic_write_json(self.dir / STATE, self._state)

    def acked(self) -> list[str]:
        with self._lock:
            return list(self._state["acked"])

    @property
    def bytes_uplinked(self) -> int:
        with self._lock:
            return int(self._state.get("bytes_sent", self._state["bytes_uplinked"]))
