"""Read the global model out of a state directory, also after the satellite process has stopped."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from satellite_node.manifest import load_base_tensors
from satellite_node.status import global_state
from satellite_node.store import Store


def global_tensors(state_dir: str | Path, base_dir: str | Path, at: datetime | None = None) -> dict[str, np.ndarray]:
    """Base tensors plus, for every expert, the parts of its newest version committed at or before emulated `at`.

    Uploaded LoRA parts appear under their own names (e.g. `expert/0/3/gate_up_proj.lora_A`); naive `at` is UTC.
    """
    with Store(state_dir, create=False) as store:
        return global_state(store, load_base_tensors(base_dir), _unix(at))


def committed_tensors(state_dir: str | Path, at: datetime | None = None) -> dict[str, np.ndarray]:
    """`global_tensors` without the base tensors: every expert's parts of its newest version committed at or before
    `at` (what an evaluation applies over a base it already holds)."""
    with Store(state_dir, create=False) as store:
        return global_state(store, {}, _unix(at))


def _unix(at: datetime | None) -> float | None:
    """Unix seconds of `at` (naive: UTC)."""
    if at is None:
        return None
    return (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()


def global_version_time(state_dir: str | Path, version: int) -> float | None:
    """When global version `version` was made (unix seconds, emulated), None if it never was."""
    with Store(state_dir, create=False) as store:
        return store.global_version_time(version)


def commits(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every committed upload in commit order: {cluster, content_hash, t (emulated ISO), bytes, experts}.

    `experts` is [[layer, expert, version], ...].
    """
    with Store(state_dir, create=False) as store:
        return store.commits()
