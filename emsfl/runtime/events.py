"""Run events (ARCHITECTURE §8): JSON lines, one object per line, appended and flushed at once so that a
killed process loses nothing it logged. Every role writes the same shape:
`{"t": emulated UTC or null, "wall": Unix s, "role", "id", "event", ...fields}`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from emsfl.runtime.timefmt import to_iso

NOW = object()  # sentinel: take the emulated time from the log's clock


class EventLog:
    def __init__(
        self, path: str | Path, role: str, node_id: str, now: Callable[[], datetime | None] | None = None
    ) -> None:
        """`now` gives the emulated time of events logged without an explicit `t`."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.role, self.node_id = role, node_id
        self._now = now
        self._lock = threading.Lock()
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def emit(self, event: str, t: datetime | object | None = NOW, **fields: Any) -> None:
        moment = (self._now() if self._now is not None else None) if t is NOW else t
        record = {
            "t": to_iso(moment) if isinstance(moment, datetime) else None,
            "wall": round(time.time(), 3),
            "role": self.role,
            "id": self.node_id,
            "event": event,
            **fields,
        }
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._handle.closed:
                self._handle.write(line)
                self._handle.flush()

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every complete event of a log; a line cut short by a kill is skipped, an absent log is empty."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
