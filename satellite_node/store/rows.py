"""The rows of the satellite state, as the store hands them out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ClusterRow:
    id: str
    device_id: str
    capacity: int
    num_examples: int


@dataclass(frozen=True)
class AffinityRow:
    cluster: str
    num_tokens: int
    num_layers: int
    num_experts: int
    gate: np.ndarray | None  # L x E float32
    freq: np.ndarray | None


@dataclass(frozen=True)
class UploadRow:
    content_hash: str
    cluster: str
    size: int
    chunk_size: int
    chunk_hashes: tuple[str, ...]
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) as offered
    assignment_version: int
    local_step: int
    base_version: int = 0


@dataclass(frozen=True)
class RoundUpload:
    """A committed FedAvg upload waiting in its round's buffer."""

    round: int
    cluster: str
    content_hash: str
    weight: float


@dataclass(frozen=True)
class AssignmentRecord:
    version: int
    t: str | None
    reason: str
    requested_by: str


@dataclass(frozen=True)
class ExpertVersionRow:
    layer: int
    expert: int
    version: int
    owner: str
    source_hash: str
    commit_hash: str
    t: str
    t_unix: float


def version_row(r: tuple[Any, ...]) -> ExpertVersionRow:
    return ExpertVersionRow(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], r[5], r[6], float(r[7]))
