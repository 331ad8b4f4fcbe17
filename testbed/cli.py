"""`emsfl lab ...`: run a whole testbed on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from emsfl import logs
from emsfl.config import ConfigError
from emsfl.errors import OneLineParser, positive_float, positive_int
from ground_node.errors import GroundError
from testbed.lab import DEFAULT_TOPOLOGY, LabOptions


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="emsfl lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start every role as a process, run for a bounded time, write runs/<run-id>/")
    up.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY, help="topology YAML (default: the local lab)")
    up.add_argument("--broker", help="HOST:PORT of a running MQTT broker (default: start the embedded amqtt)")
    up.add_argument("--duration-s", type=positive_float, help="wall seconds to run (default: lab.duration_wall_s)")
    up.add_argument("--runs-dir", type=Path, default=Path("runs"))
    up.add_argument("--run-id", help="name of the run directory (default: a UTC timestamp)")
    up.add_argument("--cache-dir", type=Path, default=Path(".cache/emsfl"), help="where base models are cached")
    up.add_argument(
        "--tls",
        action="store_true",
        help="every hop over mutual TLS: a throwaway CA in the run directory, Mosquitto with TLS and the ACL",
    )
    up.add_argument("--no-dashboard", action="store_true", help="do not start `emsfl dashboard` for this run")
    up.add_argument("--dashboard-port", type=int, default=8765, help="loopback port of the dashboard (default: 8765)")
    exp = sub.add_parser("experiment", help="run the lab once per strategy, seed and link rate; compare them")
    exp.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    exp.add_argument("--strategies", default="emsfl,fedavg,fedasync", help="comma-separated (default: all three)")
    exp.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    exp.add_argument(
        "--rates", help="comma-separated link rates in bit/s (default: the topology's and a thousandth of it)"
    )
    exp.add_argument(
        "--lrs", help="comma-separated learning rates, searched alike for every strategy (default: training.lr)"
    )
    exp.add_argument(
        "--duration-s",
        type=positive_float,
        help="wall seconds per run (default: lab.experiment_duration_wall_s, else 75)",
    )
    exp.add_argument("--quick", action="store_true", help="one seed, one rate, 45 s per run")
    exp.add_argument("--no-central", action="store_true", help="skip the centralised reference row")
    exp.add_argument(
        "--free-steps",
        action="store_true",
        help="let every strategy train as many steps as its run allows (default: as many as FedAvg's run)",
    )
    exp.add_argument(
        "--target-fraction", type=float, default=0.95, help="target = this share of the best final accuracy"
    )
    exp.add_argument("--broker", help="HOST:PORT of a running MQTT broker (default: the embedded one per run)")
    exp.add_argument("--runs-dir", type=Path, default=Path("runs"))
    exp.add_argument("--experiment-id")
    exp.add_argument(
        "--resume",
        action="store_true",
        help="with --experiment-id: reuse its finished runs, run only what is missing (failed runs, central row)",
    )
    exp.add_argument(
        "--record",
        type=Path,
        help="also copy the experiment's record (each run's summary and topology, the contact plan, the centralised "
        "reports: what --resume needs) to this directory, to commit or carry to another machine",
    )
    exp.add_argument("--cache-dir", type=Path, default=Path(".cache/emsfl"))
    gap = sub.add_parser(
        "merge-gap",
        help="EMS-FL in one process (no network): each cluster's sub-model against the merged model, on its data",
    )
    gap.add_argument("--topology", type=Path, default=DEFAULT_TOPOLOGY)
    gap.add_argument("--steps", type=positive_int, default=600, help="training steps per cluster (default: 600)")
    gap.add_argument("--seed", type=int, help="the topology's seed (default: its own)")
    gap.add_argument("--lr", type=float, help="training.lr (default: the topology's)")
    gap.add_argument("--out", type=Path, help="also write the JSON report to this file")
    gap.add_argument("--cache-dir", type=Path, default=Path(".cache/emsfl"))
    return parser


def _csv(text: str, kind: type, what: str) -> list[Any]:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated values, got {text!r}") from None


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options `lab up` and `lab experiment` take from the flags they share."""
    return {
        "topology_path": args.topology,
        "broker": args.broker,
        "duration_wall_s": args.duration_s,
        "runs_dir": args.runs_dir,
        "cache_dir": args.cache_dir,
    }


