"""The staging interface between training and the uplink (ARCHITECTURE §3 step 6, §4.4, §5.5, §11).

The trainer's side calls `stage` (the newest expert state, ready to go up at the next contact); the uplink's side
asks `pending` for what is due, `plan` for what of it to send now, and reports `mark_acked`/`record_acked`.

Upload planning: when a contact cannot carry the whole newest update, its experts go up in priority order, the
largest change since their last acknowledged state first, as separate smaller updates (the satellite accepts any
subset of a cluster's experts under `emsfl`); the rest follows at the next pass.

Layout: `<dir>/<content_hash>.safetensors` blobs, `<dir>/state.json`
({"newest": {hash, file, size, assignment_version, step}, "acked": [hash...], "bytes_uplinked"}) and
`<dir>/acked_experts.safetensors`, the last acknowledged parts of every expert, so that after a partial upload only
the experts still different from what the satellite holds are sent, and priorities are measured against what the
satellite has. Only the newest staged update matters: staging a new one deletes older unacknowledged blobs.
Every write is atomic (temporary file, fsync, rename), so the outbox survives a reboot.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import load_file, save

from emsfl.durable import atomic_write_bytes, atomic_write_json
from ground_node.errors import GroundError
from protos.wire import parse_expert_name, sha256_hex

log = logging.getLogger(__name__)

STATE = "state.json"
ACKED = "acked_experts.safetensors"
HEADER_ALLOWANCE = 4096  # safetensors header bytes per update (names, shapes)


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

    # ---- upload planning: the acknowledged experts and the priority order ------------------------------------

    def acked_tensors(self) -> dict[str, np.ndarray]:
        """The last acknowledged parts of every expert (empty before the first acknowledgement)."""
        path = self.dir / ACKED
        if not path.exists():
            return {}
        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # a torn file only costs priority precision
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}

    def record_acked(self, blob: bytes) -> None:
        """Merge an acknowledged update's tensors into the acknowledged experts."""
        acked = self.acked_tensors()
        acked.update(st_load(blob))
        atomic_write_bytes(self.dir / ACKED, save({n: np.ascontiguousarray(acked[n]) for n in sorted(acked)}))

    def rebase_acked(self, held: set[tuple[int, int]], handed_over: Mapping[str, np.ndarray]) -> None:
        """After a re-assignment: forget the experts no longer held (another cluster updates them now) and take the
        handed-over parts as what the satellite holds of the gained ones. Call it from the uplink's thread (the one
        that records acknowledgements), so the two never race."""
        handed = set(_experts(handed_over))
        kept = {
            n: a
            for n, a in self.acked_tensors().items()
            if (parsed := parse_expert_name(n)) is not None
            and (key := (parsed[0].layer, parsed[0].expert)) in held
            and key not in handed
        }
        merged = {**kept, **handed_over}
        atomic_write_bytes(self.dir / ACKED, save({n: np.ascontiguousarray(merged[n]) for n in sorted(merged)}))

    def plan(self, update: StagedUpdate, budget_bytes: float | None) -> StagedUpdate | None:
        """What to send of `update` now: itself, a priority-ordered part of its experts (staged as the in-flight
        update), or None when the satellite already holds every expert of it (then it is marked acknowledged).
        `budget_bytes`: what the rest of the contact can carry (None: unknown, send it all)."""
        newest = self.newest()
        if newest is None or newest.content_hash != update.content_hash:
            return update  # an in-flight part: resume it as it is
        acked = self.acked_tensors()
        if not acked and (budget_bytes is None or update.size <= budget_bytes):
            return update  # nothing sent in parts so far and it fits: the whole update, as staged
        tensors = dict(st_load(update.read()))
        experts = _experts(tensors)
        remaining = {
            k: names
            for k, names in experts.items()
            if any(n not in acked or not np.array_equal(acked[n], tensors[n]) for n in names)
        }
        if not remaining:
            self.mark_acked(update.content_hash, 0)  # every expert of it is on the satellite already
            return None
        if len(remaining) == len(experts) and (budget_bytes is None or update.size <= budget_bytes):
            return update
        size = {k: sum(tensors[n].nbytes for n in names) for k, names in remaining.items()}
        order = sorted(remaining, key=lambda k: (-change(tensors, acked, remaining[k]), k))
        chosen: list[tuple[int, int]] = []
        used = HEADER_ALLOWANCE
        for k in order:
            if chosen and budget_bytes is not None and used + size[k] > budget_bytes:
                break
            chosen.append(k)
            used += size[k]
        part = {n: tensors[n] for k in chosen for n in remaining[k]}
        log.info(
            "contact budget %s B: sending %d of %d remaining experts first (largest change first)",
            None if budget_bytes is None else int(budget_bytes),
            len(chosen),
            len(remaining),
        )
        return self.stage_part(part, update.assignment_version, update.step)


def _experts(tensors: Mapping[str, np.ndarray]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for name in sorted(tensors):
        parsed = parse_expert_name(name)
        if parsed is not None:
            out.setdefault((parsed[0].layer, parsed[0].expert), []).append(name)
    return out


def change(tensors: Mapping[str, np.ndarray], acked: Mapping[str, np.ndarray], names: list[str]) -> float:
    """L2 norm of an expert's change since its last acknowledged state (its whole norm if never acknowledged)."""
    total = 0.0
    for n in names:
        new = tensors[n].astype(np.float64)
        old = acked.get(n)
        diff = new if old is None or old.shape != new.shape else new - old.astype(np.float64)
        total += float(np.sum(diff * diff))
    return float(total**0.5)
