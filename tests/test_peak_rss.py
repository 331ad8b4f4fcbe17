"""Regression: a process spawned by a large one reported the spawner's peak memory as its own (`ru_maxrss`
survives exec), so every board of a real-base lab run read the lab's 8.5 GB."""

from __future__ import annotations

import subprocess
import sys

from ground_node.usage import peak_rss_mb

CHILD = "from ground_node.usage import peak_rss_mb; print(peak_rss_mb())"


def test_peak_rss_of_a_child_is_not_its_spawners() -> None:
    ballast = bytearray(600 * 2**20)  # 600 MB resident in this process before it spawns the child
    ballast[::4096] = b"x" * len(ballast[::4096])
    child = float(subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True).stdout)
    assert peak_rss_mb() >= 600
    assert 0 < child < 300  # an interpreter and one small module, not the 600 MB its parent holds
