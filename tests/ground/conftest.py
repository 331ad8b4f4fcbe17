"""Fixtures of the ground tests: a tiny topology and a cached, briefly warmed-up base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import tiny_model

TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "clusters": [
        {"id": "c0", "capacity_experts": 2},
        {"id": "c1", "capacity_experts": 2},
        {"id": "c2", "capacity_experts": 2},
    ],
    "model": tiny_model(),
    "data": {
        "task": "synthetic",
        "domains": ["copy", "reverse", "sort", "add"],
        "train_per_cluster": 200,
        "test_per_domain": 10,
        "dominant_share": 0.7,
    },
    "warmup": {"steps": 20, "lr": 0.003, "batch_size": 16},
    "training": {
        "tune": "lora",
        "split": "mask",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lr": 0.002,
        "batch_size": 8,
        "stage_every_steps": 5,
        "checkpoint_every_steps": 5,
        "profile_examples": 32,
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def topology() -> dict[str, Any]:
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ground_node.model.base import ensure_base

    torch.set_num_threads(1)
    return ensure_base(copy.deepcopy(TINY), tmp_path_factory.mktemp("cache"))