def _experiment(args: argparse.Namespace) -> int:
    from testbed.experiment import ExperimentOptions, run_experiment

    if not 0 < args.target_fraction <= 1:
        raise ConfigError(f"--target-fraction: expected a share in (0, 1], got {args.target_fraction}")

    opts = ExperimentOptions(
        **_run_options(args),
        strategies=_csv(args.strategies, str, "--strategies"),
        seeds=_csv(args.seeds, int, "--seeds"),
        rates_bps=_csv(args.rates, float, "--rates") if args.rates else None,
        lrs=_csv(args.lrs, float, "--lrs") if args.lrs else None,
        quick=args.quick,
        experiment_id=args.experiment_id,
        central=not args.no_central,
        equal_steps=not args.free_steps,
        target_fraction=args.target_fraction,
        resume=args.resume,
        record=args.record,
    )
    result = run_experiment(opts)
    for name, metrics in result["strategies"].items():
        acc = metrics["final_accuracy"]
        print(
            f"  {name:<9} final accuracy {acc['mean']:.3f} ± {acc['std']:.3f}  "
            f"uplink {metrics['uplink_bytes']['mean'] / 1e6:.2f} MB"
        )
    print(f"  comparison: {args.runs_dir / result['experiment_id'] / 'comparison.md'}")
    return 0


def _merge_gap(args: argparse.Namespace) -> int:
    import json

    from emsfl.config import load_topology, positive
    from testbed.mergegap import merge_gap

    positive(args.steps, "--steps")
    topology = load_topology(args.topology)
    if args.seed is not None:
        topology["seed"] = args.seed
    if args.lr is not None:
        positive(args.lr, "--lr")
        topology.setdefault("training", {})["lr"] = args.lr
    text = json.dumps(merge_gap(topology, args.cache_dir, args.steps), indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logs.setup("%(asctime)s %(name)s %(levelname)s %(message)s", service=True)
    if args.command in ("experiment", "merge-gap"):
        run = _experiment if args.command == "experiment" else _merge_gap
        try:
            return run(args)
        except (ConfigError, GroundError, RuntimeError, FileExistsError) as exc:
            print(f"emsfl lab {args.command}: {exc}", file=sys.stderr)
            return 2
    from testbed.lab import run_lab, stop_dashboard
    from testbed.outputs import write_outputs

    if not args.no_dashboard and not 0 < args.dashboard_port < 65536:
        print(f"emsfl lab: --dashboard-port: expected a port 1..65535, got {args.dashboard_port}", file=sys.stderr)
        return 2

    opts = LabOptions(
        **_run_options(args),
        run_id=args.run_id,
        tls=args.tls,
        dashboard_port=None if args.no_dashboard else args.dashboard_port,
    )
    try:
        lab = run_lab(opts)
    except (ConfigError, GroundError, RuntimeError, FileExistsError) as exc:
        print(f"emsfl lab: {exc}", file=sys.stderr)
        return 2
    try:
        if lab.dashboard is not None:
            print("[lab] evaluating: the dashboard shows each accuracy point as it comes")
        summary = write_outputs(lab)
    finally:
        stop_dashboard(lab)
    print(f"[lab] run written to {lab.run_dir}")
    for key in ("tls", "link_up_events", "uploads_committed", "uploads_outside_contact", "bytes_uplinked"):
        print(f"  {key:<24} {summary[key]}")
    print(f"  {'accuracy':<24} {summary['accuracy_initial']:.3f} -> {summary['accuracy_final']:.3f}")
    return 130 if lab.interrupted else 0
