"""What a ground agent spent (report.json): wall seconds training, time idle waiting for a model, bytes pulled.

Idle time is kept twice: in emulated seconds (the orbit clock, what the comparison uses) and in wall seconds.
Emulated idle time only counts while the clock is known (before the orbit service starts, no emulated time
passes). Thread-safe: the uplink thread adds downlinked bytes while the training thread trains.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

Clock = Callable[[], datetime | None]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (every role's report.json).

    Linux: `VmHWM`, the high-water mark of this process's own address space. `ru_maxrss` survives exec, so a
    process spawned by a large one (the lab holding a model, `vfork` sharing its memory until exec) reported the
    spawner's peak as its own: every board of a real-base run read 8.5 GB. `ru_maxrss` only where /proc is not."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class Usage:
    def __init__(self, now: Clock | None = None) -> None:
        self._now = now
        self._lock = threading.Lock()
        self.train_seconds = 0.0
        self.idle_seconds = 0.0  # emulated
        self.idle_wall_seconds = 0.0
        self.bytes_downlinked = 0
        self.pulls = 0
        self._idle_since: tuple[float, datetime | None] | None = None

    def _emulated(self) -> datetime | None:
        return self._now() if self._now is not None else None

    def timed(self, fn: Callable[[], Any]) -> Any:
        """Run one training step, counting its wall time as training time."""
        start = time.monotonic()
        try:
            return fn()
        finally:
            with self._lock:
                self.train_seconds += time.monotonic() - start

    def idle_start(self) -> None:
        """The device cannot train: it waits for a model (assignment, first join, next FedAvg round)."""
        with self._lock:
            if self._idle_since is None:
                self._idle_since = (time.monotonic(), self._emulated())

    def idle_tick(self) -> None:
        """Called while waiting: starts the emulated count as soon as the clock is known."""
        with self._lock:
            if self._idle_since is not None and self._idle_since[1] is None:
                self._idle_since = (self._idle_since[0], self._emulated())

    def idle_stop(self) -> None:
        with self._lock:
            if self._idle_since is None:
                return
            wall0, emu0 = self._idle_since
            self._idle_since = None
            self.idle_wall_seconds += time.monotonic() - wall0
            emu1 = self._emulated()
            if emu1 is not None:
                # the clock may only have appeared during the wait: idle_tick() noted when it did
                self.idle_seconds += max(0.0, (emu1 - emu0).total_seconds()) if emu0 is not None else 0.0

    def add_downlink(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_downlinked += nbytes

    def add_pull(self) -> None:
        with self._lock:
            self.pulls += 1

    def snapshot(self) -> dict[str, Any]:
        """The report fields; an open idle interval is closed (and reopened) so the figures are current."""
        reopen = self._idle_since is not None
        if reopen:
            self.idle_stop()
            self.idle_start()
        with self._lock:
            return {
                "bytes_downlinked": self.bytes_downlinked,
                "pulls": self.pulls,
                "train_seconds": round(self.train_seconds, 3),
                "idle_seconds": round(self.idle_seconds, 3),
                "idle_seconds_unit": "emulated",
                "idle_wall_seconds": round(self.idle_wall_seconds, 3),
            }
