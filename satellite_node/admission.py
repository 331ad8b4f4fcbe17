"""Admission of a call (ARCHITECTURE §5.2, §5.4): the link gate, and the pacing of transfers to the link budget in
emulated time; the link state is the `LinkState` protocol (emsfl/runtime/linkstate.py)."""

from __future__ import annotations

import threading
import time
from datetime import datetime

from emsfl.runtime.linkstate import LinkState
from satellite_node.validate import Refusal, RefusalCode


def gate(links: LinkState, cluster: str) -> datetime | None:
    """Refuse (UNAVAILABLE) unless `cluster`'s link is up: nothing moves over a link that is down. Returns the
    emulated instant the call was admitted at (None where the link state has no clock)."""
    up, now = links.up_now(cluster)
    if not up:
        raise Refusal(RefusalCode.UNAVAILABLE, links.down_reason(cluster), "link_down")
    return now


class Pacer:
    """Paces transfers of each cluster to its link budget: a transfer of n bytes occupies the link n / rate
    wall seconds; back-to-back transfers queue behind each other (a virtual-finish-time token bucket)."""

    def __init__(self, links: LinkState, enabled: bool = True) -> None:
        self.links = links
        self.enabled = enabled
        self._lock = threading.Lock()
        self._free_at: dict[str, float] = {}

    def pace(self, cluster: str, nbytes: int) -> float:
        """Block until `nbytes` fit the budget; returns the seconds slept."""
        if not self.enabled or nbytes <= 0:
            return 0.0
        rate = self.links.wall_rate_bytes(cluster)  # ARCHITECTURE §5.4: rate_bps x clock scale / 8
        if rate is None:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at.get(cluster, 0.0))
            done = start + nbytes / rate
            self._free_at[cluster] = done
        delay = done - time.monotonic()
        if delay > 0:
            time.sleep(delay)
            return delay
        return 0.0
