"""`emsfl ground ...`: run | warmup | eval. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from emsfl.config import ConfigError, load_topology, parse_host_port
from ground_node.errors import GroundError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emsfl ground", description="a ground node of EMS-FL")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="profile, follow the link, train the assigned experts and upload them")
    run.add_argument("--topology", required=True)
    run.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    run.add_argument("--satellite", required=True, help="satellite node gRPC HOST:PORT")
    run.add_argument("--cluster", required=True)
    run.add_argument("--workdir", required=True)
    run.add_argument("--base", required=True, help="base directory (emsfl ground warmup)")
    warm = sub.add_parser("warmup", help="build the base directory")
    warm.add_argument("--topology", required=True)
    warm.add_argument("--out", required=True)
    ev = sub.add_parser("eval", help="exact-match accuracy of base (+ uploaded tensors)")
    ev.add_argument("--topology", required=True)
    ev.add_argument("--base", required=True)
    ev.add_argument("--tensors", default=None, help="a safetensors file of manifest-named tensors")
    ev.add_argument("--cluster", default=None, help="evaluate on this cluster's test mix (default: global test set)")
    return parser


def _run(args: argparse.Namespace, topology: dict[str, Any]) -> int:
    from ground_node.agent import AgentOptions, GroundAgent
    from protos.bus import Bus
    from protos.linkview import LinkView

    host, port = parse_host_port(args.broker, "--broker")
    parse_host_port(args.satellite, "--satellite")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bus = Bus(host, port, role="ground", node_id=args.cluster)
    view = LinkView(bus, clusters=[args.cluster])
    options = AgentOptions(
        topology=topology,
        cluster=args.cluster,
        workdir=Path(args.workdir),
        base_dir=Path(args.base),
        satellite=args.satellite,
        progress=sys.stderr.isatty(),
    )
    agent = GroundAgent(options, view, now=view.emulated_now)
    try:
        bus.start()
        bus.announce({"cluster": args.cluster})
        agent.run(stop)
    finally:
        agent.close()
        bus.stop()
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='{"level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}')
    try:
        topology = load_topology(args.topology)
        if args.command == "run":
            return _run(args, topology)
        if args.command == "warmup":
            from ground_node.base import build_base

            out = build_base(topology, Path(args.out), progress=sys.stderr.isatty())
            print(json.dumps({"base": str(out)}))
            return 0
        from ground_node.evaluate import accuracy

        tensors = None
        if args.tensors:
            from safetensors.numpy import load_file

            tensors = load_file(args.tensors)
        acc = accuracy(Path(args.base), tensors, topology, args.cluster)
        print(json.dumps({"accuracy": acc, "cluster": args.cluster}))
        return 0
    except (ConfigError, GroundError, ConnectionError, OSError) as exc:
        print(f"emsfl ground: {exc}", file=sys.stderr)
        return 2
