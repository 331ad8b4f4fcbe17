"""Contact windows against an independent elevation computation, clipped passes, merging, the link model."""

from __future__ import annotations

import itertools
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from sgp4.api import jday

from emsfl.config import ConfigError
from orbit_service.constellation import WalkerSpec, walker_satellites
from orbit_service.contacts import Contact, merge_contacts, satellite_contacts, site_contacts
from orbit_service.link import SPEED_OF_LIGHT_KM_S, geometry_at
from orbit_service.plan import build_plan
from orbit_service.sites import GroundSite

START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
LISBON = GroundSite("lisbon", 38.72, -9.14, 50.0, 10.0)
TOKYO = GroundSite("tokyo", 35.68, 139.69, 40.0, 10.0)
WGS84_A_KM = 6378.137
WGS84_F = 1 / 298.257223563


@pytest.fixture(scope="module")
def satellites() -> list[Any]:
    return walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), START)


def independent_elevation_deg(sat: Any, site: GroundSite, moment: datetime) -> float:
    """Elevation from raw SGP4 (TEME), a GMST rotation to Earth-fixed and the WGS84 site: no skyfield."""
    jd, fr = jday(
        moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second + moment.microsecond / 1e6
    )
    err, r_teme, _ = sat.model.sgp4(jd, fr)
    assert err == 0
    t = (jd - 2451545.0 + fr) / 36525.0  # UT1 ~ UTC: < 1 s, negligible here
    gmst_s = 67310.54841 + (876600.0 * 3600 + 8640184.812866) * t + 0.093104 * t**2 - 6.2e-6 * t**3
    theta = math.radians((gmst_s % 86400.0) / 240.0)
    x, y, z = r_teme
    sat_ecef = np.array([x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta), z])
    lat, lon = math.radians(site.lat_deg), math.radians(site.lon_deg)
    e2 = WGS84_F * (2 - WGS84_F)
    n = WGS84_A_KM / math.sqrt(1 - e2 * math.sin(lat) ** 2)
    h = site.alt_m / 1000.0
    site_ecef = np.array(
        [
            (n + h) * math.cos(lat) * math.cos(lon),
            (n + h) * math.cos(lat) * math.sin(lon),
            (n * (1 - e2) + h) * math.sin(lat),
        ]
    )
    up = np.array([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])
    rho = sat_ecef - site_ecef
    return math.degrees(math.asin(float(rho @ up) / float(np.linalg.norm(rho))))


def test_contacts_match_independent_elevations(satellites: list[Any]) -> None:
    end = START + timedelta(hours=3)
    by_name = {s.name: s for s in satellites}
    checked = 0
    for site in (LISBON, TOKYO):
        contacts = site_contacts(site, satellites, START, end)
        assert contacts, f"no pass over {site.name} in 3 h"
        for c in contacts:
            assert START <= c.aos < c.los <= end
            assert site.min_elevation_deg <= c.peak_elevation_deg <= 90.0
            sat = by_name[c.satellite]
            one_s = timedelta(seconds=1)
            if c.aos > START:  # a real rise: above just inside, below just outside
                assert independent_elevation_deg(sat, site, c.aos + one_s) > site.min_elevation_deg
                assert independent_elevation_deg(sat, site, c.aos - one_s) < site.min_elevation_deg
                checked += 1
            if c.los < end:
                assert independent_elevation_deg(sat, site, c.los - one_s) > site.min_elevation_deg
                assert independent_elevation_deg(sat, site, c.los + one_s) < site.min_elevation_deg
                checked += 1
            mid = c.aos + (c.los - c.aos) / 2
            assert independent_elevation_deg(sat, site, mid) <= c.peak_elevation_deg + 0.05
    assert checked >= 10


