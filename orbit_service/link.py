"""The link model: geometry from skyfield at one instant, delay from the slant range, rate and loss as
functions of elevation (constant by default, or a table of (elevation_deg, value) interpolated linearly and
held flat beyond its ends).

Topology `link`: `rate_bps` (constant) or `rate_table: [[elevation_deg, rate_bps], ...]`; `loss` (constant
fraction, default 0) or `loss_table: [[elevation_deg, loss], ...]`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from emsfl.config import ConfigError
from orbit_service.sites import GroundSite
from orbit_service.timescale import to_time

SPEED_OF_LIGHT_KM_S = 299792.458
DEFAULT_RATE_BPS = 10_000_000.0


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


def _interp(table: tuple[tuple[float, float], ...], x: float) -> float:
    if len(table) == 1 or x <= table[0][0]:
        return table[0][1]
    if x >= table[-1][0]:
        return table[-1][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(table):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return table[-1][1]


@dataclass(frozen=True)
class LinkModel:
    """Rate (bit/s) and loss (fraction) as functions of the serving satellite's elevation."""

    rate_table: tuple[tuple[float, float], ...] = ((0.0, DEFAULT_RATE_BPS),)
    loss_table: tuple[tuple[float, float], ...] = ((0.0, 0.0),)

    def rate_bps(self, elevation: float | None) -> float:
        return _interp(self.rate_table, 90.0 if elevation is None else elevation)

    def loss(self, elevation: float | None) -> float:
        return _interp(self.loss_table, 90.0 if elevation is None else elevation)


def _table(value: Any, where: str, low: float, high: float | None) -> tuple[tuple[float, float], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of [elevation_deg, value] pairs")
    points: list[tuple[float, float]] = []
    for i, point in enumerate(value):
        ok = isinstance(point, (list, tuple)) and len(point) == 2
        ok = ok and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in point)
        if not ok:
            raise ConfigError(f"{where}[{i}]: expected [elevation_deg, value], got {point!r}")
        el, y = float(point[0]), float(point[1])
        if not (math.isfinite(el) and -90.0 <= el <= 90.0):
            raise ConfigError(f"{where}[{i}]: elevation must be in [-90, 90], got {el!r}")
        if not (math.isfinite(y) and y >= low and (high is None or y <= high)):
            bound = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ConfigError(f"{where}[{i}]: value must be {bound}, got {y!r}")
        points.append((el, y))
    if any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
        raise ConfigError(f"{where}: elevations must increase strictly")
    return tuple(points)


def _constant(link: Mapping[str, Any], key: str, default: float, low: float, high: float | None, strict: bool) -> float:
    value = link.get(key, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"link.{key}: expected a number, got {value!r}")
    value = float(value)
    if (value <= low if strict else value < low) or (high is not None and value > high):
        raise ConfigError(
            f"link.{key}: must be {'>' if strict else '>='} {low:g}"
            + (f" and <= {high:g}" if high is not None else "")
            + f", got {value!r}"
        )
    return value


def link_model_from(link: Mapping[str, Any]) -> LinkModel:
    """The topology's `link` section as a model."""
    if "rate_table" in link and link["rate_table"] is not None:
        rate = _table(link["rate_table"], "link.rate_table", 0.0, None)
    else:
        rate = ((0.0, _constant(link, "rate_bps", DEFAULT_RATE_BPS, 0.0, None, strict=True)),)
    if "loss_table" in link and link["loss_table"] is not None:
        loss = _table(link["loss_table"], "link.loss_table", 0.0, 1.0)
    else:
        loss = ((0.0, _constant(link, "loss", 0.0, 0.0, 1.0, strict=False)),)
    return LinkModel(rate, loss)
