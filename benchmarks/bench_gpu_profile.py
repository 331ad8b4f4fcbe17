"""GPU step time and memory of a cluster's sub-model vs the whole model, at the scale of
`testbed/topologies/gpu-olmoe.yaml` (issue #6: an OLMoE-shaped model, 64 experts per layer, top-8).

With a CUDA device, each mode trains in its own subprocess (so `torch.cuda.max_memory_allocated` is its own) for
`--steps` optimiser steps after `--warm` untimed ones, with the topology's training settings (LoRA, dtype,
gradient checkpointing) on `cuda`:
- `split`: the sub-model of cluster c0's capacity (`capacity_experts` experts per layer), `split=mask`;
- `full`: the whole model, every expert trained (what FedAvg/FedAsync train).
The model is the topology's, randomly initialised (speed and memory do not depend on the weights). Writes
`benchmarks/results/gpu_profile.json`: step time, max memory allocated and reserved, device name.

Without CUDA it says so and exits 0 writing nothing: no figure here is ever estimated.
NOT RUN HERE: the development machines and CI have no GPU, so this script has only been exercised up to its skip.

Run: `.venv/bin/python benchmarks/bench_gpu_profile.py [--steps N] [--topology FILE]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "gpu_profile.json"
TOPOLOGY = ROOT / "testbed" / "topologies" / "gpu-olmoe.yaml"
MIB = 2**20


def _settings(topology: Path) -> Any:
    from emsfl.config import load_topology
    from ground_node.settings import load_settings

    return load_settings(load_topology(topology))


def _assignment(mode: str, num_layers: int, num_experts: int, capacity: int) -> Any:
    """`capacity` consecutive experts, a different run per layer, for `split`; every expert for `full`."""
    from ground_node.records import Assignment

    if mode == "full":
        return Assignment(0, {la: tuple(range(num_experts)) for la in range(num_layers)})
    held = min(capacity, num_experts)
    return Assignment(
        1, {la: tuple(sorted((7 * la + i) % num_experts for i in range(held))) for la in range(num_layers)}
    )


def measure(mode: str, topology: Path, steps: int, warm: int, device: str = "cuda") -> dict[str, Any]:
    """One mode on `device`: `cuda` for the benchmark; `cpu` only for a smoke test of this code on a tiny
    topology (tests/ground/test_ground_device.py), whose figures are not written anywhere."""
    from dataclasses import replace

    import torch

    from ground_node.learning.data import max_positions, tokenizer_for, train_examples
    from ground_node.learning.train import Trainer
    from ground_node.model.families import get_adapter

    s = _settings(topology)
    tok = tokenizer_for(s.data)
    adapter = get_adapter(s.model.family)
    model = adapter.build(s.model, tok.vocab_size, max_positions(s), seed=s.seed)  # on the CPU, then moved
    assignment = _assignment(mode, s.model.num_layers, s.model.num_experts, s.capacities[s.clusters[0]])
    # full: every expert held, nothing dropped (split=frozen with all experts routable is the whole model)
    training = replace(s.training, device=device, split=s.training.split if mode == "split" else "frozen")
    trainer = Trainer(model, adapter, training, assignment, train_examples(s, s.clusters[0]), s.seed, tok=tok)
    cuda = trainer.device_type == "cuda"
    for _ in range(warm):  # allocator, kernels, autograd graph
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()  # time the kernels, not their launches
    start = time.perf_counter()
    losses = [trainer.train_step() for _ in range(steps)]
    if cuda:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    return {
        "mode": mode,
        "step_s": round(step_s, 5),
        **_cuda_memory(cuda),
        "params": sum(p.numel() for p in trainer.model.parameters()),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "experts_held_per_layer": len(assignment.held(0)),
        "compute_dtype": str(trainer.compute_dtype).removeprefix("torch."),
        "gradient_checkpointing": training.gradient_checkpointing,
        "final_loss": round(losses[-1], 4),
    }


def _cuda_memory(cuda: bool) -> dict[str, Any]:
    """Peak memory of this process on the GPU and the device's name (None on the CPU)."""
    import torch

    if not cuda:
        return dict.fromkeys(
            ("max_memory_allocated_MB", "max_memory_reserved_MB", "device_name", "device_memory_MB"), None
        )
    return {
        "max_memory_allocated_MB": round(torch.cuda.max_memory_allocated() / MIB, 1),
        "max_memory_reserved_MB": round(torch.cuda.max_memory_reserved() / MIB, 1),
        "device_name": torch.cuda.get_device_name(0),
        "device_memory_MB": round(torch.cuda.get_device_properties(0).total_memory / MIB, 1),
    }


def _child(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=ROOT, timeout=1800
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def cuda_missing() -> str | None:
    """Why this cannot run here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda or 'none'})"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default=str(TOPOLOGY))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warm", type=int, default=3)
    parser.add_argument("--child", choices=["split", "full"], default=None)
    args = parser.parse_args(argv)
    why = cuda_missing()
    if why is not None:
        print(f"bench_gpu_profile: skipped, {why}; nothing written to {RESULT.relative_to(ROOT)}")
        return 0
    if args.child is not None:
        print(json.dumps(measure(args.child, Path(args.topology), max(1, args.steps), max(0, args.warm))))
        return 0
    common = ["--topology", args.topology, "--steps", str(args.steps), "--warm", str(args.warm)]
    split = _child(["--child", "split", *common])
    full = _child(["--child", "full", *common])
    s = _settings(Path(args.topology))
    import torch

    result = {
        "topology": args.topology,
        "model": {
            k: getattr(s.model, k)
            for k in ("family", "num_layers", "num_experts", "top_k", "hidden_size", "intermediate_size")
        },
        "training": {k: getattr(s.training, k) for k in ("tune", "split", "dtype", "gradient_checkpointing")},
        "device_name": split["device_name"],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "steps": args.steps,
        "step_time_split_s": split["step_s"],
        "step_time_full_s": full["step_s"],
        "step_time_ratio": round(split["step_s"] / full["step_s"], 4),
        "max_memory_allocated_split_MB": split["max_memory_allocated_MB"],
        "max_memory_allocated_full_MB": full["max_memory_allocated_MB"],
        "memory_ratio": round(split["max_memory_allocated_MB"] / full["max_memory_allocated_MB"], 4),
        "split": split,
        "full": full,
    }
    from _common import write_result  # here: the tests load this file by path, without benchmarks/ on sys.path

    write_result(RESULT, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
