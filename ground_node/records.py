"""Records that cross the ground role's rooms (model, learning, federation, cluster): an assignment and an affinity.
No torch here, so that the uplink and the gateway import none (a test checks `ground gateway --help`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ground_node.errors import GroundError


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


def full_assignment(num_layers: int, num_experts: int) -> Assignment:
    """Every expert of every layer: what FedAvg and FedAsync train, and the centralised reference."""
    return Assignment(0, {layer: tuple(range(num_experts)) for layer in range(num_layers)})


@dataclass(frozen=True)
class Affinity:
    gate: np.ndarray  # [L, E] mean router probability; each row sums to 1
    freq: np.ndarray  # [L, E] share of top-k selections; each row sums to 1
    num_tokens: int
