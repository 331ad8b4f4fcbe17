"""Aggregation strategies: what an accepted update does to the global expert state (ARCHITECTURE §4.5).

One interface, chosen by the topology's `strategy`:
- `emsfl`: owners are unique; the owner's newest upload replaces each of its experts (no rounds, no averaging).
- `fedavg`: synchronous rounds over the whole model; a round closes when every cluster uploaded for it, or when a
  quorum did and the round deadline (emulated seconds) has passed; the example-weighted average becomes the next
  global version, which every expert takes as its new version.
- `fedasync`: each upload is mixed in at once, x <- (1 - a_s) x + a_s x_c with a_s = alpha / (1 + staleness)^b,
  staleness = global version now - global version the update was trained from.

A strategy never touches gRPC, MQTT or the disk itself: it reads through `StrategyContext` and returns an `Effect`
that the node persists in one transaction with the commit. docs/STRATEGIES.md documents the client protocol.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from protos.wire import ExpertKey
from satellite_node.validate import Refusal, RefusalCode


@dataclass(frozen=True)
class AcceptedUpdate:
    cluster: str
    content_hash: str  # the stored blob holding `tensors`
    tensors: Mapping[str, np.ndarray]
    experts: tuple[ExpertKey, ...]
    base_version: int = 0  # fedavg: the round; fedasync: the global version trained from
    now_unix: float = 0.0  # emulated time of the commit


@dataclass(frozen=True)
class NewVersion:
    """One new version of one expert; its parts are the `expert/<l>/<e>/*` tensors of blob `source_hash`."""

    key: ExpertKey
    version: int
    owner: str
    source_hash: str


@dataclass(frozen=True)
class RoundEntry:
    round: int
    weight: float


@dataclass(frozen=True)
class Effect:
    """What a commit (or a deadline) changes; persisted atomically with the commit."""

    versions: list[NewVersion] = field(default_factory=list)
    round_entry: RoundEntry | None = None  # fedavg: the upload joins this round's buffer
    global_version: int | None = None  # a new global version was made
    cause: str = ""
    staleness: int = 0


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


class AggregationContext(StrategyContext, Protocol):
    """What FedAvg and FedAsync read besides expert versions."""

    def global_version(self) -> int: ...
    def round_uploads(self, round_: int) -> list[tuple[str, str, float]]:
        """(cluster, content_hash, weight) of the committed uploads of a round."""
        ...

    def read_tensors(self, content_hash: str) -> Mapping[str, np.ndarray]: ...
    def base_expert(self, key: ExpertKey) -> dict[str, np.ndarray]:
        """The base tensors of an expert's parts (empty where the base has none, e.g. LoRA factors)."""
        ...

    def cluster_weight(self, cluster: str) -> float: ...
    def round_opened(self, round_: int) -> float | None:
        """Emulated Unix time a round opened, None if not known yet."""
        ...

    def all_experts(self) -> list[ExpertKey]: ...
    def clusters(self) -> Sequence[str]: ...


def _stale(message: str) -> Refusal:
    return Refusal(RefusalCode.FAILED_PRECONDITION, message)


class Strategy(ABC):
    name: str = ""
    # EMS-FL: each cluster may upload only the experts it owns; FedAvg/FedAsync train the whole model.
    requires_ownership: bool = True
    whole_model: bool = False
    clocked: bool = True  # time alone may change the global model (round deadlines): the node ticks it
    has_rounds: bool = False  # status lists which clusters uploaded the open round

    def global_version(self, commits: int, aggregated: int) -> int:
        """What a client must pull: by default the newest aggregated model (`aggregated` global versions)."""
        return aggregated

    def check_base(self, ctx: Any, cluster: str, base_version: int) -> None:
        """Refuse (FAILED_PRECONDITION) an update trained from a version this strategy cannot take."""
        return None

    @abstractmethod
    def apply(self, ctx: Any, update: AcceptedUpdate) -> Effect:
        """The effect of a validated, durably stored update (possibly no version, e.g. a FedAvg round still open)."""

    def tick(self, ctx: Any, now_unix: float) -> Effect | None:
        """Changes driven by time alone (a FedAvg round deadline); None when nothing changes."""
        return None


class EmsflStrategy(Strategy):
    """Owners are unique, so the owner's newest upload simply replaces the expert; no averaging, no rounds."""

    name = "emsfl"
    requires_ownership = True
    clocked = False

    def global_version(self, commits: int, aggregated: int) -> int:
        """Every expert carries its own version: a client's view changes with every commit."""
        return commits

    def apply(self, ctx: Any, update: AcceptedUpdate) -> Effect:
        return Effect(
            versions=[
                NewVersion(key, ctx.current_version(key) + 1, update.cluster, update.content_hash)
                for key in sorted(update.experts, key=lambda k: (k.layer, k.expert))
            ]
        )


