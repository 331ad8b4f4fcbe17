"""Emulated time from the retained `emsfl/v1/clock` message (ARCHITECTURE §5.4).

No tick stream: every process turns its own wall clock into emulated UTC with this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from emsfl.runtime.timefmt import parse_iso, to_iso


@dataclass(frozen=True)
class EmulatedClock:
    epoch_utc: datetime  # emulated time at wall_ref_unix
    wall_ref_unix: float
    scale: float
    paused: bool = False

    def at_wall(self, wall_unix: float) -> datetime:
        if self.paused:
            return self.epoch_utc
        return self.epoch_utc + timedelta(seconds=(wall_unix - self.wall_ref_unix) * self.scale)

    def now(self) -> datetime:
        return self.at_wall(time.time())

    def wall_of(self, emulated: datetime) -> float:
        """Wall time (Unix s) at which `emulated` occurs; only meaningful while running."""
        return self.wall_ref_unix + (emulated - self.epoch_utc).total_seconds() / self.scale

    def to_payload(self) -> dict[str, Any]:
        return {
            "schema": "emsfl.v1.clock",
            "version": 1,
            "epoch_utc": to_iso(self.epoch_utc),
            "wall_ref_unix": self.wall_ref_unix,
            "scale": self.scale,
            "paused": self.paused,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> EmulatedClock:
        return cls(
            epoch_utc=parse_iso(payload["epoch_utc"]),
            wall_ref_unix=float(payload["wall_ref_unix"]),
            scale=float(payload["scale"]),
            paused=bool(payload["paused"]),
        )
