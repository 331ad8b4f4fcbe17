"""`emsfl satellite run|status`: the satellite node as a standalone command (docs/INTERFACES.md, Commands)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from types import FrameType
from typing import Any

from emsfl.config import ConfigError, cluster_ids, field, load_topology, parse_host_port
from emsfl.runtime.tls import add_tls_flags, mqtt_tls

log = logging.getLogger("satellite_node")


class _JsonFormatter(logging.Formatter):
    """Structured logs (ARCHITECTURE §8): one JSON object per line on stderr."""

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
    strategy_options: dict[str, Any] = dataclass_field(default_factory=dict)
    keep_versions: int | None = None
    pace: bool = True
    upload_ttl_s: float = 86400.0


def _number(section: dict[str, Any], key: str, where: str, default: Any, minimum: float, integer: bool = False) -> Any:
    value = section.get(key, default)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{where}.{key}: expected {kind} >= {minimum}, got {value!r}")
    return value


def _strategy_options(satellite: dict[str, Any], strategy: str) -> dict[str, Any]:
    raw = satellite.get(strategy) or {}
    where = f"satellite.{strategy}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a mapping")
    known = {"emsfl": set(), "fedavg": {"quorum", "round_deadline_s"}, "fedasync": {"alpha", "b"}}[strategy]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(known)) or 'none'})")
    if strategy == "fedavg":
        quorum = _number(raw, "quorum", where, None, 1, integer=True)
        deadline = _number(raw, "round_deadline_s", where, None, 0)
        if (quorum is None) != (deadline is None):
            raise ConfigError(f"{where}.quorum: quorum and round_deadline_s go together")
        return {"quorum": quorum, "round_deadline_s": deadline}
    if strategy == "fedasync":
        alpha = _number(raw, "alpha", where, 0.5, 0)
        if not 0 < alpha <= 1:
            raise ConfigError(f"{where}.alpha: expected a number in (0, 1], got {alpha!r}")
        return {"alpha": float(alpha), "b": float(_number(raw, "b", where, 0.5, 0))}
    return {}


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
    keep = _number(satellite, "keep_versions", "satellite", None, 1, integer=True)
    pace = satellite.get("pace", True)
    if not isinstance(pace, bool):
        raise ConfigError(f"satellite.pace: expected true or false, got {pace!r}")
    ttl = float(_number(satellite, "upload_ttl_s", "satellite", 86400.0, 1))
    options = _strategy_options(satellite, strategy)
    return SatelliteConfig(clusters, strategy, affinity, options, keep, pace, ttl)


def check_base_model(manifest: Any, topology: dict[str, Any], base: str) -> None:
    """The base (--base) must be the topology's model: a mismatch is named before any state is written."""
    model = topology.get("model") or {}
    for key in ("family", "num_layers", "num_experts", "top_k"):
        want, have = model.get(key), getattr(manifest, key)
        if want is not None and want != have:
            raise ConfigError(f"--base: {base} has {key}={have!r} but the topology's model.{key} is {want!r}")


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
    run.add_argument("--listen", required=True, help="gRPC HOST:PORT")
    run.add_argument("--state", required=True, help="state directory")
    run.add_argument("--base", required=True, help="base directory (manifest.json, base.safetensors)")
    add_tls_flags(run, serves=True)
    run.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC, cluster identity from metadata (loopback labs only); without it the node refuses to"
        " start unless it has TLS files (--tls-*, the topology's tls: keys or EMSFL_TLS_*)",
    )
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0.0.0.0)")
    status = sub.add_parser("status", help="print clusters, assignment and expert versions of a state directory")
    status.add_argument("--state", required=True, help="the satellite node's state directory (satellite run --state)")
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
    from emsfl.runtime.bus import Bus
    from emsfl.runtime.events import EventLog
    from emsfl.runtime.linkview import LinkView
    from satellite_node.manifest import ManifestError, load_manifest
    from satellite_node.metrics import Metrics
    from satellite_node.node import NodeConfig, SatelliteNode
    from satellite_node.server import make_server
    from satellite_node.store import Store

    try:
        topology = load_topology(args.topology)
        config = read_config(topology)
        broker_host, broker_port = parse_host_port(args.broker, "--broker")
        parse_host_port(args.listen, "--listen")
        manifest = load_manifest(args.base)
        check_base_model(manifest, topology, args.base)
        tls = _tls_files(args, topology)
        if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
            raise ConfigError(f"--metrics-port: {args.metrics_port} is not a port")
    except (ConfigError, ManifestError) as exc:
        print(f"emsfl satellite: {exc}", file=sys.stderr)
        return 2
    _setup_logging()
    state = Path(args.state)
    store = Store(state, keep_versions=config.keep_versions)
    store.set_meta("strategy", config.strategy)
    store.set_meta("clusters", list(config.clusters))
    bus = Bus(broker_host, broker_port, role="satellite", node_id="satellite", tls=mqtt_tls(topology, tls))
    links = LinkView(bus, clusters=list(config.clusters))
    events = EventLog(state / "events.jsonl", "satellite", "satellite", links.emulated_now)
    metrics = Metrics()
    node_config = NodeConfig(
        config.clusters,
        config.strategy,
        config.affinity,
        strategy_options=config.strategy_options,
        pace=config.pace,
    )
    node = SatelliteNode(store, manifest, str(args.base), node_config, links, events, metrics)
    try:
        server, port = make_server(node, args.listen, tls=tls)
        if args.metrics_port is not None:
            metrics.serve(args.metrics_port)
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
    if tls is None:
        log.warning(
            "TLS is off (--insecure): plaintext gRPC on %s, cluster identity from the %r metadata key (loopback labs"
            " only)",
            args.listen,
            "emsfl-cluster",
        )
    else:
        log.info("mutual TLS on %s: cluster identity from client certificates signed by %s", args.listen, tls.ca)
    try:
        bus.start()
    except ConnectionError as exc:
        print(f"emsfl satellite: --broker: {exc}", file=sys.stderr)
        server.stop(0)
        store.close()
        return 1
    bus.announce({"listen": args.listen, "port": port, "strategy": config.strategy, "tls": tls is not None})
    log.info(
        "serving Federation on port %d for clusters %s (strategy %s)", port, ", ".join(config.clusters), config.strategy
    )
    next_gc = 0.0
    while not stop.is_set():
        stop.wait(0.5)
        try:
            node.tick()  # FedAvg round deadlines
            if time.monotonic() >= next_gc:
                next_gc = time.monotonic() + 60.0
                store.drop_stale_uploads(time.time() - config.upload_ttl_s)
                metrics.refresh_store(store)
        except Exception:  # keep serving; the next tick retries
            log.exception("periodic work failed")
    log.info("stopping")
    server.stop(grace=2.0).wait(5.0)
    bus.stop()
    events.close()
    store.close()
    return 0


def _tls_files(args: argparse.Namespace, topology: dict[str, Any]) -> Any:
    """The node's TLS files (emsfl/runtime/tls.py), or None with an explicit --insecure; ConfigError otherwise."""
    from emsfl.runtime import tls as tls_config

    tls = tls_config.resolve(args, topology, args.topology)
    if tls is not None and args.insecure:
        raise ConfigError("--insecure: contradicts the TLS files given (--tls-*, the topology's tls: or EMSFL_TLS_*)")
    if tls is None and not args.insecure:
        raise ConfigError(
            "no TLS files: pass --tls-ca/--tls-cert/--tls-key (or tls: in the topology) for mutual TLS, or --insecure"
            " for plaintext gRPC on a loopback lab"
        )
    return tls


def _status(state: Path, as_json: bool) -> int:
    from satellite_node.status import stored_status
    from satellite_node.store import Store

    try:
        store = Store(state, create=False)
    except FileNotFoundError as exc:
        print(f"emsfl satellite: --state: {exc}", file=sys.stderr)
        return 2
    with store:
        status = stored_status(store)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"strategy {status['strategy']}, assignment version {status['assignment_version']},"
        f" global version {status['global_version']}"
    )
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
