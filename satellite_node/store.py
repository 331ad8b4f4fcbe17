"""Durable, versioned state of the satellite node (ARCHITECTURE §5.5).

`<state>/state.sqlite` holds the small facts (clusters, affinities, assignment versions, expert versions,
commits, uploads and which chunks arrived, FedAvg round buffers, global versions); `<state>/blobs/<sha256>.safetensors`
holds committed updates and derived (averaged, mixed) tensors, and `<state>/partial/<sha256>/data` the chunks of an
upload still in flight, each written at its offset, so the completed file *is* the blob and a commit only renames it.

Durability: a chunk is recorded in SQLite (WAL, synchronous=FULL) only after its bytes were fsynced, and a whole
batch of chunks (one PushChunks stream) shares one fsync and one transaction. Blobs are written to a temporary
name, fsynced, renamed and their directory fsynced before anything refers to them: after a crash the database
never points at a missing or torn file, and `check_integrity` proves it. By default every version is kept, so the
global model can be rebuilt at any past emulated time; `keep_versions=N` keeps the newest N per expert.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from emsfl.durable import atomic_write_bytes, fsync_dir
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
CREATE TABLE IF NOT EXISTS assignments(version INTEGER PRIMARY KEY, kind TEXT NOT NULL, t TEXT, wall REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT 'initial', requested_by TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS assignment_experts(
    version INTEGER NOT NULL, layer INTEGER NOT NULL, expert INTEGER NOT NULL, cluster TEXT NOT NULL,
    PRIMARY KEY(version, layer, expert));
CREATE TABLE IF NOT EXISTS uploads(
    content_hash TEXT PRIMARY KEY, cluster TEXT NOT NULL, size INTEGER NOT NULL, chunk_size INTEGER NOT NULL,
    chunk_hashes TEXT NOT NULL, tensors TEXT NOT NULL, assignment_version INTEGER NOT NULL,
    local_step INTEGER NOT NULL, offered_wall REAL NOT NULL, base_version INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS upload_chunks(
    content_hash TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY(content_hash, idx));
CREATE TABLE IF NOT EXISTS commits(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT NOT NULL UNIQUE, cluster TEXT NOT NULL,
    bytes INTEGER NOT NULL, t TEXT NOT NULL, t_unix REAL NOT NULL, wall REAL NOT NULL,
    blob_kept INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS expert_versions(
    layer INTEGER NOT NULL, expert INTEGER NOT NULL, version INTEGER NOT NULL, owner TEXT NOT NULL,
    source_hash TEXT NOT NULL, commit_hash TEXT NOT NULL, t TEXT NOT NULL, t_unix REAL NOT NULL, wall REAL NOT NULL,
    PRIMARY KEY(layer, expert, version));
CREATE TABLE IF NOT EXISTS global_versions(version INTEGER PRIMARY KEY, t TEXT NOT NULL, t_unix REAL NOT NULL,
    cause TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS round_uploads(
    round INTEGER NOT NULL, cluster TEXT NOT NULL, content_hash TEXT NOT NULL, weight REAL NOT NULL,
    PRIMARY KEY(round, cluster));
"""

# Columns added after the first schema: older state directories get them on open.
_MIGRATIONS = (
    ("assignments", "reason", "TEXT NOT NULL DEFAULT 'initial'"),
    ("assignments", "requested_by", "TEXT NOT NULL DEFAULT ''"),
    ("uploads", "base_version", "INTEGER NOT NULL DEFAULT 0"),
    ("commits", "blob_kept", "INTEGER NOT NULL DEFAULT 1"),
)
PARTIAL_FILE = "data"
# FedAvg uploads of the round still open (closed rounds are recorded as global versions).
_OPEN_ROUND_UPLOADS = (
    "SELECT content_hash FROM round_uploads WHERE round >= (SELECT COALESCE(MAX(version), 0) FROM global_versions)"
)


class IntegrityError(AssertionError):
    """`Store.check_integrity` found state that a crash-safe store can never have."""


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
    base_version: int = 0


@dataclass(frozen=True)
class RoundUpload:
    """A committed FedAvg upload waiting in its round's buffer."""

    round: int
    cluster: str
    content_hash: str
    weight: float


