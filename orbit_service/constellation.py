"""Satellites to propagate: a generated Walker-delta shell or the entries of a TLE file.

Both come out as skyfield `EarthSatellite` objects whose `name` is the satellite id used on the wire.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sgp4.api import WGS72, Satrec
from skyfield.api import EarthSatellite

from emsfl.config import ConfigError, field, read_text_file
from orbit_service.timescale import timescale

# WGS-72 constants, the ones SGP4 itself uses, so the generated mean motion matches the altitude.
MU_KM3_S2 = 398600.8
EARTH_RADIUS_KM = 6378.135
# sgp4init counts epochs in days from 1949 December 31 00:00 UT.
SGP4_EPOCH0_JD = 2433281.5
MIN_ALTITUDE_KM = 150.0  # below this SGP4 decays within hours and the shell is meaningless

SPEC_RE = re.compile(r"^\s*([-+0-9.eE]+):([-+0-9.eE]+):(\d+)/(\d+)/(\d+)\s*$")


@dataclass(frozen=True)
class WalkerSpec:
    """A Walker-delta shell i:T/P/F with circular orbits at one altitude."""

    inclination_deg: float
    altitude_km: float
    planes: int
    sats_per_plane: int
    phasing: int

    @property
    def total(self) -> int:
        return self.planes * self.sats_per_plane

    def validate(self, where: str = "walker") -> WalkerSpec:
        if not 0.0 <= self.inclination_deg <= 180.0:
            raise ConfigError(f"{where}.inclination_deg: must be in [0, 180], got {self.inclination_deg!r}")
        if not MIN_ALTITUDE_KM <= self.altitude_km <= 100000.0:
            raise ConfigError(
                f"{where}.altitude_km: must be in [{MIN_ALTITUDE_KM:g}, 100000], got {self.altitude_km!r}"
            )
        if self.planes < 1:
            raise ConfigError(f"{where}.planes: must be >= 1, got {self.planes!r}")
        if self.sats_per_plane < 1:
            raise ConfigError(f"{where}.sats_per_plane: must be >= 1, got {self.sats_per_plane!r}")
        if not 0 <= self.phasing < self.planes:
            raise ConfigError(
                f"{where}.phasing: must be in [0, planes - 1] = [0, {self.planes - 1}], got {self.phasing!r}"
            )
        return self


def parse_walker_spec(text: str) -> WalkerSpec:
    """`INC_DEG:ALT_KM:PLANES/SATS_PER_PLANE/PHASING`, e.g. `53:550:3/4/1`."""
    match = SPEC_RE.match(text)
    if match is None:
        raise ConfigError(
            f"walker spec {text!r}: expected INC_DEG:ALT_KM:PLANES/SATS_PER_PLANE/PHASING, e.g. 53:550:3/4/1"
        )
    try:
        inc, alt = float(match.group(1)), float(match.group(2))
    except ValueError:
        raise ConfigError(f"walker spec {text!r}: inclination and altitude must be numbers") from None
    spec = WalkerSpec(inc, alt, int(match.group(3)), int(match.group(4)), int(match.group(5)))
    return spec.validate(f"walker spec {text!r}")


def walker_from_mapping(mapping: Mapping[str, Any], where: str) -> WalkerSpec:
    spec = WalkerSpec(
        inclination_deg=field(mapping, "inclination_deg", float, where),
        altitude_km=field(mapping, "altitude_km", float, where),
        planes=field(mapping, "planes", int, where),
        sats_per_plane=field(mapping, "sats_per_plane", int, where),
        phasing=field(mapping, "phasing", int, where, default=0),
    )
    return spec.validate(where)


def _sgp4_epoch_days(epoch: datetime) -> float:
    if epoch.tzinfo is None:
        epoch = epoch.replace(tzinfo=timezone.utc)
    unix_s = epoch.timestamp()
    return unix_s / 86400.0 + 2440587.5 - SGP4_EPOCH0_JD


def walker_satellites(spec: WalkerSpec, epoch: datetime) -> list[EarthSatellite]:
    """The T = planes * sats_per_plane satellites of the shell, elements referred to `epoch`.

    Plane p has its ascending node at 360 p / P; satellite s of plane p has mean anomaly
    360 s / S + 360 F p / T (the Walker-delta phasing).
    """
    spec.validate()
    a_km = EARTH_RADIUS_KM + spec.altitude_km
    mean_motion_rad_min = math.sqrt(MU_KM3_S2 / a_km**3) * 60.0
    epoch_days = _sgp4_epoch_days(epoch)
    ts = timescale()
    satellites = []
    for p in range(spec.planes):
        raan_deg = 360.0 * p / spec.planes
        for s in range(spec.sats_per_plane):
            anomaly_deg = (360.0 * s / spec.sats_per_plane + 360.0 * spec.phasing * p / spec.total) % 360.0
            satrec = Satrec()
            satrec.sgp4init(
                WGS72,
                "i",
                p * spec.sats_per_plane + s + 1,  # catalogue number
                epoch_days,
                0.0,  # bstar: no drag, the shell keeps its altitude over a run
                0.0,  # ndot
                0.0,  # nddot
                0.0,  # eccentricity: circular
                0.0,  # argument of perigee (undefined for a circle)
                math.radians(spec.inclination_deg),
                math.radians(anomaly_deg),
                mean_motion_rad_min,
                math.radians(raan_deg),
            )
            sat = EarthSatellite.from_satrec(satrec, ts)
            sat.name = f"WALKER-P{p:02d}-S{s:02d}"
            satellites.append(sat)
    return satellites


def tle_checksum(line: str) -> int:
    """The mod-10 checksum of a TLE line's first 68 columns (digits count, '-' counts 1)."""
    total = 0
    for char in line[:68]:
        if char.isdigit():
            total += int(char)
        elif char == "-":
            total += 1
    return total % 10


