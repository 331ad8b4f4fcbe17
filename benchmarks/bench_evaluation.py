"""What evaluating a finished run costs: wall time and peak memory of `testbed.outputs` on a run directory.

A lab or experiment run is evaluated after its roles stop (every figure of `summary.json`: the global accuracy
curve, each cluster's accuracy before and after, what each board serves). This script copies a run directory
(without its plots) to a temporary folder, evaluates the copy in a fresh process exactly as `emsfl lab up` and
`emsfl lab experiment` do, and checks that the figures equal the ones the run recorded. The base comes from the
cache (`ensure_base`, built there if missing). Writes `benchmarks/results/evaluation.json`: `wall_s`,
`peak_rss_MB` (the evaluating process), the test-set sizes, and `same_figures` with any that differ.

Run: `.venv/bin/python benchmarks/bench_evaluation.py [RUN_DIR]`; without RUN_DIR it takes the newest run under
`runs/` (e.g. from `make lab`), and says so and exits 0 (no JSON) when there is none.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "evaluation.json"
FIGURES = ("accuracy_initial", "accuracy_final", "accuracy_curve", "served_accuracy")
PER_CLUSTER = ("accuracy", "accuracy_initial", "served_accuracy")


def newest_run(runs: Path) -> Path | None:
    done = sorted(runs.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return done[-1].parent if done else None


def differing(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The figures of `now` that are not the recorded ones."""
    out = [k for k in FIGURES if recorded.get(k) != now.get(k)]
    for cluster, row in recorded["per_cluster"].items():
        out += [f"{cluster}.{k}" for k in PER_CLUSTER if row.get(k) != now["per_cluster"][cluster].get(k)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a run directory with summary.json (default: newest)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "emsfl")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    run = args.run_dir or newest_run(ROOT / "runs")
    if run is None or not (run / "summary.json").exists():
        print(f"bench_evaluation: no run directory with summary.json ({run or ROOT / 'runs'}); run `make lab` first")
        return

    from emsfl.config import load_topology
    from ground_node.model.base import ensure_base

    recorded = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    base_dir = ensure_base(load_topology(run / "topology.yaml"), args.cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.png", "*.pdf"))
        spec = {
            "run_dir": str(copy),
            "topology": recorded["config"],
            "base_dir": str(base_dir),
            "state_dir": str(copy / "satellite" / "state"),
            "plan_path": str(copy / "orbit" / "plan.json"),
            "orbit_events_path": str(copy / "orbit" / "events.jsonl"),
            "ground_dirs": {c: str(copy / "ground" / c) for c in recorded["clusters"]},
            "started_wall": 1.0,  # only their difference is read: the run's emulated length
            "stopped_wall": 1.0 + float(recorded["wall_seconds"]),
            "interrupted": bool(recorded["interrupted"]),
            "tls": bool(recorded["tls"]),
        }
        (Path(tmp) / "lab.json").write_text(json.dumps(spec), encoding="utf-8")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "testbed.outputs", str(Path(tmp) / "lab.json")], check=True, cwd=ROOT)
        wall_s = time.perf_counter() - started
        now = json.loads((copy / "summary.json").read_text(encoding="utf-8"))

    from ground_node.learning.data import test_examples
    from ground_node.settings import load_settings

    settings = load_settings(recorded["config"])
    different = differing(recorded, now)
    write_result(
        args.out,
        {
            "run": run.name,
            "strategy": recorded["strategy"],
            "model_family": recorded["config"]["model"]["family"],
            "clusters": len(recorded["clusters"]),
            "curve_points": len(recorded["accuracy_curve"]),
            "test_examples": {c or "global": len(test_examples(settings, c)) for c in [None, *recorded["clusters"]]},
            "wall_s": round(wall_s, 1),
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
            "same_figures": not different,
            "differing": different,
        },
    )


if __name__ == "__main__":
    main()
