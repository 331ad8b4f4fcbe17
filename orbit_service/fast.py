"""The vectorised contact finder: every satellite and every site at once, sub-second AOS/LOS.

1. SGP4 (`SatrecArray`) on a coarse time grid for all satellites at once, rotated to Earth-fixed with GMST 1982
   as SGP4 defines (positions, and velocities in the rotating frame).
2. Prefilter: at each grid sample, a satellite is a candidate for a site only if its Earth central angle
   to the site is below the largest central angle at which it can be above the site's lowest mask, plus
   the angle it can travel in half a grid step. Any pass, however short, has a moment above the mask; the
   grid sample nearest to it is within half a step, so it passes the prefilter: no pass is missed. One
   float32 vector-matrix product of unit vectors per site tests every sample.
3. Between grid samples positions come from cubic Hermite interpolation of the Earth-fixed positions and
   velocities (sub-metre at a 60 s step for LEO); the cubic also gives velocity and acceleration, hence
   analytic rates of the elevation.
4. Each run of candidate samples is searched: a local maximum below the mask (or minimum above it) is
   refined, so a pass grazing the mask between two samples is found; every sign change of elevation minus
   mask is refined by safeguarded Newton steps from a cubic through the neighbouring samples, and the peak of
   each pass by safeguarded Newton steps on the rate of sin(elevation). All brackets of a group of sites at
   once, in cache-sized pieces; groups of sites on up to WORKERS threads.

The steps live in `ephemeris.py` (1, 3), `solvers.py` (2, 4) and `passes.py` (4); this module assembles the table.

Skyfield's per-pair `find_events` (`contacts.satellite_contacts`) stays the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from orbit_service.contacts import Contact, round_ms
from orbit_service.ephemeris import Ephemeris, FloatArray, IntArray, SiteFrame, site_frames
from orbit_service.passes import Passes, find_passes
from orbit_service.sites import GroundSite


class ContactTable:
    """Every contact of a plan as columns, sorted by (site, AOS, LOS, satellite id); `Contact` objects are built
    per site only when asked for (`site_contacts`)."""

    def __init__(
        self,
        keys: Sequence[str],
        sites: Mapping[str, GroundSite],
        eph: Ephemeris,
        found: Passes,
        start: datetime,
        end: datetime,
    ) -> None:
        self.keys = list(keys)
        self.site_names = [sites[k].name for k in self.keys]
        self.sat_names = eph.names
        self.start = start
        end_ms = round((end - start).total_seconds() * 1000.0)
        aos = np.round(found.aos_s * 1000.0).astype(np.int64)
        los = np.minimum(np.round(found.los_s * 1000.0).astype(np.int64), end_ms)
        peak = np.round(found.peak_deg, 3)
        keep = los > aos
        site, sat, aos, los, peak = found.site[keep], found.sat[keep], aos[keep], los[keep], peak[keep]
        rank = np.empty(len(self.sat_names), dtype=np.int64)
        rank[np.argsort(np.array(self.sat_names, dtype=object), kind="stable")] = np.arange(len(self.sat_names))
        self.sat_rank: IntArray = rank  # of each satellite's name among the names
        order = np.lexsort((rank[sat], los, aos, site))
        self.site: IntArray = site[order]
        self.sat: IntArray = sat[order]
        self.aos_ms: IntArray = aos[order]
        self.los_ms: IntArray = los[order]
        self.peak_deg: FloatArray = peak[order]
        self.bounds = np.searchsorted(self.site, np.arange(len(self.keys) + 1), side="left")

    def __len__(self) -> int:
        return int(self.site.size)

    def rows(self, s_i: int) -> slice:
        return slice(int(self.bounds[s_i]), int(self.bounds[s_i + 1]))

    def site_contacts(self, s_i: int) -> list[Contact]:
        rows = self.rows(s_i)
        name, start, ms = self.site_names[s_i], self.start, timedelta(milliseconds=1)
        sats = self.sat_names
        return [
            Contact(name, sats[k], start + a * ms, start + b * ms, p)
            for k, a, b, p in zip(
                self.sat[rows].tolist(),
                self.aos_ms[rows].tolist(),
                self.los_ms[rows].tolist(),
                self.peak_deg[rows].tolist(),
                strict=True,
            )
        ]


def fast_contact_table(
    sites: Mapping[str, GroundSite],
    satellites: Sequence[Any],
    start: datetime,
    end: datetime,
    step_s: float | None = None,
) -> tuple[ContactTable, Ephemeris, SiteFrame]:
    """Every contact of every site as columns (see `fast_contacts`)."""
    start, end = round_ms(start), round_ms(end)
    keys = list(sites)
    eph = Ephemeris(satellites, start, end, step_s)
    frames = site_frames([sites[k] for k in keys])
    return ContactTable(keys, sites, eph, find_passes(eph, frames), start, end), eph, frames


def fast_contacts(
    sites: Mapping[str, GroundSite],
    satellites: Sequence[Any],
    start: datetime,
    end: datetime,
    step_s: float | None = None,
) -> tuple[dict[str, list[Contact]], Ephemeris, SiteFrame]:
    """Contacts per site key, earliest AOS first, as `contacts.site_contacts` would find them."""
    table, eph, frames = fast_contact_table(sites, satellites, start, end, step_s)
    return {k: table.site_contacts(s_i) for s_i, k in enumerate(table.keys)}, eph, frames
