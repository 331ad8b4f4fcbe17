"""`emsfl lab ...`: run a whole testbed on this machine."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emsfl.config import ConfigError
from testbed.lab import DEFAULT_TOPOLOGY, LabOptions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emsfl lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start every role as a process, run for a bounded time, write runs/<run-id>/")
    up.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY, help="topology YAML (default: the local lab)")
    up.add_argument("--broker", help="HOST:PORT of a running MQTT broker (default: start the embedded amqtt)")
    up.add_argument("--duration-s", type=float, help="wall seconds to run (default: lab.duration_wall_s)")
    up.add_argument("--runs-dir", type=Path, default=Path("runs"))
    up.add_argument("--run-id", help="name of the run directory (default: a UTC timestamp)")
    up.add_argument("--cache-dir", type=Path, default=Path(".cache/emsfl"), help="where base models are cached")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from testbed.lab import run_lab
    from testbed.outputs import write_outputs

    opts = LabOptions(
        topology_path=args.topology,
        broker=args.broker,
        duration_wall_s=args.duration_s,
        runs_dir=args.runs_dir,
        run_id=args.run_id,
        cache_dir=args.cache_dir,
    )
    try:
        lab = run_lab(opts)
    except (ConfigError, RuntimeError, FileExistsError) as exc:
        print(f"emsfl lab: {exc}", file=sys.stderr)
        return 2
    summary = write_outputs(lab)
    print(f"[lab] run written to {lab.run_dir}")
    for key in ("link_up_events", "uploads_committed", "uploads_outside_contact", "bytes_uplinked"):
        print(f"  {key:<24} {summary[key]}")
    print(f"  {'accuracy':<24} {summary['accuracy_initial']:.3f} -> {summary['accuracy_final']:.3f}")
    return 130 if lab.interrupted else 0
