from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ground_node.errors import GroundError
from ground_node.learning.evaluate import accuracy, apply_tensors
from ground_node.learning.synthetic import cluster_train
from ground_node.learning.train import Trainer
from ground_node.model.base import MANIFEST, ensure_base, load_base, read_manifest
from ground_node.records import Assignment
from ground_node.settings import load_settings
from protos.wire import sha256_hex

HELD = Assignment(3, {0: (1, 2), 1: (0,)})


def _trainer(base_dir: Path, topology: dict[str, Any], tune: str = "lora", split: str = "mask") -> Trainer:
    s = load_settings(dict(topology, training=dict(topology["training"], tune=tune, split=split)))
    base = load_base(base_dir)
    return Trainer(base.model, base.adapter, s.training, HELD, cluster_train(s, "c0"), s.seed)


def test_base_directory_contract_and_cache(topology: dict[str, Any], base_dir: Path) -> None:
    manifest = read_manifest(base_dir)
    assert (base_dir / "config.json").exists() and (base_dir / "model.safetensors").exists()
    assert manifest["base_hash"] == sha256_hex((base_dir / "base.safetensors").read_bytes())
    assert [p["name"] for p in manifest["expert_parts"]] == [
        "gate_up_proj.lora_A",
        "gate_up_proj.lora_B",
        "down_proj.lora_A",
        "down_proj.lora_B",
    ]
    assert manifest["expert_parts"][0]["shape"] == [4, 32] and manifest["expert_parts"][1]["shape"] == [96, 4]
    assert (manifest["num_layers"], manifest["num_experts"], manifest["top_k"]) == (2, 4, 2)
    start = time.monotonic()
    assert ensure_base(topology, base_dir.parent) == base_dir
    assert time.monotonic() - start < 1.0 and (base_dir / MANIFEST).exists()
    assert not [p for p in base_dir.parent.iterdir() if ".tmp" in p.name]


def test_lora_training_touches_only_held_experts_and_resumes(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path
) -> None:
    t = _trainer(base_dir, topology)
    for _ in range(4):
        t.train_step()
    state = t.expert_state()
    assert sorted({n.rsplit("/", 1)[0] for n in state}) == ["expert/0/1", "expert/0/2", "expert/1/0"]
    assert all(v.dtype == np.float32 for v in state.values())
    with pytest.raises(GroundError, match="not in this sub-model"):  # split=mask dropped the unheld experts
        t.adapter.extract_lora(t.model, 0, 3, 4)
    assert t.adapter.fused_param(t.model, 0, "down_proj").shape[0] == 2
    assert any(float(np.abs(v).sum()) > 0 for k, v in state.items() if k.endswith("lora_B"))
    t.save_checkpoint(tmp_path)
    for _ in range(3):
        t.train_step()
    expected = t.expert_state()
    resumed = _trainer(base_dir, topology)
    assert resumed.load_checkpoint(tmp_path) and resumed.step == 4
    assert resumed.optimizer.state_dict()["state"]  # Adam moments came back
    for _ in range(3):
        resumed.train_step()
    for name, value in expected.items():
        assert np.allclose(resumed.expert_state()[name], value, atol=1e-6), name
    other = Trainer(
        load_base(base_dir).model, resumed.adapter, resumed.training, Assignment(4, {0: (0,)}), resumed.examples, 3
    )
    assert not other.load_checkpoint(tmp_path)  # another assignment: start fresh


def test_full_tuning_changes_only_held_slices(topology: dict[str, Any], base_dir: Path) -> None:
    t = _trainer(base_dir, topology, tune="full", split="frozen")
    before = {e: t.adapter.extract_expert(t.model, 0, e) for e in range(4)}
    for _ in range(2):
        t.train_step()
    for e in range(4):
        after = t.adapter.extract_expert(t.model, 0, e)
        changed = any(not torch.equal(after[p], before[e][p]) for p in after)
        assert changed == (e in (1, 2))
    assert sorted(t.expert_state()) == sorted(
        f"expert/{la}/{e}/{p}" for la, e in HELD.pairs() for p in ("gate_up_proj", "down_proj")
    )


def test_apply_lora_equals_peft_merge_and_eval(topology: dict[str, Any], base_dir: Path) -> None:
    t = _trainer(base_dir, topology)
    for _ in range(3):
        t.train_step()
    uploads = t.expert_state()
    base = load_base(base_dir)
    assert apply_tensors(base.model, base.adapter, base.manifest, uploads) == 6
    for la, e in HELD.pairs():
        for part in ("gate_up_proj", "down_proj"):
            wrapper = t.adapter.lora_layers(t.model, la)[part]
            i = t.adapter.local_index(t.model, la, e)
            delta = wrapper.get_delta_weight("default")
            delta = delta if delta.dim() == 3 else delta[None]  # PEFT returns [out, in] for one expert
            merged = t.adapter.fused_param(t.model, la, part)[i] + delta[i]
            assert torch.allclose(base.adapter.fused_param(base.model, la, part)[e], merged, atol=1e-6)
    acc_base = accuracy(base_dir, None, topology, None)
    acc_tuned = accuracy(base_dir, uploads, topology, "c0")
    assert 0.0 <= acc_base <= 1.0 and 0.0 <= acc_tuned <= 1.0
    with pytest.raises(GroundError, match="both lora_A and lora_B"):
        apply_tensors(
            base.model,
            base.adapter,
            base.manifest,
            {"expert/0/1/down_proj.lora_A": uploads["expert/0/1/down_proj.lora_A"]},
        )
