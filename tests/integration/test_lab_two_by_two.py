"""Two clusters of two devices each (`testbed/topologies/two-by-two.yaml`), composed by the lab launcher.

Per cluster one gateway process talks to the satellite and three processes more train: the devices train on their
own shards, the gateway averages them each local round (weighted by examples) and uploads only the averages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emsfl.runtime.events import read_events
from testbed.broker import BrokerProcess
from testbed.lab import LabRun, run_lab
from tests.helpers import QUICK_TWO_BY_TWO, lab_options, topology_with, write_topology

pytestmark = pytest.mark.slow

TOPOLOGY = Path(__file__).resolve().parents[2] / "testbed" / "topologies" / "two-by-two.yaml"


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory, module_broker: BrokerProcess) -> LabRun:
    tmp = tmp_path_factory.mktemp("lab2x2")
    path = write_topology(tmp, topology_with(TOPOLOGY, QUICK_TWO_BY_TWO))
    return run_lab(lab_options(tmp, path, "it2x2", 50, broker=module_broker.address))


def test_gateways_average_their_devices_and_upload_the_averages(lab_run: LabRun) -> None:
    from satellite_node.export import commits

    committed = commits(lab_run.state_dir)
    assert {c["cluster"] for c in committed} == {"c0", "c1"}
    joined = [e["cluster"] for e in read_events(lab_run.state_dir / "events.jsonl") if e["event"] == "joined"]
    assert set(joined) == {"c0", "c1"}  # only the gateways talk to the satellite
    for cluster, workdir in lab_run.ground_dirs.items():
        events = read_events(workdir / "events.jsonl")
        rounds = [e for e in events if e["event"] == "round_closed"]
        assert rounds, f"{cluster}: the gateway closed no round"
        assert any(e["devices"] == ["d0", "d1"] for e in rounds), f"{cluster}: no round averaged both devices"
        averages = {e["content_hash"] for e in rounds}
        mine = {c["content_hash"] for c in committed if c["cluster"] == cluster}
        assert mine and mine <= averages, f"{cluster}: the satellite holds an update that is no gateway average"
        report = json.loads((workdir / "report.json").read_text(encoding="utf-8"))
        assert report["role"] == "gateway" and report["rounds"] >= 1 and report["uploads_acked"] >= 1
        assert set(report["devices"]) == {"d0", "d1"}
        for device in ("d0", "d1"):
            dev = json.loads((workdir / "devices" / device / "report.json").read_text(encoding="utf-8"))
            assert dev["role"] == "device" and dev["steps"] >= 10 and dev["rounds"] >= 1
            assert dev["bytes_to_gateway"] > 0 and dev["bytes_from_gateway"] > 0
        # the two devices trained on disjoint shards that cover the cluster's data
        sizes = [report["devices"][d]["num_examples"] for d in ("d0", "d1")]
        assert sum(sizes) == 600 and min(sizes) == 300


def test_summary_reports_devices(lab_run: LabRun) -> None:
    from testbed.outputs import write_outputs

    summary = write_outputs(lab_run)
    assert summary["uploads_outside_contact"] == 0
    for cluster in ("c0", "c1"):
        per = summary["per_cluster"][cluster]
        assert per["uploads_committed"] >= 1 and per["training_steps"] > 0
        assert set(per["devices"]) == {"d0", "d1"}
        assert all(d["steps"] > 0 and d["rounds"] >= 1 for d in per["devices"].values())
