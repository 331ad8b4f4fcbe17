"""Step time and peak memory of one board on a topology's base, per role (issue #13: what a run on it costs).

Each board runs in its own subprocess, with one torch thread as the lab's agents have, and trains `--steps`
optimiser steps on its cluster's data exactly as the agent would:
- `emsfl`: the cluster's sub-model (shared weights and its held experts only, read from `base.safetensors`),
  LoRA on the held experts, routing masked to them (`split=mask`);
- `baseline`: the whole model, LoRA on every expert, as a FedAvg/FedAsync board trains it.
The held experts are the first `capacity_experts` of every layer (step time and memory depend on how many, not
which). The first step is reported apart (it allocates the optimiser state). Writes
`benchmarks/results/board_step.json`: per role, `step_time_s` (mean of the later steps), `first_step_s`,
`load_s`, `peak_rss_MB`, and `split_memory_ratio` (EMS-FL's peak RSS over the baseline's).

Run: `.venv/bin/python benchmarks/bench_board_step.py [--topology T.yaml] [--steps N]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "board_step.json"


def board(topology_path: str, role: str, steps: int) -> dict[str, Any]:
    """One board's figures, in this process (called in a fresh subprocess per role)."""
    import torch

    from emsfl.config import load_topology
    from ground_node.learning.data import tokenizer_for, train_examples
    from ground_node.learning.train import Trainer
    from ground_node.model.base import ensure_base, read_manifest
    from ground_node.model.submodel import load_base_split
    from ground_node.records import Assignment, full_assignment
    from ground_node.settings import load_settings
    from ground_node.usage import peak_rss_mb

    torch.set_num_threads(1)
    topology = load_topology(topology_path)
    s = load_settings(topology)
    base_dir = ensure_base(topology, ROOT / ".cache" / "emsfl")
    manifest = read_manifest(base_dir)
    layers, experts = int(manifest["num_layers"]), int(manifest["num_experts"])
    cluster = s.clusters[0]
    if role == "emsfl":
        held = tuple(range(s.capacities[cluster]))
        assignment = Assignment(1, {layer: held for layer in range(layers)})
    else:
        assignment = full_assignment(layers, experts)
    started = time.monotonic()
    model, adapter = load_base_split(base_dir, assignment if role == "emsfl" else None)
    trainer = Trainer(model, adapter, s.training, assignment, train_examples(s, cluster), s.seed, tokenizer_for(s.data))
    load_s = time.monotonic() - started
    times = []
    for _ in range(steps):
        t = time.monotonic()
        trainer.train_step()
        times.append(time.monotonic() - t)
    later = times[1:] or times
    return {
        "held_experts_per_layer": len(assignment.held(0)),
        "load_s": round(load_s, 2),
        "first_step_s": round(times[0], 2),
        "step_time_s": round(sum(later) / len(later), 2),
        "steps": steps,
        "peak_rss_MB": peak_rss_mb(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--topology", default=str(ROOT / "testbed" / "topologies" / "clinc150.yaml"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--role", choices=("emsfl", "baseline"), help=argparse.SUPPRESS)  # the subprocess side
    args = parser.parse_args()
    if args.role:
        print(json.dumps(board(args.topology, args.role, args.steps)))
        return 0
    result: dict[str, Any] = {"topology": Path(args.topology).name, "torch_threads": 1}
    for role in ("emsfl", "baseline"):
        cmd = [sys.executable, __file__, "--topology", args.topology, "--steps", str(args.steps), "--role", role]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result[role] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["split_memory_ratio"] = round(result["emsfl"]["peak_rss_MB"] / result["baseline"]["peak_rss_MB"], 3)
    result["step_time_ratio"] = round(result["emsfl"]["step_time_s"] / result["baseline"]["step_time_s"], 3)
    write_result(OUT, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
