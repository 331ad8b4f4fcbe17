"""Log levels: services INFO, one-shot commands warnings only, `emsfl -v` one step more (emsfl/logs.py)."""

from __future__ import annotations

import logging

import pytest

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
