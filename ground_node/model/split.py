"""Model splitting (ARCHITECTURE §4.3): a cluster's assignment and the routing restriction to its held experts."""

from __future__ import annotations

from typing import Any

from torch import nn

from ground_node.errors import GroundError
from ground_node.model.family import FamilyAdapter
from ground_node.model.routing import ROUTER_SOFTMAX, HeldRouterMixin
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


def set_router_softmax(model: nn.Module, adapter: FamilyAdapter, softmax_over: str) -> None:
    """`training.router_softmax` on every restricted router of a model (a router that routes to every expert,
    e.g. under `split=frozen`, is not restricted and ignores it)."""
    if softmax_over not in ROUTER_SOFTMAX:
        raise GroundError(f"training.router_softmax: expected one of {list(ROUTER_SOFTMAX)}, got {softmax_over!r}")
    num_layers, _, _ = adapter.dims(model)
    for layer in range(num_layers):
        router: Any = adapter.router(model, layer)
        if isinstance(router, HeldRouterMixin):
            router.softmax_over = softmax_over
