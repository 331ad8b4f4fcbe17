"""Durable, versioned state of the satellite node (DESIGN §5.5).

`<state>/state.sqlite` holds the small facts (clusters, affinities, assignment versions, expert versions,
commits, uploads and which chunks arrived); `<state>/blobs/<sha256>.safetensors` holds committed updates
and `<state>/partial/<sha256>/<index>` the chunks of uploads still in flight. Every file is written to a
temporary name, fsynced, renamed and its directory fsynced, and only then recorded in SQLite
(WAL, synchronous=FULL): after a crash the database never points at a missing or torn file.
Every version is kept, so the global model can be rebuilt at any past emulated time.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protos.wire import ExpertKey, sha256_hex
from satellite_node.strategy import NewVersion

DB_FILE = "state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clusters(
    id TEXT PRIMARY KEY, device_id TEXT, capacity INTEGER NOT NULL, num_examples INTEGER NOT NULL,
    joined_t TEXT, joined_wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS affinities(
    cluster TEXT PRIMARY KEY, num_tokens INTEGER NOT NULL, num_layers INTEGER NOT NULL, num_experts INTEGER NOT NULL,
    gate BLOB, freq BLOB, t TEXT, wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments(version INTEGER PRIMARY KEY, kind TEXT NOT NULL, t TEXT, wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignment_experts(
    version INTEGER NOT NULL, layer INTEGER NOT NULL, expert INTEGER NOT NULL, cluster TEXT NOT NULL,
    PRIMARY KEY(version, layer, expert));
CREATE TABLE IF NOT EXISTS uploads(
    content_hash TEXT PRIMARY KEY, cluster TEXT NOT NULL, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
    chunk_hashes TEXT NOT NULL, tensors TEXT NOT NULL, assignment_version INTEGER NOT NULL,
    local_step INTEGER NOT NULL, offered_wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS upload_chunks(
    content_hash TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY(content_hash, idx));
CREATE TABLE IF NOT EXISTS commits(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT NOT NULL UNIQUE, cluster TEXT NOT NULL,
    bytes INTEGER NOT NULL, t TEXT NOT NULL, t_unix REAL NOT NULL, wall REAL NOT NULL);
CREATE TABLE IF NOT EXISTS expert_versions(
    layer INTEGER NOT NULL, expert INTEGER NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL,
    source_hash TEXT NOT NULL, commit_hash TEXT NOT NULL, t TEXT NOT NULL, t_unix REAL NOT NULL, wall REAL NOT NULL,
    PRIMARY KEY(layer, expert, version));
"""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write tmp, fsync, rename, fsync the directory: the file is either absent or complete."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class ClusterRow:
    id: str
    device_id: str
    capacity: int
    num_examples: int


@dataclass(frozen=True)
class AffinityRow:
    cluster: str
    num_tokens: int
    num_layers: int
    num_experts: int
    gate: np.ndarray | None  # L x E float32
    freq: np.ndarray | None


@dataclass(frozen=True)
class UploadRow:
    content_hash: str
    cluster: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[str, ...]
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) as offered
    assignment_version: int
    local_step: int


@dataclass(frozen=True)
class ExpertVersionRow:
    layer: int
    expert: int
    version: int
    owner: str
    source_hash: str
    commit_hash: str
    t: str
    t_unix: float


