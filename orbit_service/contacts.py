"""Contacts (one satellite above one site's mask) and the merged link-up windows of a site.

Contacts come from skyfield's `find_events`; a pass already in progress at the start of the search
window starts at the window start, and one still in progress at its end stops there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from emsfl.config import ConfigError
from orbit_service.sites import GroundSite
from orbit_service.timescale import to_datetime, to_time

RISE, CULMINATE, SET = 0, 1, 2


@dataclass(frozen=True)
class Contact:
    site: str
    satellite: str
    aos: datetime
    los: datetime
    peak_elevation_deg: float


@dataclass(frozen=True)
class Handover:
    """The serving satellite changes at `at` inside a window; geometry of the new one at that instant."""

    at: datetime
    satellite: str
    elevation_deg: float | None = None
    range_km: float | None = None


@dataclass(frozen=True)
class Window:
    """A link-up interval of one site: the union of overlapping contacts."""

    start: datetime
    end: datetime
    satellite: str  # the serving satellite at `start`
    peak_elevation_deg: float
    elevation_deg: float | None = None  # of the serving satellite at `start`
    range_km: float | None = None
    handovers: tuple[Handover, ...] = ()

    def serving_at(self, moment: datetime) -> tuple[str, float | None, float | None]:
        """(satellite, elevation at its selection, range at its selection) serving at `moment`."""
        current: tuple[str, float | None, float | None] = (self.satellite, self.elevation_deg, self.range_km)
        for h in self.handovers:
            if h.at <= moment:
                current = (h.satellite, h.elevation_deg, h.range_km)
        return current


def round_ms(moment: datetime) -> datetime:
    """Millisecond precision, the precision of every ISO time on the wire, so exports round-trip exactly."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    micro = moment.microsecond
    rounded = moment.replace(microsecond=0) + timedelta(milliseconds=round(micro / 1000))
    return rounded.astimezone(timezone.utc)


def check_interval(start: datetime, end: datetime) -> None:
    if not end > start:
        raise ConfigError(f"empty time window: end {end.isoformat()} is not after start {start.isoformat()}")


def satellite_contacts(site: GroundSite, satellite: Any, start: datetime, end: datetime) -> list[Contact]:
    """Every pass of `satellite` above `site.min_elevation_deg` within [start, end], clipped to it."""
    check_interval(start, end)
    start, end = round_ms(start), round_ms(end)
    topos = site.topos()
    relative = satellite - topos
    t0, t1 = to_time(start), to_time(end)
    times, events = satellite.find_events(topos, t0, t1, altitude_degrees=site.min_elevation_deg)
    # find_events reports no rise for a pass already under way at t0, so the state starts from t0's altitude.
    start_alt = float(relative.at(t0).altaz()[0].degrees)
    above = start_alt >= site.min_elevation_deg
    aos: datetime | None = start if above else None
    peak = start_alt if above else -90.0
    culmination_alts: dict[int, float] = {}
    culminations = [i for i, event in enumerate(events) if event == CULMINATE]
    if culminations:
        alts = relative.at(times[culminations]).altaz()[0].degrees
        culmination_alts = {i: float(a) for i, a in zip(culminations, alts, strict=True)}
    contacts: list[Contact] = []
    for i, event in enumerate(events):
        moment = round_ms(to_datetime(times[i]))
        if event == RISE and not above:
            above, aos, peak = True, moment, site.min_elevation_deg
        elif event == CULMINATE and above:
            peak = max(peak, culmination_alts[i])
        elif event == SET and above and aos is not None:
            if moment > aos:
                contacts.append(Contact(site.name, satellite.name, aos, moment, round(peak, 3)))
            above, aos = False, None
    if above and aos is not None and end > aos:
        end_alt = float(relative.at(t1).altaz()[0].degrees)
        contacts.append(Contact(site.name, satellite.name, aos, end, round(max(peak, end_alt), 3)))
    return contacts


def site_contacts(site: GroundSite, satellites: Iterable[Any], start: datetime, end: datetime) -> list[Contact]:
    """Contacts of every satellite with one site, earliest AOS first."""
    contacts = [c for sat in satellites for c in satellite_contacts(site, sat, start, end)]
    return sorted(contacts, key=lambda c: (c.aos, c.los, c.satellite))


ElevationAt = Callable[[str, datetime], float]


def merge_contacts(contacts: Sequence[Contact], elevation_at: ElevationAt | None = None) -> list[Window]:
    """Union of one site's contacts into link-up windows (the link is up while any satellite is visible).

    The serving satellite of a window is the highest one at the window start, per `elevation_at(satellite,
    moment)`; without it, the one with the highest peak among those rising at the start.
    """
    ordered = sorted(contacts, key=lambda c: (c.aos, c.los))
    groups: list[list[Contact]] = []
    for contact in ordered:
        if groups and contact.aos <= max(c.los for c in groups[-1]):
            groups[-1].append(contact)
        else:
            groups.append([contact])
    windows = []
    for group in groups:
        start = group[0].aos
        at_start = [c for c in group if c.aos == start]

        def score(c: Contact, start: datetime = start) -> float:
            return elevation_at(c.satellite, start) if elevation_at is not None else c.peak_elevation_deg

        serving = max(at_start, key=lambda c: (score(c), c.satellite))
        windows.append(
            Window(
                start=start,
                end=max(c.los for c in group),
                satellite=serving.satellite,
                peak_elevation_deg=max(c.peak_elevation_deg for c in group),
            )
        )
    return windows
