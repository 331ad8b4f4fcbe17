"""Role processes of a local testbed: each role is the same `emsfl <role> run ...` command a board runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from testbed.orphans import die_with_parent


def exit_description(code: int | None, killed_by_us: bool = False) -> str:
    """A child's exit status in words: a signal by name and, for a SIGKILL the lab did not send, its usual cause."""
    if code is None or code >= 0:
        return f"exited with {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"exited with {code}"
    if name != "SIGKILL":
        return f"was killed by {name} ({code})"
    if killed_by_us:
        return f"was killed by {name} ({code}): it did not exit within its stop timeout after SIGTERM"
    return f"was killed by {name} ({code}), most often by the kernel's OOM killer (see `dmesg | grep -i oom`)"


class RoleProcess:
    """One `python -m emsfl ...` child with its output in a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed_by_us = False  # stop() or kill() sent SIGKILL

    def start(self) -> RoleProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        # A new session: Ctrl-C in the terminal reaches the lab only, which then stops each child in order.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emsfl", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, as a power cut would."""
        if self.proc is not None and self.proc.poll() is None:
            self.killed_by_us = True
            self.proc.kill()
            self.proc.wait()

    @property
    def exit_description(self) -> str:
        return exit_description(self.returncode, self.killed_by_us)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
