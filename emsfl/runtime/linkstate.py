"""The link, as every role sees it (ARCHITECTURE §5.3, §5.4): one typed protocol.

`LinkView` (emsfl/runtime/linkview.py) implements it from the MQTT topics; tests implement it with fakes that
subclass it explicitly. Callers use only these methods: the satellite's link gate and pacer, the ground uplink and
its contact budget. Kept apart from the view so that importing it pulls no MQTT.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol


class LinkState(Protocol):
    def is_up(self, cluster: str) -> bool:
        """Whether a call of `cluster` may pass now (a late `down` never lets one through after LOS)."""
        ...

    def up_now(self, cluster: str) -> tuple[bool, datetime | None]:
        """`is_up` and the emulated instant it was decided at, read together: a reply that reports the time of its
        call carries the instant the gate admitted it at, not a later one (at x240, 10 ms of scheduling delay is
        2.4 emulated seconds, enough to fall after LOS)."""
        ...

    def wait_up(self, cluster: str, timeout_s: float) -> bool:
        """Block until the cluster's link is up or `timeout_s` passes; returns `is_up`."""
        ...

    def down_reason(self, cluster: str) -> str:
        """Why the cluster's link is down, in words (for UNAVAILABLE)."""
        ...

    def emulated_now(self) -> datetime | None:
        """The emulated time; None before the clock is known."""
        ...

    def link(self, cluster: str) -> Mapping[str, Any] | None:
        """The cluster's last link payload (`state`, `since`, `until`, `rate_bps`, ...); None when none came."""
        ...

    def wall_rate_bytes(self, cluster: str) -> float | None:
        """Bytes per wall second the link may carry (rate_bps x clock scale / 8); None: unpaced."""
        ...


def wall_rate_bytes_of(link: Mapping[str, Any] | None, scale: float | None) -> float | None:
    """ARCHITECTURE §5.4: at scale N a link of R bit/s moves R·N bits per wall second; None without a rate or clock."""
    rate = None if link is None else link.get("rate_bps")
    if not rate or rate <= 0 or scale is None:
        return None
    return float(rate) * float(scale) / 8.0
