"""Durable, versioned state of the satellite node (ARCHITECTURE §5.5).

`<state>/state.sqlite` holds the small facts (clusters, affinities, assignment versions, expert versions,
commits, uploads and which chunks arrived, FedAvg round buffers, global versions; `schema.py`);
`<state>/blobs/<sha256>.safetensors` holds committed updates and derived (averaged, mixed) tensors (`blobs.py`), and
`<state>/partial/<sha256>/data` the chunks of an upload still in flight (`partial.py`).

Blobs are written to a temporary name, fsynced, renamed and their directory fsynced before anything refers to them:
after a crash the database never points at a missing or torn file, and `check_integrity` proves it. By default every
version is kept, so the global model can be rebuilt at any past emulated time; `keep_versions=N` keeps the newest N
per expert.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load

from protos.wire import ExpertKey
from satellite_node.store.integrity import check_integrity
from satellite_node.store.partial import PartialUploads
from satellite_node.store.rows import (
    AffinityRow,
    AssignmentRecord,
    ClusterRow,
    ExpertVersionRow,
    RoundUpload,
    version_row,
)
from satellite_node.store.schema import OPEN_ROUND_UPLOADS
from satellite_node.strategy import NewVersion


class Store(PartialUploads):
    """One state directory: everything the satellite node keeps across restarts."""

    def __init__(self, state_dir: str | Path, create: bool = True, keep_versions: int | None = None) -> None:
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (or None: keep all), got {keep_versions}")
        super().__init__(state_dir, create)
        self.keep_versions = keep_versions
        if create:
            self._sweep()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sweep(self) -> None:
        """Drop what a crash may leave behind: temporary files, chunk folders of no known upload, unreferenced blobs.

        A blob is written before the transaction that refers to it; a crash in between leaves an orphan blob,
        collected here (nothing was acknowledged for it).
        """
        for folder in (self.blobs, self.partial):
            for tmp in folder.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        known = {r[0] for r in self._rows("SELECT content_hash FROM uploads")}
        for folder in self.partial.iterdir():
            if folder.name not in known:
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
        live = self.referenced_blobs()
        for path in self.blobs.glob("*.safetensors"):
            if path.name.removesuffix(".safetensors") not in live:
                path.unlink(missing_ok=True)

    def referenced_blobs(self) -> set[str]:
        refs = {r[0] for r in self._rows("SELECT source_hash FROM expert_versions")}
        refs |= {r[0] for r in self._rows(OPEN_ROUND_UPLOADS)}
        refs |= {r[0] for r in self._rows("SELECT content_hash FROM commits WHERE blob_kept=1")}
        return refs

    def drop_stale_uploads(self, older_than_wall: float) -> list[str]:
        """Forget uploads offered before `older_than_wall` and never completed, with their chunks."""
        stale = [
            r[0] for r in self._rows("SELECT content_hash FROM uploads WHERE offered_wall < ?", (older_than_wall,))
        ]
        with self._tx() as db:
            for h in stale:
                db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (h,))
                db.execute("DELETE FROM uploads WHERE content_hash=?", (h,))
        for h in stale:
            shutil.rmtree(self._chunk_dir(h), ignore_errors=True)
        return stale

    def check_integrity(self) -> None:
        """Raise `IntegrityError` unless the state is what a crash-safe store can have (`integrity.py`)."""
        self.settle()
        check_integrity(self, self.referenced_blobs(), self.keep_versions)

    # clusters and affinities

    def upsert_cluster(self, row: ClusterRow, t: str | None, wall: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO clusters(id, device_id, capacity, num_examples, joined_t, joined_wall) VALUES(?,?,?,?,?,?)"
                " ON CONFLICT(id) DO UPDATE SET device_id=excluded.device_id, capacity=excluded.capacity,"
                " num_examples=excluded.num_examples",
                (row.id, row.device_id, row.capacity, row.num_examples, t, wall),
            )

    def clusters(self) -> dict[str, ClusterRow]:
        rows = self._rows("SELECT id, device_id, capacity, num_examples FROM clusters ORDER BY id")
        return {r[0]: ClusterRow(r[0], r[1], int(r[2]), int(r[3])) for r in rows}

    def put_affinity(self, row: AffinityRow, t: str | None, wall: float) -> None:
        gate, freq = (
            None if m is None else np.ascontiguousarray(m, dtype="<f4").tobytes() for m in (row.gate, row.freq)
        )
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO affinities VALUES(?,?,?,?,?,?,?,?)",
                (row.cluster, row.num_tokens, row.num_layers, row.num_experts, gate, freq, t, wall),
            )

    def affinities(self) -> dict[str, AffinityRow]:
        out: dict[str, AffinityRow] = {}
        for cluster, tokens, layers, experts, gate, freq, *_ in self._rows("SELECT * FROM affinities ORDER BY cluster"):
            shape = (int(layers), int(experts))
            gate_m, freq_m = (
                None if b is None else np.frombuffer(b, dtype="<f4").reshape(shape).copy() for b in (gate, freq)
            )
            out[cluster] = AffinityRow(cluster, int(tokens), shape[0], shape[1], gate_m, freq_m)
        return out

    # assignments

    def record_assignment(
        self,
        version: int,
        kind: str,
        owners: Mapping[tuple[int, int], str],
        t: str | None,
        wall: float,
        reason: str = "initial",
        requested_by: str = "",
    ) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO assignments VALUES(?,?,?,?,?,?)", (version, kind, t, wall, reason, requested_by))
            db.executemany(
                "INSERT INTO assignment_experts VALUES(?,?,?,?)",
                [(version, layer, expert, c) for (layer, expert), c in sorted(owners.items())],
            )

    def assignment_version(self) -> int:
        rows = self._rows("SELECT MAX(version) FROM assignments")
        return int(rows[0][0] or 0)

    def owners(self, version: int | None = None) -> dict[tuple[int, int], str] | None:
        """(layer, expert) -> cluster under `version` (default: the current one); None before any assignment."""
        version = self.assignment_version() if version is None else version
        if version <= 0:
            return None
        rows = self._rows("SELECT layer, expert, cluster FROM assignment_experts WHERE version=?", (version,))
        return {(int(r[0]), int(r[1])): r[2] for r in rows}

    def is_committed(self, content_hash: str) -> bool:
        return bool(self._rows("SELECT 1 FROM commits WHERE content_hash=?", (content_hash,)))

    def commit_cluster(self, content_hash: str) -> str | None:
        rows = self._rows("SELECT cluster FROM commits WHERE content_hash=?", (content_hash,))
        return rows[0][0] if rows else None

    def record_commit(
        self,
        content_hash: str,
        cluster: str,
        size: int,
        versions: list[NewVersion],
        t: str,
        t_unix: float,
        wall: float,
        round_upload: RoundUpload | None = None,
        global_version: int | None = None,
        cause: str = "",
    ) -> bool:
        """Record a commit, its versions, its round-buffer entry and new global version in one transaction
        (every blob is already durable).

        False, and no change, when this content was committed before: committing twice is a no-op.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM commits WHERE content_hash=?", (content_hash,)).fetchone():
                return False
            db.execute(
                "INSERT INTO commits(content_hash, cluster, bytes, t, t_unix, wall) VALUES(?,?,?,?,?,?)",
                (content_hash, cluster, size, t, t_unix, wall),
            )
            self._insert_versions(db, versions, content_hash, t, t_unix, wall)
            if round_upload is not None:
                db.execute(
                    "INSERT INTO round_uploads VALUES(?,?,?,?)",
                    (round_upload.round, round_upload.cluster, round_upload.content_hash, round_upload.weight),
                )
            if global_version is not None:
                db.execute("INSERT INTO global_versions VALUES(?,?,?,?)", (global_version, t, t_unix, cause))
            db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (content_hash,))
            db.execute("DELETE FROM uploads WHERE content_hash=?", (content_hash,))
        shutil.rmtree(self._chunk_dir(content_hash), ignore_errors=True)
        self._prune()
        return True

    def record_derived(
        self, versions: list[NewVersion], global_version: int, cause: str, t: str, t_unix: float, wall: float
    ) -> None:
        """Versions made without an upload (a FedAvg round closed at its deadline) and the new global version."""
        with self._tx() as db:
            self._insert_versions(db, versions, cause, t, t_unix, wall)
            db.execute("INSERT INTO global_versions VALUES(?,?,?,?)", (global_version, t, t_unix, cause))
        self._prune()

    @staticmethod
    def _insert_versions(
        db: sqlite3.Connection, versions: list[NewVersion], commit_hash: str, t: str, t_unix: float, wall: float
    ) -> None:
        db.executemany(
            "INSERT INTO expert_versions VALUES(?,?,?,?,?,?,?,?,?)",
            [
                (v.key.layer, v.key.expert, v.version, v.owner, v.source_hash, commit_hash, t, t_unix, wall)
                for v in versions
            ],
        )

    def _prune(self) -> None:
        """Keep the newest `keep_versions` versions per expert; delete blobs nothing refers to any more."""
        if self.keep_versions is None:
            return
        with self._tx() as db:
            db.execute(
                "DELETE FROM expert_versions WHERE version <= "
                "(SELECT MAX(v.version) FROM expert_versions v WHERE v.layer=expert_versions.layer"
                " AND v.expert=expert_versions.expert) - ?",
                (self.keep_versions,),
            )
            sources = {r[0] for r in db.execute("SELECT source_hash FROM expert_versions").fetchall()}
            buffered = {r[0] for r in db.execute(OPEN_ROUND_UPLOADS).fetchall()}
            db.execute(
                "UPDATE commits SET blob_kept=0 WHERE blob_kept=1 AND content_hash NOT IN "
                f"(SELECT source_hash FROM expert_versions) AND content_hash NOT IN ({OPEN_ROUND_UPLOADS})"
            )
            keep = sources | buffered
        for path in self.blobs.glob("*.safetensors"):
            if path.name.removesuffix(".safetensors") not in keep:
                self._delete_later(path)

    # global versions, rounds and assignment history

    def global_version(self) -> int:
        return int(self._rows("SELECT COALESCE(MAX(version), 0) FROM global_versions")[0][0])

    def global_version_time(self, version: int) -> float | None:
        rows = self._rows("SELECT t_unix FROM global_versions WHERE version=?", (version,))
        return float(rows[0][0]) if rows else None

    def round_uploads(self, round_: int) -> list[RoundUpload]:
        rows = self._rows("SELECT * FROM round_uploads WHERE round=? ORDER BY cluster", (round_,))
        return [RoundUpload(int(r[0]), r[1], r[2], float(r[3])) for r in rows]

    def assignment_history(self) -> list[AssignmentRecord]:
        rows = self._rows("SELECT version, t, reason, requested_by FROM assignments ORDER BY version")
        return [AssignmentRecord(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def generation(self) -> int:
        """Changes whenever the global model does (for caches)."""
        return int(self._rows("SELECT COUNT(*) FROM expert_versions")[0][0]) + 7919 * self.global_version()

    def current_version(self, key: ExpertKey) -> int:
        rows = self._rows(
            "SELECT MAX(version) FROM expert_versions WHERE layer=? AND expert=?", (key.layer, key.expert)
        )
        return int(rows[0][0] or 0)

    def versions_of_commit(self, content_hash: str) -> list[ExpertVersionRow]:
        rows = self._rows("SELECT * FROM expert_versions WHERE commit_hash=? ORDER BY layer, expert", (content_hash,))
        return [version_row(r) for r in rows]

    def newest_versions(self, at_unix: float | None = None) -> dict[ExpertKey, ExpertVersionRow]:
        """The newest version of every uploaded expert, committed at or before emulated `at_unix` if given."""
        sql = "SELECT * FROM expert_versions"
        args: tuple[Any, ...] = ()
        if at_unix is not None:
            sql += " WHERE t_unix <= ?"
            args = (at_unix,)
        newest: dict[ExpertKey, ExpertVersionRow] = {}
        for r in self._rows(sql + " ORDER BY layer, expert, version", args):
            row = version_row(r)
            newest[ExpertKey(row.layer, row.expert)] = row
        return newest

    def read_expert_parts(self, row: ExpertVersionRow) -> dict[str, np.ndarray]:
        prefix = f"expert/{row.layer}/{row.expert}/"
        tensors: dict[str, np.ndarray] = st_load(self.read_blob(row.source_hash))
        return {n: a for n, a in tensors.items() if n.startswith(prefix)}

    def uploads_in_flight(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM uploads")[0][0])

    def size_bytes(self) -> int:
        """Bytes of blobs and partial uploads on disk."""
        return sum(p.stat().st_size for folder in (self.blobs, self.partial) for p in folder.rglob("*") if p.is_file())

    def commits(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for content_hash, cluster, size, t in self._rows(
            "SELECT content_hash, cluster, bytes, t FROM commits ORDER BY seq"
        ):
            experts = [[v.layer, v.expert, v.version] for v in self.versions_of_commit(content_hash)]
            out.append(
                {"cluster": cluster, "content_hash": content_hash, "t": t, "bytes": int(size), "experts": experts}
            )
        return out

    def commit_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM commits")[0][0])

    def commit_stats(self) -> dict[str, tuple[int, int]]:
        """cluster -> (uploads committed, bytes received in committed uploads)."""
        rows = self._rows("SELECT cluster, COUNT(*), COALESCE(SUM(bytes), 0) FROM commits GROUP BY cluster")
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    # the StrategyContext protocol

    def read_expert(self, key: ExpertKey) -> dict[str, np.ndarray] | None:
        row = self.newest_versions().get(key)
        return None if row is None else self.read_expert_parts(row)
