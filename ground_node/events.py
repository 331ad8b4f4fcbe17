"""`<workdir>/events.jsonl`: one JSON object per line, appended and flushed (docs/INTERFACES.md)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from protos.timefmt import to_iso


class EventLog:
    def __init__(self, path: Path, node_id: str, now: Callable[[], datetime | None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self._now = now
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def emit(self, event: str, **fields: Any) -> None:
        moment = self._now() if self._now is not None else None
        record = {
            "t": to_iso(moment) if moment is not None else None,
            "wall": round(time.time(), 3),
            "role": "ground",
            "id": self.node_id,
            "event": event,
            **fields,
        }
        line = json.dumps(record, sort_keys=False)
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                self._fh.close()
