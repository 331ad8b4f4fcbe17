"""Regression: `summary.json` counted the link-ups the orbit service raised while the lab was stopping the other
roles. `make lab` reported 62 link-ups where its 10 emulated hours hold 59 windows: a few wall seconds of shutdown at
240× are hours of passes."""

from __future__ import annotations

from datetime import datetime, timezone

from testbed.report import link_ups_until


def test_link_ups_after_the_run_are_not_counted() -> None:
    events = [
        {"event": "link_up", "cluster": "c0", "t": "2026-03-20T06:00:00.000Z"},
        {"event": "link_down", "cluster": "c0", "t": "2026-03-20T06:05:00.000Z"},
        {"event": "link_up", "cluster": "c1", "t": "2026-03-20T16:00:00.000Z"},  # at the end: part of the run
        {"event": "link_up", "cluster": "c0", "t": "2026-03-20T16:10:29.245Z"},  # during the shutdown
    ]
    end = datetime(2026, 3, 20, 16, 0, tzinfo=timezone.utc)
    assert [(e["cluster"], e["t"]) for e in link_ups_until(events, end)] == [
        ("c0", "2026-03-20T06:00:00.000Z"),
        ("c1", "2026-03-20T16:00:00.000Z"),
    ]