class Store:
    """One state directory. Thread-safe: one connection behind a lock (commits are rare and small)."""

    def __init__(self, state_dir: str | Path, create: bool = True) -> None:
        self.dir = Path(state_dir)
        db = self.dir / DB_FILE
        if not create and not db.is_file():
            raise FileNotFoundError(f"{db}: no satellite state here")
        self.blobs = self.dir / "blobs"
        self.partial = self.dir / "partial"
        for path in (self.dir, self.blobs, self.partial):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk before an update is acknowledged
        self._db.executescript(_SCHEMA)
        if create:
            self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _sweep(self) -> None:
        """Drop what a crash may leave behind: temporary files and chunk folders of no known upload."""
        for folder in (self.blobs, self.partial):
            for tmp in folder.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        known = {r[0] for r in self._rows("SELECT content_hash FROM uploads")}
        for folder in self.partial.iterdir():
            if folder.is_dir() and folder.name not in known:
                shutil.rmtree(folder, ignore_errors=True)

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES(?,?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._rows("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default

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
        self, version: int, kind: str, owners: Mapping[tuple[int, int], str], t: str | None, wall: float
    ) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO assignments VALUES(?,?,?,?)", (version, kind, t, wall))
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

    # uploads and chunks

    def _chunk_dir(self, content_hash: str) -> Path:
        return self.partial / content_hash

    def get_upload(self, content_hash: str) -> UploadRow | None:
        rows = self._rows("SELECT * FROM uploads WHERE content_hash=?", (content_hash,))
        if not rows:
            return None
        h, cluster, size, chunk_size, hashes, tensors, version, step, _ = rows[0]
        specs = tuple((n, d, tuple(s)) for n, d, s in json.loads(tensors))
        return UploadRow(
            h, cluster, int(size), int(chunk_size), tuple(json.loads(hashes)), specs, int(version), int(step)
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
                "INSERT OR REPLACE INTO uploads VALUES(?,?,?,?,?,?,?,?,?)",
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
                ),
            )
        if relayout:
            shutil.rmtree(self._chunk_dir(row.content_hash), ignore_errors=True)

    def received_chunks(self, content_hash: str) -> set[int]:
        return {int(r[0]) for r in self._rows("SELECT idx FROM upload_chunks WHERE content_hash=?", (content_hash,))}

    def put_chunk(self, content_hash: str, index: int, data: bytes) -> None:
        """Durably store one verified chunk, then record it (a chunk on record is always on disk)."""
        folder = self._chunk_dir(content_hash)
        folder.mkdir(exist_ok=True)
        atomic_write(folder / f"{index:08d}", data)
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO upload_chunks VALUES(?,?)", (content_hash, index))

    def assemble(self, upload: UploadRow) -> bytes:
        folder = self._chunk_dir(upload.content_hash)
        return b"".join((folder / f"{i:08d}").read_bytes() for i in range(len(upload.chunk_hashes)))

    # blobs, commits and expert versions

    def blob_path(self, content_hash: str) -> Path:
        return self.blobs / f"{content_hash}.safetensors"

    def put_blob(self, blob: bytes) -> str:
        content_hash = sha256_hex(blob)
        path = self.blob_path(content_hash)
        if not path.exists():  # content-addressed: an existing blob is the same bytes
            atomic_write(path, blob)
        return content_hash

    def read_blob(self, content_hash: str) -> bytes:
        return self.blob_path(content_hash).read_bytes()

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
    ) -> bool:
        """Record a commit and its versions in one transaction (the blob is already durable).

        False, and no change, when this content was committed before: committing twice is a no-op.
        """
        with self._tx() as db:
            if db.execute("SELECT 1 FROM commits WHERE content_hash=?", (content_hash,)).fetchone():
                return False
            db.execute(
                "INSERT INTO commits(content_hash, cluster, bytes, t, t_unix, wall) VALUES(?,?,?,?,?,?)",
                (content_hash, cluster, size, t, t_unix, wall),
            )
            db.executemany(
                "INSERT INTO expert_versions VALUES(?,?,?,?,?,?,?,?,?)",
                [
                    (v.key.layer, v.key.expert, v.version, v.owner, v.source_hash, content_hash, t, t_unix, wall)
                    for v in versions
                ],
            )
            db.execute("DELETE FROM upload_chunks WHERE content_hash=?", (content_hash,))
            db.execute("DELETE FROM uploads WHERE content_hash=?", (content_hash,))
        shutil.rmtree(self._chunk_dir(content_hash), ignore_errors=True)
        return True

    def current_version(self, key: ExpertKey) -> int:
        rows = self._rows(
            "SELECT MAX(version) FROM expert_versions WHERE layer=? AND expert=?", (key.layer, key.expert)
        )
        return int(rows[0][0] or 0)

    def versions_of_commit(self, content_hash: str) -> list[ExpertVersionRow]:
        rows = self._rows("SELECT * FROM expert_versions WHERE commit_hash=? ORDER BY layer, expert", (content_hash,))
        return [_version_row(r) for r in rows]

    def newest_versions(self, at_unix: float | None = None) -> dict[ExpertKey, ExpertVersionRow]:
        """The newest version of every uploaded expert, committed at or before emulated `at_unix` if given."""
        sql = "SELECT * FROM expert_versions"
        args: tuple[Any, ...] = ()
        if at_unix is not None:
            sql += " WHERE t_unix <= ?"
            args = (at_unix,)
        newest: dict[ExpertKey, ExpertVersionRow] = {}
        for r in self._rows(sql + " ORDER BY layer, expert, version", args):
            row = _version_row(r)
            newest[ExpertKey(row.layer, row.expert)] = row
        return newest

    def read_expert_parts(self, row: ExpertVersionRow) -> dict[str, np.ndarray]:
        prefix = f"expert/{row.layer}/{row.expert}/"
        tensors: dict[str, np.ndarray] = st_load(self.read_blob(row.source_hash))
        return {n: a for n, a in tensors.items() if n.startswith(prefix)}

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

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        return self.put_blob(st_save(dict(tensors)))


def _version_row(r: tuple[Any, ...]) -> ExpertVersionRow:
    return ExpertVersionRow(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], float(r[7]))