def _check_tle_line(line: str, number: str, source: str, lineno: int) -> None:
    where = f"{source} line {lineno}"
    if not line.startswith(f"{number} "):
        raise ConfigError(f"{where}: expected TLE line {number} (starting with '{number} '), got {line[:20]!r}")
    if len(line) != 69:
        raise ConfigError(f"{where}: a TLE line has 69 characters, this one has {len(line)}")
    if not line[68].isdigit():
        raise ConfigError(f"{where}: the checksum (column 69) must be a digit, got {line[68]!r}")
    if tle_checksum(line) != int(line[68]):
        raise ConfigError(f"{where}: bad checksum: column 69 says {line[68]}, the line sums to {tle_checksum(line)}")


# (line, first column, last column (1-based, inclusive), field) of the numbers SGP4 needs; its C parser
# silently reads garbage as 0, so they are checked here to name the bad field.
TLE_NUMERIC_FIELDS = (
    (1, 19, 32, "epoch"),
    (2, 9, 16, "inclination"),
    (2, 18, 25, "right ascension of the ascending node"),
    (2, 27, 33, "eccentricity"),
    (2, 35, 42, "argument of perigee"),
    (2, 44, 51, "mean anomaly"),
    (2, 53, 63, "mean motion"),
)


def _check_tle_numbers(line1: str, line2: str, source: str, n1: int, n2: int) -> None:
    for number, first, last, name in TLE_NUMERIC_FIELDS:
        line, lineno = (line1, n1) if number == 1 else (line2, n2)
        text = line[first - 1 : last].strip()
        try:
            float(text)
        except ValueError:
            raise ConfigError(
                f"{source} line {lineno}: malformed TLE: {name} (columns {first}-{last}) is not a number: {text!r}"
            ) from None


def parse_tle_text(text: str, source: str = "<tle>") -> list[EarthSatellite]:
    """Satellites from 2-line or 3-line (named) TLE text; errors name `source` and the line number."""
    lines = [(i + 1, raw.rstrip()) for i, raw in enumerate(text.splitlines())]
    lines = [(n, line) for n, line in lines if line.strip()]
    ts = timescale()
    satellites: list[EarthSatellite] = []
    seen: dict[str, int] = {}
    i = 0
    while i < len(lines):
        name: str | None = None
        name_lineno, first = lines[i]
        if not first.startswith("1 "):
            # A name line (3-line format); CelesTrak's 3LE prefixes names with "0 ".
            name = first[2:].strip() if first.startswith("0 ") else first.strip()
            if not name or len(name) > 69:
                raise ConfigError(f"{source} line {name_lineno}: expected a satellite name or TLE line 1")
            i += 1
        if i + 1 >= len(lines):
            last = lines[i][0] if i < len(lines) else name_lineno
            raise ConfigError(f"{source} line {last}: incomplete TLE (lines 1 and 2 expected after it)")
        (n1, line1), (n2, line2) = lines[i], lines[i + 1]
        _check_tle_line(line1, "1", source, n1)
        _check_tle_line(line2, "2", source, n2)
        if line1[2:7] != line2[2:7]:
            raise ConfigError(
                f"{source} line {n2}: catalogue number {line2[2:7].strip()!r} differs from line {n1}'s "
                f"{line1[2:7].strip()!r}"
            )
        _check_tle_numbers(line1, line2, source, n1, n2)
        try:
            satrec = Satrec.twoline2rv(line1, line2)
        except (ValueError, IndexError) as exc:
            raise ConfigError(f"{source} line {n1}: malformed TLE: {exc}") from None
        if satrec.error != 0 or not satrec.no_kozai > 0:
            raise ConfigError(f"{source} line {n1}: SGP4 rejects these elements (error code {satrec.error})")
        sat = EarthSatellite.from_satrec(satrec, ts)
        sat.name = name or f"TLE-{line1[2:7].strip()}"
        if sat.name in seen:
            raise ConfigError(f"{source} line {n1}: satellite {sat.name!r} already defined at line {seen[sat.name]}")
        seen[sat.name] = n1
        satellites.append(sat)
        i += 2
    if not satellites:
        raise ConfigError(f"{source}: no TLE found")
    return satellites


