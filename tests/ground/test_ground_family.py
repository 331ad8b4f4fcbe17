from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ground_node.errors import GroundError
from ground_node.learning.train import wrap_lora
from ground_node.model.base import load_base, new_model
from ground_node.model.families import get_adapter
from ground_node.model.family import lora_a_slice, lora_b_slice
from ground_node.settings import load_settings


def test_manifest_names_round_trip_exact(topology: dict[str, Any]) -> None:
    model, adapter = new_model(load_settings(topology))
    state = dict(model.state_dict())
    manifest = adapter.to_manifest(state)
    assert "expert/1/3/down_proj" in manifest and "shared/model.layers.0.mlp.gate.weight" in manifest
    assert not any(".experts." in n for n in manifest)
    back = adapter.from_manifest(manifest)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_expert_slice_extract_insert_round_trip(topology: dict[str, Any]) -> None:
    model, adapter = new_model(load_settings(topology))
    parts = adapter.extract_expert(model, 1, 2)
    assert parts["gate_up_proj"].shape == (96, 32) and parts["down_proj"].shape == (32, 48)
    new = {k: torch.randn_like(v) for k, v in parts.items()}
    before_other = adapter.extract_expert(model, 1, 1)
    adapter.insert_expert(model, 1, 2, new)
    got = adapter.extract_expert(model, 1, 2)
    for k in new:
        assert torch.equal(got[k], new[k])
        assert torch.equal(adapter.extract_expert(model, 1, 1)[k], before_other[k])
    with pytest.raises(GroundError, match="expert 9"):
        adapter.extract_expert(model, 0, 9)


def test_lora_slices_match_peft_delta(topology: dict[str, Any]) -> None:
    model, adapter = new_model(load_settings(topology))
    peft_model = wrap_lora(model, adapter, rank=4, alpha=8, seed=0)
    for wrapper in [w for la in range(2) for w in adapter.lora_layers(peft_model, la).values()]:
        torch.nn.init.normal_(adapter.lora_factor(wrapper, "lora_B"))
    wrappers = adapter.lora_layers(peft_model, 1)
    assert set(wrappers) == {"gate_up_proj", "down_proj"}
    for part, wrapper in wrappers.items():
        delta = wrapper.get_delta_weight("default")  # [E, out, in] as the fused tensor
        parts = adapter.extract_lora(peft_model, 1, 3, rank=4)
        a, b = parts[f"{part}.lora_A"], parts[f"{part}.lora_B"]
        assert torch.allclose((8 / 4) * b @ a, delta[3], atol=1e-6)
    # insert round trip, other experts untouched
    other = adapter.extract_lora(peft_model, 0, 1, rank=4)
    new = {k: torch.randn_like(v) for k, v in adapter.extract_lora(peft_model, 0, 2, rank=4).items()}
    adapter.insert_lora(peft_model, 0, 2, 4, new)
    got = adapter.extract_lora(peft_model, 0, 2, rank=4)
    assert all(torch.equal(got[k], new[k]) for k in new)
    assert all(torch.equal(v, adapter.extract_lora(peft_model, 0, 1, rank=4)[k]) for k, v in other.items())


def test_slice_helpers_layout() -> None:
    a = torch.arange(4 * 2 * 3).reshape(8, 3)  # E=4, r=2
    assert torch.equal(lora_a_slice(a, 1, 2), a[2:4])
    b = torch.arange(5 * 8).reshape(5, 8)
    assert torch.equal(lora_b_slice(b, 1, 4), b[:, [1, 5]])
    assert torch.equal(lora_b_slice(b, 1, 4), b.reshape(5, 2, 4)[:, :, 1])


def test_checkpoint_of_other_size_or_family_is_refused(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path
) -> None:
    other = dict(topology, model=dict(topology["model"], checkpoint=str(base_dir), num_experts=8))
    with pytest.raises(GroundError, match="num_experts"):
        new_model(load_settings(other))
    fake = tmp_path / "llama"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "llama"}))
    wrong = dict(topology, model=dict(topology["model"], checkpoint=str(fake)))
    with pytest.raises(GroundError, match="llama"):
        new_model(load_settings(wrong))
    same = dict(topology, model=dict(topology["model"], checkpoint=str(base_dir)))
    model, _ = new_model(load_settings(same))
    ref = load_base(base_dir).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))
    with pytest.raises(GroundError, match="unknown family"):
        get_adapter("mixtral-xl")
