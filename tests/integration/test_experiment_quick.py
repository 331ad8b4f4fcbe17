"""`emsfl lab experiment --quick` end to end, as a user runs it: the CLI on the default topology.

Three strategies, one seed, one rate, 45 s runs and the centralised reference, each role a real process, against
the shared broker fixture (real Mosquitto where installed). Checks comparison.json's structure and the invariants
every experiment must hold: no upload outside a contact, every strategy committed uploads, EMS-FL sends fewer
uplink bytes than FedAvg, and every run saw the same contact plan. The wall time is printed, never asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from testbed.broker import BrokerProcess
from testbed.experiment import STRATEGIES
from testbed.record import record_files

# The module fixture runs the whole quick experiment (about 5 min on a quiet 2-core machine, 11 under load).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

METRICS = (
    "time_to_target_s",
    "final_accuracy",
    "final_accuracy_cluster_mean",
    "uplink_bytes",
    "downlink_bytes",
    "device_hours",
    "peak_device_memory_mb",
    "idle_waiting_s",
    "uploads_committed",
)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, module_broker: BrokerProcess) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("experiment")
    argv = [sys.executable, "-m", "emsfl", "lab", "experiment", "--quick", "--broker", module_broker.address]
    argv += ["--runs-dir", str(tmp / "runs"), "--experiment-id", "quick", "--cache-dir", str(tmp / "cache")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    exp_dir = tmp / "runs" / "quick"
    result = json.loads((exp_dir / "comparison.json").read_text(encoding="utf-8"))
    print(f"emsfl lab experiment --quick: {result['wall_seconds']} s wall")
    return exp_dir, result


def test_comparison_files(comparison: tuple[Path, dict[str, Any]]) -> None:
    exp_dir, result = comparison
    on_disk = result
    assert on_disk["experiment_id"] == "quick" and on_disk["quick"] is True
    markdown = (exp_dir / "comparison.md").read_text(encoding="utf-8")
    assert markdown.count("| EMS-FL |") == 1 and "1 seed (0)" in markdown and "± " not in markdown
    # every figure as PDF and as a 300 dpi PNG (what is drawn: tests/test_figures.py)
    figures = (
        "accuracy_vs_time",
        "per_cluster_accuracy",
        "served_accuracy",
        "uplink_bytes",
        "peak_memory",
        "idle_waiting",
    )
    for name in (*figures, "assignment_heatmap"):
        assert (exp_dir / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
        assert round(Image.open(exp_dir / f"{name}.png").info["dpi"][0]) == 300, name
    run_dir = exp_dir / on_disk["runs"][0]["run_id"]
    for name in ("contact_timeline", "accuracy", "bytes_per_cluster", "assignment_heatmap"):
        assert (run_dir / f"{name}.pdf").exists() and (run_dir / f"{name}.png").exists(), name
    assert on_disk["seeds"] == [0] and len(on_disk["rates_bps"]) == 1
    assert on_disk["contact_plan"]["mode"] in ("replay", "deterministic")
    assert on_disk["contact_plan"]["identical_across_runs"] is True
    assert len(on_disk["runs"]) == 3
    for name, metric in next(iter(on_disk["by_rate"].values()))["strategies"].items():
        assert metric["served_accuracy"]["missing"] == 0 and 0.0 <= metric["served_accuracy"]["mean"] <= 1.0, name


def test_structure(comparison: tuple[Path, dict[str, Any]]) -> None:
    _, result = comparison
    assert set(result["strategies"]) == set(STRATEGIES)
    assert 0.0 < result["target_accuracy"] <= 1.0
    for name, metrics in result["strategies"].items():
        for key in METRICS:
            assert {"mean", "std", "values", "missing"} <= set(metrics[key]), (name, key)
        assert metrics["final_accuracy"]["mean"] is not None
        assert metrics["device_hours"]["mean"] > 0, name
    # baselines pull the global model; EMS-FL never needs to
    assert result["strategies"]["emsfl"]["downlink_bytes"]["mean"] == 0
    assert "claims_vs_fedavg" in result
    assert result["centralised"]["final_accuracy"]["mean"] is not None  # the reference row ran, same step budget


def test_invariants(comparison: tuple[Path, dict[str, Any]]) -> None:
    _, result = comparison
    for name, metrics in result["strategies"].items():
        assert metrics["uploads_outside_contact"] == 0, name
        assert metrics["uploads_committed"]["mean"] > 0, name
    s = result["strategies"]
    assert s["emsfl"]["uplink_bytes"]["mean"] < s["fedavg"]["uplink_bytes"]["mean"]
    (checks,) = result["checks"].values()
    assert all(v == 0 for v in checks["uploads_outside_contact"].values())
    assert all(checks["every_run_committed"].values())
    assert checks["emsfl_uplink_below_fedavg"] is True


def test_every_strategy_trains_at_most_fedavgs_steps(comparison: tuple[Path, dict[str, Any]]) -> None:
    exp_dir, result = comparison
    runs = {r["strategy"]: r for r in result["runs"]}
    assert result["runs"][0]["strategy"] == "fedavg"  # it runs first: it sets the budgets

    def steps(strategy: str) -> dict[str, int]:
        summary = json.loads((exp_dir / runs[strategy]["run_id"] / "summary.json").read_text(encoding="utf-8"))
        return {c: int(v["training_steps"] or 0) for c, v in summary["per_cluster"].items()}

    fedavg = steps("fedavg")
    assert runs["fedavg"]["max_training_steps"] is None and sum(fedavg.values()) > 0
    for strategy in ("emsfl", "fedasync"):
        assert runs[strategy]["max_training_steps"] == fedavg, strategy
        assert all(n <= fedavg[c] for c, n in steps(strategy).items()), (strategy, steps(strategy), fedavg)


def test_resume_reuses_every_finished_run(
    comparison: tuple[Path, dict[str, Any]], module_broker: BrokerProcess
) -> None:
    """`--resume` on a finished experiment runs no lab again and recomputes the same comparison; one whose
    topology changed since is refused by name, with nothing rewritten. Its record alone, carried to another runs
    directory, resumes the same way. (Last in this module: it rewrites comparison.json, which the tests above have
    read.)"""
    exp_dir, result = comparison
    argv = [sys.executable, "-m", "emsfl", "lab", "experiment", "--quick", "--broker", module_broker.address]
    argv += ["--runs-dir", str(exp_dir.parent), "--experiment-id", "quick"]
    argv += ["--cache-dir", str(exp_dir.parent.parent / "cache")]
    before = {p: p.stat().st_mtime_ns for p in exp_dir.rglob("*") if p.is_file()}

    changed = subprocess.run([*argv, "--resume", "--lrs", "0.5"], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "another topology" in changed.stderr and "-fedavg-seed0" in changed.stderr
    assert {p: p.stat().st_mtime_ns for p in exp_dir.rglob("*") if p.is_file()} == before

    record = exp_dir.parent.parent / "record"
    again = subprocess.run([*argv, "--resume", "--record", str(record)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # every run and the centralised report reused, nothing trained again
    assert again.stdout.count("(reused)") == len(STRATEGIES) + 1 and "[lab]" not in again.stdout + again.stderr
    resumed = json.loads((exp_dir / "comparison.json").read_text(encoding="utf-8"))
    assert resumed["strategies"] == result["strategies"] and resumed["runs"] == result["runs"]
    assert resumed["centralised"] == result["centralised"]

    assert sorted(p.relative_to(record) for p in record.rglob("*") if p.is_file()) == record_files(exp_dir)
    elsewhere = exp_dir.parent.parent / "elsewhere"
    shutil.copytree(record, elsewhere / "quick")
    argv[argv.index("--runs-dir") + 1] = str(elsewhere)
    moved = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0, moved.stderr[-3000:]
    assert moved.stdout.count("(reused)") == len(STRATEGIES) + 1 and "[lab]" not in moved.stdout + moved.stderr
    carried = json.loads((elsewhere / "quick" / "comparison.json").read_text(encoding="utf-8"))
    assert carried["strategies"] == result["strategies"] and carried["runs"] == result["runs"]
    assert carried["centralised"] == result["centralised"]
    assert carried["contact_plan"]["identical_across_runs"] is True
