"""What a cluster keeps across a re-assignment (ARCHITECTURE §4.2): `carry_over` / `restore` move the kept
experts' trained parts and, per fused tensor, the optimizer moments of their slices from the old trainer to the
rebuilt one.

AdamW keeps one step count per tensor, and a fused tensor holds the slices of every held expert of a layer. Fresh
moments under an old step count would skip Adam's bias correction, so a gained expert's first updates would be
several times too large; a fused tensor that gains an expert therefore starts its optimizer state afresh, and only
one that gains none (its layer kept or lost experts) continues its kept slices' moments exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ground_node.federation.handover import Expert, only_experts
from ground_node.learning.train import Trainer, load_expert_state
from ground_node.model.family import lora_a_slice, lora_b_slice


@dataclass
class CarryOver:
    step: int
    parts: dict[str, np.ndarray]  # kept experts' trained parts, manifest names
    moments: dict[tuple[int, str, int], dict[str, torch.Tensor]]  # (layer, key, expert) -> exp_avg, exp_avg_sq
    counts: dict[tuple[int, str], torch.Tensor]  # (layer, key) -> the fused tensor's Adam step count


MOMENTS = ("exp_avg", "exp_avg_sq")


def trainable_slots(trainer: Trainer) -> dict[tuple[int, str], torch.nn.Parameter]:
    """The trainer's fused trainable tensors by (layer, key): key `<part>.lora_A|B` (LoRA) or `<part>` (full)."""
    adapter, model = trainer.adapter, trainer.model
    num_layers = adapter.dims(model)[0]
    slots: dict[tuple[int, str], torch.nn.Parameter] = {}
    for layer in range(num_layers):
        if trainer.training.tune == "lora":
            for part, wrapper in adapter.lora_layers(model, layer).items():
                for factor in ("lora_A", "lora_B"):
                    slots[(layer, f"{part}.{factor}")] = adapter.lora_factor(wrapper, factor)
        elif adapter.local_count(model, layer) > 0:
            for part in adapter.expert_parts:
                slots[(layer, part)] = adapter.fused_param(model, layer, part)
    return {k: p for k, p in slots.items() if p.requires_grad}


def expert_view(trainer: Trainer, tensor: torch.Tensor, layer: int, key: str, expert: int) -> torch.Tensor:
    """The slice of one expert in a fused trainable tensor (or a tensor shaped like it, e.g. a moment)."""
    adapter, model = trainer.adapter, trainer.model
    i = adapter.local_index(model, layer, expert)
    if key.endswith(".lora_A"):
        return lora_a_slice(tensor, i, trainer.training.lora_rank)
    if key.endswith(".lora_B"):
        return lora_b_slice(tensor, i, adapter.local_count(model, layer))
    return tensor[i]


def carry_over(trainer: Trainer, keep: set[Expert]) -> CarryOver:
    """What the kept experts take to the rebuilt trainer (copies: the old trainer may go)."""
    parts = only_experts(trainer.expert_state(), keep)
    moments: dict[tuple[int, str, int], dict[str, torch.Tensor]] = {}
    counts: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, key), param in trainable_slots(trainer).items():
        state = trainer.optimizer.state.get(param) or {}
        if not all(m in state for m in MOMENTS) or "step" not in state:
            continue
        counts[(layer, key)] = torch.as_tensor(state["step"]).clone()
        for la, e in keep:
            if la == layer:
                moments[(layer, key, e)] = {m: expert_view(trainer, state[m], layer, key, e).clone() for m in MOMENTS}
    return CarryOver(trainer.step, parts, moments, counts)


def restore(trainer: Trainer, carry: CarryOver, fresh_layers: set[int]) -> None:
    """Put the kept experts' parts into the new trainer; continue the optimizer state of every fused tensor whose
    layer gained nothing (`fresh_layers`: layers that did, whose tensors start a fresh optimizer state)."""
    trainer.step = carry.step
    load_expert_state(trainer, carry.parts)
    held = trainer.assignment
    for (layer, key), param in trainable_slots(trainer).items():
        if layer in fresh_layers or (layer, key) not in carry.counts:
            continue
        if any((layer, key, e) not in carry.moments for e in held.held(layer)):
            continue
        state: dict[str, Any] = {"step": carry.counts[(layer, key)].clone()}
        for m in MOMENTS:
            state[m] = torch.zeros_like(param, memory_format=torch.preserve_format)
            for e in held.held(layer):
                expert_view(trainer, state[m], layer, key, e).copy_(carry.moments[(layer, key, e)][m])
        trainer.optimizer.state[param] = state
