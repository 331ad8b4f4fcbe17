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
from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.events import EventLog
from emsfl.runtime.timefmt import parse_iso
from emsfl.runtime.tls import add_tls_flags, mqtt_tls
from emsfl.runtime.tls import resolve as resolve_tls
from orbit_service.commands import REPLY_TOPIC, CommandListener, make_command
from orbit_service.constellation import (
    load_omm_file,
    load_tle_file,
    parse_walker_spec,
    satellites_from_topology,
    walker_satellites,
)
from orbit_service.link import link_model_from
from orbit_service.plan import Plan, build_plan, contacts_csv, contacts_json, load_plan, plan_dict, plan_from_topology
from orbit_service.publisher import OrbitPublisher
from orbit_service.sites import load_sites_csv, sites_from_topology
from orbit_service.subpoints import SubpointPublisher
from protos import topics

PROG = "emsfl orbit"
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
    run.add_argument("--topology", help="topology YAML file (required unless --replay)")
    run.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    run.add_argument("--plan-out", help="write the contact plan (JSON) here")
    run.add_argument("--events", help="append link_up/link_down events (JSON lines) here")
    run.add_argument("--scale", type=float, help="emulated seconds per wall second (default: clock.scale)")
    run.add_argument("--start-utc", help="emulated start, ISO 8601 (default: clock.start_utc)")
    run.add_argument("--hours", type=float, help="plan horizon in emulated hours (default: the lab duration + 10%%)")
    run.add_argument("--replay", help="drive the links from a recorded plan (a --plan-out file) instead of orbits")
    run.add_argument("--method", choices=("fast", "reference"), default="fast", help="contact finder (default: fast)")
    add_tls_flags(run)  # MQTT over TLS with this certificate (the orbit service dials no gRPC)
    run.add_argument(
        "--subpoints-every-s",
        type=float,
        default=1.0,
        help="publish sub-satellite points on emsfl/v1/orbit/satellites this often, wall s (0: never; default 1)",
    )

    override = sub.add_parser("override", help="send an operator command to a running orbit service")
    override.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    override.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    verbs = override.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    link = verbs.add_parser("link", help="force a cluster's link up or down (auto: back to the plan)")
    link.add_argument("--cluster", required=True)
    link.add_argument("--state", required=True, choices=("up", "down", "auto"))
    link.add_argument(
        "--duration-s",
        type=float,
        help="how long the override holds, in emulated seconds (the orbit clock's, i.e. wall seconds x clock.scale;"
        " default: until --state auto)",
    )
    link.add_argument("--delay-s", type=float, help="one-way delay while forced up")
    link.add_argument("--rate-bps", type=float, help="rate while forced up")
    link.add_argument("--loss", type=float, help="loss fraction while forced up")
    verbs.add_parser("pause", help="freeze emulated time")
    verbs.add_parser("resume", help="let emulated time run again")
    scale = verbs.add_parser("scale", help="change the time scale")
    scale.add_argument("scale", type=float)
    verbs.add_parser("reload", help="re-read the plan source (topology or --replay file)")

    shaper = sub.add_parser("shaper", help="enforce one cluster's link state on a network device with tc netem")
    shaper.add_argument("--cluster", required=True)
    shaper.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    shaper.add_argument("--dev", required=True, help="network interface whose egress is shaped")
    shaper.add_argument("--netns", help="run tc in this network namespace")

    plan = sub.add_parser("plan", help="print or export the contacts of a constellation over sites")
    source = plan.add_mutually_exclusive_group(required=True)
    source.add_argument("--topology", help="topology YAML file (constellation and cluster sites)")
    source.add_argument("--walker", help="Walker-delta shell INC_DEG:ALT_KM:PLANES/SATS_PER_PLANE/PHASING")
    source.add_argument("--tle", help="TLE file (2-line or 3-line)")
    source.add_argument("--omm", help="OMM file (CelesTrak JSON or CSV)")
    plan.add_argument("--sites", help="sites CSV: name,lat_deg,lon_deg,alt_m,min_elevation_deg")
    plan.add_argument("--start", help="start, ISO 8601 UTC (default: clock.start_utc of the topology, else now)")
    plan.add_argument("--hours", type=float, default=DEFAULT_PLAN_HOURS, help="window length (default: 24)")
    plan.add_argument("--format", choices=("json", "csv"), default="json")
    plan.add_argument("--out", help="write here instead of stdout")
    plan.add_argument("--method", choices=("fast", "reference"), default="fast", help="contact finder (default: fast)")

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
        raise ConfigError("--sites: required with --walker, --tle or --omm")

    if topology is not None:
        satellites = satellites_from_topology(topology, start, base_dir=Path(args.topology).parent)
    elif args.walker:
        try:
            spec = parse_walker_spec(args.walker)
        except ConfigError as exc:
            raise ConfigError(f"--walker: {exc}") from None
        satellites = walker_satellites(spec, start)
    elif args.omm:
        satellites = load_omm_file(args.omm)
    else:
        satellites = load_tle_file(args.tle)
    plan = build_plan(sites, satellites, start, end, method=args.method)
    contacts = [contact for _, contact in plan.all_contacts()]
    _write(args.out, contacts_json(contacts) if args.format == "json" else contacts_csv(contacts))
    return 0


