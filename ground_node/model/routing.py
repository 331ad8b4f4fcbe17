"""Routing restricted to a cluster's held experts (ARCHITECTURE §4.3): top-k among the held experts only, and the
router class that does it, mixed into each family's router by `FamilyAdapter.mask_router`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError

ROUTER_SOFTMAX = ("held", "all")


def route_held(
    logits: torch.Tensor,
    held: torch.Tensor,
    top_k: int,
    scoring: str,
    norm_topk: bool,
    n_held: int | None = None,
    softmax_over: str = "all",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked logits, top-k weights, global top-k indices) with unheld experts never selected.

    `scoring="softmax"` (OLMoE, Mixtral, Qwen-MoE) with `softmax_over="all"`: weights are the full model's softmax
    probabilities of the chosen experts (optionally renormalised over the top-k), so a token whose top-k experts
    are all held is computed exactly as in the full model. `softmax_over="held"` (ARCHITECTURE §4.3): the unheld
    experts' logits are masked before the softmax, so the held experts' weights sum to one as in a model that
    has only them (the same as `all` wherever the top-k weights are renormalised, e.g. Mixtral).
    `scoring="topk_softmax"` (GPT-OSS): softmax over the top-k logits (the same under both).
    With fewer than k held experts, fewer are chosen; with none, no expert is chosen (zero-width top-k).
    """
    if softmax_over not in ROUTER_SOFTMAX:
        raise GroundError(f"training.router_softmax: expected one of {list(ROUTER_SOFTMAX)}, got {softmax_over!r}")
    if n_held is None:
        n_held = int(held.sum())
    k = min(top_k, n_held)
    masked = logits.masked_fill(~held, float("-inf"))
    if k == 0:
        idx = torch.zeros((logits.shape[0], 0), dtype=torch.long, device=logits.device)
        return masked, torch.zeros((logits.shape[0], 0), dtype=logits.dtype, device=logits.device), idx
    top_logit, top_index = torch.topk(masked, k, dim=-1)
    if scoring == "topk_softmax":
        weights = nn.functional.softmax(top_logit, dim=1, dtype=top_logit.dtype)
        return masked, weights, top_index
    probs = nn.functional.softmax(masked if softmax_over == "held" else logits, dtype=torch.float, dim=-1)
    top_value = probs.gather(-1, top_index)
    if norm_topk:
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    return masked, top_value.to(logits.dtype), top_index


class HeldRouterMixin:
    """Forward of a router restricted to held experts; mixed into the family's router class.

    Buffers: `held_mask` [E] (global), `held_index` [n] (local -> global), `to_local` [E] (global -> local).
    In a physical split (`physical=True`) the router's own `weight` (and `bias`) hold only the held experts'
    rows; the other rows stay as the frozen, non-persistent buffers `rest_weight`/`rest_bias` where the scoring
    needs the full softmax denominator (so routing stays exact), else they are dropped.
    """

    held_mask: torch.Tensor
    held_index: torch.Tensor
    to_local: torch.Tensor
    physical: bool
    scoring: str
    norm_topk: bool
    k_route: int
    n_held: int
    softmax_over: str  # training.router_softmax (held | all); absent: all

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        module: Any = self
        weight: torch.Tensor = module.weight
        hidden_states = hidden_states.reshape(-1, weight.shape[1])
        bias = module._parameters.get("bias")
        held_logits = nn.functional.linear(hidden_states, weight, bias)
        if not self.physical:
            logits = held_logits
        else:
            num_experts = self.held_mask.shape[0]
            logits = held_logits.new_full((held_logits.shape[0], num_experts), float("-inf"))
            logits[:, self.held_index] = held_logits
            rest = module._buffers.get("rest_weight")
            if rest is not None:
                rest_logits = nn.functional.linear(hidden_states, rest, module._buffers.get("rest_bias"))
                logits[:, module._buffers["rest_index"]] = rest_logits
        softmax_over = getattr(self, "softmax_over", "all")
        masked, weights, index = route_held(
            logits, self.held_mask, self.k_route, self.scoring, self.norm_topk, self.n_held, softmax_over
        )
        if self.physical:
            index = self.to_local[index]
        return masked, weights, index


_HELD_CLASSES: dict[type, type] = {}


def held_router_class(base: type) -> type:
    if base not in _HELD_CLASSES:
        _HELD_CLASSES[base] = type(f"Held{base.__name__}", (HeldRouterMixin, base), {})
    return _HELD_CLASSES[base]
