"""What a strategy may read and write (`StrategyContext`), over the store, the base tensors and the topology."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from protos.wire import ExpertKey
from satellite_node.manifest import Manifest
from satellite_node.store import Store
from satellite_node.validate import parse_safetensors


class NodeContext:
    """`StrategyContext` / `AggregationContext` over the store, the base tensors and the topology."""

    def __init__(
        self,
        store: Store,
        manifest: Manifest,
        base_tensors: Callable[[], Mapping[str, np.ndarray]],
        clusters: Sequence[str],
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.base_tensors = base_tensors  # loaded on first use: a strategy that never needs them never pays
        self.cluster_ids = list(clusters)

    def current_version(self, key: ExpertKey) -> int:
        return self.store.current_version(key)

    def read_expert(self, key: ExpertKey) -> dict[str, np.ndarray] | None:
        return self.store.read_expert(key)

    def put_tensors(self, tensors: Mapping[str, np.ndarray]) -> str:
        return self.store.put_tensors(tensors)

    def global_version(self) -> int:
        return self.store.global_version()

    def round_uploads(self, round_: int) -> list[tuple[str, str, float]]:
        return [(r.cluster, r.content_hash, r.weight) for r in self.store.round_uploads(round_)]

    def read_tensors(self, content_hash: str) -> Mapping[str, np.ndarray]:
        return parse_safetensors(self.store.map_blob(content_hash))

    def base_expert(self, key: ExpertKey) -> dict[str, np.ndarray]:
        prefix = f"expert/{key.layer}/{key.expert}/"
        return {n: a for n, a in self.base_tensors().items() if n.startswith(prefix)}

    def cluster_weight(self, cluster: str) -> float:
        row = self.store.clusters().get(cluster)
        return float(row.num_examples) if row is not None else 0.0

    def round_opened(self, round_: int) -> float | None:
        if round_ == 0:
            value = self.store.get_meta("round0_opened")
            return None if value is None else float(value)
        return self.store.global_version_time(round_)

    def all_experts(self) -> list[ExpertKey]:
        m = self.manifest
        return [ExpertKey(layer, e) for layer in range(m.num_layers) for e in range(m.num_experts)]

    def clusters(self) -> list[str]:
        return list(self.cluster_ids)
