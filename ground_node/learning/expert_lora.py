"""LoRA on fused experts without materialising W + dW: each expert computes `x W_e^T + s (x A_e^T) B_e^T`.

PEFT's `target_parameters` LoRA folds the factors into a full-size copy of every fused expert tensor on each
forward and takes the gradient of that copy in backward: the cost of full fine-tuning for a rank-r adapter. On the
real base (30 layers, 8 experts of 2 x 1536 x 576) that was about half of a training step (`py-spy`, issue #13).
Here PEFT keeps its modules and factor layout (`lora_A.weight` [E*r, in], `lora_B.weight` [out, r*E]: checkpoints,
the outbox and the wire are unchanged); only the forward differs. The wrappers pass straight through and the
experts module runs the per-expert loop below, so the frozen W needs no gradient and no copy.

Families whose experts are stored [E, out, in] with a gated activation and no bias (OLMoE, Mixtral, Qwen2/3-MoE)
take this path; others (GPT-OSS: transposed, biased) keep PEFT's own forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from ground_node.model.family import FamilyAdapter, lora_a_slice, lora_b_slice


def supports_factored(adapter: FamilyAdapter, experts: nn.Module) -> bool:
    """Whether this experts module has the layout the factored forward computes."""
    return (
        not adapter.transposed
        and not getattr(experts, "has_bias", True)
        and getattr(experts, "has_gate", False)
        and not getattr(experts, "is_transposed", True)
        and hasattr(experts, "_apply_gate")
    )


def _innermost(module: nn.Module) -> nn.Module:
    inner: Any = module
    while hasattr(inner, "base_layer"):
        inner = inner.base_layer
    return inner  # type: ignore[no-any-return]


def _pass_through(wrapper: nn.Module) -> Any:
    base: Any = wrapper.base_layer

    def forward(*args: Any, **kwargs: Any) -> Any:
        return base(*args, **kwargs)

    return forward


def _factored_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The eager experts loop of transformers, with each projection's LoRA term added from its factors."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, int]] = {
        part: (w.lora_A["default"].weight, w.lora_B["default"].weight, float(w.scaling["default"]), int(w.r["default"]))
        for part, w in self._emsfl_lora.items()
    }

    def project(x: torch.Tensor, part: str, e: int) -> torch.Tensor:
        y = functional.linear(x, getattr(self, part)[e])
        if part in lora:
            a, b, scaling, rank = lora[part]
            y = y + scaling * functional.linear(
                functional.linear(x, lora_a_slice(a, e, rank)), lora_b_slice(b, e, self.num_experts)
            )
        return y

    final = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):  # indices >= num_experts (unheld experts of a sub-model) contribute nothing
        token_idx, top_k_pos = torch.where(top_k_index == e)
        if token_idx.numel() == 0:
            continue
        h = self._apply_gate(project(hidden_states[token_idx], "gate_up_proj", e))
        y = project(h, "down_proj", e) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, y.to(final.dtype))
    return final


def use_factored_lora(model: nn.Module, adapter: FamilyAdapter) -> int:
    """Switch every PEFT-wrapped experts module that supports it to the factored forward; the count switched."""
    num_layers, _, _ = adapter.dims(model)
    switched = 0
    for layer in range(num_layers):
        wrappers = adapter.lora_layers(model, layer)
        if not wrappers:
            continue
        experts = _innermost(adapter.experts_module(model, layer))
        if not supports_factored(adapter, experts):
            continue
        for wrapper in wrappers.values():
            wrapper.forward = _pass_through(wrapper)  # type: ignore[method-assign]
        experts._emsfl_lora = wrappers  # type: ignore[assignment]
        experts.forward = types.MethodType(_factored_forward, experts)  # type: ignore[method-assign]
        switched += 1
    return switched
