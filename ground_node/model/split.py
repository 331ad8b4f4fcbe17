"""Model splitting (ARCHITECTURE §4.3): a cluster's assignment and the routing restriction to its held experts."""

from __future__ import annotations

from torch import nn

from ground_node.errors import GroundError
from ground_node.model.family import FamilyAdapter
from ground_node.records import Assignment


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
