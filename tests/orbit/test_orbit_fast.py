"""The vectorised contact finder against skyfield's `find_events`, its two known traps, and analytic geometry."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from orbit_service import ephemeris, selection
from orbit_service.constellation import EARTH_RADIUS_KM, MU_KM3_S2, WalkerSpec, walker_satellites
from orbit_service.contacts import Contact, round_ms, satellite_contacts
from orbit_service.fast import fast_contacts
from orbit_service.plan import build_plan
from orbit_service.sites import GroundSite

START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
TOL_S = 1.0


def _match(ref: list[Contact], fast: list[Contact], mask_deg: float) -> list[float]:
    """Pair the passes (same count, except grazing ones either side may miss); the AOS/LOS errors in s."""
    errors: list[float] = []
    unmatched_ref = list(ref)
    for c in fast:
        near = [r for r in unmatched_ref if r.aos < c.los and c.aos < r.los]
        if not near:
            assert c.peak_elevation_deg < mask_deg + 0.05, f"fast pass not in the reference: {c}"
            continue
        r = near[0]
        unmatched_ref.remove(r)
        errors += [abs((r.aos - c.aos).total_seconds()), abs((r.los - c.los).total_seconds())]
    for r in unmatched_ref:
        assert r.peak_elevation_deg < mask_deg + 0.05, f"reference pass missed by the fast path: {r}"
    return errors


def test_fast_matches_find_events_on_random_pairs() -> None:
    rng = random.Random(7)
    satellites = walker_satellites(WalkerSpec(53.0, 550.0, 12, 10, 1), START) + walker_satellites(
        WalkerSpec(97.6, 800.0, 6, 5, 2), START
    )
    for i, sat in enumerate(satellites):
        sat.name = f"{sat.name}-{i}"
    sites = {
        f"s{i}": GroundSite(
            f"s{i}",
            rng.uniform(-70, 70),
            rng.uniform(-180, 180),
            rng.uniform(0, 2000),
            rng.choice((0.0, 5.0, 10.0, 25.0)),
        )
        for i in range(40)
    }
    start = START + timedelta(seconds=rng.uniform(0, 3600))
    end = start + timedelta(hours=2)
    found, _, _ = fast_contacts(sites, satellites, start, end)
    errors: list[float] = []
    pairs = [(rng.choice(list(sites)), rng.choice(satellites)) for _ in range(300)]
    for key, sat in pairs:
        site = sites[key]
        ref = satellite_contacts(site, sat, start, end)
        mine = [c for c in found[key] if c.satellite == sat.name]
        errors += _match(ref, mine, site.min_elevation_deg)
    assert len(errors) >= 40, "too few passes to compare: widen the windows"
    assert max(errors) <= TOL_S, f"max AOS/LOS error {max(errors):.3f} s"


def test_pass_in_progress_at_window_start_starts_at_window_start() -> None:
    """Guards: a pass already under way at the window start has no rise event and was once dropped."""
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), START)
    site = GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0)
    passes = [c for s in sats for c in satellite_contacts(site, s, START, START + timedelta(hours=6))]
    c = max(passes, key=lambda p: p.los - p.aos)
    mid = round_ms(c.aos + (c.los - c.aos) / 2)
    found, _, _ = fast_contacts({"c0": site}, sats, mid, mid + timedelta(hours=1))
    first = next(f for f in found["c0"] if f.satellite == c.satellite)
    assert first.aos == mid
    assert abs((first.los - c.los).total_seconds()) <= TOL_S


def test_peak_of_a_pass_cut_by_the_window_matches_find_events() -> None:
    """Guards: a pass under way at the window start that culminates after it once reported its first sample as
    the peak (degrees low); cut at the window end before culmination, the peak is the elevation at the end."""
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), START)
    site = GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0)
    passes = [c for s in sats for c in satellite_contacts(site, s, START, START + timedelta(hours=6))]
    c = max(passes, key=lambda p: p.peak_elevation_deg)
    sat = next(s for s in sats if s.name == c.satellite)
    middle = round_ms(c.aos + (c.los - c.aos) / 2)  # about the culmination
    for window in (
        (middle - timedelta(seconds=20), c.los + timedelta(minutes=10)),  # the highest sample is the first one
        (c.aos - timedelta(minutes=10), middle - timedelta(seconds=20)),
        (c.aos - timedelta(minutes=10), middle + timedelta(seconds=20)),
    ):
        (ref,) = satellite_contacts(site, sat, *window)
        found, _, _ = fast_contacts({"c0": site}, [sat], *window)
        (got,) = found["c0"]
        assert got.peak_elevation_deg == pytest.approx(ref.peak_elevation_deg, abs=0.01)


def test_pass_grazing_the_minimum_elevation_shorter_than_the_grid_step_is_found() -> None:
    """Guards: a pass that peaks just above the mask lasts seconds, between two coarse grid samples."""
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), START)
    site = GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0)
    passes = [c for s in sats for c in satellite_contacts(site, s, START, START + timedelta(hours=6))]
    c = passes[0]
    grazing = GroundSite("lisbon", 38.72, -9.14, 50.0, c.peak_elevation_deg - 0.01)
    sat = next(s for s in sats if s.name == c.satellite)
    window = (c.aos - timedelta(minutes=20), c.los + timedelta(minutes=20))
    ref = satellite_contacts(grazing, sat, *window)
    assert len(ref) == 1 and (ref[0].los - ref[0].aos).total_seconds() < 60.0  # shorter than one grid step
    found, eph, _ = fast_contacts({"g": grazing}, [sat], *window)
    assert eph.step_s >= 30.0
    assert len(found["g"]) == 1
    got = found["g"][0]
    assert abs((got.aos - ref[0].aos).total_seconds()) <= TOL_S
    assert abs((got.los - ref[0].los).total_seconds()) <= TOL_S
    assert got.peak_elevation_deg == pytest.approx(c.peak_elevation_deg, abs=0.02)


def _equatorial(alt_km: float) -> list[Any]:
    return walker_satellites(WalkerSpec(0.0, alt_km, 1, 1, 0), START)


def test_analytic_slant_range_and_longest_pass_550km_10deg() -> None:
    """Circular 550 km orbit, site under the ground track, 10 deg mask.

    Slant range at the mask (law of cosines in the Earth-centre, site, satellite triangle):
    rho = sqrt(r^2 - R^2 cos^2 e) - R sin e. The overhead pass spans the Earth central angle 2 lambda with
    lambda = acos(R cos e / r) - e; seen from the rotating Earth an equatorial prograde satellite sweeps it at
    n - omega_E, so the pass lasts 2 lambda / (n - omega_E) (~511 s; without Earth rotation ~477 s, 7 % less).
    Tolerance 1 %: J2 (SGP4) shifts the mean motion and radius slightly; WGS-72 vs WGS-84 radii.
    """
    alt, e = 550.0, math.radians(10.0)
    site = GroundSite("equator", 0.0, 0.0, 0.0, 10.0)
    sats = _equatorial(alt)
    r = EARTH_RADIUS_KM + alt
    rho = math.sqrt(r**2 - (EARTH_RADIUS_KM * math.cos(e)) ** 2) - EARTH_RADIUS_KM * math.sin(e)
    lam = math.acos(EARTH_RADIUS_KM * math.cos(e) / r) - e
    n = math.sqrt(MU_KM3_S2 / r**3)
    longest_s = 2 * lam / (n - 7.2921158553e-5)
    plan = build_plan({"c": site}, sats, START, START + timedelta(hours=12))
    contacts = plan.contacts["c"]
    assert len(contacts) >= 5
    full = [c for c in contacts if c.aos > START and c.los < plan.end_utc]
    duration = max((c.los - c.aos).total_seconds() for c in full)
    assert duration == pytest.approx(longest_s, rel=0.01)
    assert abs(duration - 2 * lam / n) > 0.05 * duration  # Earth rotation is accounted for
    # The largest slant range of a pass is at AOS/LOS, on the mask.
    ranges = [w.range_km for w in plan.windows["c"] if w.start > plan.start_utc]
    assert ranges and max(r for r in ranges if r is not None) == pytest.approx(rho, rel=0.01)
    assert all(c.peak_elevation_deg > 85.0 for c in full)  # overhead passes


def test_reference_and_fast_plans_agree_with_selection() -> None:
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 4, 5, 1), START)
    sites = {"c0": GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0)}
    end = START + timedelta(hours=3)
    fast = build_plan(sites, sats, START, end, method="fast")
    ref = build_plan(sites, sats, START, end, method="reference")
    assert len(fast.windows["c0"]) == len(ref.windows["c0"]) > 0
    for a, b in zip(fast.windows["c0"], ref.windows["c0"], strict=True):
        assert abs((a.start - b.start).total_seconds()) <= TOL_S
        assert abs((a.end - b.end).total_seconds()) <= TOL_S
        assert a.satellite == b.satellite
        assert a.range_km == pytest.approx(b.range_km, abs=10.0)  # range rate ~6 km/s at AOS
    assert np.isfinite([w.elevation_deg for w in fast.windows["c0"]]).all()


def test_pruned_highest_elevation_selection_matches_evaluating_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the selection evaluates only the entries that may be the highest at their sample (bounds from
    elevations at nodes); the windows and handovers must equal those from every entry."""
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 12, 10, 1), START) + walker_satellites(
        WalkerSpec(97.6, 800.0, 6, 5, 2), START
    )
    for i, sat in enumerate(sats):
        sat.name = f"{sat.name}-{i}"
    sites = {
        "c0": GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0),
        "c1": GroundSite("quito", -0.18, -78.47, 2850.0, 25.0),
        "c2": GroundSite("tromso", 69.65, 18.96, 10.0, 0.0),
    }
    end = START + timedelta(hours=4)
    pruned = build_plan(sites, sats, START, end)

    def every_entry(*args: Any) -> tuple[np.ndarray, np.ndarray]:
        first, last = args[3], args[4]
        visible = np.flatnonzero(last > first)
        return selection._entries(visible, first[visible], last[visible])

    monkeypatch.setattr(selection, "_contenders", every_entry)
    full = build_plan(sites, sats, START, end)
    assert sum(len(w.handovers) for v in full.windows.values() for w in v) > 10
    assert pruned.windows == full.windows


def test_plan_is_the_same_on_one_or_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 6, 8, 1), START)
    sites = {f"c{i}": GroundSite(f"s{i}", 10.0 * i - 30.0, 20.0 * i, 0.0, 10.0) for i in range(5)}
    end = START + timedelta(hours=3)
    monkeypatch.setattr(ephemeris, "WORKERS", 2)
    two = build_plan(sites, sats, START, end)
    monkeypatch.setattr(ephemeris, "WORKERS", 1)
    one = build_plan(sites, sats, START, end)
    assert two.windows == one.windows
    assert [two.contacts[k] for k in sites] == [one.contacts[k] for k in sites]


def test_all_contacts_from_the_table_in_the_export_order() -> None:
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 6, 8, 1), START)
    sites = {f"c{i}": GroundSite(f"s{4 - i}", 10.0 * i - 30.0, 20.0 * i, 0.0, 10.0) for i in range(5)}
    plan = build_plan(sites, sats, START, START + timedelta(hours=3))
    pairs = [(key, c) for key, contacts in plan.contacts.items() for c in contacts]
    expected = sorted(pairs, key=lambda p: (p[1].aos, p[1].los, p[0], p[1].satellite))
    assert len(expected) > 20
    assert plan.all_contacts() == expected
