"""Writes `runs/<run-id>/` of a finished lab run: summary.json, events.jsonl and the plots."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from emsfl.runtime.events import read_events
from emsfl.runtime.timefmt import parse_iso, to_iso
from testbed import plots
from testbed.lab import LabRun
from testbed.report import (
    link_ups_until,
    merge_events,
    uploads_outside_contact,
    windows_by_cluster,
    write_json,
    write_jsonl,
)
from testbed.served import served_model


def _eval_times(start: datetime, end: datetime, points: int) -> list[datetime]:
    """Evenly spaced emulated times, both ends included; evaluation is skipped where nothing changed."""
    step = (end - start) / max(points - 1, 1)
    return sorted({start + step * i for i in range(points)} | {end})


def _owners(assignment: dict[str, Any] | None, clusters: list[str], layers: int, experts: int) -> list[list[int]]:
    owners = [[-1] * experts for _ in range(layers)]
    if assignment:
        for cluster, per_layer in assignment.get("experts", {}).items():
            for layer, held in per_layer:
                for expert in held:
                    owners[layer][expert] = clusters.index(cluster)
    return owners


def write_outputs_apart(lab: LabRun) -> dict[str, Any]:
    """`write_outputs` in a fresh process (`python -m testbed.outputs`), returning the summary it wrote.

    Evaluation holds the base model and its tensors (11 GB at its peak on the SmolLM2 base) and glibc keeps what it
    frees, so an experiment that evaluated in its own process started each next run's four boards beside that
    memory."""
    spec = {
        "run_dir": str(lab.run_dir),
        "topology": lab.topology,
        "base_dir": str(lab.base_dir),
        "state_dir": str(lab.state_dir),
        "plan_path": str(lab.plan_path),
        "orbit_events_path": str(lab.orbit_events_path),
        "ground_dirs": {c: str(d) for c, d in lab.ground_dirs.items()},
        "started_wall": lab.started_wall,
        "stopped_wall": lab.stopped_wall,
        "interrupted": lab.interrupted,
        "tls": lab.tls,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lab.json"
        path.write_text(json.dumps(spec, default=str), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "testbed.outputs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"evaluating {lab.run_dir.name} failed ({done.returncode}): {done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads((lab.run_dir / "summary.json").read_text(encoding="utf-8"))
    return summary


def _lab_from_spec(path: Path) -> LabRun:
    spec = json.loads(path.read_text(encoding="utf-8"))
    return LabRun(
        run_dir=Path(spec["run_dir"]),
        topology=spec["topology"],
        base_dir=Path(spec["base_dir"]),
        state_dir=Path(spec["state_dir"]),
        plan_path=Path(spec["plan_path"]),
        orbit_events_path=Path(spec["orbit_events_path"]),
        ground_dirs={c: Path(d) for c, d in spec["ground_dirs"].items()},
        started_wall=float(spec["started_wall"]),
        stopped_wall=float(spec["stopped_wall"]),
        interrupted=bool(spec["interrupted"]),
        tls=bool(spec["tls"]),
    )


def write_outputs(lab: LabRun) -> dict[str, Any]:
    from ground_node.learning.evaluate import BaseScorer
    from satellite_node.export import commits as read_commits
    from satellite_node.export import committed_tensors

    topology = lab.topology
    clusters = [c["id"] for c in topology["clusters"]]
    plan = json.loads(lab.plan_path.read_text(encoding="utf-8")) if lab.plan_path.exists() else {}
    windows = windows_by_cluster(plan)
    orbit_events = read_events(lab.orbit_events_path)
    satellite_events = read_events(lab.state_dir / "events.jsonl")
    ground_events = [read_events(d / "events.jsonl") for d in lab.ground_dirs.values()]
    commits = read_commits(lab.state_dir) if lab.state_dir.exists() else []

    scale = float(topology["clock"]["scale"])
    start = parse_iso(plan["start_utc"]) if "start_utc" in plan else parse_iso(topology["clock"]["start_utc"])
    emulated_seconds = max(0.0, (lab.stopped_wall - lab.started_wall) * scale) if lab.started_wall else 0.0
    end = start + timedelta(seconds=emulated_seconds)
    link_ups = link_ups_until(orbit_events, end)

    # Accuracy of the global model (base + newest committed experts) against emulated time.
    commit_times = sorted(parse_iso(c["t"]) for c in commits if c.get("t"))
    scorer = BaseScorer(lab.base_dir, topology)  # the base loaded once for every figure below
    global_set = {None: scorer.test_set(None)}
    mixes = {c: scorer.test_set(c) for c in clusters}  # each cluster's test mix, scored after the curve
    accuracy_initial = scorer.score(None, global_set)[None]
    curve: list[tuple[datetime, float]] = []
    last_seen = -1
    points = (lab.run_dir / "accuracy.jsonl").open("w", encoding="utf-8")  # each point as it comes (dashboard)
    with points:
        for moment in _eval_times(start, end, int(topology.get("lab", {}).get("eval_points", 8))):
            seen = sum(1 for t in commit_times if t <= moment)
            if seen == last_seen:
                curve.append((moment, curve[-1][1]))
            elif seen:
                global_then = committed_tensors(lab.state_dir, at=moment)
                curve.append((moment, scorer.score(global_then, global_set)[None]))
            else:
                curve.append((moment, accuracy_initial))
            last_seen = seen
            points.write(json.dumps({"t": to_iso(moment), "accuracy": curve[-1][1]}) + "\n")
            points.flush()
    accuracy_final = curve[-1][1] if curve else accuracy_initial
    final_tensors = committed_tensors(lab.state_dir) if commits else None
    initial = scorer.score(None, mixes)
    final = scorer.score(final_tensors, mixes) if commits else initial

    reports = {}
    for cluster, workdir in lab.ground_dirs.items():
        path = workdir / "report.json"
        reports[cluster] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    strategy = str(topology.get("strategy", "emsfl"))
    per_cluster: dict[str, dict[str, Any]] = {}
    for cluster in clusters:
        mine = [c for c in commits if c["cluster"] == cluster]
        tensors, held, served = served_model(strategy, lab.ground_dirs[cluster], lab.state_dir)
        per_cluster[cluster] = {
            "accuracy": final[cluster],
            # what the cluster's board answers with the model it holds (EMS-FL: its sub-model; baselines: the
            # newest global model it loaded), on the same test mix as `accuracy`
            "served_accuracy": scorer.score(tensors, {cluster: mixes[cluster]}, held)[cluster],
            "served_model": served,
            "accuracy_initial": initial[cluster],
            "coverage": reports[cluster].get("coverage"),
            "bytes": sum(int(c["bytes"]) for c in mine),
            "uploads_committed": len(mine),
            "training_steps": reports[cluster].get("steps"),
            "peak_rss_mb": reports[cluster].get("peak_rss_mb"),
            "peak_gpu_memory_mb": reports[cluster].get("peak_gpu_memory_mb"),  # None unless trained on CUDA
            "step_time_s": reports[cluster].get("step_time_s"),
            "bytes_downlinked": reports[cluster].get("bytes_downlinked", 0),
            "train_seconds": reports[cluster].get("train_seconds"),
            "idle_seconds": reports[cluster].get("idle_seconds"),
            "devices": reports[cluster].get("devices"),  # multi-device clusters: per-device figures (gateway report)
            "link_up_events": sum(1 for e in link_ups if e.get("cluster") == cluster),
        }

    assignments = [e for e in satellite_events if e.get("event") == "assignment"]
    manifest = json.loads((lab.base_dir / "manifest.json").read_text(encoding="utf-8"))
    summary: dict[str, Any] = {
        "run_id": lab.run_dir.name,
        "strategy": strategy,
        "clusters": clusters,
        "emulated_start": to_iso(start),
        "emulated_seconds": emulated_seconds,
        "wall_seconds": lab.stopped_wall - lab.started_wall if lab.started_wall else 0.0,
        "interrupted": lab.interrupted,
        "tls": lab.tls,  # mutual TLS on every gRPC hop and TLS on every MQTT session (`emsfl lab up --tls`)
        "link_up_events": len(link_ups),
        "uploads_committed": len(commits),
        "uploads_outside_contact": uploads_outside_contact(commits, windows),
        "bytes_uplinked": sum(int(c["bytes"]) for c in commits),
        "accuracy_initial": accuracy_initial,
        "accuracy_final": accuracy_final,
        "accuracy_curve": [{"t": to_iso(t), "accuracy": a} for t, a in curve],
        "served_accuracy": round(float(np.mean([per_cluster[c]["served_accuracy"] for c in clusters])), 4),
        "per_cluster": per_cluster,
        "assignment": assignments[-1] if assignments else None,
        "config": topology,
    }
    out = lab.run_dir
    write_json(out / "summary.json", summary)
    write_jsonl(out / "events.jsonl", merge_events(orbit_events, satellite_events, *ground_events))
    commits_by_cluster = {c: [parse_iso(x["t"]) for x in commits if x["cluster"] == c and x.get("t")] for c in clusters}
    plots.contact_timeline(out / "contact_timeline.png", start, windows, commits_by_cluster)
    plots.accuracy_curve(out / "accuracy.png", start, curve, f"Global accuracy, {summary['strategy']}")
    plots.bytes_per_cluster(out / "bytes_per_cluster.png", {c: per_cluster[c]["bytes"] for c in clusters})
    owners = _owners(summary["assignment"], clusters, int(manifest["num_layers"]), int(manifest["num_experts"]))
    plots.assignment_heatmap(out / "assignment_heatmap.png", owners, clusters)
    return summary


if __name__ == "__main__":
    write_outputs(_lab_from_spec(Path(sys.argv[1])))
