"""`emsfl orbit run|plan`: the orbit service and its contact-plan export.

Bad input prints one line naming the field or line and returns 2; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from emsfl.config import ConfigError, field, load_topology, parse_host_port, positive
from orbit_service.constellation import load_tle_file, parse_walker_spec, satellites_from_topology, walker_satellites
from orbit_service.events import EventLog
from orbit_service.plan import build_plan, contacts_csv, contacts_json, plan_dict, plan_from_topology
from orbit_service.publisher import OrbitPublisher
from orbit_service.sites import load_sites_csv, sites_from_topology
from protos import topics
from protos.bus import Bus
from protos.clock import EmulatedClock
from protos.timefmt import parse_iso

PROG = "emsfl orbit"
DEFAULT_RATE_BPS = 10_000_000.0
DEFAULT_PLAN_HOURS = 24.0
HORIZON_MARGIN = 1.10  # the run's plan outlasts the lab by 10 %, so its last seconds still see passes

log = logging.getLogger("orbit_service")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage dump; `--help` still shows the usage.
        raise UsageError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Satellite passes, emulated clock and link states over MQTT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="compute the plan and publish clock, links and contacts until stopped")
    run.add_argument("--topology", required=True, help="topology YAML file")
    run.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    run.add_argument("--plan-out", help="write the contact plan (JSON) here")
    run.add_argument("--events", help="append link_up/link_down events (JSON lines) here")
    run.add_argument("--scale", type=float, help="emulated seconds per wall second (default: clock.scale)")
    run.add_argument("--start-utc", help="emulated start, ISO 8601 (default: clock.start_utc)")
    run.add_argument("--hours", type=float, help="plan horizon in emulated hours (default: the lab duration + 10%%)")

    plan = sub.add_parser("plan", help="print or export the contacts of a constellation over sites")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--topology", help="topology YAML file (constellation and cluster sites)")
    source.add_argument("--walker", help="Walker-delta shell INC_DEG:ALT_KM:PLANES/SATS_PER_PLANE/PHASING")
    source.add_argument("--tle", help="TLE file (2-line or 3-line)")
    plan.add_argument("--sites", help="sites CSV: name,lat_deg,lon_deg,alt_m,min_elevation_deg")
    plan.add_argument("--start", help="start, ISO 8601 UTC (default: clock.start_utc of the topology, else now)")
    plan.add_argument("--hours", type=float, default=DEFAULT_PLAN_HOURS, help="window length (default: 24)")
    plan.add_argument("--format", choices=("json", "csv"), default="json")
    plan.add_argument("--out", help="write here instead of stdout")
    return parser


def _time_arg(text: str, flag: str) -> datetime:
    try:
        return parse_iso(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _hours(value: float, flag: str) -> timedelta:
    if not value > 0:
        raise ConfigError(f"{flag}: must be > 0 (the time window would be empty), got {value!r}")
    return timedelta(hours=value)


def _optional_section(topology: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = topology.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: not a mapping")
    return value


def _topology_start(topology: Mapping[str, Any]) -> datetime | None:
    text = _optional_section(topology, "clock").get("start_utc")
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConfigError(f"clock.start_utc: expected an ISO 8601 string, got {text!r}")
    return _time_arg(text, "clock.start_utc")


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def default_run_hours(topology: Mapping[str, Any], scale: float) -> float:
    """The lab's emulated duration plus a margin, or a day without a `lab` section."""
    lab = _optional_section(topology, "lab")
    if "duration_wall_s" not in lab:
        return DEFAULT_PLAN_HOURS
    wall_s = positive(field(lab, "duration_wall_s", float, "lab"), "lab.duration_wall_s")
    return wall_s * scale / 3600.0 * HORIZON_MARGIN


def _command_plan(args: argparse.Namespace) -> int:
    topology: dict[str, Any] | None = None
    if args.topology:
        topology = load_topology(args.topology)
    start = _time_arg(args.start, "--start") if args.start else None
    if start is None and topology is not None:
        start = _topology_start(topology)
    start = start or _now()
    end = start + _hours(args.hours, "--hours")

    if args.sites:
        sites = {site.name: site for site in load_sites_csv(args.sites)}
    elif topology is not None:
        sites = {s.name: s for s in sites_from_topology(topology).values()}
    else:
        raise ConfigError("--sites: required with --walker or --tle")

    if topology is not None:
        satellites = satellites_from_topology(topology, start, base_dir=Path(args.topology).parent)
    elif args.walker:
        satellites = walker_satellites(parse_walker_spec(args.walker), start)
    else:
        satellites = load_tle_file(args.tle)
    plan = build_plan(sites, satellites, start, end)
    contacts = [contact for _, contact in plan.all_contacts()]
    _write(args.out, contacts_json(contacts) if args.format == "json" else contacts_csv(contacts))
    return 0


def _command_run(args: argparse.Namespace) -> int:
    topology = load_topology(args.topology)
    clock_cfg = _optional_section(topology, "clock")
    if args.scale is not None:
        scale = positive(args.scale, "--scale")
    else:
        scale = positive(field(clock_cfg, "scale", float, "clock", default=1.0), "clock.scale")
    start = _time_arg(args.start_utc, "--start-utc") if args.start_utc else _topology_start(topology) or _now()
    hours = args.hours if args.hours is not None else default_run_hours(topology, scale)
    end = start + _hours(hours, "--hours")
    link_cfg = _optional_section(topology, "link")
    rate_bps = positive(field(link_cfg, "rate_bps", float, "link", default=DEFAULT_RATE_BPS), "link.rate_bps")
    contacts_published = field(link_cfg, "contacts_published", int, "link", default=5)
    if contacts_published < 1:
        raise ConfigError(f"link.contacts_published: must be >= 1, got {contacts_published}")
    host, port = parse_host_port(args.broker, "--broker")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    plan = plan_from_topology(topology, start, end, scale, base_dir=Path(args.topology).parent)
    if args.plan_out:
        _write(args.plan_out, json.dumps(plan_dict(plan), indent=2) + "\n")
    log.info("plan %s .. %s: %d contacts", plan.start_utc, plan.end_utc, len(plan.all_contacts()))

    events = EventLog(args.events) if args.events else None
    bus = Bus(host, port, role="orbit", node_id="orbit", status_topic=topics.ORBIT_STATUS)
    try:
        bus.start()
    except ConnectionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        if events is not None:
            events.close()
        return 1
    # The clock starts now, after planning, so that no transition is already due when publishing begins.
    clock = EmulatedClock(epoch_utc=plan.start_utc, wall_ref_unix=time.time(), scale=scale)
    publisher = OrbitPublisher(plan, bus, clock, rate_bps, contacts_published, events)
    try:
        publisher.start()
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        publisher.stop()
        bus.stop()
        if events is not None:
            events.close()
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orbit %(levelname)s %(message)s", stream=sys.stderr)
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return _command_run(args)
        return _command_plan(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # `--help`
        return exc.code if isinstance(exc.code, int) else 0
