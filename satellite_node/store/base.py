"""The state directory and its database connection, shared by every part of the store."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from satellite_node.store.schema import DB_FILE, open_db


class StoreBase:
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
        self._db = open_db(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES(?,?)", (key, json.dumps(value)))

    def get_meta(self, key: str, default: Any = None) -> Any:
        rows = self._rows("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else default
