"""The model each cluster's board serves at the end of a run (ARCHITECTURE §8, `served_accuracy`).

EMS-FL: the cluster's sub-model, i.e. the base with its own experts at their newest version (the newest update it
staged, which is at least as new as the newest the satellite committed) and its routing restricted to them, as it
trained. FedAvg and FedAsync: the newest global version the cluster pulled and loaded (its `model_loaded` event),
rebuilt from the satellite's store as it stood when that version was made; version 0, or none loaded, is the base.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from emsfl.runtime.events import read_events
from ground_node.federation.outbox import Outbox
from ground_node.records import Assignment
from protos.wire import parse_expert_name


def staged_experts(workdir: Path) -> dict[str, np.ndarray] | None:
    """The newest update a cluster staged (its experts' parts), or None if it staged none."""
    if not (workdir / "outbox").is_dir():
        return None
    newest = Outbox(workdir / "outbox").newest()
    return None if newest is None else load_file(str(newest.path))


def held_of(tensors: dict[str, np.ndarray]) -> Assignment:
    """The experts an update holds, as an assignment (its parts name them)."""
    layers: dict[int, set[int]] = {}
    for name in tensors:
        parsed = parse_expert_name(name)
        if parsed is not None:
            layers.setdefault(parsed[0].layer, set()).add(parsed[0].expert)
    return Assignment.from_pairs(0, [(layer, sorted(experts)) for layer, experts in sorted(layers.items())])


def loaded_global_version(workdir: Path) -> int:
    """The newest global version a baseline cluster loaded (0: it never loaded one and serves the base)."""
    versions = [int(e["version"]) for e in read_events(workdir / "events.jsonl") if e.get("event") == "model_loaded"]
    return max(versions, default=0)


def served_model(
    strategy: str, workdir: Path, state_dir: Path
) -> tuple[dict[str, np.ndarray] | None, Assignment | None, dict[str, Any]]:
    """(tensors over the base, held experts or None for every expert, what was chosen) for one cluster."""
    from satellite_node.export import committed_tensors, global_version_time

    if strategy == "emsfl":
        staged = staged_experts(workdir)
        if staged is None:
            return None, None, {"model": "base", "reason": "no update staged"}
        return staged, held_of(staged), {"model": "own experts, newest staged update"}
    version = loaded_global_version(workdir)
    t_unix = global_version_time(state_dir, version) if version > 0 else None
    if t_unix is None:
        return None, None, {"model": "base", "global_version": 0}
    at = datetime.fromtimestamp(t_unix, tz=timezone.utc)
    return committed_tensors(state_dir, at=at), None, {"model": "pulled global", "global_version": version}
