"""Helpers shared by tests of several roles: the tiny model every fast test trains, and process clean-up."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any

# The tiny OLMoE that trains in seconds on a CPU; a test that needs another size overrides keys of a copy.
TINY_MODEL: dict[str, Any] = {
    "family": "olmoe",
    "checkpoint": None,
    "num_layers": 2,
    "num_experts": 4,
    "top_k": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 2,
}


def tiny_model(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of `TINY_MODEL` with `overrides` applied (a topology's `model` section)."""
    return {**TINY_MODEL, **overrides}


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running, then wait for each; one that outlives `timeout_s` is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
