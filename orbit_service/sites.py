"""Ground sites (one per cluster gateway) from the topology or a CSV file, validated field by field."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from skyfield.api import wgs84

from emsfl.config import ConfigError, cluster_ids, field, read_text_file

CSV_COLUMNS = ("name", "lat_deg", "lon_deg", "alt_m", "min_elevation_deg")


@dataclass(frozen=True)
class GroundSite:
    name: str
    lat_deg: float
    lon_deg: float
    alt_m: float = 0.0
    min_elevation_deg: float = 10.0
    # Optional azimuth-dependent mask: (azimuth_deg, elevation_deg) points, interpolated linearly around the
    # circle; the effective minimum elevation at an azimuth is the larger of this and `min_elevation_deg`.
    mask: tuple[tuple[float, float], ...] = ()

    def mask_at(self, azimuth_deg: float) -> float:
        """The minimum elevation (deg) towards `azimuth_deg`."""
        if not self.mask:
            return self.min_elevation_deg
        points = sorted(self.mask)
        az = [a for a, _ in points]
        el = [e for _, e in points]
        # Wrap around: the first point again at +360, the last at -360.
        xs = [az[-1] - 360.0, *az, az[0] + 360.0]
        ys = [el[-1], *el, el[0]]
        x = azimuth_deg % 360.0
        for i in range(len(xs) - 1):
            if xs[i] <= x <= xs[i + 1]:
                span = xs[i + 1] - xs[i]
                w = 0.0 if span == 0 else (x - xs[i]) / span
                return max(self.min_elevation_deg, ys[i] + w * (ys[i + 1] - ys[i]))
        return self.min_elevation_deg  # unreachable: the wrapped points cover [0, 360]

    def validate(self, where: str, sep: str = ".") -> GroundSite:
        """Check ranges; errors read `<where><sep><field>: ...`."""
        if not self.name.strip():
            raise ConfigError(f"{where}{sep}name: must not be empty")
        checks = (
            ("lat_deg", self.lat_deg, -90.0, 90.0),
            ("lon_deg", self.lon_deg, -180.0, 180.0),
            ("alt_m", self.alt_m, -500.0, 10000.0),  # from the Dead Sea shore to above any mountain
            ("min_elevation_deg", self.min_elevation_deg, 0.0, 89.0),
        )
        for name, value, low, high in checks:
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{where}{sep}{name}: must be in [{low:g}, {high:g}], got {value!r}")
        for i, (az, el) in enumerate(self.mask):
            if not (math.isfinite(az) and 0.0 <= az < 360.0 and math.isfinite(el) and 0.0 <= el <= 89.0):
                raise ConfigError(
                    f"{where}{sep}mask[{i}]: expected [azimuth in [0, 360), elevation in [0, 89]], got {[az, el]!r}"
                )
        return self

    def topos(self) -> Any:
        """The skyfield position of the site on the WGS84 ellipsoid."""
        return wgs84.latlon(self.lat_deg, self.lon_deg, elevation_m=self.alt_m)


def site_from_mapping(mapping: Mapping[str, Any], where: str) -> GroundSite:
    site = GroundSite(
        name=field(mapping, "name", str, where),
        lat_deg=field(mapping, "lat_deg", float, where),
        lon_deg=field(mapping, "lon_deg", float, where),
        alt_m=field(mapping, "alt_m", float, where, default=0.0),
        min_elevation_deg=field(mapping, "min_elevation_deg", float, where, default=10.0),
        mask=_mask_from(mapping.get("mask"), f"{where}.mask"),
    )
    return site.validate(where)


def _mask_from(value: Any, where: str) -> tuple[tuple[float, float], ...]:
    """`[[azimuth_deg, elevation_deg], ...]` or None."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of [azimuth_deg, elevation_deg] pairs")
    points = []
    for i, point in enumerate(value):
        if not (isinstance(point, (list, tuple)) and len(point) == 2) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in point
        ):
            raise ConfigError(f"{where}[{i}]: expected [azimuth_deg, elevation_deg], got {point!r}")
        points.append((float(point[0]), float(point[1])))
    return tuple(points)


def sites_from_topology(topology: Mapping[str, Any]) -> dict[str, GroundSite]:
    """Cluster id -> its site (`clusters[i].site`), in topology order."""
    ids = cluster_ids(topology)
    sites: dict[str, GroundSite] = {}
    for i, (cluster_id, cluster) in enumerate(zip(ids, topology["clusters"], strict=True)):
        site = cluster.get("site")
        if not isinstance(site, dict):
            raise ConfigError(f"clusters[{i}].site: missing or not a mapping")
        sites[cluster_id] = site_from_mapping(site, f"clusters[{i}].site")
    return sites


def parse_sites_csv(text: str, source: str = "<sites>") -> list[GroundSite]:
    """Sites from CSV with the header `name,lat_deg,lon_deg,alt_m,min_elevation_deg`."""
    reader = csv.reader(io.StringIO(text))
    rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    if not rows:
        raise ConfigError(f"{source}: empty; expected the header {','.join(CSV_COLUMNS)}")
    header_line, header = rows[0]
    if tuple(cell.strip() for cell in header) != CSV_COLUMNS:
        raise ConfigError(f"{source} line {header_line}: expected the header {','.join(CSV_COLUMNS)}")
    sites: list[GroundSite] = []
    for lineno, row in rows[1:]:
        where = f"{source} line {lineno}"
        if len(row) != len(CSV_COLUMNS):
            raise ConfigError(f"{where}: expected {len(CSV_COLUMNS)} columns, got {len(row)}")
        values: list[float] = []
        for column, cell in zip(CSV_COLUMNS[1:], row[1:], strict=True):
            try:
                values.append(float(cell))
            except ValueError:
                raise ConfigError(f"{where}: {column}: not a number: {cell!r}") from None
        lat, lon, alt, min_el = values
        sites.append(GroundSite(row[0].strip(), lat, lon, alt, min_el).validate(where, sep=": "))
    if not sites:
        raise ConfigError(f"{source}: no sites after the header")
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: duplicate site names in {names}")
    return sites


def load_sites_csv(path: str | Path) -> list[GroundSite]:
    return parse_sites_csv(read_text_file(path, "sites"), str(path))
