"""`emsfl lab experiment` end to end, reduced: three strategies, one seed, one rate, short runs, small data.

Checks comparison.json's structure and the invariants every experiment must hold: no upload outside a contact,
every strategy committed uploads, EMS-FL sends fewer uplink bytes than FedAvg, and every run saw the same
contact plan. Runs against the shared broker fixture (real Mosquitto where installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.broker import BrokerProcess
from testbed.experiment import STRATEGIES, ExperimentOptions, run_experiment
from testbed.lab import DEFAULT_TOPOLOGY

pytestmark = pytest.mark.slow

METRICS = (
    "time_to_target_s",
    "final_accuracy",
    "final_accuracy_cluster_mean",
    "uplink_bytes",
    "downlink_bytes",
    "device_hours",
    "peak_device_memory_mb",
    "idle_waiting_s",
    "uploads_committed",
)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory, module_broker: BrokerProcess) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("experiment")
    topology: dict[str, Any] = yaml.safe_load(DEFAULT_TOPOLOGY.read_text(encoding="utf-8"))
    topology["data"]["train_per_cluster"] = 1500
    topology["data"]["test_per_domain"] = 40
    topology["warmup"]["steps"] = 200
    topology["lab"]["eval_points"] = 3
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    result = run_experiment(
        ExperimentOptions(
            topology_path=path,
            strategies=list(STRATEGIES),
            seeds=[0],
            quick=True,
            duration_wall_s=35,
            runs_dir=tmp / "runs",
            experiment_id="quick",
            cache_dir=tmp / "cache",
            broker=module_broker.address,
            central=False,
        )
    )
    return tmp / "runs" / "quick", result


def test_comparison_files(comparison: tuple[Path, dict[str, Any]]) -> None:
    exp_dir, result = comparison
    on_disk = json.loads((exp_dir / "comparison.json").read_text(encoding="utf-8"))
    assert on_disk["experiment_id"] == result["experiment_id"] == "quick"
    assert (exp_dir / "comparison.md").read_text(encoding="utf-8").count("| emsfl |") == 1
    for png in ("accuracy_vs_time.png", "uplink_bytes.png", "idle_waiting.png"):
        assert (exp_dir / png).stat().st_size > 0
    assert on_disk["seeds"] == [0] and len(on_disk["rates_bps"]) == 1
    assert on_disk["contact_plan"]["mode"] in ("replay", "deterministic")
    assert on_disk["contact_plan"]["identical_across_runs"] is True
    assert len(on_disk["runs"]) == 3


def test_structure(comparison: tuple[Path, dict[str, Any]]) -> None:
    _, result = comparison
    assert set(result["strategies"]) == set(STRATEGIES)
    assert 0.0 < result["target_accuracy"] <= 1.0
    for name, metrics in result["strategies"].items():
        for key in METRICS:
            assert {"mean", "std", "values", "missing"} <= set(metrics[key]), (name, key)
        assert metrics["final_accuracy"]["mean"] is not None
        assert metrics["device_hours"]["mean"] > 0, name
    # baselines pull the global model; EMS-FL never needs to
    assert result["strategies"]["emsfl"]["downlink_bytes"]["mean"] == 0
    assert "claims_vs_fedavg" in result


def test_invariants(comparison: tuple[Path, dict[str, Any]]) -> None:
    _, result = comparison
    for name, metrics in result["strategies"].items():
        assert metrics["uploads_outside_contact"] == 0, name
        assert metrics["uploads_committed"]["mean"] > 0, name
    s = result["strategies"]
    assert s["emsfl"]["uplink_bytes"]["mean"] < s["fedavg"]["uplink_bytes"]["mean"]
    (checks,) = result["checks"].values()
    assert all(v == 0 for v in checks["uploads_outside_contact"].values())
    assert all(checks["every_run_committed"].values())
    assert checks["emsfl_uplink_below_fedavg"] is True
