"""`emsfl lab experiment`: the same testbed run once per strategy, seed and link rate, then compared.

Every run of one seed shares the base model, the data partition and the contact plan (the orbit
service computes it from the same constellation, sites and start), so strategies differ only in how
they train and what they send. Transfers are paced by the link model, so every byte costs emulated time.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from emsfl.config import ConfigError, load_topology
from protos.timefmt import parse_iso
from testbed import plots
from testbed.compare import compare, markdown_table
from testbed.lab import LabOptions, run_lab
from testbed.outputs import write_outputs
from testbed.report import write_json

STRATEGIES = ("emsfl", "fedavg", "fedasync")


@dataclass
class ExperimentOptions:
    topology_path: Path
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    rates_bps: list[float] | None = None  # None: the topology's rate and a tenth of it
    duration_wall_s: float | None = None
    quick: bool = False
    runs_dir: Path = Path("runs")
    experiment_id: str | None = None
    cache_dir: Path = Path(".cache/emsfl")
    broker: str | None = None


def plan_runs(opts: ExperimentOptions, topology: dict[str, Any]) -> list[tuple[float, str, int]]:
    """(rate_bps, strategy, seed) of every run, after --quick has trimmed the grid."""
    unknown = [s for s in opts.strategies if s not in STRATEGIES]
    if unknown or not opts.strategies:
        raise ConfigError(f"--strategies: expected a list of {', '.join(STRATEGIES)}, got {opts.strategies}")
    rate = float(topology.get("link", {}).get("rate_bps", 1e7))
    rates = opts.rates_bps or [rate, rate / 10.0]
    if any(r <= 0 for r in rates):
        raise ConfigError(f"--rates: every rate must be > 0, got {rates}")
    seeds = opts.seeds[:1] if opts.quick else opts.seeds
    if opts.quick:
        rates = rates[:1]
    if not seeds:
        raise ConfigError("--seeds: at least one seed is required")
    return [(r, s, seed) for r in rates for s in opts.strategies for seed in seeds]


def _rate_label(rate_bps: float) -> str:
    return f"{rate_bps / 1e6:g}Mbps"


def run_experiment(opts: ExperimentOptions) -> dict[str, Any]:
    topology = load_topology(opts.topology_path)
    grid = plan_runs(opts, topology)
    experiment_id = opts.experiment_id or "exp-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    exp_dir = opts.runs_dir / experiment_id
    (exp_dir / "topologies").mkdir(parents=True, exist_ok=False)
    duration = opts.duration_wall_s or (45.0 if opts.quick else None)

    summaries: dict[float, dict[str, list[dict[str, Any]]]] = {}
    for index, (rate, strategy, seed) in enumerate(grid, start=1):
        run_id = f"{_rate_label(rate)}-{strategy}-seed{seed}"
        print(f"[experiment] run {index}/{len(grid)}: {run_id}", flush=True)
        variant = copy.deepcopy(topology)
        variant["strategy"] = strategy
        variant["seed"] = seed
        variant.setdefault("link", {})["rate_bps"] = rate
        path = exp_dir / "topologies" / f"{run_id}.yaml"
        path.write_text(yaml.safe_dump(variant, sort_keys=False), encoding="utf-8")
        lab = run_lab(
            LabOptions(
                topology_path=path,
                broker=opts.broker,
                duration_wall_s=duration,
                runs_dir=exp_dir,
                run_id=run_id,
                cache_dir=opts.cache_dir,
            )
        )
        summaries.setdefault(rate, {}).setdefault(strategy, []).append(write_outputs(lab))

    by_rate = {_rate_label(rate): compare(per_strategy) for rate, per_strategy in summaries.items()}
    first = next(iter(by_rate.values()))
    result: dict[str, Any] = {
        "experiment_id": experiment_id,
        "task": topology.get("data", {}).get("task", "synthetic"),
        "seeds": sorted({seed for _, _, seed in grid}),
        "rates_bps": sorted(summaries),
        "link_rate_bps": grid[0][0],
        "quick": opts.quick,
        # The first rate's table at top level, as the experiment's headline figures.
        "target_accuracy": first["target_accuracy"],
        "strategies": first["strategies"],
        "by_rate": by_rate,
    }
    write_json(exp_dir / "comparison.json", result)
    (exp_dir / "comparison.md").write_text(
        f"# Experiment {experiment_id}\n\n" + "\n".join(markdown_table(by_rate[_rate_label(r)], r) for r in summaries),
        encoding="utf-8",
    )
    _plot(exp_dir, summaries[grid[0][0]])
    print(f"[experiment] written to {exp_dir}", flush=True)
    return result


def _plot(exp_dir: Path, per_strategy: dict[str, list[dict[str, Any]]]) -> None:
    def hours(summary: dict[str, Any]) -> list[tuple[float, float]]:
        start = parse_iso(summary["emulated_start"])
        return [
            ((parse_iso(p["t"]) - start).total_seconds() / 3600.0, p["accuracy"]) for p in summary["accuracy_curve"]
        ]

    def per_cluster_mean(key: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for strategy, runs in per_strategy.items():
            clusters = runs[0]["per_cluster"]
            out[strategy] = {
                c: sum(float(r["per_cluster"][c].get(key) or 0.0) for r in runs) / len(runs) for c in clusters
            }
        return out

    plots.accuracy_by_strategy(
        exp_dir / "accuracy_vs_time.png",
        {s: [hours(r) for r in runs] for s, runs in per_strategy.items()},
        "Global accuracy against emulated time",
    )
    plots.grouped_bars(
        exp_dir / "per_cluster_accuracy.png", per_cluster_mean("accuracy"), "accuracy", "Per-cluster accuracy"
    )
    uplink = {s: {c: v / 1e6 for c, v in per.items()} for s, per in per_cluster_mean("bytes").items()}
    plots.grouped_bars(exp_dir / "uplink_bytes.png", uplink, "uplink (MB)", "Uplink bytes per cluster")
    plots.grouped_bars(
        exp_dir / "peak_memory.png", per_cluster_mean("peak_rss_mb"), "peak RSS (MB)", "Device peak memory"
    )
    idle = {s: {c: v / 3600.0 for c, v in per.items()} for s, per in per_cluster_mean("idle_seconds").items()}
    plots.grouped_bars(exp_dir / "idle_waiting.png", idle, "hours", "Time idle waiting for a model")
    emsfl_runs = per_strategy.get("emsfl")
    if emsfl_runs:
        heatmap = emsfl_runs[0]["run_id"]
        source = exp_dir / heatmap / "assignment_heatmap.png"
        if source.exists():
            (exp_dir / "assignment_heatmap.png").write_bytes(source.read_bytes())


def load_comparison(exp_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((exp_dir / "comparison.json").read_text(encoding="utf-8"))
    return data
