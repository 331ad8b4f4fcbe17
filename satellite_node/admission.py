"""Admission of a call (ARCHITECTURE §5.2, §5.4): the link state a call is gated on, and the pacing of
transfers to the link budget in emulated time."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any, Protocol


class Links(Protocol):
    def is_up(self, cluster: str) -> bool: ...
    def down_reason(self, cluster: str) -> str: ...
    def emulated_now(self) -> datetime | None: ...


def wall_rate_bytes(links: Any, cluster: str) -> float | None:
    """Bytes per wall second the link may carry (ARCHITECTURE §5.4: rate_bps x clock scale / 8); None: unpaced.

    Read from the link payload's `rate_bps` and the clock's `scale` (a `LinkView`), or from a `wall_rate_bytes`
    method of the links object (tests)."""
    own = getattr(links, "wall_rate_bytes", None)
    if callable(own):
        value = own(cluster)
        return None if value is None else float(value)
    link_of = getattr(links, "link", None)
    clock = getattr(links, "clock", None)
    if not callable(link_of) or clock is None:
        return None
    link = link_of(cluster)
    rate = None if link is None else link.get("rate_bps")
    if not rate or rate <= 0:
        return None
    return float(rate) * float(clock.scale) / 8.0


class Pacer:
    """Paces transfers of each cluster to its link budget: a transfer of n bytes occupies the link n / rate
    wall seconds; back-to-back transfers queue behind each other (a virtual-finish-time token bucket)."""

    def __init__(self, links: Any, enabled: bool = True) -> None:
        self.links = links
        self.enabled = enabled
        self._lock = threading.Lock()
        self._free_at: dict[str, float] = {}

    def pace(self, cluster: str, nbytes: int) -> float:
        """Block until `nbytes` fit the budget; returns the seconds slept."""
        if not self.enabled or nbytes <= 0:
            return 0.0
        rate = wall_rate_bytes(self.links, cluster)
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
