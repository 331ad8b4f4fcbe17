"""EMS-FL's merge gap, measured in one process (no network, no clock): `emsfl lab merge-gap`.

Every cluster is profiled through the base routers and gets its experts as the satellite assigns them
(`solve_assignment`); each cluster's sub-model then trains `steps` steps on its local data. Reported: what each
sub-model scores on its own cluster's test mix (`local_accuracy`), what the merged global model (base + every
cluster's experts, as the satellite keeps it) scores on that mix and on the global test set, the routing
coverage, and the share of tokens whose full-model top-k experts are all held by the cluster.

EMS-FL's premise is that a cluster's tokens route to its own experts. Where they do not (low
`all_top_k_held_share`, nearly equal affinities across clusters: `affinity_max_gap`), the merged model routes each
token mostly through experts that other clusters trained on other data: `merged_accuracy` falls far below
`local_accuracy`, and `merged_answer_loss` rises above `local_answer_loss`. This isolates that effect from the
link, the clock and the baselines.

Under `split=mask` the federation runs twice, once per `training.router_softmax` (the topology's first, the other
under `other_router_softmax`): the held experts' logits masked before the softmax, or their probabilities taken
from the full model's softmax. Families that renormalise the top-k weights (Mixtral) route identically under both,
so there the second run is skipped and said so (`same_as_configured`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ground_node.learning.data import label_choices, max_new_tokens, test_examples, tokenizer_for, train_examples
from ground_node.learning.evaluate import exact_match, model_with_tensors
from ground_node.learning.profile import coverage_from_probs, profile_affinity
from ground_node.learning.synthetic import Example, encode_train
from ground_node.learning.tokenizer import Tokenizer
from ground_node.learning.train import Trainer
from ground_node.model.base import ensure_base, load_base
from ground_node.records import Assignment
from ground_node.settings import TrainingSettings, load_settings
from satellite_node.assignment import solve_assignment


def all_top_k_held_share(probs: list[torch.Tensor], top_k: int, assignment: Assignment) -> float:
    """Share of tokens whose full-model top-k experts are all held (mean over layers): those a masked sub-model
    computes exactly as the merged model does."""
    shares = []
    for layer, p in enumerate(probs):
        held = torch.zeros(p.shape[1], dtype=torch.bool)
        held[list(assignment.held(layer))] = True
        idx = torch.topk(p, top_k, dim=-1).indices
        shares.append(float(held[idx].all(dim=-1).float().mean()))
    return float(np.mean(shares))


@torch.no_grad()
def answer_loss(model: torch.nn.Module, examples: Sequence[Example], tok: Tokenizer, batch_size: int = 64) -> float:
    """Mean cross-entropy per answer token (the training loss, on held-out examples): a finer gauge than accuracy."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        ids, labels = (t.to(device) for t in encode_train(tok, examples[i : i + batch_size]))
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        tokens += n
    return total / tokens


