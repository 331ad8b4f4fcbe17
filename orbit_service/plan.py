"""A contact plan: every site's contacts and link-up windows over [start, end], and its exports.

Exports: the `--plan-out` JSON of `emsfl orbit run`, and the JSON or CSV contact lists of `emsfl orbit plan`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from emsfl.config import ConfigError, read_text_file
from emsfl.runtime.timefmt import parse_iso, to_iso
from orbit_service.constellation import satellites_from_topology
from orbit_service.contacts import Contact, Handover, Window, check_interval, round_ms, site_contacts
from orbit_service.ephemeris import Ephemeris, SiteFrame, parallel_map
from orbit_service.fast import ContactTable, fast_contact_table
from orbit_service.selection import (
    DEFAULT_POLICY,
    DEFAULT_STEP_S,
    ContactArrays,
    LookFn,
    check_policy,
    select_windows,
)
from orbit_service.sites import GroundSite, sites_from_topology
from orbit_service.timescale import timescale

METHODS = ("fast", "reference")

CONTACT_COLUMNS = ("site", "satellite", "aos", "los", "peak_elevation_deg")


class LazyContacts(MutableMapping[str, list[Contact]]):
    """Contacts per site key, each list built from a `ContactTable` the first time it is asked for."""

    def __init__(self, table: ContactTable) -> None:
        self._table = table
        self._index = {key: i for i, key in enumerate(table.keys)}
        self._built: dict[str, list[Contact]] = {}
        self.pristine = True  # every list still the table's (no key set or deleted)

    def __getitem__(self, key: str) -> list[Contact]:
        built = self._built.get(key)
        if built is None:
            if key not in self._index:
                raise KeyError(key)
            built = self._built[key] = self._table.site_contacts(self._index[key])
        return built

    def __setitem__(self, key: str, value: list[Contact]) -> None:
        self._index.setdefault(key, -1)
        self._built[key] = value
        self.pristine = False

    def __delitem__(self, key: str) -> None:
        del self._index[key]
        self._built.pop(key, None)
        self.pristine = False

    def all_contacts(self) -> list[tuple[str, Contact]]:
        """(key, contact) for every contact, by (AOS, LOS, key, satellite): the order from the table's columns."""
        table = self._table
        keys = table.keys
        key_rank = np.empty(len(keys), dtype=np.int64)
        key_rank[np.argsort(np.array(keys, dtype=object), kind="stable")] = np.arange(len(keys))
        order = np.lexsort((table.sat_rank[table.sat], key_rank[table.site], table.los_ms, table.aos_ms))
        lists = [self[key] for key in keys]
        site, row = table.site[order], order - table.bounds[table.site[order]]
        return [(keys[s], lists[s][r]) for s, r in zip(site.tolist(), row.tolist(), strict=True)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class Plan:
    start_utc: datetime
    end_utc: datetime
    scale: float
    sites: dict[str, GroundSite]  # key (cluster id, or site name) -> site
    satellites: dict[str, Any]  # satellite id -> skyfield EarthSatellite
    contacts: MutableMapping[str, list[Contact]] = field(default_factory=dict)  # a LazyContacts from `fast`
    windows: dict[str, list[Window]] = field(default_factory=dict)
    selection: str = DEFAULT_POLICY

    def all_contacts(self) -> list[tuple[str, Contact]]:
        """(key, contact) for every contact, earliest AOS first."""
        if isinstance(self.contacts, LazyContacts) and self.contacts.pristine:
            return self.contacts.all_contacts()
        pairs = [(key, c) for key, contacts in self.contacts.items() for c in contacts]
        return sorted(pairs, key=lambda p: (p[1].aos, p[1].los, p[0], p[1].satellite))


def _skyfield_look(site: GroundSite, by_id: Mapping[str, Any], origin: datetime) -> LookFn:
    """Geometry from skyfield, one call per satellite (the reference path)."""
    topos = site.topos()
    ts = timescale()

    def look(
        sats: Sequence[str], which: NDArray[np.int64], t_s: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        el = np.zeros(which.size)
        rng = np.zeros(which.size)
        for k, name in enumerate(sats):
            rows = np.flatnonzero(which == k)
            if rows.size == 0:
                continue
            t = ts.from_datetimes([origin + timedelta(seconds=float(x)) for x in t_s[rows]])
            alt, _, dist = (by_id[name] - topos).at(t).altaz()
            el[rows], rng[rows] = alt.degrees, dist.km
        return el, rng

    return look


def _fast_windows(
    table: ContactTable,
    eph: Ephemeris,
    frames: SiteFrame,
    s_i: int,
    origin: datetime,
    selection: str,
    selection_step_s: float,
) -> list[Window]:
    """The windows of site s_i from the fast path's contact table, with its ephemeris for the geometry."""

    last: list[Any] = [None, None]  # (names, their satellite indices): one group's names come in several calls

    def indices(sats: Sequence[str]) -> NDArray[np.int64]:
        if last[0] is not sats:
            last[:] = [sats, np.array([eph.index[name] for name in sats], dtype=np.int64)]
        out: NDArray[np.int64] = last[1]
        return out

    def fast_look(
        sats: Sequence[str], which: NDArray[np.int64], t_s: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        sat_idx = indices(sats)[which]
        el, _, rng = eph.look(frames, np.full(sat_idx.size, s_i, dtype=np.int64), sat_idx, t_s)
        return el, rng

    weights: list[Any] = [None, None]  # (grid, its Hermite weights): one group's grid comes in several calls

    def grid_look(
        sats: Sequence[str], which: NDArray[np.int64], sample: NDArray[np.int64], grid: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        if weights[0] is not grid:
            weights[:] = [grid, eph.grid_weights(grid)]
        return eph.grid_elevation(frames, s_i, indices(sats)[which], sample, grid, weights[1])

    rows = table.rows(s_i)

    def instant(i: int, at_los: bool) -> datetime:
        column = table.los_ms if at_los else table.aos_ms
        return origin + timedelta(milliseconds=int(column[rows][i]))

    arrays = ContactArrays(
        table.aos_ms[rows] / 1000.0,
        table.los_ms[rows] / 1000.0,
        [table.sat_names[k] for k in table.sat[rows].tolist()],
        table.peak_deg[rows],
        instant,
    )
    return select_windows(arrays, origin, fast_look, selection, selection_step_s, grid_look)


def build_plan(
    sites: Mapping[str, GroundSite],
    satellites: Sequence[Any],
    start: datetime,
    end: datetime,
    scale: float = 1.0,
    method: str = "fast",
    selection: str = DEFAULT_POLICY,
    selection_step_s: float = DEFAULT_STEP_S,
) -> Plan:
    """Contacts and windows of every site. `method`: `fast` (vectorised, all pairs at once) or `reference`
    (skyfield `find_events` per pair); both agree within a second on every AOS and LOS."""
    check_interval(start, end)
    if method not in METHODS:
        raise ConfigError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    check_policy(selection)
    by_id = {sat.name: sat for sat in satellites}
    if len(by_id) != len(satellites):
        raise ConfigError("constellation: satellite names are not unique")
    plan = Plan(round_ms(start), round_ms(end), scale, dict(sites), by_id, selection=selection)
    if method == "fast" and sites:
        table, eph, frames = fast_contact_table(sites, satellites, plan.start_utc, plan.end_utc)
        plan.contacts = LazyContacts(table)
        keys = list(sites)

        def site_windows(s_i: int) -> list[Window]:
            return _fast_windows(table, eph, frames, s_i, plan.start_utc, selection, selection_step_s)

        # Sites are independent: their selections overlap on the cores (numpy releases the GIL).
        for key, windows in zip(keys, parallel_map(site_windows, range(len(keys))), strict=True):
            plan.windows[key] = windows
    else:
        for key, site in sites.items():
            plan.contacts[key] = site_contacts(site, satellites, plan.start_utc, plan.end_utc)
            look = _skyfield_look(site, by_id, plan.start_utc)
            plan.windows[key] = select_windows(plan.contacts[key], plan.start_utc, look, selection, selection_step_s)
    return plan


def plan_from_topology(
    topology: Mapping[str, Any],
    start: datetime,
    end: datetime,
    scale: float = 1.0,
    base_dir: Path | None = None,
    method: str = "fast",
) -> Plan:
    """The plan of every cluster's site; the Walker epoch is `start`; `link.selection` picks the policy."""
    sites = sites_from_topology(topology)
    satellites = satellites_from_topology(topology, start, base_dir)
    link = topology.get("link") or {}
    if not isinstance(link, dict):
        raise ConfigError("link: not a mapping")
    selection = check_policy(str(link.get("selection", DEFAULT_POLICY)))
    step = link.get("selection_step_s", DEFAULT_STEP_S)
    if not isinstance(step, (int, float)) or isinstance(step, bool) or not step > 0:
        raise ConfigError(f"link.selection_step_s: must be a number > 0, got {step!r}")
    return build_plan(sites, satellites, start, end, scale, method, selection, float(step))


def window_dict(window: Window) -> dict[str, Any]:
    return {
        "start": to_iso(window.start),
        "end": to_iso(window.end),
        "satellite": window.satellite,
        "peak_elevation_deg": window.peak_elevation_deg,
        "elevation_deg": window.elevation_deg,
        "range_km": window.range_km,
        "handovers": [
            {"at": to_iso(h.at), "satellite": h.satellite, "elevation_deg": h.elevation_deg, "range_km": h.range_km}
            for h in window.handovers
        ],
    }


def _opt_float(values: Mapping[str, Any], key: str) -> float | None:
    value = values.get(key)
    return None if value is None else float(value)


def _window_from(values: Mapping[str, Any], where: str) -> Window:
    try:
        handovers = tuple(
            Handover(
                at=parse_iso(h["at"]),
                satellite=str(h["satellite"]),
                elevation_deg=_opt_float(h, "elevation_deg"),
                range_km=_opt_float(h, "range_km"),
            )
            for h in values.get("handovers") or []
        )
        return Window(
            start=parse_iso(values["start"]),
            end=parse_iso(values["end"]),
            satellite=str(values["satellite"]),
            peak_elevation_deg=float(values["peak_elevation_deg"]),
            elevation_deg=_opt_float(values, "elevation_deg"),
            range_km=_opt_float(values, "range_km"),
            handovers=handovers,
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing {exc.args[0]}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def plan_from_dict(document: Any, source: str = "plan") -> Plan:
    """A plan back from its `--plan-out` document (for `emsfl orbit run --replay`); no satellites needed."""
    if not isinstance(document, dict) or not isinstance(document.get("windows"), dict):
        raise ConfigError(f"{source}: expected a --plan-out document with a 'windows' mapping")
    try:
        start, end = parse_iso(document["start_utc"]), parse_iso(document["end_utc"])
        scale = float(document.get("scale", 1.0))
    except KeyError as exc:
        raise ConfigError(f"{source}: missing {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    plan = Plan(start, end, scale, {}, {}, selection=str(document.get("selection", DEFAULT_POLICY)))
    for key, items in document["windows"].items():
        if not isinstance(items, list):
            raise ConfigError(f"{source}: windows.{key}: expected a list")
        windows = [_window_from(w, f"{source}: windows.{key}[{i}]") for i, w in enumerate(items)]
        for i, (a, b) in enumerate(itertools.pairwise(windows)):
            if not (a.start < a.end <= b.start):
                raise ConfigError(f"{source}: windows.{key}[{i}]: windows must be ordered and disjoint")
        plan.windows[str(key)] = windows
    contacts = document.get("contacts") or []
    for i, item in enumerate(contacts):
        contact = _contact_from(item, f"{source}: contacts[{i}]")
        plan.contacts.setdefault(str(item.get("cluster", contact.site)), []).append(contact)
    return plan


def load_plan(path: str | Path) -> Plan:
    text = read_text_file(path, "plan")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"plan file {path}: not JSON: {exc}") from None
    return plan_from_dict(document, str(path))


def contact_dict(contact: Contact) -> dict[str, Any]:
    return {
        "site": contact.site,
        "satellite": contact.satellite,
        "aos": to_iso(contact.aos),
        "los": to_iso(contact.los),
        "peak_elevation_deg": contact.peak_elevation_deg,
    }


def plan_dict(plan: Plan) -> dict[str, Any]:
    """The `--plan-out` document: contacts with their cluster, merged windows per cluster."""
    return {
        "contacts": [{**contact_dict(c), "cluster": key} for key, c in plan.all_contacts()],
        "windows": {key: [window_dict(w) for w in windows] for key, windows in plan.windows.items()},
        "start_utc": to_iso(plan.start_utc),
        "end_utc": to_iso(plan.end_utc),
        "scale": plan.scale,
        "selection": plan.selection,
    }


def contacts_json(contacts: Sequence[Contact]) -> str:
    return json.dumps({"contacts": [contact_dict(c) for c in contacts]}, indent=2) + "\n"


def contacts_csv(contacts: Sequence[Contact]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CONTACT_COLUMNS)
    for c in contacts:
        writer.writerow([c.site, c.satellite, to_iso(c.aos), to_iso(c.los), f"{c.peak_elevation_deg:.3f}"])
    return out.getvalue()


def _contact_from(values: Mapping[str, Any], where: str) -> Contact:
    try:
        return Contact(
            site=str(values["site"]),
            satellite=str(values["satellite"]),
            aos=parse_iso(values["aos"]),
            los=parse_iso(values["los"]),
            peak_elevation_deg=float(values["peak_elevation_deg"]),
        )
    except KeyError as exc:
        raise ConfigError(f"{where}: missing {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_contacts_json(text: str) -> list[Contact]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"contacts JSON: {exc}") from None
    items = document.get("contacts") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ConfigError("contacts JSON: expected an object with a 'contacts' list")
    return [_contact_from(item, f"contacts[{i}]") for i, item in enumerate(items)]


def parse_contacts_csv(text: str) -> list[Contact]:
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != CONTACT_COLUMNS:
        raise ConfigError(f"contacts CSV: expected the header {','.join(CONTACT_COLUMNS)}")
    return [_contact_from(row, f"contacts CSV line {reader.line_num}") for row in reader]
