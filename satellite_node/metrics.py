"""Prometheus metrics of the satellite node (ARCHITECTURE §8); `satellite run --metrics-port` serves them.

Each node has its own registry, so several in-process nodes (tests) never collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from satellite_node.strategy import Effect
from satellite_node.validate import Refusal


def refusal_reason(refusal: Refusal) -> str:
    """A bounded label for a refusal: its kind if it names one, else its status code."""
    return refusal.kind or refusal.code.name.lower()


class Metrics:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.uploads = Counter("emsfl_satellite_uploads_committed", "Updates committed", ["cluster"], registry=r)
        self.bytes = Counter("emsfl_satellite_bytes_received", "Bytes of chunks stored", ["cluster"], registry=r)
        self.chunks = Counter("emsfl_satellite_chunks_received", "Chunks stored", ["cluster"], registry=r)
        self.chunks_resent = Counter(
            "emsfl_satellite_chunks_resent", "Chunks received again after they were stored", ["cluster"], registry=r
        )
        self.refusals = Counter("emsfl_satellite_refusals", "Refused calls", ["code", "reason"], registry=r)
        self.expert_versions = Gauge(
            "emsfl_satellite_expert_version", "Newest version of each expert", ["layer", "expert"], registry=r
        )
        self.global_version = Gauge(
            "emsfl_satellite_global_version", "Global model version (fedavg/fedasync)", registry=r
        )
        self.assignment_version = Gauge("emsfl_satellite_assignment_version", "Assignment version", registry=r)
        self.staleness = Histogram(
            "emsfl_satellite_update_staleness",
            "Global versions between an update's base and the commit (fedasync)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.store_bytes = Gauge("emsfl_satellite_store_bytes", "Bytes of blobs and partial uploads", registry=r)
        self.uploads_in_flight = Gauge("emsfl_satellite_uploads_in_flight", "Offered, not yet committed", registry=r)

    def chunk_received(self, cluster: str, nbytes: int) -> None:
        self.chunks.labels(cluster).inc()
        self.bytes.labels(cluster).inc(nbytes)

    def committed(self, cluster: str, nbytes: int, staleness: int) -> None:
        self.uploads.labels(cluster).inc()
        self.staleness.observe(staleness)

    def refused(self, refusal: Refusal) -> None:
        self.refusals.labels(refusal.code.name, refusal_reason(refusal)).inc()

    def expert_version(self, layer: int, expert: int, version: int) -> None:
        self.expert_versions.labels(str(layer), str(expert)).set(version)

    def versions_made(self, effect: Effect) -> None:
        """The new versions of a commit or a round deadline."""
        for v in effect.versions:
            self.expert_version(v.key.layer, v.key.expert, v.version)
        if effect.global_version is not None:
            self.global_version.set(effect.global_version)

    def refresh_store(self, store: Any) -> None:
        """Gauges that come from the store (called periodically by `satellite run`)."""
        self.store_bytes.set(store.size_bytes())
        self.uploads_in_flight.set(store.uploads_in_flight())
        for key, row in store.newest_versions().items():
            self.expert_version(key.layer, key.expert, row.version)

    def serve(self, port: int, addr: str = "0.0.0.0") -> Any:
        """Serve `/metrics` on `port`; returns the server (it runs in a daemon thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value (0 when absent), for tests."""
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else float(value)
