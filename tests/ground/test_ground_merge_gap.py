"""`emsfl lab merge-gap`: EMS-FL's federation in one process, local sub-models against the merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.cli import main as lab_main
from testbed.mergegap import merge_gap


def test_merge_gap_reports_disjoint_experts_and_accuracies(topology: dict[str, Any], base_dir: Path) -> None:
    report = merge_gap(topology, base_dir.parent, steps=3)
    owned = {}
    for cluster, row in report["clusters"].items():
        for layer, experts in row["experts"]:
            for e in experts:
                assert (layer, e) not in owned, f"expert {e} of layer {layer} owned twice"
                owned[(layer, e)] = cluster
        for key in ("routing_coverage", "all_top_k_held_share", "local_accuracy", "merged_accuracy"):
            assert 0.0 <= row[key] <= 1.0, key
        assert row["all_top_k_held_share"] <= row["routing_coverage"] + 1e-9
    assert len(owned) == 2 * 4  # 3 clusters x 2 slots >= 4 experts: every expert of both layers has an owner
    assert report["steps_per_cluster"] == 3
    assert report["router_softmax"] == "held"  # the default: ARCHITECTURE §4.3
    other = report["other_router_softmax"]
    assert other["router_softmax"] == "all" and set(other["clusters"]) == set(report["clusters"])
    assert 0.0 <= other["mean_merged_accuracy"] <= 1.0


def test_merge_gap_is_zero_for_one_cluster_holding_every_expert(topology: dict[str, Any], base_dir: Path) -> None:
    # its sub-model is the whole model, so the merged model is the same model: same answers, same accuracy
    topology["clusters"] = [{"id": "c0", "capacity_experts": 4}]
    report = merge_gap(topology, base_dir.parent, steps=20)
    row = report["clusters"]["c0"]
    assert row["routing_coverage"] == pytest.approx(1.0)
    assert row["all_top_k_held_share"] == 1.0
    assert row["loss_last"] is not None
    assert row["merged_accuracy"] == row["local_accuracy"]
    assert row["merged_answer_loss"] == pytest.approx(row["local_answer_loss"], abs=1e-4)
    assert row["loss_last"] < row["loss_first"]  # it trained: the comparison is not of two untouched bases


def test_merge_gap_cli_refuses_bad_steps(tmp_path: Path, topology: dict[str, Any], capsys: Any) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    out = tmp_path / "gap.json"
    with pytest.raises(SystemExit) as exit_info:  # the command line refuses it before anything runs
        lab_main(["merge-gap", "--topology", str(path), "--steps", "0", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--steps: must be >= 1, got 0" in capsys.readouterr().err
    assert not out.exists()
