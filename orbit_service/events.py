"""The `--events` JSON-lines log: one object per line, flushed at once so a killed process loses nothing."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from protos.timefmt import to_iso


class EventLog:
    def __init__(self, path: str | Path, role: str = "orbit", node_id: str = "orbit") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        self.role, self.node_id = role, node_id

    def write(self, event: str, t: datetime | None, **fields: Any) -> None:
        record = {
            "t": None if t is None else to_iso(t),
            "wall": time.time(),
            "role": self.role,
            "id": self.node_id,
            "event": event,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
