"""The centralised reference (`emsfl lab experiment`): all clusters' data in one process, the whole model.

Same base, same data partition (the union of every cluster's training examples), same tuning (LoRA on every
expert, or full slices), same learning rate and batch size as the federated runs, and a given budget of
optimiser steps (the experiment passes the federated runs' total). Writes one JSON report.

    python -m ground_node.learning.central --topology T.yaml --base BASE_DIR --steps N --out report.json

Run by hand, it is also the accuracy ceiling of a base and task: `--threads 0` uses every core, `--test-examples`
evaluates on more of the test set than the topology's sample (CLINC150: all 4,500 in-scope queries), `--lr`
overrides `training.lr`, `--lr-decay` lowers it linearly to zero over the steps (the federated runs keep it
constant: a board never knows when its training ends), `--no-checkpointing` trades memory for speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from emsfl.config import ConfigError, load_topology
from emsfl.durable import atomic_write_json
from ground_node.errors import GroundError
from ground_node.learning.data import label_choices, max_new_tokens, test_examples, tokenizer_for, train_examples
from ground_node.learning.evaluate import ExactMatch, model_with_tensors
from ground_node.learning.train import Trainer, peak_gpu_memory_mb
from ground_node.model.submodel import load_base_split
from ground_node.records import full_assignment
from ground_node.settings import load_settings
from ground_node.usage import peak_rss_mb


def centralised(topology: dict[str, Any], base_dir: Path, steps: int, lr_decay: bool = False) -> dict[str, Any]:
    s = load_settings(topology)
    tok = tokenizer_for(s.data)
    model, adapter = load_base_split(base_dir, None)  # as a baseline board reads it: no file stays mapped
    pooled = [ex for c in s.clusters for ex in train_examples(s, c)]
    num_layers, num_experts, _ = adapter.dims(model)
    trainer = Trainer(model, adapter, s.training, full_assignment(num_layers, num_experts), pooled, s.seed, tok)
    start = time.monotonic()
    losses = []
    with tqdm(total=steps, desc="centralised", unit="step", mininterval=30) as bar:  # runs last an hour on 2 cores
        for step in range(steps):
            if lr_decay:
                for group in trainer.optimizer.param_groups:
                    group["lr"] = s.training.lr * (1 - step / steps)
            losses.append(trainer.train_step())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    train_seconds = time.monotonic() - start
    device, trained = trainer.device_type, trainer.expert_state()
    train_peak_rss_mb, train_peak_gpu_mb = peak_rss_mb(), peak_gpu_memory_mb()
    del trainer, model  # the trained model and its optimiser go before the merged one is built, not beside it
    gc.collect()
    # the adapters merged into the expert weights, as the lab evaluates a global model (no per-forward LoRA cost)
    merged = model_with_tensors(base_dir, trained).model.to(device)
    score = ExactMatch(merged, tok, max_new_tokens(s), label_choices(s))
    tests = test_examples(s, None)
    return {
        "strategy": "centralised",
        "steps": steps,
        "lr": s.training.lr,
        "lr_schedule": "linear decay to 0" if lr_decay else "constant",
        "examples": len(pooled),
        "test_examples": len(tests),
        "accuracy_final": score(tests),
        "per_cluster_accuracy": {c: score(test_examples(s, c)) for c in s.clusters},
        "loss_last": float(sum(losses[-10:]) / max(1, len(losses[-10:]))) if losses else None,
        "train_seconds": round(train_seconds, 3),
        "step_time_s": round(train_seconds / steps, 4) if steps else None,
        "training_device": device,
        "peak_rss_mb": peak_rss_mb(),  # training and evaluation
        "train_peak_rss_mb": train_peak_rss_mb,
        "peak_gpu_memory_mb": peak_gpu_memory_mb(),  # None unless training ran on CUDA
        "train_peak_gpu_memory_mb": train_peak_gpu_mb,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ground_node.learning.central", description=__doc__)
    parser.add_argument("--topology", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, every core)")
    parser.add_argument("--test-examples", type=int, help="size of the test sample (default: data.test_examples)")
    parser.add_argument("--lr", type=float, help="learning rate (default: training.lr)")
    parser.add_argument("--lr-decay", action="store_true", help="lower the learning rate linearly to 0 over the steps")
    parser.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="train without gradient checkpointing (faster, more memory) whatever the topology says",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:  # one thread in the lab: the reference shares the cores with nothing, like a device
        torch.set_num_threads(args.threads)
    try:
        topology = load_topology(args.topology)
        if args.test_examples is not None:
            topology.setdefault("data", {})["test_examples"] = args.test_examples
        if args.lr is not None:
            topology.setdefault("training", {})["lr"] = args.lr
        if args.no_checkpointing:
            topology.setdefault("training", {})["gradient_checkpointing"] = False
        report = centralised(topology, Path(args.base), max(0, args.steps), args.lr_decay)
    except (ConfigError, GroundError, OSError) as exc:
        print(f"ground_node.learning.central: {exc}", file=sys.stderr)
        return 2
    atomic_write_json(Path(args.out), report)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
