"""Affinity profiling (ARCHITECTURE §4.1) and routing coverage (§4.3) through the routers of the full model.

`profile_base` streams the base model from its `base.safetensors` one decoder layer at a time
(`ground_node.model.stream`), so profiling before the assignment never holds more than one layer's experts;
`router_probs` profiles a model already in memory. Both give the same probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ground_node.learning.synthetic import Example, encode_train
from ground_node.learning.tokenizer import Tokenizer
from ground_node.model.family import FamilyAdapter
from ground_node.records import Affinity, Assignment


@torch.no_grad()
def router_probs(
    model: nn.Module,
    adapter: FamilyAdapter,
    examples: Sequence[Example],
    tok: Tokenizer,
    batch_size: int = 128,
) -> list[torch.Tensor]:
    """Per layer, the full softmax router probabilities [T, E] over the non-pad tokens of `examples`."""
    batches = _batches(examples, tok, batch_size)
    num_layers, _, _ = adapter.dims(model)
    captured: dict[int, list[torch.Tensor]] = {la: [] for la in range(num_layers)}
    handles = [
        adapter.router(model, layer).register_forward_hook(_capture_logits(captured[layer]))
        for layer in range(num_layers)
    ]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return _probs(captured, batches, tok.pad_id)


def _batches(examples: Sequence[Example], tok: Tokenizer, batch_size: int) -> list[torch.Tensor]:
    if not examples:
        raise ValueError("cannot profile an empty dataset")
    return [encode_train(tok, examples[i : i + batch_size])[0] for i in range(0, len(examples), batch_size)]


def _capture_logits(into: list[torch.Tensor]) -> Any:
    """A forward hook keeping a router's logits (the first item of its output)."""

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        into.append(out[0].detach().float())

    return hook


def _probs(captured: dict[int, list[torch.Tensor]], batches: list[torch.Tensor], pad_id: int) -> list[torch.Tensor]:
    """Per layer, the softmax of the captured logits over the non-pad tokens (batches in order)."""
    mask = torch.cat([(ids != pad_id).reshape(-1) for ids in batches])
    return [torch.softmax(torch.cat(captured[la])[mask], dim=-1) for la in sorted(captured)]


@torch.no_grad()
def stream_router_probs(
    adapter: FamilyAdapter,
    config: Any,
    tensors_file: Path,
    examples: Sequence[Example],
    tok: Tokenizer,
    batch_size: int = 128,
) -> list[torch.Tensor]:
    """`router_probs` of the model stored in a manifest-named safetensors file, streamed layer by layer."""
    from ground_node.model.stream import meta_skeleton, run_layers
    from ground_node.model.tensorfile import TensorFile

    batches = _batches(examples, tok, batch_size)
    num_layers = int(config.num_hidden_layers)
    captured: dict[int, list[torch.Tensor]] = {la: [] for la in range(num_layers)}
    with TensorFile(tensors_file) as tensors:
        model = meta_skeleton(adapter, config, tensors)

        def hook_router(index: int, layer: nn.Module) -> Any:
            return adapter.router(model, index).register_forward_hook(_capture_logits(captured[index]))

        run_layers(model, adapter, tensors, batches, on_layer=hook_router)
    return _probs(captured, batches, tok.pad_id)


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


@dataclass(frozen=True)
class Profile:
    affinity: Affinity
    probs: list[torch.Tensor]  # per layer [T, E]: kept for the routing coverage of later assignments
    top_k: int


def profile_base(base_dir: Path, examples: Sequence[Example], tok: Tokenizer, sample: int) -> Profile:
    """`profile_affinity` of a base directory's model, streamed from its `base.safetensors` layer by layer."""
    from transformers import AutoConfig

    from ground_node.model.base import BASE_TENSORS, read_manifest
    from ground_node.model.families import get_adapter

    adapter = get_adapter(str(read_manifest(base_dir).get("family")))
    config = AutoConfig.from_pretrained(str(base_dir))
    probs = stream_router_probs(adapter, config, Path(base_dir) / BASE_TENSORS, list(examples[:sample]), tok)
    top_k = int(config.num_experts_per_tok)
    return Profile(affinity_from_probs(probs, top_k), probs, top_k)
