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
