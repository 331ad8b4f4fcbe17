"""Sub-satellite points (emsfl/v1/orbit/satellites): where each satellite of a Walker shell is, by schema."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from orbit_service.constellation import WalkerSpec, walker_satellites
from orbit_service.plan import Plan
from orbit_service.sites import GroundSite
from orbit_service.subpoints import satellites_payload, subpoints
from protos import payloads

START = datetime(2026, 3, 20, 6, tzinfo=timezone.utc)


def _sats() -> dict[str, object]:
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 2, 3, 1), START)
    return {s.name: s for s in sats}


def test_subpoints_stay_within_the_inclination_at_the_shell_altitude_and_move() -> None:
    sats = _sats()
    now = subpoints(sats, START)
    later = subpoints(sats, START + timedelta(minutes=5))
    assert [p["id"] for p in now] == sorted(sats)
    for p in now:
        assert abs(p["lat_deg"]) <= 53.5 and -180 <= p["lon_deg"] <= 180
        assert 500 < p["alt_km"] < 600
    assert all((a["lat_deg"], a["lon_deg"]) != (b["lat_deg"], b["lon_deg"]) for a, b in zip(now, later, strict=True))


def test_payload_validates_and_names_the_cluster_sites() -> None:
    site = GroundSite("lisbon", 38.72, -9.14)
    plan = Plan(START, START + timedelta(hours=1), 240.0, {"c0": site}, _sats(), windows={"c0": []})
    body = satellites_payload(plan, START)
    assert payloads.decode("satellites", payloads.encode("satellites", body)) == body
    assert body["sites"] == [{"cluster": "c0", "name": "lisbon", "lat_deg": 38.72, "lon_deg": -9.14}]


def test_replayed_plan_without_elements_publishes_no_satellites() -> None:
    plan = Plan(START, START + timedelta(hours=1), 240.0, {}, {}, windows={})
    assert satellites_payload(plan, START)["satellites"] == []
