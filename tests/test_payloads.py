"""MQTT payload schemas (ARCHITECTURE §5.3): valid messages pass, each kind of invalid one is refused by name."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from emsfl.runtime.clock import EmulatedClock
from protos import payloads
from protos.payloads import PayloadError
from tests import helpers

LINK_UP: dict[str, Any] = {
    **helpers.LINK_UP,
    "satellite": "WALKER-P00-S01",
    "elevation_deg": 12.5,
    "range_km": 1800.2,
    "delay_s": 0.006,
}
VALID: dict[str, dict[str, Any]] = {
    "clock": EmulatedClock(datetime(2026, 3, 20, 6, tzinfo=timezone.utc), 1.7e9, 240.0).to_payload(),
    "link": LINK_UP,
    "contacts": {
        "schema": "emsfl.v1.contacts",
        "version": 1,
        "cluster": "c0",
        "windows": [
            {
                "start": "2026-03-20T06:00:00Z",
                "end": "2026-03-20T06:07:30Z",
                "satellite": "S1",
                "peak_elevation_deg": 40.0,
            }
        ],
    },
    "status": {"schema": "emsfl.v1.status", "version": 1, "role": "orbit", "id": "orbit", "state": "offline"},
}


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_payload_round_trips(kind: str) -> None:
    assert payloads.decode(kind, payloads.encode(kind, VALID[kind])) == VALID[kind]


INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("link", {**LINK_UP, "state": "sideways"}, "state"),
    ("link", {**LINK_UP, "seq": -1}, "seq"),
    ("link", {**LINK_UP, "elevation_deg": 120.0}, "elevation_deg"),
    ("link", {**LINK_UP, "since": "yesterday"}, "since"),
    ("link", {**LINK_UP, "cluster": "a/b"}, "cluster"),
    ("link", {k: v for k, v in LINK_UP.items() if k != "seq"}, "seq"),
    ("link", {**LINK_UP, "version": 2}, "version"),
    ("link", {**LINK_UP, "extra": 1}, "extra"),
    ("clock", {**VALID["clock"], "scale": 0}, "scale"),
    ("clock", {**VALID["clock"], "paused": "no"}, "paused"),
    ("contacts", {**VALID["contacts"], "windows": [{"start": "2026-03-20T06:00:00Z"}]}, "windows"),
    ("status", {**VALID["status"], "state": "sleeping"}, "state"),
    ("status", {**VALID["status"], "role": "toaster"}, "role"),
]


@pytest.mark.parametrize(("kind", "payload", "field"), INVALID)
def test_invalid_payload_is_refused_naming_the_field(kind: str, payload: dict[str, Any], field: str) -> None:
    with pytest.raises(PayloadError, match=field):
        payloads.encode(kind, payload)


def test_wrong_schema_tag_is_refused() -> None:
    with pytest.raises(PayloadError, match="schema"):
        payloads.validate("status", VALID["link"])


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"not json", b"[1, 2]", b""])
def test_undecodable_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(PayloadError):
        payloads.decode("link", raw)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(PayloadError, match="unknown payload kind"):
        payloads.validate("weather", {})


def test_emulated_clock_follows_scale_and_pause() -> None:
    start = datetime(2026, 3, 20, 6, tzinfo=timezone.utc)
    clock = EmulatedClock(start, wall_ref_unix=1000.0, scale=60.0)
    assert (clock.at_wall(1010.0) - start).total_seconds() == pytest.approx(600.0)
    assert clock.wall_of(clock.at_wall(1234.5)) == pytest.approx(1234.5)
    paused = EmulatedClock(start, 1000.0, 60.0, paused=True)
    assert paused.at_wall(5000.0) == start
    assert EmulatedClock.from_payload(clock.to_payload()) == clock
