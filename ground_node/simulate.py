"""The federation in one process (no network): profile every cluster, assign experts greedily, train each
cluster's masked sub-model, merge every cluster's expert parts into one global model, evaluate.

Used by tests and by `python -m ground_node.simulate --topology FILE` to tune the defaults.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emsfl.config import load_topology
from ground_node.base import ensure_base, load_base
from ground_node.evaluate import apply_tensors, exact_match
from ground_node.profile import coverage_from_probs, profile_affinity
from ground_node.settings import load_settings
from ground_node.split import Assignment
from ground_node.synthetic import cluster_test, cluster_train, global_test, max_answer_len
from ground_node.tokenizer import CharTokenizer
from ground_node.train import Trainer


def greedy_assignment(
    affinity: Mapping[str, np.ndarray], capacities: Mapping[str, int], weights: Mapping[str, float], version: int = 1
) -> dict[str, Assignment]:
    """Per layer, give experts to clusters by descending w_c * A_c[l, e], disjoint, within capacities."""
    clusters = sorted(affinity)
    num_layers, num_experts = next(iter(affinity.values())).shape
    layers: dict[str, dict[int, list[int]]] = {c: {} for c in clusters}
    for layer in range(num_layers):
        scored = sorted(
            ((weights[c] * float(affinity[c][layer, e]), c, e) for c in clusters for e in range(num_experts)),
            key=lambda t: (-t[0], t[1], t[2]),
        )
        taken: set[int] = set()
        for _, c, e in scored:
            held = layers[c].setdefault(layer, [])
            if e in taken or len(held) >= capacities[c]:
                continue
            held.append(e)
            taken.add(e)
    return {c: Assignment(version, {la: tuple(sorted(ex)) for la, ex in layers[c].items()}) for c in clusters}


def simulate(topology: dict[str, Any], cache_dir: Path, steps: int) -> dict[str, Any]:
    settings = load_settings(topology)
    tok = CharTokenizer()
    t0 = time.monotonic()
    base_dir = ensure_base(topology, cache_dir)
    warmup_s = time.monotonic() - t0
    max_new = max_answer_len(settings.data) + 1
    tests = global_test(settings)
    base = load_base(base_dir)
    acc_base = exact_match(base.model, tests, max_new)
    affinities, probs, data = {}, {}, {}
    for c in settings.clusters:
        data[c] = cluster_train(settings, c)
        aff, probs[c] = profile_affinity(base.model, base.adapter, data[c], tok, settings.training.profile_examples)
        affinities[c] = aff.gate
    n = sum(len(d) for d in data.values())
    weights = {c: len(data[c]) / n for c in settings.clusters}
    assignment = greedy_assignment(affinities, settings.capacities, weights)
    _, _, top_k = base.adapter.dims(base.model)
    uploads: dict[str, np.ndarray] = {}
    per_cluster: dict[str, Any] = {}
    step_times = []
    for c in settings.clusters:
        model = load_base(base_dir).model
        trainer = Trainer(model, base.adapter, settings.training, assignment[c], data[c], settings.seed)
        t1 = time.monotonic()
        losses = [trainer.train_step() for _ in range(steps)]
        step_times.append((time.monotonic() - t1) / max(steps, 1))
        uploads.update(trainer.expert_state())
        per_cluster[c] = {
            "coverage": coverage_from_probs(probs[c], top_k, assignment[c]),
            "experts": assignment[c].to_json()["layers"],
            "loss_first": float(np.mean(losses[:10])) if losses else None,
            "loss_last": float(np.mean(losses[-10:])) if losses else None,
        }
    merged = load_base(base_dir)
    apply_tensors(merged.model, merged.adapter, merged.manifest, uploads)
    acc_fed = exact_match(merged.model, tests, max_new)
    for c in settings.clusters:
        ctest = cluster_test(settings, c)
        per_cluster[c]["acc_base"] = exact_match(base.model, ctest, max_new)
        per_cluster[c]["acc_fed"] = exact_match(merged.model, ctest, max_new)
    return {
        "base_dir": str(base_dir),
        "warmup_s": round(warmup_s, 2),
        "step_s": round(float(np.mean(step_times)), 4),
        "steps": steps,
        "accuracy_base": acc_base,
        "accuracy_federated": acc_fed,
        "per_cluster": per_cluster,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ground_node.simulate")
    parser.add_argument("--topology", required=True)
    parser.add_argument("--cache", default=".cache/ground")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], help="SECTION.KEY=JSON override")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    topology = load_topology(args.topology)
    for item in args.set:
        key, _, value = item.partition("=")
        sec, _, name = key.partition(".")
        topology.setdefault(sec, {})[name] = json.loads(value)
    print(json.dumps(simulate(topology, Path(args.cache), args.steps), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
