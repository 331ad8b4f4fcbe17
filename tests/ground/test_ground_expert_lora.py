"""The factored expert LoRA (`expert_lora.py`) computes what PEFT's folded forward computes, gradients included."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ground_node.learning.train import wrap_lora
from ground_node.model.families import get_adapter
from ground_node.model.family import FamilyAdapter
from ground_node.model.submodel import split_model
from ground_node.records import Assignment
from ground_node.settings import ModelSettings

VOCAB = 64
FACTORED_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"]


def _model(family: str) -> tuple[nn.Module, FamilyAdapter]:
    adapter = get_adapter(family)
    model = adapter.build(ModelSettings(family, None, 2, 6, 2, 32, 24, 2), VOCAB, 64, seed=5)
    with torch.no_grad():  # routers some families init to zero: random, so that every expert sees tokens
        for name, p in model.named_parameters():
            if "router" in name or ".gate.weight" in name:
                p.normal_(0, 0.5)
    return model, adapter


def _wrapped_pair(model: nn.Module, adapter: FamilyAdapter) -> tuple[nn.Module, nn.Module]:
    """(PEFT's folded forward, the factored one) with the same non-zero factors (PEFT starts B at zero)."""
    folded = wrap_lora(copy.deepcopy(model), adapter, rank=3, alpha=6.0, seed=0, factored=False)
    factored = wrap_lora(copy.deepcopy(model), adapter, rank=3, alpha=6.0, seed=0)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(folded.named_parameters(), factored.named_parameters(), strict=True):
            assert n1 == n2
            if "lora_" in n1:
                p1.copy_(torch.randn(p1.shape, generator=gen) * 0.3)
                p2.copy_(p1)
    return folded, factored


def _logits_and_grads(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", FACTORED_FAMILIES)
def test_factored_lora_equals_peft_fold_in_logits_and_gradients(family: str) -> None:
    model, adapter = _model(family)
    folded, factored = _wrapped_pair(model, adapter)
    assert all(hasattr(m, "_emsfl_lora") for m in factored.modules() if type(m).__name__.endswith("Experts"))
    logits_folded, grads_folded = _logits_and_grads(folded)
    logits_factored, grads_factored = _logits_and_grads(factored)
    assert set(grads_folded) == set(grads_factored) and grads_folded
    torch.testing.assert_close(logits_factored, logits_folded, rtol=1e-4, atol=1e-5)
    for name, grad in grads_folded.items():
        torch.testing.assert_close(grads_factored[name], grad, rtol=1e-4, atol=1e-6)
    # and the adapters matter: zero factors give other logits
    with torch.no_grad():
        bare = model(input_ids=torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))).logits
    assert not torch.allclose(bare, logits_factored, atol=1e-3)


def test_factored_lora_on_a_physical_sub_model_equals_peft_fold() -> None:
    model, adapter = _model("mixtral")
    split_model(model, adapter, Assignment(1, {0: (1, 4), 1: (0, 5)}))
    folded, factored = _wrapped_pair(model, adapter)
    logits_folded, grads_folded = _logits_and_grads(folded)
    logits_factored, grads_factored = _logits_and_grads(factored)
    torch.testing.assert_close(logits_factored, logits_folded, rtol=1e-4, atol=1e-5)
    for name, grad in grads_folded.items():
        torch.testing.assert_close(grads_factored[name], grad, rtol=1e-4, atol=1e-6)


def test_gpt_oss_keeps_peft_forward() -> None:
    from ground_node.learning.expert_lora import use_factored_lora

    model, adapter = _model("gpt_oss")
    wrapped = wrap_lora(model, adapter, rank=3, alpha=6.0, seed=0, factored=False)
    assert use_factored_lora(wrapped, adapter) == 0