def _command_run(args: argparse.Namespace) -> int:
    if not args.topology and not args.replay:
        raise UsageError(f"{PROG} run: the following arguments are required: --topology (or --replay)")
    topology: dict[str, Any] = load_topology(args.topology) if args.topology else {}
    clock_cfg = _optional_section(topology, "clock")
    replayed = load_plan(args.replay) if args.replay else None
    if args.scale is not None:
        scale = positive(args.scale, "--scale")
    elif "scale" in clock_cfg or replayed is None:
        scale = positive(field(clock_cfg, "scale", float, "clock", default=1.0), "clock.scale")
    else:
        scale = positive(replayed.scale, "plan scale")
    link_cfg = _optional_section(topology, "link")
    model = link_model_from(link_cfg)
    contacts_published = field(link_cfg, "contacts_published", int, "link", default=5)
    if contacts_published < 1:
        raise ConfigError(f"link.contacts_published: must be >= 1, got {contacts_published}")
    host, port = parse_host_port(args.broker, "--broker")
    tls = resolve_tls(args, topology, args.topology, grpc_role=False)
    if args.subpoints_every_s < 0:
        raise ConfigError(f"--subpoints-every-s: must be >= 0 (0: never), got {args.subpoints_every_s!r}")

    def make_plan() -> Plan:
        if args.replay:
            plan = load_plan(args.replay)
            plan.scale = scale
            return plan
        start = _time_arg(args.start_utc, "--start-utc") if args.start_utc else _topology_start(topology) or _now()
        hours = args.hours if args.hours is not None else default_run_hours(topology, scale)
        end = start + _hours(hours, "--hours")
        base_dir = Path(args.topology).parent
        return plan_from_topology(topology, start, end, scale, base_dir=base_dir, method=args.method)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    plan = make_plan()
    if args.plan_out:
        _write(args.plan_out, json.dumps(plan_dict(plan), indent=2) + "\n")
    log.info("plan %s .. %s: %d windows", plan.start_utc, plan.end_utc, sum(len(w) for w in plan.windows.values()))

    events = EventLog(args.events, "orbit", "orbit") if args.events else None
    bus = Bus(host, port, role="orbit", node_id="orbit", status_topic=topics.ORBIT_STATUS, tls=mqtt_tls(topology, tls))
    try:
        bus.start()
    except ConnectionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        if events is not None:
            events.close()
        return 1
    # The clock starts now, after planning, so that no transition is already due when publishing begins.
    clock = EmulatedClock(epoch_utc=plan.start_utc, wall_ref_unix=time.time(), scale=scale)
    publisher = OrbitPublisher(plan, bus, clock, model, contacts_published, events)
    listener = CommandListener(host, port, publisher, make_plan, events)
    subpoints = SubpointPublisher(bus, publisher, args.subpoints_every_s) if args.subpoints_every_s > 0 else None
    try:
        publisher.start()
        listener.start()
        if subpoints is not None:
            subpoints.start()
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    finally:
        if subpoints is not None:
            subpoints.stop()
        listener.stop()
        publisher.stop()
        bus.stop()
        if events is not None:
            events.close()
    return 0


def _command_override(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protos import payloads

    host, port = parse_host_port(args.broker, "--broker")
    fields: dict[str, Any] = {}
    if args.verb == "link":
        fields = {
            "cluster": args.cluster,
            "state": args.state,
            "duration_s": args.duration_s,
            "delay_s": args.delay_s,
            "rate_bps": args.rate_bps,
            "loss": args.loss,
        }
    elif args.verb == "scale":
        fields = {"scale": args.scale}
    body = make_command(args.verb, **fields)
    try:
        data = payloads.encode("cmd", body)
    except payloads.PayloadError as exc:
        raise ConfigError(str(exc)) from None
    replies: list[dict[str, Any]] = []
    got = threading.Event()
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            reply = payloads.decode("cmd_reply", msg.payload)
        except payloads.PayloadError:
            return
        if reply.get("id") == body["id"]:
            replies.append(reply)
            got.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"orbit-override-{body['id'][:8]}")
    client.on_connect = lambda c, *a: c.subscribe(REPLY_TOPIC, qos=1)
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = on_message
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        print(f"{PROG}: cannot reach the broker at {host}:{port}: {exc}", file=sys.stderr)
        return 1
    client.loop_start()
    try:
        if not subscribed.wait(args.timeout):
            print(f"{PROG}: no broker answer at {host}:{port}", file=sys.stderr)
            return 1
        client.publish(f"{topics.ORBIT_CMD}/{args.verb}", data, qos=1)
        if not got.wait(args.timeout):
            print(f"{PROG}: no reply from the orbit service within {args.timeout:g} s", file=sys.stderr)
            return 1
    finally:
        client.disconnect()
        client.loop_stop()
    reply = replies[0]
    print(json.dumps(reply))
    if not reply["ok"]:
        print(f"{PROG}: refused: {reply['error']}", file=sys.stderr)
        return 1
    return 0


def _command_shaper(args: argparse.Namespace) -> int:
    from orbit_service.shaper import Shaper, ShaperError, check_tools

    host, port = parse_host_port(args.broker, "--broker")
    try:
        check_tools()
    except ShaperError as exc:
        raise ConfigError(str(exc)) from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    bus = Bus(host, port, role="shaper", node_id=args.cluster)
    shaper = Shaper(bus, args.cluster, args.dev, args.netns)
    try:
        shaper.start()
    except ShaperError as exc:
        raise ConfigError(str(exc)) from None
    try:
        bus.start()
    except ConnectionError as exc:
        shaper.stop()
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        while not stop.wait(0.5):
            pass
    finally:
        shaper.stop()
        bus.stop()
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s orbit %(levelname)s %(message)s", stream=sys.stderr)
    try:
        args = _parser().parse_args(argv)
        if args.command == "run":
            return _command_run(args)
        if args.command == "override":
            return _command_override(args)
        if args.command == "shaper":
            return _command_shaper(args)
        return _command_plan(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # `--help`
        return exc.code if isinstance(exc.code, int) else 0