def merge_gap(topology: dict[str, Any], cache_dir: Path, steps: int) -> dict[str, Any]:
    """The report for the topology's `training.router_softmax`, with the other routing's figures under
    `other_router_softmax` (split=mask only: ARCHITECTURE §4.3's masked softmax against the full model's)."""
    started = time.monotonic()
    topology = copy.deepcopy(topology)
    settings = load_settings(topology)
    base_dir = ensure_base(topology, cache_dir)
    tok = tokenizer_for(settings.data)
    max_new = max_new_tokens(settings)
    choices = label_choices(settings)

    tests = {c: test_examples(settings, c) for c in (None, *settings.clusters)}

    def score(model: torch.nn.Module, cluster: str | None) -> float:
        return exact_match(model, tests[cluster], max_new, tok, choices)

    def loss(model: torch.nn.Module, cluster: str) -> float:
        return round(answer_loss(model, tests[cluster], tok), 5)

    base = load_base(base_dir)
    _, _, top_k = base.adapter.dims(base.model)
    data = {c: train_examples(settings, c) for c in settings.clusters}
    gates, probs = {}, {}
    for c in settings.clusters:
        sample = settings.training.profile_examples
        affinity, probs[c] = profile_affinity(base.model, base.adapter, data[c], tok, sample)
        gates[c] = affinity.gate
    solved = solve_assignment(gates, settings.capacities, {c: len(data[c]) for c in settings.clusters})
    assignment = {c: Assignment.from_pairs(1, list(enumerate(solved[c]))) for c in settings.clusters}
    stacked = np.stack([gates[c] for c in settings.clusters])
    base_scores = {c: score(base.model, c) for c in settings.clusters}

    def federate(training: TrainingSettings) -> tuple[dict[str, dict[str, Any]], float]:
        """Every cluster's sub-model trained `steps` steps, then the merged model: (per cluster, global acc)."""
        clusters: dict[str, dict[str, Any]] = {}
        uploads: dict[str, np.ndarray] = {}
        for c in settings.clusters:
            model = load_base(base_dir).model
            trainer = Trainer(model, base.adapter, training, assignment[c], data[c], settings.seed, tok)
            losses = [trainer.train_step() for _ in range(steps)]
            uploads.update(trainer.expert_state())
            clusters[c] = {
                "experts": assignment[c].to_json()["layers"],
                "routing_coverage": round(coverage_from_probs(probs[c], top_k, assignment[c]), 4),
                "all_top_k_held_share": round(all_top_k_held_share(probs[c], top_k, assignment[c]), 4),
                "loss_first": round(float(np.mean(losses[:10])), 4) if losses else None,
                "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
                "base_accuracy": base_scores[c],
                "local_accuracy": score(trainer.model, c),
                "local_answer_loss": loss(trainer.model, c),
            }
            del trainer
        merged = model_with_tensors(base_dir, uploads).model
        for c in settings.clusters:
            clusters[c]["merged_accuracy"] = score(merged, c)
            clusters[c]["merged_answer_loss"] = loss(merged, c)
        return clusters, score(merged, None)

    def means(clusters: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {
            f"mean_{k}": round(float(np.mean([v[k] for v in clusters.values()])), 4)
            for k in ("local_accuracy", "merged_accuracy")
        }

    clusters, merged_global = federate(settings.training)
    other: dict[str, Any] | None = None
    same_routing = not base.adapter.softmax_choice_matters(base.model)
    if settings.training.split == "mask" and same_routing:
        # the top-k weights are renormalised: both softmaxes give the same weights, so the run is not repeated
        other = {
            "router_softmax": "all" if settings.training.router_softmax == "held" else "held",
            "same_as_configured": True,
            "why": f"{base.adapter.name} normalises the top-{top_k} weights: held and all route identically",
        }
    elif settings.training.split == "mask":
        mode = "all" if settings.training.router_softmax == "held" else "held"
        other_clusters, other_global = federate(dataclasses.replace(settings.training, router_softmax=mode))
        other = {
            "router_softmax": mode,
            "merged_accuracy_global": other_global,
            **means(other_clusters),
            "clusters": {
                c: {k: v[k] for k in ("loss_last", "local_accuracy", "merged_accuracy")}
                for c, v in other_clusters.items()
            },
        }
    return {
        "topology": topology.get("name"),
        "task": settings.data.task,
        "family": base.adapter.name,
        "seed": settings.seed,
        "steps_per_cluster": steps,
        "lr": settings.training.lr,
        "split": settings.training.split,
        "router_softmax": settings.training.router_softmax if settings.training.split == "mask" else None,
        "tune": settings.training.tune,
        # largest difference between two clusters' mean router probability of one expert (any layer)
        "affinity_max_gap": round(float((stacked.max(axis=0) - stacked.min(axis=0)).max()), 4),
        "base_accuracy_global": score(base.model, None),
        "merged_accuracy_global": merged_global,
        **means(clusters),
        "clusters": clusters,
        "other_router_softmax": other,
        "wall_s": round(time.monotonic() - started, 1),
    }
