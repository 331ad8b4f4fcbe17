from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from ground_node.cli import main


def test_warmup_and_eval_commands(topology: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "t.yaml"
    topology["warmup"]["steps"] = 2
    topo.write_text(yaml.safe_dump(topology))
    assert main(["warmup", "--topology", str(topo), "--out", str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / "manifest.json").exists()
    capsys.readouterr()
    assert main(["eval", "--topology", str(topo), "--base", str(tmp_path / "base"), "--cluster", "c1"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0


def test_bad_input_exits_2(topology: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    topo = tmp_path / "t.yaml"
    topology["training"]["tune"] = "prefix"
    topo.write_text(yaml.safe_dump(topology))
    assert main(["warmup", "--topology", str(topo), "--out", str(tmp_path / "b")]) == 2
    assert "training.tune" in capsys.readouterr().err
    assert main(["eval", "--topology", str(tmp_path / "missing.yaml"), "--base", str(tmp_path)]) == 2


def test_profile_train_export_commands(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topo = tmp_path / "t.yaml"
    topology["training"]["grad_accum"] = 2
    topo.write_text(yaml.safe_dump(topology))
    base = str(base_dir)
    assert main(["profile", "--topology", str(topo), "--base", base, "--cluster", "c0"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert len(prof["top_experts"]) == 2 and all(len(r) == 2 for r in prof["top_experts"])
    work = tmp_path / "w"
    args = ["train", "--topology", str(topo), "--base", base, "--cluster", "c0", "--workdir", str(work)]
    assert main([*args, "--steps", "3", "--experts", "0:1,3;1:2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == 3 and rep["experts"] == [[0, [1, 3]], [1, [2]]] and not rep["resumed"]
    assert main([*args, "--steps", "5", "--experts", "0:1,3;1:2"]) == 0  # resumes from its checkpoint
    rep = json.loads(capsys.readouterr().out)
    assert rep["steps"] == 5 and rep["resumed"] and Path(rep["staged"]).exists()
    onnx = tmp_path / "sub.onnx"
    ex = ["export", "--base", base, "--tensors", rep["staged"], "--out", str(onnx), "--submodel"]
    assert main(ex) == 0
    out = json.loads(capsys.readouterr().out)
    assert onnx.exists() and out["max_abs_diff"] <= 1e-4 and out["submodel"] == [[0, [1, 3]], [1, [2]]]
    # bad input: experts that do not exist, a checkpoint of another family
    assert main([*args, "--steps", "1", "--experts", "0:9"]) == 2
    assert "expert 9" in capsys.readouterr().err
    bad = dict(topology, model=dict(topology["model"], family="mixtral", checkpoint=base))
    topo.write_text(yaml.safe_dump(bad))
    assert main(["warmup", "--topology", str(topo), "--out", str(tmp_path / "b2")]) == 2
    assert "holds a 'olmoe' model" in capsys.readouterr().err
