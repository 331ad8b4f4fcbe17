"""Every MoE family adapter on a tiny random config of its real transformers class."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ground_node.errors import GroundError
from ground_node.learning.train import wrap_lora
from ground_node.model.families import get_adapter
from ground_node.model.family import FamilyAdapter
from ground_node.model.split import apply_split
from ground_node.model.submodel import load_split, split_model
from ground_node.records import Assignment
from ground_node.settings import ModelSettings

FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"]
VOCAB = 64


def _model(family: str, num_experts: int = 6) -> tuple[nn.Module, FamilyAdapter]:
    adapter = get_adapter(family)
    settings = ModelSettings(family, None, 2, num_experts, 2, 32, 24, 2)
    model = adapter.build(settings, VOCAB, 64, seed=5)
    with torch.no_grad():  # random routers (some families init them to zero) and non-zero biases
        for name, p in model.named_parameters():
            if "router" in name or ".gate.weight" in name or name.endswith("_bias"):
                p.normal_(0, 0.5)
    return model, adapter


def _ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))


def _layer0(model: nn.Module, adapter: FamilyAdapter, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(MoE block output, router logits, router top-k indices) of layer 0."""
    got: dict[str, Any] = {}
    mlp = adapter.experts_module(model, 0)
    block = next(m for m in model.modules() if getattr(m, "experts", None) is mlp)

    def on_block(_m: nn.Module, _i: Any, out: Any) -> None:
        got["out"] = (out[0] if isinstance(out, tuple) else out).reshape(-1, out_dim(out))

    def out_dim(out: Any) -> int:
        return int((out[0] if isinstance(out, tuple) else out).shape[-1])

    def on_router(_m: nn.Module, _i: Any, out: Any) -> None:
        got["logits"], got["idx"] = out[0], out[2]

    handles = [block.register_forward_hook(on_block), adapter.router(model, 0).register_forward_hook(on_router)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return got["out"], got["logits"], got["idx"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_slices_round_trip_exactly(family: str) -> None:
    model, adapter = _model(family)
    state = dict(model.state_dict())
    manifest = adapter.to_manifest(state)
    assert not any(".experts." in n for n in manifest)
    assert all(f"expert/1/5/{p}" in manifest for p in adapter.expert_parts)
    if family == "qwen2_moe":  # its shared expert is shared weight, not an expert
        assert "shared/model.layers.0.mlp.shared_expert.gate_proj.weight" in manifest
        assert "shared/model.layers.0.mlp.shared_expert_gate.weight" in manifest
    back = adapter.from_manifest(manifest)
    assert set(back) == set(state) and all(torch.equal(back[n], state[n]) for n in state)
    new = {k: torch.randn_like(v) for k, v in adapter.extract_expert(model, 1, 2).items()}
    other = adapter.extract_expert(model, 1, 3)
    adapter.insert_expert(model, 1, 2, new)
    assert all(torch.equal(adapter.extract_expert(model, 1, 2)[k], new[k]) for k in new)
    assert all(torch.equal(adapter.extract_expert(model, 1, 3)[k], other[k]) for k in other)
    # LoRA slices: per-expert delta equals PEFT's, insert round-trips
    peft_model = wrap_lora(model, adapter, rank=3, alpha=6, seed=0)
    for wrapper in adapter.lora_layers(peft_model, 1).values():
        nn.init.normal_(adapter.lora_factor(wrapper, "lora_B"))
    shapes = adapter.lora_part_shapes(model, 3)
    for part, wrapper in adapter.lora_layers(peft_model, 1).items():
        parts = adapter.extract_lora(peft_model, 1, 4, rank=3)
        a, b = parts[f"{part}.lora_A"], parts[f"{part}.lora_B"]
        assert [list(a.shape), list(b.shape)] == [shapes[f"{part}.lora_A"], shapes[f"{part}.lora_B"]]
        delta = wrapper.get_delta_weight("default")
        assert torch.allclose(adapter.lora_delta(a, b, 2.0), delta[4], atol=1e-6)
    lora_new = {k: torch.randn_like(v) for k, v in adapter.extract_lora(peft_model, 0, 2, 3).items()}
    adapter.insert_lora(peft_model, 0, 2, 3, lora_new)
    assert all(torch.equal(adapter.extract_lora(peft_model, 0, 2, 3)[k], lora_new[k]) for k in lora_new)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_forward_equals_full_where_topk_held(family: str, tmp_path: Path) -> None:
    model, adapter = _model(family)
    ids = _ids()
    full_out, full_logits, full_idx = _layer0(model, adapter, ids)
    held0 = sorted(set(full_idx[0].tolist()) | {5})  # the first token's top-k experts are all held
    assignment = Assignment(1, {0: tuple(held0), 1: (1, 3, 4)})
    all_held = torch.isin(full_idx, torch.tensor(held0)).all(dim=-1)
    assert all_held.any()
    # logical mask: unheld never selected, held logits exposed unchanged
    masked = copy.deepcopy(model)
    apply_split(masked, adapter, assignment, "mask")
    m_out, m_logits, m_idx = _layer0(masked, adapter, ids)
    assert set(m_idx.unique().tolist()) <= set(held0)
    assert torch.equal(m_logits[:, held0], full_logits[:, held0])
    assert torch.isinf(m_logits[:, [e for e in range(6) if e not in held0]]).all()
    assert torch.allclose(m_out[all_held], full_out[all_held], atol=1e-5)
    # physical split: only held experts stay; indices are local, outputs match on fully held tokens
    sub = split_model(copy.deepcopy(model), adapter, assignment)
    assert adapter.fused_param(sub, 0, adapter.expert_parts[0]).shape[0] == len(held0)
    assert adapter.router(sub, 0).weight.shape[0] == len(held0)
    assert adapter.held_index(sub, 1) == [1, 3, 4]
    s_out, _, s_idx = _layer0(sub, adapter, ids)
    held_t = torch.tensor(held0)
    assert torch.equal(held_t[s_idx].sort(-1).values, m_idx.sort(-1).values)
    assert torch.allclose(s_out, m_out, atol=1e-5)
    assert torch.allclose(s_out[all_held], full_out[all_held], atol=1e-5)
    assert torch.equal(adapter.extract_expert(sub, 1, 3)["down_proj"], adapter.extract_expert(model, 1, 3)["down_proj"])
    with pytest.raises(GroundError, match="not in this sub-model"):
        adapter.extract_expert(sub, 1, 2)
    # built directly from a manifest safetensors file: same as cutting the full model
    path = tmp_path / "base.safetensors"
    save_file(adapter.to_manifest(dict(model.state_dict())), str(path))
    direct = load_split(adapter, model.config, path, assignment)
    with torch.no_grad():
        assert torch.allclose(direct(input_ids=ids).logits, sub(input_ids=ids).logits, atol=1e-5)
        every = Assignment(1, {0: tuple(range(6)), 1: tuple(range(6))})
        whole = load_split(adapter, model.config, path, every)
        assert torch.allclose(whole(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_split_with_an_empty_layer_trains(family: str) -> None:
    from ground_node.learning.synthetic import Example
    from ground_node.learning.train import Trainer
    from ground_node.settings import TrainingSettings

    model, adapter = _model(family)
    training = TrainingSettings("lora", "mask", 2, 4.0, 0.01, 4, 5, 5, 8)
    examples = [Example("copy", "C:ab=", "ab")] * 4
    trainer = Trainer(model, adapter, training, Assignment(1, {0: (1, 3)}), examples, 0)
    trainer.train_step()
    state = trainer.expert_state()
    assert sorted({n.rsplit("/", 1)[0] for n in state}) == ["expert/0/1", "expert/0/3"]
    assert all(n.endswith(("lora_A", "lora_B")) for n in state)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(GroundError, match="unknown family 'llama'"):
        get_adapter("llama")