def test_pass_in_progress_at_start_and_end_is_clipped(satellites: list[Any]) -> None:
    full = site_contacts(LISBON, satellites, START + timedelta(minutes=10), START + timedelta(hours=2))
    c = next(c for c in full if c.aos > START + timedelta(minutes=10) and (c.los - c.aos) > timedelta(minutes=4))
    sat = next(s for s in satellites if s.name == c.satellite)
    middle = c.aos + (c.los - c.aos) / 2

    after = satellite_contacts(LISBON, sat, middle, middle + timedelta(hours=1))
    assert after[0].aos == middle
    assert abs((after[0].los - c.los).total_seconds()) < 1.0

    before = satellite_contacts(LISBON, sat, middle - timedelta(hours=1), middle)
    assert before[-1].los == middle
    assert abs((before[-1].aos - c.aos).total_seconds()) < 1.0
    # The clipped halves each keep their own highest point, and one of them holds the pass's peak.
    assert max(after[0].peak_elevation_deg, before[-1].peak_elevation_deg) == pytest.approx(
        c.peak_elevation_deg, abs=0.01
    )


def test_empty_window_is_refused(satellites: list[Any]) -> None:
    with pytest.raises(ConfigError, match="empty time window"):
        satellite_contacts(LISBON, satellites[0], START, START)


def _c(sat: str, aos_min: float, los_min: float, peak: float = 30.0) -> Contact:
    return Contact("s", sat, START + timedelta(minutes=aos_min), START + timedelta(minutes=los_min), peak)


def test_merge_overlapping_and_touching_contacts() -> None:
    contacts = [_c("D", 30, 40), _c("B", 5, 15, 60.0), _c("A", 0, 10), _c("C", 15, 20), _c("E", 32, 35, 80.0)]
    windows = merge_contacts(contacts)
    assert [(w.start, w.end) for w in windows] == [
        (START, START + timedelta(minutes=20)),
        (START + timedelta(minutes=30), START + timedelta(minutes=40)),
    ]
    assert [w.satellite for w in windows] == ["A", "D"]  # the one up at the window start
    assert [w.peak_elevation_deg for w in windows] == [60.0, 80.0]
    assert merge_contacts([]) == []


def test_merge_serving_satellite_is_highest_at_start() -> None:
    contacts = [_c("LOW", 0, 10, 70.0), _c("HIGH", 0, 5, 20.0)]
    elevations = {"LOW": 11.0, "HIGH": 19.0}
    windows = merge_contacts(contacts, lambda sat, moment: elevations[sat])
    assert windows[0].satellite == "HIGH"
    assert merge_contacts(contacts)[0].satellite == "LOW"  # without geometry: the highest peak


def test_plan_windows_cover_exactly_the_contacts(satellites: list[Any]) -> None:
    plan = build_plan({"c0": LISBON, "c2": TOKYO}, satellites, START, START + timedelta(hours=4))
    for key, windows in plan.windows.items():
        assert all(a.end < b.start for a, b in itertools.pairwise(windows))
        for c in plan.contacts[key]:
            assert sum(w.start <= c.aos and c.los <= w.end for w in windows) == 1
        for w in windows:
            assert any(c.aos == w.start for c in plan.contacts[key])
            assert any(c.los == w.end for c in plan.contacts[key])


def test_link_geometry_and_delay(satellites: list[Any]) -> None:
    c = site_contacts(LISBON, satellites, START + timedelta(minutes=10), START + timedelta(hours=2))[0]
    sat = next(s for s in satellites if s.name == c.satellite)
    at_aos = geometry_at(LISBON, sat, c.aos)
    assert at_aos.elevation_deg == pytest.approx(LISBON.min_elevation_deg, abs=0.05)
    # A 550 km shell seen at 10 degrees: slant range between the altitude and the horizon distance.
    assert 550.0 < at_aos.range_km < 2500.0
    assert at_aos.delay_s == pytest.approx(at_aos.range_km / SPEED_OF_LIGHT_KM_S)
    assert at_aos.delay_s == pytest.approx(at_aos.range_km / 299792.458)
