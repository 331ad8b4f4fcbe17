"""Aggregation strategies: what an accepted update does to the global expert state (DESIGN §4.5).

The transport and the store call `Strategy.apply` with a validated update and persist whatever
versions it returns; a strategy never touches gRPC, MQTT or the disk itself. EMS-FL is implemented;
FedAvg (round buffer, weighted average) and FedAsync (staleness-weighted mixing) fit the same
interface through `StrategyContext.read_expert` / `put_tensors` for the tensors they derive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from protos.wire import ExpertKey


@dataclass(frozen=True)
class AcceptedUpdate:
    cluster: str
    content_hash: str  # the stored blob holding `tensors`
    tensors: Mapping[str, np.ndarray]
    experts: tuple[ExpertKey, ...]


@dataclass(frozen=True)
class NewVersion:
    """One new version of one expert; its parts are the `expert/<l>/<e>/*` tensors of blob `source_hash`."""

    key: ExpertKey
    version: int
    owner: str
    source_hash: str


class StrategyContext(Protocol):
    def current_version(self, key: ExpertKey) -> int:
        """0 while the expert is still the base one."""
        ...

    def read_expert(self, key: ExpertKey) -> dict[str, np.ndarray] | None:
        """Parts of the newest version (by full name), None while it is the base one."""
        ...

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        """Store derived tensors durably as a blob; returns its content hash."""
        ...


class Strategy(ABC):
    name: str = ""
    # EMS-FL: each cluster may upload only the experts it owns; FedAvg/FedAsync train the whole model.
    requires_ownership: bool = True

    @abstractmethod
    def apply(self, ctx: StrategyContext, update: AcceptedUpdate) -> list[NewVersion]:
        """The versions this update creates (possibly none, e.g. a FedAvg round still open)."""


class EmsflStrategy(Strategy):
    """Owners are unique, so the owner's newest upload simply replaces the expert; no averaging, no rounds."""

    name = "emsfl"
    requires_ownership = True

    def apply(self, ctx: StrategyContext, update: AcceptedUpdate) -> list[NewVersion]:
        return [
            NewVersion(key, ctx.current_version(key) + 1, update.cluster, update.content_hash)
            for key in sorted(update.experts, key=lambda k: (k.layer, k.expert))
        ]


STRATEGIES: dict[str, type[Strategy]] = {"emsfl": EmsflStrategy}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"strategy {name!r} is not available on the satellite node (have: {', '.join(STRATEGIES)})"
        ) from None
