"""The satellite state database: its tables, the columns added since the first schema, and opening it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

DB_FILE = "state.sqlite"

SCHEMA = """
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
MIGRATIONS = (
    ("assignments", "reason", "TEXT NOT NULL DEFAULT 'initial'"),
    ("assignments", "requested_by", "TEXT NOT NULL DEFAULT ''"),
    ("uploads", "base_version", "INTEGER NOT NULL DEFAULT 0"),
    ("commits", "blob_kept", "INTEGER NOT NULL DEFAULT 1"),
)
# FedAvg uploads of the round still open (closed rounds are recorded as global versions).
OPEN_ROUND_UPLOADS = (
    "SELECT content_hash FROM round_uploads WHERE round >= (SELECT COALESCE(MAX(version), 0) FROM global_versions)"
)


def open_db(path: Path) -> sqlite3.Connection:
    """Open (or create) the database and bring an older schema up to date."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a COMMIT is on disk before an update is acknowledged
    db.executescript(SCHEMA)
    for table, column, decl in MIGRATIONS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
    return db
