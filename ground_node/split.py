"""Model splitting (ARCHITECTURE §4.3): a cluster's assignment and the routing restriction to its held experts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ground_node.errors import GroundError
from ground_node.family import FamilyAdapter


@dataclass(frozen=True)
class Assignment:
    """The experts a cluster holds, per MoE layer, at an assignment version."""

    version: int
    layers: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def held(self, layer: int) -> tuple[int, ...]:
        return self.layers.get(layer, ())

    def pairs(self) -> list[tuple[int, int]]:
        return [(layer, e) for layer in sorted(self.layers) for e in sorted(self.layers[layer])]

    def validate(self, num_layers: int, num_experts: int) -> None:
        for layer, experts in self.layers.items():
            if not 0 <= layer < num_layers:
                raise GroundError(f"assignment names layer {layer}, but the model has {num_layers} MoE layers")
            for e in experts:
                if not 0 <= e < num_experts:
                    raise GroundError(
                        f"assignment names expert {e} of layer {layer}, but the model has {num_experts} experts"
                    )
            if len(set(experts)) != len(experts):
                raise GroundError(f"assignment names an expert of layer {layer} twice: {list(experts)}")

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "layers": [[layer, list(self.layers[layer])] for layer in sorted(self.layers)]}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Assignment:
        return cls(int(obj["version"]), {int(la): tuple(int(e) for e in ex) for la, ex in obj["layers"]})

    @classmethod
    def from_pairs(cls, version: int, layers: Sequence[tuple[int, Sequence[int]]]) -> Assignment:
        return cls(version, {int(la): tuple(sorted(int(e) for e in ex)) for la, ex in layers})


def apply_split(model: nn.Module, adapter: FamilyAdapter, assignment: Assignment, split: str) -> None:
    """`mask`: unheld experts can never be routed to; `frozen`: every expert stays routable (exact routing)."""
    num_layers, num_experts, _ = adapter.dims(model)
    assignment.validate(num_layers, num_experts)
    for layer in range(num_layers):
        if split == "mask":
            adapter.mask_router(model, layer, list(assignment.held(layer)))
        elif split == "frozen":
            adapter.mask_router(model, layer, None)
        else:
            raise GroundError(f"training.split: unknown split {split!r}")


def remove_split(model: nn.Module, adapter: FamilyAdapter) -> None:
    num_layers, _, _ = adapter.dims(model)
    for layer in range(num_layers):
        adapter.mask_router(model, layer, None)
