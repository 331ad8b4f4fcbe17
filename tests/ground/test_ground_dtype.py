"""`training.dtype`: mixed-precision training (bf16 on CPU), float32 master weights and updates."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from emsfl.config import ConfigError
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.train import Trainer, resolve_dtype
from ground_node.model.base import load_base
from ground_node.records import Assignment
from ground_node.settings import load_settings


def test_bf16_training_on_cpu(topology: dict[str, Any], base_dir: Path) -> None:
    topology["training"]["dtype"] = "bfloat16"
    s = load_settings(topology)
    base = load_base(base_dir)
    assignment = Assignment(1, {0: (0, 1), 1: (2,)})
    trainer = Trainer(
        base.model, base.adapter, s.training, assignment, train_examples(s, "c0"), s.seed, tok=tokenizer_for(s.data)
    )
    assert trainer.compute_dtype == torch.bfloat16
    seen: set[torch.dtype] = set()
    hook = base.adapter.router(trainer.model, 0).register_forward_hook(
        lambda _m, _i, out: seen.add((out[0] if isinstance(out, tuple) else out).dtype)
    )
    before = {n: t.copy() for n, t in trainer.expert_state().items()}
    losses = [trainer.train_step() for _ in range(3)]
    hook.remove()
    assert torch.bfloat16 in seen  # the forward ran in bf16
    assert all(math.isfinite(x) for x in losses) and trainer.step == 3
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)  # master weights
    after = trainer.expert_state()
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[n], after[n]) for n in after)


def test_dtype_is_validated_and_falls_back() -> None:
    assert resolve_dtype("float16", "cpu") == torch.float32  # no fp16 training on CPU
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    bad: dict[str, Any] = {"clusters": [{"id": "c0"}], "model": {}, "data": {}, "training": {"dtype": "int8"}}
    with pytest.raises(ConfigError, match=r"training\.dtype"):
        load_settings(bad)
