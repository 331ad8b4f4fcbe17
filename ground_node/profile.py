"""Affinity profiling (DESIGN §4.1) and routing coverage (§4.3) through the routers of the full model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ground_node.family import FamilyAdapter
from ground_node.split import Assignment
from ground_node.synthetic import Example, encode_train
from ground_node.tokenizer import PAD, Tokenizer


@dataclass(frozen=True)
class Affinity:
    gate: np.ndarray  # [L, E] mean router probability; each row sums to 1
    freq: np.ndarray  # [L, E] share of top-k selections; each row sums to 1
    num_tokens: int


@torch.no_grad()
def router_probs(
    model: nn.Module,
    adapter: FamilyAdapter,
    examples: Sequence[Example],
    tok: Tokenizer,
    batch_size: int = 128,
) -> list[torch.Tensor]:
    """Per layer, the full softmax router probabilities [T, E] over the non-pad tokens of `examples`."""
    if not examples:
        raise ValueError("cannot profile an empty dataset")
    num_layers, _, _ = adapter.dims(model)
    captured: dict[int, list[torch.Tensor]] = {la: [] for la in range(num_layers)}
    handles = []
    for layer in range(num_layers):

        def hook(_mod: nn.Module, _inp: Any, out: Any, layer: int = layer) -> None:
            captured[layer].append(out[0].detach().float())

        handles.append(adapter.router(model, layer).register_forward_hook(hook))
    keep: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(examples), batch_size):
            ids, _ = encode_train(tok, examples[i : i + batch_size])
            model(input_ids=ids)
            keep.append((ids != PAD).reshape(-1))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    mask = torch.cat(keep)
    return [torch.softmax(torch.cat(captured[la])[mask], dim=-1) for la in range(num_layers)]


def affinity_from_probs(probs: list[torch.Tensor], top_k: int) -> Affinity:
    gates, freqs = [], []
    for p in probs:
        gates.append(p.mean(dim=0))
        idx = torch.topk(p, top_k, dim=-1).indices
        counts = torch.bincount(idx.reshape(-1), minlength=p.shape[1]).float()
        freqs.append(counts / counts.sum())
    return Affinity(
        gate=torch.stack(gates).numpy().astype(np.float32),
        freq=torch.stack(freqs).numpy().astype(np.float32),
        num_tokens=int(probs[0].shape[0]),
    )


def coverage_from_probs(probs: list[torch.Tensor], top_k: int, assignment: Assignment) -> float:
    """Share of the full model's top-k routing probability that falls on held experts (mean over layers)."""
    shares = []
    for layer, p in enumerate(probs):
        values, idx = torch.topk(p, top_k, dim=-1)
        held = torch.zeros(p.shape[1], dtype=torch.bool)
        held[list(assignment.held(layer))] = True
        shares.append(float((values * held[idx]).sum() / values.sum()))
    return float(np.mean(shares))


def profile_affinity(
    model: nn.Module, adapter: FamilyAdapter, examples: Sequence[Example], tok: Tokenizer, sample: int
) -> tuple[Affinity, list[torch.Tensor]]:
    """Affinity over a fixed-size sample (the first `sample` examples of the seeded, shuffled local data)."""
    _, _, top_k = adapter.dims(model)
    probs = router_probs(model, adapter, list(examples[:sample]), tok)
    return affinity_from_probs(probs, top_k), probs
