"""`emsfl satellite run|status`: the satellite node as a standalone command (docs/INTERFACES.md, Commands)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from emsfl.config import ConfigError, cluster_ids, field, load_topology, parse_host_port

log = logging.getLogger("satellite_node")


class _JsonFormatter(logging.Formatter):
    """Structured logs (DESIGN §8): one JSON object per line on stderr."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "wall": round(record.created, 3),
            "level": record.levelname.lower(),
            "role": "satellite",
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


@dataclass(frozen=True)
class SatelliteConfig:
    clusters: dict[str, int | None]
    strategy: str
    affinity: str


def read_config(topology: dict[str, Any]) -> SatelliteConfig:
    """The satellite's view of the topology; ConfigError names the bad field."""
    from satellite_node.assignment import AFFINITY_KINDS
    from satellite_node.strategy import STRATEGIES

    ids = cluster_ids(topology)
    clusters: dict[str, int | None] = {}
    for i, (cid, raw) in enumerate(zip(ids, topology["clusters"], strict=True)):
        capacity = field(raw, "capacity_experts", int, f"clusters[{i}]", default=None)
        if capacity is not None and capacity < 0:
            raise ConfigError(f"clusters[{i}].capacity_experts: must be >= 0, got {capacity}")
        clusters[cid] = capacity
    strategy = field(topology, "strategy", str, "(root)", default="emsfl")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"strategy: {strategy!r} is not available on the satellite node (have: {', '.join(STRATEGIES)})"
        )
    satellite = topology.get("satellite") or {}
    if not isinstance(satellite, dict):
        raise ConfigError("satellite: not a mapping")
    affinity = field(satellite, "affinity", str, "satellite", default="gate")
    if affinity not in AFFINITY_KINDS:
        raise ConfigError(f"satellite.affinity: expected one of {', '.join(AFFINITY_KINDS)}, got {affinity!r}")
    return SatelliteConfig(clusters, strategy, affinity)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as every emsfl command does
        print(f"emsfl satellite: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="emsfl satellite", description="the satellite node: gRPC Federation server and global model")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="serve the Federation API")
    run.add_argument("--topology", required=True, help="topology YAML")
    run.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    run.add_argument("--listen", required=True, help="gRPC HOST:PORT (plaintext; loopback labs)")
    run.add_argument("--state", required=True, help="state directory")
    run.add_argument("--base", required=True, help="base directory (manifest.json, base.safetensors)")
    status = sub.add_parser("status", help="print clusters, assignment and expert versions of a state directory")
    status.add_argument("--state", required=True)
    status.add_argument("--json", action="store_true", help="JSON instead of a table")
    return parser


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "status":
        return _status(Path(args.state), args.json)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from protos.bus import Bus
    from protos.linkview import LinkView
    from satellite_node.events import EVENTS_FILE, EventLog
    from satellite_node.manifest import ManifestError, load_manifest
    from satellite_node.node import NodeConfig, SatelliteNode
    from satellite_node.server import make_server
    from satellite_node.store import Store

    try:
        config = read_config(load_topology(args.topology))
        broker_host, broker_port = parse_host_port(args.broker, "--broker")
        parse_host_port(args.listen, "--listen")
        manifest = load_manifest(args.base)
    except (ConfigError, ManifestError) as exc:
        print(f"emsfl satellite: {exc}", file=sys.stderr)
        return 2
    _setup_logging()
    state = Path(args.state)
    store = Store(state)
    store.set_meta("strategy", config.strategy)
    store.set_meta("clusters", list(config.clusters))
    bus = Bus(broker_host, broker_port, role="satellite", node_id="satellite")
    links = LinkView(bus, clusters=list(config.clusters))
    events = EventLog(state / EVENTS_FILE, links.emulated_now)
    node = SatelliteNode(
        store, manifest, str(args.base), NodeConfig(config.clusters, config.strategy, config.affinity), links, events
    )
    try:
        server, port = make_server(node, args.listen)
    except (OSError, RuntimeError) as exc:
        print(f"emsfl satellite: --listen: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        store.close()
        return 2
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    log.warning(
        "TLS is off: plaintext gRPC on %s, cluster identity from the %r metadata key (loopback labs only)",
        args.listen,
        "emsfl-cluster",
    )
    try:
        bus.start()
    except ConnectionError as exc:
        print(f"emsfl satellite: --broker: {exc}", file=sys.stderr)
        server.stop(0)
        store.close()
        return 1
    bus.announce({"listen": args.listen, "port": port, "strategy": config.strategy, "tls": False})
    log.info(
        "serving Federation on port %d for clusters %s (strategy %s)", port, ", ".join(config.clusters), config.strategy
    )
    while not stop.is_set():
        stop.wait(0.5)
    log.info("stopping")
    server.stop(grace=2.0).wait(5.0)
    bus.stop()
    events.close()
    store.close()
    return 0


def _status(state: Path, as_json: bool) -> int:
    from satellite_node.node import status_dict
    from satellite_node.store import Store

    try:
        store = Store(state, create=False)
    except FileNotFoundError as exc:
        print(f"emsfl satellite: --state: {exc}", file=sys.stderr)
        return 2
    with store:
        status = status_dict(store, str(store.get_meta("strategy", "?")), store.get_meta("clusters", []))
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"strategy {status['strategy']}, assignment version {status['assignment_version']}")
    print(f"{'cluster':<12}{'joined':<8}{'affinity':<10}{'owned':<7}{'uploads':<9}{'bytes':>12}")
    for c in status["clusters"]:
        print(
            f"{c['cluster_id']:<12}{'yes' if c['joined'] else 'no':<8}{'yes' if c['affinity_reported'] else 'no':<10}"
            f"{c['experts_owned']:<7}{c['uploads_committed']:<9}{c['bytes_received']:>12}"
        )
    if status["assignment"]:
        print("assignment:")
        for cluster, layers in sorted(status["assignment"].items()):
            print(f"  {cluster}: " + "; ".join(f"L{layer} {experts}" for layer, experts in layers))
    print(f"expert versions ({len(status['experts'])} uploaded):")
    for e in status["experts"]:
        print(f"  expert/{e['layer']}/{e['expert']}  v{e['version']}  {e['owner']}  {e['committed_at']}")
    return 0
