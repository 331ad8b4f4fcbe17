"""A short version of benchmarks/bench_satellite_load.py: many clusters upload at once to a real satellite process;
no call fails, every acknowledged upload is on record, and retention keeps the newest N versions per expert."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from satellite_node import export
from satellite_node.loadgen import cluster_ids, experts_per_layer, run_clients, setup_clusters, topology_yaml
from satellite_node.store import DB_FILE, Store
from satellite_node.testing import OrbitStub, SatelliteProcess, write_tiny_base
from testbed.broker import BrokerProcess, free_port

pytestmark = pytest.mark.slow

CLUSTERS, LAYERS, KEEP = 20, 4, 2


def test_many_clusters_upload_at_once(tmp_path: Path, broker: BrokerProcess) -> None:
    base = write_tiny_base(tmp_path / "base", num_layers=LAYERS, num_experts=experts_per_layer(CLUSTERS, LAYERS))
    orbit = OrbitStub(broker.host, broker.port).start()
    sat = SatelliteProcess(
        tmp_path, (broker.host, broker.port), topology_yaml(CLUSTERS, KEEP), free_port(), ["--insecure"], base
    )
    try:
        for c in cluster_ids(CLUSTERS):
            orbit.set_link(c, True)
        sat.start()
        deadline = time.monotonic() + 20
        while True:  # the node may see the retained link states a moment after it listens
            try:
                owned = setup_clusters(sat.target, CLUSTERS, LAYERS)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert all(len(experts) == 1 for experts in owned.values())
        assert len({e[0] for e in owned.values()}) == CLUSTERS  # one expert each, no two alike
        record = run_clients(sat.target, base, owned, time.time(), 3.0)
        assert record.errors == 0, record.error_samples
        assert len(record.committed) >= CLUSTERS
        on_record = {c["content_hash"] for c in export.commits(sat.state)}
        assert set(record.committed) <= on_record
        sat.stop()
        with Store(sat.state, create=False, keep_versions=KEEP) as store:
            store.check_integrity()
            assert len(store.newest_versions()) == CLUSTERS
        with sqlite3.connect(sat.state / DB_FILE) as db:
            counts = [n for (n,) in db.execute("SELECT COUNT(*) FROM expert_versions GROUP BY layer, expert")]
        assert len(counts) == CLUSTERS and max(counts) <= KEEP
    finally:
        sat.kill()
        orbit.stop()
