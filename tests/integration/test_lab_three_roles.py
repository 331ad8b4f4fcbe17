"""The three roles as separate OS processes against a real Mosquitto, composed by the lab launcher.

Checks the foundation's promises: no call of a cluster succeeds while its link is down, every committed
expert belongs to its uploader, and the satellite's global model equals the newest accepted uploads.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from emsfl.runtime.client import FederationClient
from emsfl.runtime.events import read_events
from emsfl.runtime.timefmt import parse_iso
from protos import wire
from testbed.broker import BrokerProcess, free_port
from testbed.lab import DEFAULT_TOPOLOGY, LabRun, run_lab
from testbed.report import in_contact, windows_by_cluster
from tests.helpers import lab_options, topology_with, write_topology

pytestmark = pytest.mark.slow


class StatusProbe(threading.Thread):
    """Calls GetStatus as cluster `cluster` twice a second for the whole run, recording outcomes."""

    def __init__(self, address: str, cluster: str) -> None:
        super().__init__(daemon=True)
        self.client = FederationClient(address, cluster, timeout_s=2)
        self.outcomes: list[tuple[datetime | None, grpc.StatusCode]] = []  # (server's emulated now, code)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.5):
            try:
                reply = self.client.status()
                now = parse_iso(reply.emulated_now) if reply.emulated_now else None
                self.outcomes.append((now, grpc.StatusCode.OK))
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or "link" in (err.details() or "").lower():
                    self.outcomes.append((None, err.code()))

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)
        self.client.close()


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory: pytest.TempPathFactory, module_broker: BrokerProcess) -> tuple[LabRun, StatusProbe]:
    tmp = tmp_path_factory.mktemp("lab")
    quick = {
        "data": {"train_per_cluster": 1500, "test_per_domain": 50},
        "warmup": {"steps": 200},
        "lab": {"eval_points": 3},
    }
    path = write_topology(tmp, topology_with(DEFAULT_TOPOLOGY, quick))
    sat_port = free_port()
    probe = StatusProbe(f"127.0.0.1:{sat_port}", "c0")
    probe.start()
    lab = run_lab(lab_options(tmp, path, "it", 45, broker=module_broker.address, satellite_port=sat_port))
    probe.stop()
    return lab, probe


def _plan_windows(lab: LabRun) -> dict[str, list[tuple[datetime, datetime]]]:
    return windows_by_cluster(json.loads(lab.plan_path.read_text(encoding="utf-8")))


def test_no_call_succeeds_while_the_link_is_down(lab_run: tuple[LabRun, StatusProbe]) -> None:
    lab, probe = lab_run
    windows = _plan_windows(lab)
    ok = [t for t, code in probe.outcomes if code == grpc.StatusCode.OK]
    refused = [code for _, code in probe.outcomes if code == grpc.StatusCode.UNAVAILABLE]
    assert ok and refused, "the probe must see the link both up and down during the run"
    assert all(t is not None and in_contact("c0", t, windows) for t in ok)
    assert {code for _, code in probe.outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    # Every state-changing call the satellite accepted happened inside its cluster's contact windows.
    accepted = [
        e
        for e in read_events(lab.state_dir / "events.jsonl")
        if e["event"] in {"joined", "affinity", "upload_committed"}
    ]
    assert accepted
    assert all(in_contact(e["cluster"], parse_iso(e["t"]), windows) for e in accepted)


def test_every_committed_expert_belongs_to_its_uploader(lab_run: tuple[LabRun, StatusProbe]) -> None:
    from satellite_node.export import commits

    lab, _ = lab_run
    events = read_events(lab.state_dir / "events.jsonl")
    assignment = next(e for e in events if e["event"] == "assignment")
    owned = {
        (layer, expert): cluster
        for cluster, per_layer in assignment["experts"].items()
        for layer, experts in per_layer
        for expert in experts
    }
    committed = commits(lab.state_dir)
    assert committed, "the run must commit uploads"
    assert {c["cluster"] for c in committed} == {"c0", "c1", "c2"}
    for commit in committed:
        for layer, expert, _version in commit["experts"]:
            assert owned[(layer, expert)] == commit["cluster"]


def test_global_model_equals_newest_accepted_uploads(lab_run: tuple[LabRun, StatusProbe]) -> None:
    from satellite_node.export import commits, global_tensors

    lab, _ = lab_run
    global_model = global_tensors(lab.state_dir, lab.base_dir)
    committed_hashes = {c["content_hash"] for c in commits(lab.state_dir)}
    for cluster, workdir in lab.ground_dirs.items():
        acked = json.loads((workdir / "outbox" / "state.json").read_text(encoding="utf-8"))["acked"]
        assert acked, f"{cluster} got no upload acknowledged"
        assert set(acked) <= committed_hashes, f"an update acknowledged to {cluster} is missing on the satellite"
        blob = (lab.state_dir / "blobs" / f"{acked[-1]}.safetensors").read_bytes()
        assert wire.sha256_hex(blob) == acked[-1]
        newest = load_safetensors(blob)
        assert newest
        for name, tensor in newest.items():
            np.testing.assert_array_equal(global_model[name], tensor, err_msg=f"{cluster}: {name}")


def test_run_outputs(lab_run: tuple[LabRun, StatusProbe], monkeypatch: pytest.MonkeyPatch) -> None:
    import ground_node.learning.evaluate as evaluate
    from satellite_node.export import global_tensors
    from testbed.outputs import write_outputs

    lab, _ = lab_run
    loads: list[Path] = []
    load_base = evaluate.load_base

    def counted(path: Path) -> Any:
        loads.append(path)
        return load_base(path)

    monkeypatch.setattr(evaluate, "load_base", counted)
    summary = write_outputs(lab)
    assert loads == [lab.base_dir], "every figure of a run is scored on one loaded base"
    monkeypatch.undo()
    final = global_tensors(lab.state_dir, lab.base_dir)
    for cluster, row in summary["per_cluster"].items():  # each as a freshly loaded model scores it
        assert row["accuracy"] == evaluate.accuracy(lab.base_dir, final, lab.topology, cluster), cluster
        assert row["accuracy_initial"] == evaluate.accuracy(lab.base_dir, None, lab.topology, cluster), cluster
    on_disk = json.loads((lab.run_dir / "summary.json").read_text(encoding="utf-8"))
    assert on_disk["uploads_committed"] == summary["uploads_committed"] > 0
    assert on_disk["link_up_events"] > 0
    assert on_disk["uploads_outside_contact"] == 0
    for key in (
        "strategy",
        "clusters",
        "emulated_seconds",
        "bytes_uplinked",
        "accuracy_initial",
        "accuracy_final",
        "per_cluster",
        "config",
    ):
        assert key in on_disk
    served = {c: row["served_accuracy"] for c, row in on_disk["per_cluster"].items()}
    assert all(0.0 <= a <= 1.0 for a in served.values())
    assert on_disk["served_accuracy"] == round(sum(served.values()) / len(served), 4)
    for c, row in on_disk["per_cluster"].items():  # EMS-FL: a cluster that uploaded serves its own staged experts
        if row["uploads_committed"]:
            assert row["served_model"]["model"] == "own experts, newest staged update", c
    for png in ("contact_timeline.png", "accuracy.png", "bytes_per_cluster.png", "assignment_heatmap.png"):
        assert (lab.run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_events(lab.run_dir / "events.jsonl")
