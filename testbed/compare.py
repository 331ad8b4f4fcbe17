"""Comparison of strategies across seeds (issue: experiments): pure functions over run summaries."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from emsfl.runtime.timefmt import parse_iso


def spread_of(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds; `missing` counts runs without a value."""
    present = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": (statistics.stdev(present) if len(present) > 1 else 0.0) if present else None,
        "values": present,
        "missing": len(values) - len(present),
    }


def time_to_target_s(summary: dict[str, Any], target: float) -> float | None:
    """Emulated seconds from the start until the global accuracy first reaches `target`, else None."""
    start = parse_iso(summary["emulated_start"])
    for point in summary["accuracy_curve"]:
        if point["accuracy"] >= target:
            return (parse_iso(point["t"]) - start).total_seconds()
    return None


def mean_cluster_accuracy(summary: dict[str, Any]) -> float:
    return statistics.fmean(c["accuracy"] for c in summary["per_cluster"].values())


def _per_cluster_sum(summary: dict[str, Any], key: str) -> float:
    return float(sum(c.get(key) or 0 for c in summary["per_cluster"].values()))


def _per_cluster_max(summary: dict[str, Any], key: str) -> float | None:
    values = [c.get(key) for c in summary["per_cluster"].values() if c.get(key) is not None]
    return max(values) if values else None


def seed_of(summary: dict[str, Any]) -> int:
    return int(summary["config"].get("seed", 0))


def strategy_metrics(summaries: list[dict[str, Any]], targets: dict[int, float]) -> dict[str, Any]:
    """Every metric of one strategy at one link rate, with its spread over seeds (`targets`: accuracy per seed)."""
    per_upload = [
        float(s["bytes_uplinked"]) / s["uploads_committed"] if s["uploads_committed"] else None for s in summaries
    ]
    return {
        "runs": [s["run_id"] for s in summaries],
        "time_to_target_s": spread_of([time_to_target_s(s, targets[seed_of(s)]) for s in summaries]),
        "final_accuracy": spread_of([s["accuracy_final"] for s in summaries]),
        "final_accuracy_cluster_mean": spread_of([mean_cluster_accuracy(s) for s in summaries]),
        # the mean over clusters of what each board answers with the model it holds (testbed/served.py)
        "served_accuracy": spread_of([s.get("served_accuracy") for s in summaries]),
        "uplink_bytes": spread_of([float(s["bytes_uplinked"]) for s in summaries]),
        "uplink_bytes_per_upload": spread_of(per_upload),
        "downlink_bytes": spread_of([_per_cluster_sum(s, "bytes_downlinked") for s in summaries]),
        "device_hours": spread_of([_per_cluster_sum(s, "train_seconds") / 3600.0 for s in summaries]),
        "peak_device_memory_mb": spread_of([_per_cluster_max(s, "peak_rss_mb") for s in summaries]),
        "idle_waiting_s": spread_of([_per_cluster_sum(s, "idle_seconds") for s in summaries]),
        "training_steps": spread_of([_per_cluster_sum(s, "training_steps") for s in summaries]),
        "uploads_committed": spread_of([float(s["uploads_committed"]) for s in summaries]),
        "uploads_outside_contact": sum(int(s["uploads_outside_contact"]) for s in summaries),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _only_one_reached(t_e: dict[str, Any], t_f: dict[str, Any]) -> bool | None:
    """Without a ratio: True if only EMS-FL reached the target in every run, False if only FedAvg did."""
    if not t_e["missing"] and t_f["missing"] == len(t_f["values"]) + t_f["missing"]:
        return True
    if not t_f["missing"] and t_e["missing"] == len(t_e["values"]) + t_e["missing"]:
        return False
    return None


def claims(comparison: dict[str, Any], num_clusters: int) -> dict[str, Any]:
    """The issue's three claims for EMS-FL against FedAvg, from mean figures (None where a figure is missing)."""
    strategies = comparison["strategies"]
    if "emsfl" not in strategies or "fedavg" not in strategies:
        return {}
    e, f = strategies["emsfl"], strategies["fedavg"]
    t_e, t_f = e["time_to_target_s"], f["time_to_target_s"]
    # a strategy that never reached the target within the run counts as slower than the run (no ratio)
    speedup = _ratio(t_f["mean"], t_e["mean"]) if not t_f["missing"] and not t_e["missing"] else None
    uplink_ratio = _ratio(e["uplink_bytes"]["mean"], f["uplink_bytes"]["mean"])
    acc_e, acc_f = e["final_accuracy"]["mean"], f["final_accuracy"]["mean"]
    served_e, served_f = (m.get("served_accuracy", {}).get("mean") for m in (e, f))
    return {
        "time_to_target_speedup_vs_fedavg": speedup,
        "fedavg_reached_target_runs": len(t_f["values"]),
        "emsfl_reached_target_runs": len(t_e["values"]),
        "reaches_target_2x_sooner": speedup >= 2.0 if speedup is not None else _only_one_reached(t_e, t_f),
        "final_accuracy_minus_fedavg": None if acc_e is None or acc_f is None else acc_e - acc_f,
        "final_accuracy_not_below_fedavg": None if acc_e is None or acc_f is None else acc_e >= acc_f,
        "served_accuracy_minus_fedavg": None if served_e is None or served_f is None else served_e - served_f,
        "uplink_ratio_vs_fedavg": uplink_ratio,
        "uplink_at_most_1_over_C": None if uplink_ratio is None else uplink_ratio <= 1.0 / num_clusters,
        # context for the total: EMS-FL sends a cluster's experts per upload, FedAvg the whole model's tuned parts
        "uplink_per_upload_ratio_vs_fedavg": _ratio(
            e["uplink_bytes_per_upload"]["mean"], f["uplink_bytes_per_upload"]["mean"]
        ),
        "C": num_clusters,
    }


def compare(runs: dict[str, list[dict[str, Any]]], target_fraction: float = 0.95) -> dict[str, Any]:
    """`runs[strategy]` = the summaries of its seeds at one link rate.

    The target is per seed: `target_fraction` of the best final accuracy among the strategies' runs of that seed,
    so every strategy is measured against the same bar and a seed whose base starts high (seeds differ in base
    and partition) does not hide the others' progress.
    """
    best: dict[int, float] = {}
    for summaries in runs.values():
        for s in summaries:
            best[seed_of(s)] = max(best.get(seed_of(s), 0.0), float(s["accuracy_final"]))
    targets = {seed: target_fraction * acc for seed, acc in sorted(best.items())}
    return {
        "target_accuracy": statistics.fmean(targets.values()),
        "target_accuracy_by_seed": targets,
        "target_rule": f"per seed, {target_fraction:.0%} of the best final accuracy among the strategies",
        "strategies": {name: strategy_metrics(summaries, targets) for name, summaries in runs.items()},
    }
