"""`<state>/events.jsonl`: one JSON object per line, appended and flushed (docs/INTERFACES.md, Events)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from protos.timefmt import to_iso

EVENTS_FILE = "events.jsonl"


class EventLog:
    def __init__(
        self, path: str | Path, now: Callable[[], datetime | None], role: str = "satellite", node_id: str = "satellite"
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._now = now
        self._role, self._id = role, node_id
        self._lock = threading.Lock()
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the process lifetime

    def emit(self, event: str, **fields: Any) -> None:
        now = self._now()
        record = {
            "t": None if now is None else to_iso(now),
            "wall": round(time.time(), 3),
            "role": self._role,
            "id": self._id,
            "event": event,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":"), sort_keys=False)
        with self._lock:
            if not self._handle.closed:
                self._handle.write(line + "\n")
                self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event of a log (for tests and the lab)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