def _weighted_mean(parts: Sequence[tuple[float, Mapping[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    total = sum(w for w, _ in parts)
    weights = [w / total for w, _ in parts] if total > 0 else [1.0 / len(parts)] * len(parts)
    out: dict[str, np.ndarray] = {}
    for name in sorted(parts[0][1]):
        acc = np.zeros(parts[0][1][name].shape, dtype=np.float64)
        for w, (_, tensors) in zip(weights, parts, strict=True):
            acc += w * np.asarray(tensors[name], dtype=np.float64)
        out[name] = acc.astype(parts[0][1][name].dtype)
    return out


class FedAvgStrategy(Strategy):
    """Synchronous rounds; round r trains from global version r and its average becomes global version r + 1."""

    name = "fedavg"
    has_rounds = True
    requires_ownership = False
    whole_model = True

    def __init__(self, quorum: int | None = None, round_deadline_s: float | None = None) -> None:
        if quorum is not None and quorum < 1:
            raise ValueError(f"satellite.fedavg.quorum must be >= 1, got {quorum}")
        if round_deadline_s is not None and round_deadline_s < 0:
            raise ValueError(f"satellite.fedavg.round_deadline_s must be >= 0, got {round_deadline_s}")
        self.quorum = quorum
        self.round_deadline_s = round_deadline_s

    def check_base(self, ctx: Any, cluster: str, base_version: int) -> None:
        current = ctx.global_version()
        if base_version != current:
            raise _stale(
                f"update trained for round {base_version}, the open round is {current}"
                + (f": pull global version {current} and train for round {current}" if base_version < current else "")
            )
        if any(c == cluster for c, _, _ in ctx.round_uploads(current)):
            raise _stale(f"cluster {cluster!r} already uploaded for round {current}; wait for round {current + 1}")

    def _may_close(self, ctx: Any, uploaded: set[str], now_unix: float) -> bool:
        if set(ctx.clusters()) <= uploaded:
            return True
        if self.quorum is None or self.round_deadline_s is None or len(uploaded) < self.quorum:
            return False
        opened = ctx.round_opened(ctx.global_version())
        return opened is not None and now_unix - opened >= self.round_deadline_s

    def _close(
        self, ctx: Any, entries: list[tuple[float, Mapping[str, np.ndarray]]], round_: int, cause: str
    ) -> Effect:
        average = _weighted_mean(entries)
        source = ctx.put_tensors(average)
        versions = [NewVersion(key, round_ + 1, "fedavg", source) for key in ctx.all_experts()]
        return Effect(versions=versions, global_version=round_ + 1, cause=cause)

    def apply(self, ctx: Any, update: AcceptedUpdate) -> Effect:
        self.check_base(ctx, update.cluster, update.base_version)
        round_ = update.base_version
        weight = float(ctx.cluster_weight(update.cluster))
        entry = RoundEntry(round_, weight)
        buffered = ctx.round_uploads(round_)
        uploaded = {c for c, _, _ in buffered} | {update.cluster}
        if not self._may_close(ctx, uploaded, update.now_unix):
            return Effect(round_entry=entry)
        entries = [(w, ctx.read_tensors(h)) for _, h, w in buffered] + [(weight, update.tensors)]
        closed = self._close(ctx, entries, round_, f"round:{round_}")
        return Effect(closed.versions, entry, closed.global_version, closed.cause)

    def tick(self, ctx: Any, now_unix: float) -> Effect | None:
        round_ = ctx.global_version()
        buffered = ctx.round_uploads(round_)
        if not buffered or not self._may_close(ctx, {c for c, _, _ in buffered}, now_unix):
            return None
        entries = [(w, ctx.read_tensors(h)) for _, h, w in buffered]
        return self._close(ctx, entries, round_, f"round:{round_}")


class FedAsyncStrategy(Strategy):
    """x <- (1 - a_s) x + a_s x_c per expert, a_s = alpha / (1 + staleness)^b; every upload makes a global version."""

    name = "fedasync"
    requires_ownership = False
    whole_model = True

    def __init__(self, alpha: float = 0.5, b: float = 0.5) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"satellite.fedasync.alpha must be in (0, 1], got {alpha}")
        if b < 0:
            raise ValueError(f"satellite.fedasync.b must be >= 0, got {b}")
        self.alpha = alpha
        self.b = b

    def mixing_weight(self, staleness: int) -> float:
        return float(self.alpha / (1.0 + staleness) ** self.b)

    def check_base(self, ctx: Any, cluster: str, base_version: int) -> None:
        current = ctx.global_version()
        if not 0 <= base_version <= current:
            raise _stale(f"update trained from global version {base_version}, the newest is {current}")

    def apply(self, ctx: Any, update: AcceptedUpdate) -> Effect:
        self.check_base(ctx, update.cluster, update.base_version)
        current = ctx.global_version()
        staleness = current - update.base_version
        a_s = self.mixing_weight(staleness)
        mixed: dict[str, np.ndarray] = {}
        for key in sorted(update.experts, key=lambda k: (k.layer, k.expert)):
            have = ctx.read_expert(key) or {}
            base = ctx.base_expert(key)
            prefix = f"expert/{key.layer}/{key.expert}/"
            for name, x_c in update.tensors.items():
                if not name.startswith(prefix):
                    continue
                # No global value yet (LoRA factors are not in the base): the first upload initialises it.
                x = have.get(name, base.get(name, x_c))
                new = (1.0 - a_s) * np.asarray(x, np.float64) + a_s * np.asarray(x_c, np.float64)
                mixed[name] = new.astype(x_c.dtype)
        source = ctx.put_tensors(mixed)
        versions = [
            NewVersion(key, current + 1, update.cluster, source)
            for key in sorted(update.experts, key=lambda k: (k.layer, k.expert))
        ]
        return Effect(versions=versions, global_version=current + 1, cause=f"mix:{staleness}", staleness=staleness)


DEFAULT_STRATEGY = "emsfl"  # when the topology names none

STRATEGIES: dict[str, type[Strategy]] = {
    "emsfl": EmsflStrategy,
    "fedavg": FedAvgStrategy,
    "fedasync": FedAsyncStrategy,
}


def make_strategy(name: str, options: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy `name` with its options (`satellite.<name>` of the topology)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"strategy {name!r} is not available on the satellite node (have: {', '.join(STRATEGIES)})"
        ) from None
    return cls(**dict(options or {}))
