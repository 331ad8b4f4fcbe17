"""Run outputs (ARCHITECTURE §8): merged events and the figures of `summary.json`, computed from what each role wrote.

`uploads_outside_contact` is checked here, against the orbit service's contact windows, not taken from
the uploader or the satellite.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from emsfl.runtime.timefmt import parse_iso


def merge_events(*streams: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """All events in emulated-time order (events without a time keep their wall order, first)."""
    rows = [row for stream in streams for row in stream]

    def key(row: dict[str, Any]) -> tuple[int, float, float]:
        t = row.get("t")
        return (0, 0.0, row.get("wall", 0.0)) if not t else (1, parse_iso(t).timestamp(), row.get("wall", 0.0))

    return sorted(rows, key=key)


def windows_by_cluster(plan: dict[str, Any]) -> dict[str, list[tuple[datetime, datetime]]]:
    return {
        cluster: [(parse_iso(w["start"]), parse_iso(w["end"])) for w in windows]
        for cluster, windows in plan.get("windows", {}).items()
    }


def in_contact(cluster: str, moment: datetime, windows: dict[str, list[tuple[datetime, datetime]]]) -> bool:
    return any(start <= moment <= end for start, end in windows.get(cluster, []))


def uploads_outside_contact(commits: list[dict[str, Any]], windows: dict[str, list[tuple[datetime, datetime]]]) -> int:
    """Commits whose emulated time lies in no contact window of their cluster (a commit without a time counts)."""
    return sum(1 for c in commits if not c.get("t") or not in_contact(c["cluster"], parse_iso(c["t"]), windows))


def count_events(events: Iterable[dict[str, Any]], name: str) -> int:
    return sum(1 for e in events if e.get("event") == name)


def link_ups_until(orbit_events: Iterable[dict[str, Any]], end: datetime) -> list[dict[str, Any]]:
    """The link-ups of a run that ended at emulated `end`. The orbit service keeps toggling links while the lab stops
    the other roles (seconds of wall time, hours emulated): those link-ups are no part of the run."""
    return [e for e in orbit_events if e.get("event") == "link_up" and parse_iso(e["t"]) <= end]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, sort_keys=True, default=str) + "\n")
