"""Log levels: services INFO, one-shot commands warnings only, `emsfl -v` one step more (emsfl/logs.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from emsfl import logs
from emsfl.cli import _take_verbosity


def test_levels_by_kind_and_verbosity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    assert logs.level_for(service=False) == logging.WARNING
    assert logs.level_for(service=True) == logging.INFO
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    assert logs.level_for(service=False) == logging.INFO
    assert logs.level_for(service=True) == logging.DEBUG
    monkeypatch.setenv(logs.VERBOSE_ENV, "not a number")
    assert logs.level_for(service=False) == logging.WARNING


def test_the_entry_point_takes_v_before_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")  # recorded, so what the entry point sets is undone after the test
    assert _take_verbosity(["-v", "-v", "ground", "export", "-v"]) == ["ground", "export", "-v"]
    assert logs.verbosity() == 2
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    assert _take_verbosity(["-vv", "lab", "up"]) == ["lab", "up"] and logs.verbosity() == 2


@pytest.mark.slow
def test_ground_export_prints_its_result_only(tmp_path: Path) -> None:
    """`emsfl ground export` printed ~150 lines of exporter logs; by default it prints its JSON line alone."""
    from tests.test_cli_bad_input import TINY, _emsfl

    topology, base = tmp_path / "t.yaml", tmp_path / "base"
    topology.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    built = _emsfl(["ground", "warmup", "--topology", str(topology), "--out", str(base)], tmp_path)
    assert built.returncode == 0, built.stderr
    done = _emsfl(["ground", "export", "--base", str(base), "--out", str(tmp_path / "m.onnx")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["max_abs_diff"] < 1e-3
