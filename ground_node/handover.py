"""Re-assignment on the ground (ARCHITECTURE §4.2): what changes hands when experts move between clusters.

- `fetch_gained` pulls the newest parts (LoRA factors or full weights, as the manifest's `expert_parts` say) of the
  experts a cluster gained, for those the satellite has a version of; the others start from the base. The pull is a
  `ResumablePull`: when the link cuts it, the next pass asks only for the chunks still missing.
- `carry_over` / `restore` move what a cluster keeps from its old trainer to the rebuilt one: the kept experts'
  trained parts and, per fused tensor, the optimizer moments of their slices.

AdamW keeps one step count per tensor, and a fused tensor holds the slices of every held expert of a layer. Fresh
moments under an old step count would skip Adam's bias correction, so a gained expert's first updates would be
several times too large; a fused tensor that gains an expert therefore starts its optimizer state afresh, and only
one that gains none (its layer kept or lost experts) continues its kept slices' moments exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ground_node.errors import GroundError
from ground_node.family import lora_a_slice, lora_b_slice
from ground_node.split import Assignment
from ground_node.train import Trainer, load_expert_state
from protos.client import ResumablePull
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import expert_name, parse_expert_name

Expert = tuple[int, int]  # (layer, expert), global ids


@dataclass(frozen=True)
class Switch:
    """A new assignment, ready for the training thread, with the handed-over parts of the experts it gains."""

    assignment: Assignment
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def diff(old: Assignment | None, new: Assignment) -> tuple[list[Expert], list[Expert]]:
    """(gained, lost) experts going from `old` (None: nothing held) to `new`."""
    before = set(old.pairs()) if old is not None else set()
    after = set(new.pairs())
    return sorted(after - before), sorted(before - after)


def experts_of(names: Iterable[str]) -> set[Expert]:
    out = set()
    for name in names:
        parsed = parse_expert_name(name)
        if parsed is not None:
            out.add((parsed[0].layer, parsed[0].expert))
    return out


def only_experts(tensors: Mapping[str, np.ndarray], keep: set[Expert]) -> dict[str, np.ndarray]:
    return {n: a for n, a in tensors.items() if experts_of([n]) <= keep}


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names and float32 bytes, in name order: equal parts, equal digests."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def reassigned_event(old: Assignment, new: Assignment, handed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Fields of the `reassigned` event: the versions, the gained and lost experts, and the handed-over experts
    with the digest of their parts (`handed`: those parts as they went into the model)."""
    gained, lost = diff(old, new)
    return {
        "old_version": old.version,
        "new_version": new.version,
        "gained": [list(x) for x in gained],
        "lost": [list(x) for x in lost],
        "handed_over": [list(x) for x in sorted(experts_of(handed))],
        "handed_over_sha256": tensors_digest(handed),
    }


# ---- fetching from the satellite ---------------------------------------------------------------


def versioned_experts(stub: Any, metadata: Any, timeout: float) -> set[Expert]:
    """Experts the satellite holds a committed version of (GetStatus)."""
    status = stub.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=timeout)
    return {(int(x.layer), int(x.expert)) for x in status.experts}


def fetch_gained(
    stub: Any,
    metadata: Any,
    gained: list[Expert],
    parts: list[str],
    timeout: float,
    puller: ResumablePull,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The newest parts of the gained experts the satellite has a version of (the others start from the base).
    Raises when the pull is cut or incomplete; `puller` keeps what arrived, so the next call resumes."""
    if not gained:
        return {}
    versioned = versioned_experts(stub, metadata, timeout)
    names = [expert_name(la, e, p) for la, e in gained if (la, e) in versioned for p in parts]
    if not names:
        return {}
    tensors = puller.fetch(stub, metadata, names, timeout, on_bytes)
    if tensors is None:
        raise GroundError("hand-over pull: the stream ended before its last chunk")
    return tensors


# ---- carrying state over to the rebuilt trainer ------------------------------------------------


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
