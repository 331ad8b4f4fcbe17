"""`emsfl lab experiment`: the same testbed run once per strategy, seed and link rate, then compared.

Every run of one seed shares the base model, the data partition and the contact plan: where the orbit
service can replay a recorded plan (`emsfl orbit run --replay`), every run after the first replays the
first run's plan; otherwise each run recomputes it from the same constellation, sites and start. The
comparison records which, and checks that every run saw the same windows. Strategies differ only in how
they train and what they send. Transfers are paced by the link model, so every byte costs emulated time.
A centralised reference (all data in one process, the federated runs' budget of steps) is run per seed.
`resume` reuses every run of an earlier experiment of the same id whose summary was written (with the same
topology), and each centralised report of the same number of steps, and runs only what is missing: a run that
failed, more seeds, or the centralised row. `record` (testbed/record.py) copies the small files resuming needs to
a directory that can be committed and carried to another machine.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from emsfl.config import ConfigError, load_topology
from emsfl.datadir import repo_relative
from emsfl.runtime.timefmt import parse_iso
from testbed import comparemd, plots
from testbed.compare import claims, compare, spread_of
from testbed.lab import LabOptions, run_lab
from testbed.outputs import write_outputs_apart
from testbed.record import save_record
from testbed.report import write_json
from testbed.style import FIGURE_FORMATS

STRATEGIES = ("emsfl", "fedavg", "fedasync")


@dataclass
class ExperimentOptions:
    topology_path: Path
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rates_bps: list[float] | None = None  # None: the topology's rate and a thousandth of it
    lrs: list[float] | None = None  # learning rates every strategy is searched over (None: training.lr only)
    duration_wall_s: float | None = None  # None: lab.experiment_duration_wall_s, else DEFAULT_DURATION_S
    quick: bool = False
    runs_dir: Path = Path("runs")
    experiment_id: str | None = None
    cache_dir: Path = Path(".cache/emsfl")
    broker: str | None = None
    central: bool = True  # the centralised reference row (one per seed)
    # every strategy trains, per cluster, as many steps as FedAvg's run of the same seed, rate and lr (FedAvg
    # runs first): FedAvg idles between rounds, so without this it trains far fewer steps in the same time
    equal_steps: bool = True
    target_fraction: float = 0.95
    resume: bool = False  # reuse the finished runs of `experiment_id`
    record: Path | None = None  # also copy the experiment's record (testbed/record.py) here


DEFAULT_DURATION_S = 75.0  # wall seconds per run: 18 runs + references fit in 45 minutes on 2 cores
QUICK_DURATION_S = 45.0
SLOW_RATE_FACTOR = 1000.0  # the second rate of the sweep: the tiny model's update then takes what a real MoE's would


def base_description(topology: dict[str, Any]) -> str:
    """The base model in words, for the comparison and the README's Results."""
    m = topology.get("model", {})
    shape = f"{m.get('num_layers')} layers, {m.get('num_experts')} experts, top-{m.get('top_k')}"
    convert = m.get("convert")
    if convert:
        return f"{m.get('family')} upcycled from {convert.get('source')} ({shape}; pretrained)"
    if m.get("checkpoint"):
        return f"{m.get('family')} from {m['checkpoint']} ({shape})"
    return f"tiny {m.get('family', 'olmoe')} of width {m.get('hidden_size')} ({shape}; random, warmed up locally)"


