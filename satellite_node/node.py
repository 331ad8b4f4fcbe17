"""The satellite node, free of gRPC and MQTT: a thin facade over admission (identity, the link gate, pacing;
`admission.py`), the federation's bookkeeping (joins, affinities, the assignment, pulls, status) and the upload
service (`uploads.py`), built with the strategy the topology names (the node itself never names one).

The server (server.py) turns protos into these calls, and an upload into `Uploads.offer`/`Uploads.push` once
`admit` let the call in; `Refusal`s become status codes there. The link state comes in through the `LinkState`
protocol (emsfl/runtime/linkstate.py: a `LinkView` in production, a fake in tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from emsfl.runtime.events import NOW, EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import to_iso
from protos.wire import CHUNK_SIZE, ExpertKey, sha256_hex, split_chunks
from satellite_node.admission import Pacer, gate
from satellite_node.assignment import AFFINITY_KINDS, owners, solve_assignment
from satellite_node.context import NodeContext
from satellite_node.manifest import Manifest, load_base_tensors
from satellite_node.metrics import Metrics
from satellite_node.status import global_state, status_dict
from satellite_node.store import AffinityRow, ClusterRow, ExpertVersionRow, Store
from satellite_node.strategy import DEFAULT_STRATEGY, Strategy, make_strategy
from satellite_node.uploads import Uploads
from satellite_node.validate import Refusal, RefusalCode, invalid


@dataclass(frozen=True)
class PullBlob:
    content_hash: str
    size: int
    chunks: list[memoryview]


@dataclass(frozen=True)
class NodeConfig:
    clusters: Mapping[str, int | None]  # topology cluster id -> its configured capacity_experts (None: not given)
    strategy: str = DEFAULT_STRATEGY
    affinity: str = "gate"
    max_update_bytes: int = 4 << 30
    strategy_options: Mapping[str, Any] = field(default_factory=dict)  # satellite.<strategy> of the topology
    pace: bool = True  # satellite.pace: transfers paced to the link budget (ARCHITECTURE §5.4)


class SatelliteNode:
    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        base_dir: str,
        config: NodeConfig,
        links: LinkState,
        events: EventLog | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if config.affinity not in AFFINITY_KINDS:
            raise ValueError(f"affinity kind must be one of {AFFINITY_KINDS}, got {config.affinity!r}")
        self.store = store
        self.manifest = manifest
        self.base_dir = base_dir
        self.config = config
        self.links = links
        self.events = events
        self.metrics = metrics or Metrics(enabled=False)
        self.strategy: Strategy = make_strategy(config.strategy, config.strategy_options)
        self.pacer = Pacer(links, config.pace)
        self._ctx = NodeContext(store, manifest, self.base_tensors, list(config.clusters))
        # Serialises every state change (joins, assignment, offers, commits); chunk writes run outside it.
        self._lock = threading.RLock()
        self._base: dict[str, np.ndarray] | None = None
        self._pull_cache: tuple[tuple[Any, ...], PullBlob] | None = None
        self.uploads = Uploads(
            store,
            manifest,
            self.strategy,
            self._ctx,
            links,
            self.pacer,
            self._lock,
            config.max_update_bytes,
            self.metrics,
            events,
        )
        self._maybe_solve()

    def _maybe_solve(self) -> None:
        """Solve version 1 once every topology cluster has joined and reported (also after a crash in between)."""
        if self.store.assignment_version() != 0:
            return
        reported = self.store.affinities()
        if set(self.config.clusters) <= set(reported) and set(self.config.clusters) <= set(self.store.clusters()):
            self._solve(reported)

    def tick(self) -> None:
        """Time-driven work: open FedAvg round 0 once a clock is known; close a round whose deadline passed."""
        now = self.links.emulated_now()
        if now is None or not self.strategy.clocked:
            return
        with self._lock:
            if self.store.get_meta("round0_opened") is None:
                self.store.set_meta("round0_opened", now.timestamp())
            effect = self.strategy.tick(self._ctx, now.timestamp())
            if effect is None or effect.global_version is None:
                return
            self.store.record_derived(
                effect.versions, effect.global_version, effect.cause, to_iso(now), now.timestamp(), time.time()
            )
            self._pull_cache = None
        self.metrics.versions_made(effect)
        self._emit("round_closed", version=effect.global_version, cause=effect.cause, at="deadline")

    def _emit(self, event: str, t: datetime | object = NOW, **fields: Any) -> None:
        """`t`: the event's emulated time (default: the log's clock now)."""
        if self.events is not None:
            self.events.emit(event, t, **fields)

    # identity and the link gate

    def admit(self, cluster: str | None) -> str:
        """The caller's cluster if it may be served now, else a Refusal (no state change)."""
        return self.admit_at(cluster)[0]

    def admit_at(self, cluster: str | None) -> tuple[str, datetime | None]:
        """`admit`, and the emulated instant the link gate admitted the call at."""
        if not cluster:
            raise Refusal(RefusalCode.UNAUTHENTICATED, "no cluster identity on the call")
        if cluster not in self.config.clusters:
            raise Refusal(RefusalCode.PERMISSION_DENIED, f"cluster {cluster!r} is not in the topology")
        now = gate(self.links, cluster)
        self.tick()
        return cluster, now

    def refused(self, cluster: str | None, refusal: Refusal) -> None:
        self.metrics.refused(refusal)
        self._emit("refused", cluster=cluster, code=refusal.code.name, reason=refusal.message)

    # join, affinity, assignment

    def join(self, cluster: str, device_id: str, capacity: int, num_examples: int, at: datetime | None = None) -> None:
        """`at`: the instant the call was admitted at (`admit_at`), recorded as the join's time; default now."""
        if capacity < 0:
            raise invalid(f"capacity_experts must be >= 0, got {capacity}")
        if capacity == 0:  # proto3 default: fall back to the topology's value
            configured = self.config.clusters.get(cluster)
            if configured is None:
                raise invalid("capacity_experts missing and the topology gives none for this cluster")
            capacity = configured
        if num_examples < 0:
            raise invalid(f"num_examples must be >= 0, got {num_examples}")
        with self._lock:
            now = at or self.links.emulated_now()
            self.store.upsert_cluster(
                ClusterRow(cluster, device_id, capacity, num_examples),
                None if now is None else to_iso(now),
                time.time(),
            )
        self._emit("joined", now or NOW, cluster=cluster)

    def _matrix(self, name: str, values: Iterable[float]) -> np.ndarray | None:
        array = np.asarray(list(values), dtype=np.float64)
        if array.size == 0:
            return None
        shape = (self.manifest.num_layers, self.manifest.num_experts)
        if array.size != shape[0] * shape[1]:
            raise invalid(f"{name}: {array.size} values, expected num_layers x num_experts = {shape[0] * shape[1]}")
        if not np.isfinite(array).all():
            raise invalid(f"{name}: contains NaN or Inf")
        if (array < 0).any():
            raise invalid(f"{name}: contains negative values")
        return array.reshape(shape)

    def report_affinity(
        self,
        cluster: str,
        num_tokens: int,
        num_layers: int,
        num_experts: int,
        gate: Iterable[float],
        freq: Iterable[float],
        at: datetime | None = None,
    ) -> tuple[int, int]:
        """Store a cluster's affinity; solves assignment version 1 once every cluster has reported. `at`: as in
        `join`."""
        m = self.manifest
        if (num_layers, num_experts) != (m.num_layers, m.num_experts):
            raise invalid(f"affinity is {num_layers}x{num_experts}, the model has {m.num_layers}x{m.num_experts}")
        if num_tokens < 0:
            raise invalid(f"num_tokens must be >= 0, got {num_tokens}")
        gate_m, freq_m = self._matrix("gate", gate), self._matrix("freq", freq)
        if (gate_m if self.config.affinity == "gate" else freq_m) is None:
            raise invalid(
                f"{self.config.affinity}: required (the satellite assigns by {self.config.affinity} affinity)"
            )
        with self._lock:
            if cluster not in self.store.clusters():
                raise Refusal(RefusalCode.FAILED_PRECONDITION, "join before reporting affinity")
            now = at or self.links.emulated_now()
            self.store.put_affinity(
                AffinityRow(cluster, num_tokens, m.num_layers, m.num_experts, gate_m, freq_m),
                None if now is None else to_iso(now),
                time.time(),
            )
            self._emit("affinity", now or NOW, cluster=cluster)
            self._maybe_solve()
            reported = set(self.store.affinities()) & set(self.config.clusters)
            return len(reported), len(self.config.clusters)

    def _solve(self, reported: Mapping[str, AffinityRow], reason: str = "initial", requested_by: str = "") -> int:
        joined = self.store.clusters()
        matrices: dict[str, np.ndarray] = {}
        for c in self.config.clusters:
            row = reported[c]
            matrix = row.gate if self.config.affinity == "gate" else row.freq
            assert matrix is not None  # checked when the report came in
            matrices[c] = matrix
        result = solve_assignment(
            matrices, {c: joined[c].capacity for c in matrices}, {c: joined[c].num_examples for c in matrices}
        )
        version = self.store.assignment_version() + 1
        now = self.links.emulated_now()
        self.store.record_assignment(
            version,
            self.config.affinity,
            owners(result),
            None if now is None else to_iso(now),
            time.time(),
            reason,
            requested_by,
        )
        experts = {c: [[layer, es] for layer, es in enumerate(layers)] for c, layers in result.items()}
        self.metrics.assignment_version.set(version)
        self._emit("assignment", version=version, experts=experts, reason=reason, requested_by=requested_by)
        return version

    def reassign(self, cluster: str, reason: str) -> tuple[int, list[ExpertVersionRow]]:
        """Solve a new assignment version from the newest affinities (on a cluster's request).

        Returns the new version and the experts `cluster` gained from another owner, each with its newest version
        (the hand-over: the new owner pulls those parameters and continues from them, never from the base)."""
        if not self.strategy.requires_ownership:
            raise Refusal(
                RefusalCode.FAILED_PRECONDITION,
                f"strategy {self.strategy.name} trains the whole model: there is no assignment to change",
            )
        if len(reason) > 500:
            raise invalid("reason: at most 500 characters")
        with self._lock:
            reported = self.store.affinities()
            if self.store.assignment_version() == 0 or not set(self.config.clusters) <= set(reported):
                raise Refusal(RefusalCode.FAILED_PRECONDITION, "no assignment yet: every cluster must report first")
            version = self._solve(reported, reason or "requested", cluster)
            return version, self.handed_over(cluster, version)

    def handed_over(self, cluster: str, version: int) -> list[ExpertVersionRow]:
        """Experts `cluster` owns under `version` but another cluster owned under `version - 1`, with their newest
        committed version (experts still at the base version are not listed: there is nothing to hand over)."""
        now_owners = self.store.owners(version) or {}
        before = self.store.owners(version - 1) or {}
        newest = self.store.newest_versions()
        out: list[ExpertVersionRow] = []
        for (layer, expert), owner in sorted(now_owners.items()):
            if owner == cluster and before.get((layer, expert)) not in (None, cluster):
                row = newest.get(ExpertKey(layer, expert))
                if row is not None:
                    out.append(row)
        return out

    def assignment_for(self, cluster: str) -> tuple[bool, int, list[list[int]]]:
        """(ready, version, experts per layer) of the caller."""
        version = self.store.assignment_version()
        table = self.store.owners(version)
        layers: list[list[int]] = [[] for _ in range(self.manifest.num_layers)]
        if table is None:
            return False, 0, layers
        for (layer, expert), owner in sorted(table.items()):
            if owner == cluster:
                layers[layer].append(expert)
        return True, version, layers

    # pulls and status

    def base_tensors(self) -> dict[str, np.ndarray]:
        if self._base is None:
            self._base = load_base_tensors(self.base_dir)
        return self._base

    def pull(self, names: Iterable[str], chunk_size: int = CHUNK_SIZE) -> PullBlob:
        """The requested global tensors as one deterministic safetensors blob, split into chunks."""
        wanted = tuple(sorted(set(names)))
        key = (wanted, self.store.generation(), self.uploads.commits, chunk_size)
        cached = self._pull_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        tensors = global_state(self.store, self.base_tensors())
        selected: dict[str, np.ndarray] = {}
        for name in wanted or ("",):
            if name.endswith("/") or name == "":
                hits = {n: a for n, a in tensors.items() if n.startswith(name)}
                if not hits:
                    raise invalid(f"names: no tensor under prefix {name!r}")
                selected.update(hits)
            elif name in tensors:
                selected[name] = tensors[name]
            else:
                raise invalid(f"names: unknown tensor {name!r}")
        blob = st_save({n: np.ascontiguousarray(selected[n]) for n in sorted(selected)})
        result = PullBlob(sha256_hex(blob), len(blob), split_chunks(blob, chunk_size))
        self._pull_cache = (key, result)
        return result

    def status(self, at: datetime | None = None) -> dict[str, Any]:
        """`at`: the emulated time the reply reports (the instant a call was admitted at); default now."""
        return status_dict(self.store, self.strategy, self.config.clusters, self.links, at)

    def global_version(self) -> int:
        """What a client must pull (the strategy says what counts as a new global model)."""
        return self.strategy.global_version(self.store.commit_count(), self.store.global_version())
