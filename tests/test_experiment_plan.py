"""The experiment grid and the learning-rate search (no processes: the quick integration test runs the lab)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emsfl.config import ConfigError
from testbed.experiment import ExperimentOptions, choose_lr, plan_runs

TOPOLOGY: dict[str, Any] = {"link": {"rate_bps": 1e7}, "training": {"lr": 0.002}}


def _opts(**kw: Any) -> ExperimentOptions:
    return ExperimentOptions(topology_path=Path("t.yaml"), **kw)


def test_grid_defaults_to_the_topology_lr_and_two_rates() -> None:
    grid = plan_runs(_opts(seeds=[0, 1]), TOPOLOGY)
    assert {lr for *_, lr in grid} == {0.002}
    assert {rate for rate, *_ in grid} == {1e7, 1e4}
    assert len(grid) == 2 * 2 * 3


def test_every_strategy_gets_the_same_lr_candidates() -> None:
    grid = plan_runs(_opts(seeds=[0], lrs=[0.001, 0.004], quick=True), TOPOLOGY)
    per_strategy: dict[str, set[float]] = {}
    for _, strategy, _, lr in grid:
        per_strategy.setdefault(strategy, set()).add(lr)
    assert per_strategy == {s: {0.001, 0.004} for s in ("emsfl", "fedavg", "fedasync")}


@pytest.mark.parametrize("lrs", [[0.0], [-1.0], [0.001, 0.001]])
def test_bad_lrs_are_refused(lrs: list[float]) -> None:
    with pytest.raises(ConfigError, match="--lrs"):
        plan_runs(_opts(lrs=lrs), TOPOLOGY)


def test_choose_lr_takes_the_best_mean_over_seeds_per_strategy() -> None:
    def runs(*accs: float) -> list[dict[str, Any]]:
        return [{"accuracy_final": a} for a in accs]

    per_lr = {
        0.001: {"emsfl": runs(0.5, 0.7), "fedavg": runs(0.4, 0.4)},
        0.004: {"emsfl": runs(0.9, 0.1), "fedavg": runs(0.6, 0.5)},
    }
    chosen, search = choose_lr(per_lr)
    assert search["emsfl"]["lr"] == 0.001 and chosen["emsfl"] is per_lr[0.001]["emsfl"]  # 0.6 beats 0.5
    assert search["fedavg"]["lr"] == 0.004 and search["fedavg"]["final_accuracy_by_lr"] == {"0.001": 0.4, "0.004": 0.55}


def test_lr_candidates_share_one_base() -> None:
    """Regression: the base cache key hashed the whole training section, so each lr warmed up its own base."""
    import copy

    import yaml

    from ground_node.settings import cache_key, load_settings
    from testbed.lab import DEFAULT_TOPOLOGY

    topo = yaml.safe_load(DEFAULT_TOPOLOGY.read_text(encoding="utf-8"))
    other_lr = copy.deepcopy(topo)
    other_lr["training"]["lr"] = 0.01
    other_rank = copy.deepcopy(topo)
    other_rank["training"]["lora_rank"] = 4
    key = cache_key(load_settings(topo))
    assert cache_key(load_settings(other_lr)) == key
    assert cache_key(load_settings(other_rank)) != key  # the manifest records the rank


def _summary(seed: int, curve: list[float], uplinked: int = 100, uploads: int = 4) -> dict[str, Any]:
    return {
        "run_id": f"r{seed}",
        "config": {"seed": seed},
        "emulated_start": "2026-03-20T06:00:00Z",
        "accuracy_curve": [{"t": f"2026-03-20T0{6 + i}:00:00Z", "accuracy": a} for i, a in enumerate(curve)],
        "accuracy_final": curve[-1],
        "bytes_uplinked": uplinked,
        "uploads_committed": uploads,
        "uploads_outside_contact": 0,
        "per_cluster": {"c0": {"accuracy": curve[-1], "train_seconds": 36.0}},
    }


def test_time_to_target_uses_each_seeds_own_target() -> None:
    """Regression: one target across seeds let a seed whose base already beat it report 0 s for everyone."""
    from testbed.compare import compare

    runs = {
        "emsfl": [_summary(0, [0.2, 0.5, 0.5]), _summary(1, [0.7, 0.8, 0.8])],
        "fedavg": [_summary(0, [0.2, 0.3, 0.4]), _summary(1, [0.7, 0.7, 0.9])],
    }
    result = compare(runs, target_fraction=0.9)
    assert result["target_accuracy_by_seed"] == {0: 0.45, 1: 0.81}
    emsfl, fedavg = result["strategies"]["emsfl"], result["strategies"]["fedavg"]
    assert emsfl["time_to_target_s"]["values"] == [3600.0]  # seed 1 never reaches 0.81
    assert emsfl["time_to_target_s"]["missing"] == 1
    assert fedavg["time_to_target_s"]["values"] == [7200.0] and fedavg["time_to_target_s"]["missing"] == 1
    assert emsfl["uplink_bytes_per_upload"]["mean"] == 25.0


def test_claim_is_false_when_only_fedavg_reaches_the_target() -> None:
    """Regression: `(False and ...) or None` turned "FedAvg reached it, EMS-FL never did" into None."""
    from testbed.compare import claims, compare

    runs = {
        "emsfl": [_summary(0, [0.2, 0.3, 0.3]), _summary(1, [0.2, 0.3, 0.3])],
        "fedavg": [_summary(0, [0.2, 0.5, 0.6]), _summary(1, [0.2, 0.5, 0.6])],
    }
    assert claims(compare(runs), 3)["reaches_target_2x_sooner"] is False
    swapped = {"emsfl": runs["fedavg"], "fedavg": runs["emsfl"]}
    assert claims(compare(swapped), 3)["reaches_target_2x_sooner"] is True


def test_missing_data_set_is_a_clear_error_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a GroundError (absent ../shared/data path) escaped `emsfl lab experiment` as a traceback."""
    import yaml

    from testbed.cli import main
    from testbed.lab import DEFAULT_TOPOLOGY

    topo = yaml.safe_load(DEFAULT_TOPOLOGY.read_text(encoding="utf-8"))
    topo["data"] = {"task": "banking77", "path": str(tmp_path / "absent")}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topo), encoding="utf-8")
    argv = ["experiment", "--topology", str(path), "--quick", "--no-central", "--runs-dir", str(tmp_path / "runs")]
    assert main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "absent" in err and "Traceback" not in err


def test_fedavg_runs_first_when_steps_are_equalised() -> None:
    grid = plan_runs(_opts(seeds=[0], strategies=["emsfl", "fedasync", "fedavg"], quick=True), TOPOLOGY)
    assert [s for _, s, _, _ in grid] == ["fedavg", "emsfl", "fedasync"]
    free = plan_runs(_opts(seeds=[0], strategies=["emsfl", "fedavg"], quick=True, equal_steps=False), TOPOLOGY)
    assert [s for _, s, _, _ in free] == ["emsfl", "fedavg"]