@dataclass(frozen=True)
class AssignmentRecord:
    version: int
    t: str | None
    reason: str
    requested_by: str


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

    def __init__(self, state_dir: str | Path, create: bool = True, keep_versions: int | None = None) -> None:
        self.dir = Path(state_dir)
        db = self.dir / DB_FILE
        if not create and not db.is_file():
            raise FileNotFoundError(f"{db}: no satellite state here")
        self.blobs = self.dir / "blobs"
        self.partial = self.dir / "partial"
        for path in (self.dir, self.blobs, self.partial):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._reaper: ThreadPoolExecutor | None = None  # deletes pruned blobs off the commit path
        self._reaped: list[Future[None]] = []
        self._db = sqlite3.connect(db, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk before an update is acknowledged
        self._db.executescript(_SCHEMA)
        for table, column, decl in _MIGRATIONS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        if keep_versions is not None and keep_versions < 1:
            raise ValueError(f"keep_versions must be >= 1 (or None: keep all), got {keep_versions}")
        self.keep_versions = keep_versions
        if create:
            self._sweep()

    def close(self) -> None:
        self.settle()
        with self._lock:
            if self._reaper is not None:
                self._reaper.shutdown(wait=True)
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
        live = self._referenced_blobs()
        for path in self.blobs.glob("*.safetensors"):
            if path.name.removesuffix(".safetensors") not in live:
                path.unlink(missing_ok=True)

    def _referenced_blobs(self) -> set[str]:
        refs = {r[0] for r in self._rows("SELECT source_hash FROM expert_versions")}
        refs |= {r[0] for r in self._rows(_OPEN_ROUND_UPLOADS)}
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
        """Raise `IntegrityError` unless the state is what a crash-safe store can have.

        Every recorded blob (expert versions, FedAvg round buffers, kept commits) exists and hashes to its name;
        every expert version's blob carries that expert; no blob, chunk folder or chunk record is orphaned;
        every recorded chunk of an upload in flight is on disk with its hash; versions count up from 1.
        """
        self.settle()
        problems: list[str] = []
        live = self._referenced_blobs()
        on_disk = {p.name.removesuffix(".safetensors") for p in self.blobs.glob("*.safetensors")}
        for h in sorted(live - on_disk):
            problems.append(f"blob {h[:16]} is recorded but missing")
        for h in sorted(on_disk - live):
            problems.append(f"blob {h[:16]} is on disk but referenced by nothing")
        for h in sorted(live & on_disk):
            if file_sha256(self.blob_path(h)) != h:
                problems.append(f"blob {h[:16]} does not hash to its name")
        for layer, expert, version, source in self._rows(
            "SELECT layer, expert, version, source_hash FROM expert_versions"
        ):
            if source in on_disk:
                names = safetensors_names(self.blob_path(source))
                if not any(n.startswith(f"expert/{layer}/{expert}/") for n in names):
                    problems.append(f"expert/{layer}/{expert} v{version}: blob {source[:16]} lacks its tensors")
        for layer, expert, count, top in self._rows(
            "SELECT layer, expert, COUNT(*), MAX(version) FROM expert_versions GROUP BY layer, expert"
        ):
            if self.keep_versions is None and int(count) != int(top):
                problems.append(f"expert/{layer}/{expert}: versions are not 1..{top}")
        uploads = {r[0] for r in self._rows("SELECT content_hash FROM uploads")}
        committed = {r[0] for r in self._rows("SELECT content_hash FROM commits")}
        for h in sorted(uploads & committed):
            problems.append(f"upload {h[:16]} is both in flight and committed")
        for h, idx in self._rows("SELECT content_hash, idx FROM upload_chunks"):
            row = self.get_upload(h)
            if row is None:
                problems.append(f"chunk {idx} of {h[:16]} belongs to no upload")
                continue
            data = self.read_chunk(row, int(idx))
            if data is None or sha256_hex(data) != row.chunk_hashes[int(idx)]:
                problems.append(f"chunk {idx} of {h[:16]} is recorded but not on disk intact")
        for folder in self.partial.iterdir():
            if folder.name not in uploads:
                problems.append(f"partial/{folder.name} belongs to no upload")
        for folder in (self.blobs, self.partial):
            for tmp in folder.rglob(".*.tmp"):
                problems.append(f"temporary file {tmp.relative_to(self.dir)} left behind")
        if problems:
            raise IntegrityError("; ".join(problems))

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

    # uploads and chunks

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

    # blobs, commits and expert versions

    def blob_path(self, content_hash: str) -> Path:
        return self.blobs / f"{content_hash}.safetensors"

    def put_blob(self, blob: bytes) -> str:
        content_hash = sha256_hex(blob)
        path = self.blob_path(content_hash)
        if not path.exists():  # content-addressed: an existing blob is the same bytes
            atomic_write_bytes(path, blob)
        return content_hash

    def read_blob(self, content_hash: str) -> bytes:
        return self.blob_path(content_hash).read_bytes()

    def map_blob(self, content_hash: str) -> memoryview:
        """A read-only memory map of a blob (no copy; stays valid after the file is unlinked)."""
        with open(self.blob_path(content_hash), "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                return memoryview(b"")
            return memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))

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
            buffered = {r[0] for r in db.execute(_OPEN_ROUND_UPLOADS).fetchall()}
            db.execute(
                "UPDATE commits SET blob_kept=0 WHERE blob_kept=1 AND content_hash NOT IN "
                f"(SELECT source_hash FROM expert_versions) AND content_hash NOT IN ({_OPEN_ROUND_UPLOADS})"
            )
            keep = sources | buffered
        for path in self.blobs.glob("*.safetensors"):
            if path.name.removesuffix(".safetensors") not in keep:
                self._delete_later(path)

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

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        return self.put_blob(st_save(dict(tensors)))


def _version_row(r: tuple[Any, ...]) -> ExpertVersionRow:
    return ExpertVersionRow(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], float(r[7]))


class ChunkWriter:
    """Verified chunks of one upload go to their offsets in `partial/<hash>/data`; `flush` fsyncs the file once
    and records every written index in one transaction, so a chunk is never on record before it is on disk."""

    def __init__(self, store: Store, upload: UploadRow) -> None:
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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def safetensors_names(path: Path) -> list[str]:
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            return []
        n = int.from_bytes(head, "little")
        try:
            header = json.loads(handle.read(min(n, 100 << 20)))
        except ValueError:
            return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
