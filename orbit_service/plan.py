"""A contact plan: every site's contacts and link-up windows over [start, end], and its exports.

Exports: the `--plan-out` JSON of `emsfl orbit run`, and the JSON or CSV contact lists of `emsfl orbit plan`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from emsfl.config import ConfigError
from orbit_service.constellation import satellites_from_topology
from orbit_service.contacts import Contact, Window, check_interval, merge_contacts, round_ms, site_contacts
from orbit_service.link import elevation_deg
from orbit_service.sites import GroundSite, sites_from_topology
from protos.timefmt import parse_iso, to_iso

CONTACT_COLUMNS = ("site", "satellite", "aos", "los", "peak_elevation_deg")


@dataclass
class Plan:
    start_utc: datetime
    end_utc: datetime
    scale: float
    sites: dict[str, GroundSite]  # key (cluster id, or site name) -> site
    satellites: dict[str, Any]  # satellite id -> skyfield EarthSatellite
    contacts: dict[str, list[Contact]] = field(default_factory=dict)
    windows: dict[str, list[Window]] = field(default_factory=dict)

    def all_contacts(self) -> list[tuple[str, Contact]]:
        """(key, contact) for every contact, earliest AOS first."""
        pairs = [(key, c) for key, contacts in self.contacts.items() for c in contacts]
        return sorted(pairs, key=lambda p: (p[1].aos, p[1].los, p[0], p[1].satellite))


def build_plan(
    sites: Mapping[str, GroundSite], satellites: Sequence[Any], start: datetime, end: datetime, scale: float = 1.0
) -> Plan:
    check_interval(start, end)
    by_id = {sat.name: sat for sat in satellites}
    if len(by_id) != len(satellites):
        raise ConfigError("constellation: satellite names are not unique")
    plan = Plan(round_ms(start), round_ms(end), scale, dict(sites), by_id)
    for key, site in sites.items():
        contacts = site_contacts(site, satellites, plan.start_utc, plan.end_utc)

        def elevation_at(satellite: str, moment: datetime, site: GroundSite = site) -> float:
            return elevation_deg(site, by_id[satellite], moment)

        plan.contacts[key] = contacts
        plan.windows[key] = merge_contacts(contacts, elevation_at)
    return plan


def plan_from_topology(
    topology: Mapping[str, Any], start: datetime, end: datetime, scale: float = 1.0, base_dir: Path | None = None
) -> Plan:
    """The plan of every cluster's site; the Walker epoch is `start`."""
    sites = sites_from_topology(topology)
    satellites = satellites_from_topology(topology, start, base_dir)
    return build_plan(sites, satellites, start, end, scale)


def window_dict(window: Window) -> dict[str, Any]:
    return {
        "start": to_iso(window.start),
        "end": to_iso(window.end),
        "satellite": window.satellite,
        "peak_elevation_deg": window.peak_elevation_deg,
    }


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
