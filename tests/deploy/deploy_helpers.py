"""Helpers of the deploy tests: tools that may be absent skip locally but fail under CI=true."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def require(condition: bool, reason: str) -> None:
    """Skip with `reason` unless CI=true, where a missing prerequisite is a failure of .ci/run."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


def tool(name: str) -> str:
    """Path of a console script: the venv's first (ansible-playbook, ansible-lint), then PATH."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    require(found is not None, f"{name} is not installed (pip install -e '.[deploy]' or apt-get install)")
    assert found is not None
    return found
