"""A role process's exit in words (testbed/procs.py). Regression: a board the kernel's OOM killer took during a
real-base FedAvg run was reported only as `exited with -9`, which reads like a crash of the board's own code."""

from __future__ import annotations

import signal

from testbed.procs import exit_description


def test_a_sigkill_the_lab_did_not_send_points_at_the_oom_killer() -> None:
    text = exit_description(-int(signal.SIGKILL))
    assert "SIGKILL" in text and "OOM killer" in text and "dmesg" in text


def test_a_sigkill_after_the_stop_timeout_says_so_and_blames_no_oom() -> None:
    text = exit_description(-int(signal.SIGKILL), killed_by_us=True)
    assert "stop timeout" in text and "OOM" not in text


def test_other_exits() -> None:
    assert exit_description(-int(signal.SIGTERM)) == "was killed by SIGTERM (-15)"
    assert exit_description(1) == "exited with 1"
    assert exit_description(None) == "exited with None"
