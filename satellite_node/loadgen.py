"""A load of many clusters against one satellite node (benchmarks/bench_satellite_load.py and its smoke test).

Each cluster owns one expert (cluster i: layer i // E, expert i % E, by its affinity) and uploads small fresh
updates of it back to back over its own gRPC channel (asyncio, so that hundreds of clusters fit in one process),
recording each upload's latency from OfferUpdate to the commit acknowledgement.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from emsfl.runtime.channel import open_aio_channel
from emsfl.runtime.client import offer_message, tensor_specs
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import CLUSTER_METADATA_KEY, chunk_messages, expert_name
from satellite_node.testing import Client, encode

CHUNK_BYTES = 4096  # small updates still travel as several chunks
MAX_ERRORS_KEPT = 20


def cluster_ids(count: int) -> list[str]:
    return [f"c{i:03d}" for i in range(count)]


def experts_per_layer(clusters: int, layers: int) -> int:
    return -(-clusters // layers)


def topology_yaml(clusters: int, keep_versions: int) -> str:
    lines = ["strategy: emsfl", f"satellite: {{keep_versions: {keep_versions}}}", "clusters:"]
    lines += [f"  - {{id: {c}, capacity_experts: 1}}" for c in cluster_ids(clusters)]
    return "\n".join(lines) + "\n"


def setup_clusters(target: str, clusters: int, layers: int) -> dict[str, list[tuple[int, int]]]:
    """Join every cluster, report affinities that make cluster i prefer expert (i // E, i % E), and return each
    cluster's experts from the solved assignment."""
    experts = experts_per_layer(clusters, layers)
    ids = cluster_ids(clusters)
    for i, cluster in enumerate(ids):
        gate = np.full((layers, experts), 0.01, dtype=np.float32)
        gate[i // experts, i % experts] = 1.0
        client = Client(target, cluster)
        try:
            client.join(1, 100)
            client.report(gate)
        finally:
            client.close()
    owned: dict[str, list[tuple[int, int]]] = {}
    for cluster in ids:
        client = Client(target, cluster)
        try:
            reply = client.assignment()
        finally:
            client.close()
        if not reply.ready:
            raise RuntimeError(f"{cluster}: no assignment after every cluster reported")
        owned[cluster] = [(layer.layer, e) for layer in reply.layers for e in layer.experts]
    return owned


@dataclass
class LoadRecord:
    latencies_s: list[float] = field(default_factory=list)  # OfferUpdate sent -> commit acknowledged
    committed: list[str] = field(default_factory=list)  # content hashes acknowledged
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def merge(self, other: LoadRecord) -> None:
        self.latencies_s += other.latencies_s
        self.committed += other.committed
        self.errors += other.errors
        self.error_samples += other.error_samples[: MAX_ERRORS_KEPT - len(self.error_samples)]


def _update(parts: list[dict[str, Any]], experts: list[tuple[int, int]], rng: np.random.Generator) -> Any:
    tensors = {
        expert_name(layer, e, p["name"]): rng.standard_normal(p["shape"]).astype(np.float32)
        for layer, e in experts
        for p in parts
    }
    blob = encode(tensors)
    return blob, offer_message(blob, tensor_specs(tensors), 1, CHUNK_BYTES)


async def _cluster(
    target: str, cluster: str, experts: list[tuple[int, int]], parts: list[dict[str, Any]], until: float
) -> LoadRecord:
    record = LoadRecord()
    rng = np.random.default_rng(int(cluster.lstrip("c")))
    md = ((CLUSTER_METADATA_KEY, cluster),)
    async with open_aio_channel(target, None) as channel:  # the shared caps and keepalive (emsfl/runtime/channel.py)
        stub = pb_grpc.FederationStub(channel)
        while time.time() < until:
            blob, offer = _update(parts, experts, rng)
            started = time.perf_counter()
            try:
                reply = await stub.OfferUpdate(offer, metadata=md, timeout=120)
                if not reply.committed:
                    chunks = chunk_messages(blob, reply.missing, CHUNK_BYTES, hashes=offer.chunk_hashes)
                    pushed = await stub.PushChunks(chunks, metadata=md, timeout=120)
                    if not pushed.committed:
                        raise RuntimeError(f"not committed, missing {list(pushed.missing)[:5]}")
            except (grpc.RpcError, RuntimeError) as exc:
                record.errors += 1
                if len(record.error_samples) < MAX_ERRORS_KEPT:
                    record.error_samples.append(f"{cluster}: {exc}")
                continue
            record.latencies_s.append(time.perf_counter() - started)
            record.committed.append(offer.content_hash)
    return record


async def _all(target: str, owned: dict[str, list[tuple[int, int]]], parts: list[dict[str, Any]], until: float) -> Any:
    return await asyncio.gather(*(_cluster(target, c, experts, parts, until) for c, experts in owned.items()))


def run_clients(
    target: str, base_dir: str | Path, owned: dict[str, list[tuple[int, int]]], start_wall: float, duration_s: float
) -> LoadRecord:
    """Upload for every cluster in `owned`, from `start_wall` (Unix time) for `duration_s`; one event loop."""
    parts = json.loads((Path(base_dir) / "manifest.json").read_text(encoding="utf-8"))["expert_parts"]
    time.sleep(max(0.0, start_wall - time.time()))
    total = LoadRecord()
    for record in asyncio.run(_all(target, owned, parts, start_wall + duration_s)):
        total.merge(record)
    return total


def record_to_json(record: LoadRecord) -> str:
    return json.dumps(asdict(record))


def record_from_json(text: str) -> LoadRecord:
    return LoadRecord(**json.loads(text))
