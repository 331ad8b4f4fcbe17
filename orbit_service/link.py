"""The link model: geometry from skyfield at one instant, delay from the slant range, a constant rate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from orbit_service.sites import GroundSite
from orbit_service.timescale import to_time

SPEED_OF_LIGHT_KM_S = 299792.458


@dataclass(frozen=True)
class LinkGeometry:
    elevation_deg: float
    range_km: float

    @property
    def delay_s(self) -> float:
        """One-way propagation delay."""
        return self.range_km / SPEED_OF_LIGHT_KM_S


def elevation_deg(site: GroundSite, satellite: Any, moment: datetime) -> float:
    alt, _, _ = (satellite - site.topos()).at(to_time(moment)).altaz()
    return float(alt.degrees)


def geometry_at(site: GroundSite, satellite: Any, moment: datetime) -> LinkGeometry:
    alt, _, distance = (satellite - site.topos()).at(to_time(moment)).altaz()
    return LinkGeometry(elevation_deg=float(alt.degrees), range_km=float(distance.km))
