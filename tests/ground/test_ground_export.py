"""ONNX export of the global model and a cluster's sub-model; torch vs onnxruntime logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ground_node.learning.synthetic import cluster_train
from ground_node.learning.train import Trainer
from ground_node.model.base import load_base
from ground_node.model.export import check_onnx, export_model
from ground_node.records import Assignment
from ground_node.settings import load_settings

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_export_global_and_submodel_match_onnxruntime(topology: dict[str, Any], base_dir: Path, tmp_path: Path) -> None:
    s = load_settings(topology)
    base = load_base(base_dir)
    trainer = Trainer(
        base.model, base.adapter, s.training, Assignment(1, {0: (1, 2), 1: (0, 3)}), cluster_train(s, "c0"), 3
    )
    for wrapper in [w for la in range(2) for w in base.adapter.lora_layers(trainer.model, la).values()]:
        torch.nn.init.normal_(base.adapter.lora_factor(wrapper, "lora_B"), std=0.05)
    tensors = trainer.expert_state()
    ids = torch.randint(3, 40, (3, 13), generator=torch.Generator().manual_seed(0))  # other shape than traced
    for submodel in (False, True):
        out = tmp_path / f"m-{submodel}.onnx"
        module, summary = export_model(base_dir, tensors, out, submodel=submodel)
        assert out.exists() and (summary["submodel"] is not None) == submodel
        diff = check_onnx(out, module, ids)
        assert diff <= 1e-4, (submodel, diff)