def load_tle_file(path: str | Path) -> list[EarthSatellite]:
    path = Path(path)
    text = read_text_file(path, "TLE")
    return parse_tle_text(text, str(path))


def parse_omm_text(text: str, source: str = "<omm>", fmt: str | None = None) -> list[EarthSatellite]:
    """Satellites from OMM records (CelesTrak `FORMAT=json` or `FORMAT=csv`), via sgp4's omm module."""
    from sgp4 import omm

    fmt = fmt or ("json" if text.lstrip().startswith(("[", "{")) else "csv")
    try:
        if fmt == "json":
            import json

            records = json.loads(text)
            if isinstance(records, dict):
                records = [records]
        else:
            import io

            records = list(omm.parse_csv(io.StringIO(text)))
    except ValueError as exc:
        raise ConfigError(f"{source}: not OMM {fmt.upper()}: {exc}") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{source}: no OMM records")
    ts = timescale()
    satellites: list[EarthSatellite] = []
    seen: set[str] = set()
    for i, fields in enumerate(records):
        where = f"{source} record {i + 1}"
        if not isinstance(fields, dict):
            raise ConfigError(f"{where}: expected an object")
        satrec = Satrec()
        try:
            omm.initialize(satrec, {k: str(v) for k, v in fields.items()})
        except KeyError as exc:
            raise ConfigError(f"{where}: missing OMM field {exc.args[0]}") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: malformed OMM: {exc}") from None
        if satrec.error != 0 or not satrec.no_kozai > 0:
            raise ConfigError(f"{where}: SGP4 rejects these elements (error code {satrec.error})")
        sat = EarthSatellite.from_satrec(satrec, ts)
        sat.name = str(fields.get("OBJECT_NAME") or f"OMM-{fields.get('NORAD_CAT_ID', i + 1)}").strip()
        if sat.name in seen:
            raise ConfigError(f"{where}: satellite {sat.name!r} defined twice")
        seen.add(sat.name)
        satellites.append(sat)
    return satellites


def load_omm_file(path: str | Path) -> list[EarthSatellite]:
    path = Path(path)
    text = read_text_file(path, "OMM")
    fmt = "json" if path.suffix.lower() == ".json" else "csv" if path.suffix.lower() == ".csv" else None
    return parse_omm_text(text, str(path), fmt)


def _walker_shell(walker: Any, where: str, epoch: datetime) -> list[EarthSatellite]:
    if isinstance(walker, str):
        return walker_satellites(parse_walker_spec(walker), epoch)
    if not isinstance(walker, dict):
        raise ConfigError(f"{where}: expected a mapping or an INC:ALT:P/S/F string")
    return walker_satellites(walker_from_mapping(walker, where), epoch)


def satellites_from_topology(
    topology: Mapping[str, Any], epoch: datetime, base_dir: Path | None = None
) -> list[EarthSatellite]:
    """`constellation: {walker: {...}}` or `constellation: {tle_file: PATH}` (relative to `base_dir`)."""
    constellation = topology.get("constellation")
    if not isinstance(constellation, dict):
        raise ConfigError("constellation: missing or not a mapping")
    sources = [k for k in ("walker", "tle_file", "omm_file") if k in constellation]
    if len(sources) != 1:
        raise ConfigError("constellation: give exactly one of walker, tle_file or omm_file")
    if sources == ["walker"]:
        walker = constellation["walker"]
        if not isinstance(walker, list):
            return _walker_shell(walker, "constellation.walker", epoch)
        if not walker:
            raise ConfigError("constellation.walker: an empty list of shells")
        satellites = []
        for i, shell in enumerate(walker):  # several shells: ids WALKER<i>-Ppp-Sss
            for sat in _walker_shell(shell, f"constellation.walker[{i}]", epoch):
                sat.name = sat.name.replace("WALKER-", f"WALKER{i}-", 1)
                satellites.append(sat)
        return satellites
    key = sources[0]
    path = Path(field(constellation, key, str, "constellation"))
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return load_tle_file(path) if key == "tle_file" else load_omm_file(path)