def plan_runs(opts: ExperimentOptions, topology: dict[str, Any]) -> list[tuple[float, str, int, float]]:
    """(rate_bps, strategy, seed, lr) of every run, after --quick has trimmed the grid."""
    unknown = [s for s in opts.strategies if s not in STRATEGIES]
    if unknown or not opts.strategies:
        raise ConfigError(f"--strategies: expected a list of {', '.join(STRATEGIES)}, got {opts.strategies}")
    if len(set(opts.strategies)) != len(opts.strategies):
        raise ConfigError(f"--strategies: duplicates in {opts.strategies}")
    rate = float(topology.get("link", {}).get("rate_bps", 1e7))
    rates = opts.rates_bps or [rate, rate / SLOW_RATE_FACTOR]
    if any(r <= 0 for r in rates):
        raise ConfigError(f"--rates: every rate must be > 0, got {rates}")
    seeds = opts.seeds[:1] if opts.quick else opts.seeds
    if opts.quick:
        rates = rates[:1]
    if not seeds:
        raise ConfigError("--seeds: at least one seed is required")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: duplicates in {seeds}")
    lrs = opts.lrs or [float((topology.get("training") or {}).get("lr", 0.002))]
    if any(lr <= 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise ConfigError(f"--lrs: expected distinct learning rates > 0, got {lrs}")
    strategies = sorted(opts.strategies, key=lambda s: s != "fedavg") if opts.equal_steps else opts.strategies
    return [(r, s, seed, lr) for r in rates for seed in seeds for s in strategies for lr in lrs]


def choose_lr(
    per_lr: dict[float, dict[str, list[dict[str, Any]]]],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Per strategy, the runs of the learning rate with the best mean final accuracy over seeds.

    Every strategy is searched over the same candidates with the same rule, so no baseline is tuned into
    weakness; the search reads the same test accuracy it reports (there is no separate validation split).
    """
    chosen: dict[str, list[dict[str, Any]]] = {}
    search: dict[str, Any] = {}
    strategies = {name for per_strategy in per_lr.values() for name in per_strategy}
    for name in sorted(strategies):
        means = {lr: statistics.fmean(r["accuracy_final"] for r in runs[name]) for lr, runs in per_lr.items()}
        best = max(means, key=lambda lr: (means[lr], -lr))
        chosen[name] = per_lr[best][name]
        search[name] = {"final_accuracy_by_lr": {f"{lr:g}": round(m, 4) for lr, m in means.items()}, "lr": best}
    return chosen, search


def _rate_label(rate_bps: float) -> str:
    return f"{rate_bps / 1e6:g}Mbps"


def orbit_replay_supported() -> bool:
    """Whether `emsfl orbit run --replay PLAN.json` exists in this checkout."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "emsfl", "orbit", "run", "--help"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "--replay" in out.stdout


def plan_fingerprint(plan_path: Path) -> str | None:
    """SHA-256 of a run's contact windows (cluster, satellite, AOS, LOS), None without a plan."""
    if not plan_path.exists():
        return None
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    windows = sorted(
        (str(c.get("cluster")), str(c.get("satellite")), str(c.get("aos")), str(c.get("los")))
        for c in plan.get("contacts", [])
    )
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()


def _run_one(
    opts: ExperimentOptions, path: Path, run_id: str, duration: float, replay_plan: Path | None, exp_dir: Path
) -> tuple[dict[str, Any], Path, Path]:
    """One lab run, evaluated in its own process: its summary, contact plan and base directory."""
    lab = run_lab(
        LabOptions(
            topology_path=path,
            broker=opts.broker,
            duration_wall_s=duration,
            runs_dir=exp_dir,
            run_id=run_id,
            cache_dir=opts.cache_dir,
            replay_plan=replay_plan,
        )
    )
    if lab.interrupted:
        raise KeyboardInterrupt
    return write_outputs_apart(lab), lab.plan_path, lab.base_dir


def _earlier_runs(exp_dir: Path) -> dict[str, dict[str, Any]]:
    """Each run an earlier try of this experiment recorded in its comparison (none if it never finished)."""
    path = exp_dir / "comparison.json"
    if not path.exists():
        return {}
    return {str(r["run_id"]): r for r in load_comparison(exp_dir).get("runs", [])}


def _base_of(topology_path: Path, cache_dir: Path) -> Path:
    from ground_node.model.base import ensure_base  # torch only here, as in the lab

    return ensure_base(load_topology(topology_path), cache_dir)


def run_central(topology_path: Path, base_dir: Path, steps: int, out: Path) -> dict[str, Any]:
    """The centralised reference in its own process (its own peak memory, like a device)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ground_node.learning.central",
            "--topology",
            str(topology_path),
            "--base",
            str(base_dir),
            "--steps",
            str(steps),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"centralised reference failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return report


def _central_metrics(reports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "steps": spread_of([float(r["steps"]) for r in reports]),
        "steps_rule": "per seed, the largest total of training steps (all clusters) among the federated runs "
        "at the first link rate",
        "final_accuracy": spread_of([r["accuracy_final"] for r in reports]),
        "final_accuracy_cluster_mean": spread_of(
            [statistics.fmean(r["per_cluster_accuracy"].values()) for r in reports]
        ),
        "device_hours": spread_of([r["train_seconds"] / 3600.0 for r in reports]),
        "peak_device_memory_mb": spread_of([r["peak_rss_mb"] for r in reports]),
    }


def _checks(per_rate: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Invariants every experiment must hold (the quick test asserts them)."""
    out: dict[str, Any] = {}
    for label, per_strategy in per_rate.items():
        uplink = {s: statistics.fmean(float(r["bytes_uplinked"]) for r in runs) for s, runs in per_strategy.items()}
        out[label] = {
            "uploads_outside_contact": {
                s: sum(int(r["uploads_outside_contact"]) for r in runs) for s, runs in per_strategy.items()
            },
            "every_run_committed": {
                s: all(int(r["uploads_committed"]) > 0 for r in runs) for s, runs in per_strategy.items()
            },
            "emsfl_uplink_below_fedavg": (uplink["emsfl"] < uplink["fedavg"])
            if "emsfl" in uplink and "fedavg" in uplink
            else None,
        }
    return out


def run_experiment(opts: ExperimentOptions) -> dict[str, Any]:
    wall_start = time.monotonic()
    topology = load_topology(opts.topology_path)
    grid = plan_runs(opts, topology)
    experiment_id = opts.experiment_id or "exp-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    exp_dir = opts.runs_dir / experiment_id
    if opts.resume and not (opts.experiment_id and exp_dir.is_dir()):
        raise ConfigError(f"--resume: no experiment {experiment_id!r} under {opts.runs_dir} to resume")
    (exp_dir / "topologies").mkdir(parents=True, exist_ok=opts.resume)
    earlier = _earlier_runs(exp_dir) if opts.resume else {}
    lab_cfg = topology.get("lab", {}) or {}
    duration = opts.duration_wall_s or (
        QUICK_DURATION_S if opts.quick else float(lab_cfg.get("experiment_duration_wall_s", DEFAULT_DURATION_S))
    )
    replay = orbit_replay_supported()
    replay_plan: Path | None = None
    plan_source: str | None = None

    searched: dict[float, dict[float, dict[str, list[dict[str, Any]]]]] = {}  # rate -> lr -> strategy -> runs
    runs: list[dict[str, Any]] = []
    bases: dict[int, tuple[Path, Path]] = {}  # seed -> (topology of its first run, base dir)
    several_lrs = len({lr for *_, lr in grid}) > 1
    budgets: dict[tuple[float, int, float], dict[str, int]] = {}  # FedAvg's steps per cluster, by (rate, seed, lr)
    for index, (rate, strategy, seed, lr) in enumerate(grid, start=1):
        run_id = f"{_rate_label(rate)}-{strategy}-seed{seed}" + (f"-lr{lr:g}" if several_lrs else "")
        variant = copy.deepcopy(topology)
        variant["strategy"] = strategy
        variant["seed"] = seed
        variant.setdefault("link", {})["rate_bps"] = rate
        variant.setdefault("training", {})["lr"] = lr
        budget = budgets.get((rate, seed, lr)) if opts.equal_steps and strategy != "fedavg" else None
        if budget is not None:
            for cluster in variant["clusters"]:
                cluster["max_training_steps"] = budget[cluster["id"]]
        path = exp_dir / "topologies" / f"{run_id}.yaml"
        text = yaml.safe_dump(variant, sort_keys=False)
        finished = exp_dir / run_id / "summary.json"
        if opts.resume and finished.exists():
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                raise ConfigError(f"--resume: {run_id} was run with another topology than {path} now gives")
            print(f"[experiment] run {index}/{len(grid)}: {run_id} (reused)", flush=True)
            summary = json.loads(finished.read_text(encoding="utf-8"))
            plan_path = exp_dir / run_id / "orbit" / "plan.json"
            if replay and replay_plan is None and (exp_dir / "contact_plan.json").exists():
                replay_plan, plan_source = exp_dir / "contact_plan.json", run_id
            bases.setdefault(seed, (path, _base_of(path, opts.cache_dir)))
            wall_seconds = earlier.get(run_id, {}).get("wall_seconds")
        else:
            print(f"[experiment] run {index}/{len(grid)}: {run_id}", flush=True)
            if (exp_dir / run_id).exists():  # an earlier try that never finished: kept aside, not reused
                (exp_dir / run_id).rename(exp_dir / f"{run_id}.incomplete-{int(time.time())}")
            path.write_text(text, encoding="utf-8")
            started = time.monotonic()
            summary, plan_path, base_dir = _run_one(opts, path, run_id, duration, replay_plan, exp_dir)
            if replay and replay_plan is None and plan_path.exists():
                replay_plan, plan_source = exp_dir / "contact_plan.json", run_id
                replay_plan.write_bytes(plan_path.read_bytes())
            bases.setdefault(seed, (path, base_dir))
            wall_seconds = round(time.monotonic() - started, 1)
        if strategy == "fedavg":
            budgets[(rate, seed, lr)] = {
                c: int(v.get("training_steps") or 0) for c, v in summary["per_cluster"].items()
            }
        searched.setdefault(rate, {}).setdefault(lr, {}).setdefault(strategy, []).append(summary)
        runs.append(
            {
                "run_id": run_id,
                "rate_bps": rate,
                "strategy": strategy,
                "seed": seed,
                "lr": lr,
                "wall_seconds": wall_seconds,
                # a record (testbed/record.py) keeps the fingerprint, not each run's copy of the plan
                "plan_sha256": plan_fingerprint(plan_path) or earlier.get(run_id, {}).get("plan_sha256"),
                "max_training_steps": budget,
            }
        )

    summaries: dict[float, dict[str, list[dict[str, Any]]]] = {}
    lr_search: dict[str, Any] = {}
    for rate, per_lr in searched.items():
        summaries[rate], lr_search[_rate_label(rate)] = choose_lr(per_lr)
    by_rate = {
        _rate_label(rate): compare(per_strategy, opts.target_fraction) for rate, per_strategy in summaries.items()
    }
    clusters = len(topology.get("clusters", []))
    for comparison in by_rate.values():
        comparison["claims_vs_fedavg"] = claims(comparison, clusters)

    central: dict[str, Any] | None = None
    if opts.central:
        first = summaries[grid[0][0]]
        reports = []
        for seed, (path, base_dir) in bases.items():
            steps = max(
                int(sum(int(c.get("training_steps") or 0) for c in r["per_cluster"].values()))
                for runs_ in first.values()
                for r in runs_
                if r["config"].get("seed") == seed
            )
            out = exp_dir / f"centralised-seed{seed}.json"
            earlier_report = json.loads(out.read_text(encoding="utf-8")) if opts.resume and out.exists() else None
            if earlier_report is not None and earlier_report.get("steps") == steps:
                print(f"[experiment] centralised reference, seed {seed}: {steps} steps (reused)", flush=True)
                reports.append(earlier_report)
                continue
            print(f"[experiment] centralised reference, seed {seed}: {steps} steps", flush=True)
            reports.append(run_central(path, base_dir, steps, out))
        central = _central_metrics(reports)
        for comparison in by_rate.values():
            comparison["centralised"] = central

    fingerprints = {r["plan_sha256"] for r in runs}
    first_label = _rate_label(grid[0][0])
    result: dict[str, Any] = {
        "experiment_id": experiment_id,
        "task": topology.get("data", {}).get("task", "synthetic"),
        "topology": repo_relative(opts.topology_path),  # no path of this machine in a committed result
        "base": base_description(topology),
        "seeds": sorted({seed for _, _, seed, _ in grid}),
        "rates_bps": sorted(summaries),
        "link_rate_bps": grid[0][0],
        "quick": opts.quick,
        "duration_wall_s_per_run": duration,
        "equal_steps": (
            "per seed, rate and lr, each cluster of every strategy trains at most as many steps as in FedAvg's run "
            "(`runs[].max_training_steps`)"
            if opts.equal_steps
            else None
        ),
        "lr_search": {"candidates": sorted({lr for *_, lr in grid}), "by_rate": lr_search},
        "contact_plan": {
            "mode": "replay" if replay else "deterministic",
            "how": (
                f"every run after {plan_source} replays its plan (emsfl orbit run --replay)"
                if replay
                else "each run recomputes the plan from the same constellation, sites and start (deterministic)"
            ),
            "identical_across_runs": len(fingerprints) == 1 and None not in fingerprints,
        },
        # The first rate's table at top level, as the experiment's headline figures.
        "target_accuracy": by_rate[first_label]["target_accuracy"],
        "target_rule": by_rate[first_label]["target_rule"],
        "strategies": by_rate[first_label]["strategies"],
        "claims_vs_fedavg": by_rate[first_label]["claims_vs_fedavg"],
        "centralised": central,
        "by_rate": by_rate,
        "checks": _checks({_rate_label(r): per for r, per in summaries.items()}),
        "runs": runs,
        "wall_seconds": round(time.monotonic() - wall_start, 1),
    }
    write_json(exp_dir / "comparison.json", result)
    (exp_dir / "comparison.md").write_text(comparemd.render(result), encoding="utf-8")
    for rate, per_strategy in summaries.items():  # the first rate's plots keep the plain names
        suffix = "" if rate == grid[0][0] else f"-{_rate_label(rate)}"
        label = _rate_label(rate)
        _plot(exp_dir, per_strategy, suffix, by_rate[label]["target_accuracy"], label, central)
    print(f"[experiment] written to {exp_dir} in {result['wall_seconds']:.0f} s", flush=True)
    if opts.record is not None:
        save_record(exp_dir, opts.record)
        print(f"[experiment] record (what --resume needs, elsewhere too) copied to {opts.record}", flush=True)
    return result


def _plot(
    exp_dir: Path,
    per_strategy: dict[str, list[dict[str, Any]]],
    suffix: str,
    target: float,
    rate: str,
    central: dict[str, Any] | None = None,
) -> dict[str, Figure]:
    """The experiment's figures for one link rate (each as PDF and 300 dpi PNG, testbed/plots.py), by name."""

    def hours(summary: dict[str, Any]) -> list[tuple[float, float]]:
        start = parse_iso(summary["emulated_start"])
        return [
            ((parse_iso(p["t"]) - start).total_seconds() / 3600.0, p["accuracy"]) for p in summary["accuracy_curve"]
        ]

    def per_cluster(key: str, scale: float = 1.0) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """Per strategy and cluster: the mean over seeds and the sample std (0 for one seed)."""
        means: dict[str, dict[str, float]] = {}
        stds: dict[str, dict[str, float]] = {}
        for strategy, runs in per_strategy.items():
            spreads = {
                c: spread_of([float(r["per_cluster"][c].get(key) or 0.0) / scale for r in runs])
                for c in runs[0]["per_cluster"]
            }
            means[strategy] = {c: float(s["mean"]) for c, s in spreads.items()}
            stds[strategy] = {c: float(s["std"]) for c, s in spreads.items()}
        return means, stds

    def path(name: str) -> Path:
        return exp_dir / f"{name}{suffix}.png"  # plots.save writes .pdf beside it

    acc = (central or {}).get("final_accuracy") or {}
    figures: dict[str, Figure] = {}
    figures["accuracy_vs_time"] = plots.accuracy_by_strategy(
        path("accuracy_vs_time"),
        {s: [hours(r) for r in runs] for s, runs in per_strategy.items()},
        f"Global accuracy against emulated time ({rate})",
        target,
        central=(float(acc["mean"]), float(acc["std"] or 0.0)) if acc.get("mean") is not None else None,
    )
    bars = (
        ("per_cluster_accuracy", "accuracy", 1.0, "accuracy", "Per-cluster accuracy of the global model"),
        ("served_accuracy", "served_accuracy", 1.0, "accuracy", "Per-cluster accuracy of the model each board serves"),
        ("uplink_bytes", "bytes", 1e6, "uplink (MB)", "Uplink bytes per cluster"),
        ("peak_memory", "peak_rss_mb", 1.0, "peak RSS (MB)", "Device peak memory"),
        ("idle_waiting", "idle_seconds", 3600.0, "hours", "Time idle waiting for a model"),
    )
    for name, key, scale, ylabel, title in bars:
        means, stds = per_cluster(key, scale)
        figures[name] = plots.grouped_bars(path(name), means, ylabel, f"{title} ({rate}, mean ± std over seeds)", stds)
    emsfl_runs = per_strategy.get("emsfl")
    if emsfl_runs:
        for fmt in FIGURE_FORMATS:
            source = exp_dir / emsfl_runs[0]["run_id"] / f"assignment_heatmap.{fmt}"
            if source.exists():
                (exp_dir / f"assignment_heatmap.{fmt}").write_bytes(source.read_bytes())
    return figures


def load_comparison(exp_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((exp_dir / "comparison.json").read_text(encoding="utf-8"))
    return data
