"""Walker-delta generation, the Walker spec string, and TLE parsing (checksums, malformed lines)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from emsfl.config import ConfigError
from orbit_service.constellation import (
    WalkerSpec,
    load_tle_file,
    parse_tle_text,
    parse_walker_spec,
    satellites_from_topology,
    tle_checksum,
    walker_satellites,
)

EPOCH = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
ISS_1 = "1 25544U 98067A   08264.51782528 -.00002182  00000-0 -11606-4 0  2927"
ISS_2 = "2 25544  51.6416 247.4627 0006703 130.5360 325.0288 15.72125391563537"
EARTH_RADIUS_KM = 6378.137


def _teme_states(sat: object, moments: list[datetime]) -> tuple[np.ndarray, np.ndarray]:
    """Position and velocity (TEME, km and km/s) straight from the SGP4 model, without skyfield frames."""
    from sgp4.api import jday

    rs, vs = [], []
    for m in moments:
        jd, fr = jday(m.year, m.month, m.day, m.hour, m.minute, m.second + m.microsecond / 1e6)
        err, r, v = sat.model.sgp4(jd, fr)  # type: ignore[attr-defined]
        assert err == 0
        rs.append(r)
        vs.append(v)
    return np.array(rs), np.array(vs)


def test_walker_count_names_and_orbits() -> None:
    spec = WalkerSpec(inclination_deg=53.0, altitude_km=550.0, planes=3, sats_per_plane=4, phasing=1)
    sats = walker_satellites(spec, EPOCH)
    assert len(sats) == 12
    names = [s.name for s in sats]
    assert names[0] == "WALKER-P00-S00" and "WALKER-P02-S03" in names and len(set(names)) == 12

    # One orbit (~96 min) sampled each minute: mean radius gives the altitude, r x v the orbital plane.
    moments = [EPOCH + timedelta(minutes=k) for k in range(96)]
    nodes = []
    for sat in sats:
        r, v = _teme_states(sat, moments)
        altitude_km = float(np.linalg.norm(r, axis=1).mean()) - EARTH_RADIUS_KM
        assert altitude_km == pytest.approx(550.0, abs=10.0)
        h = np.cross(r[0], v[0])
        inclination = math.degrees(math.acos(h[2] / np.linalg.norm(h)))
        assert inclination == pytest.approx(53.0, abs=0.2)
        nodes.append(math.degrees(math.atan2(h[0], -h[1])) % 360.0)
    # Planes are spread evenly in right ascension of the ascending node: 0, 120, 240 degrees.
    for p in range(3):
        for s in range(4):
            expected = 120.0 * p
            diff = (nodes[p * 4 + s] - expected + 180.0) % 360.0 - 180.0
            assert abs(diff) < 0.5, (p, s, nodes[p * 4 + s])


def test_walker_phasing_offsets_adjacent_planes() -> None:
    # With F = 1 and T = 12, plane p's first satellite leads plane 0's by 30 degrees of mean anomaly.
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), EPOCH)
    assert math.degrees(sats[4].model.mo) == pytest.approx(30.0, abs=1e-6)
    assert math.degrees(sats[8].model.mo) == pytest.approx(60.0, abs=1e-6)
    assert math.degrees(sats[1].model.mo) == pytest.approx(90.0, abs=1e-6)


def test_parse_walker_spec() -> None:
    assert parse_walker_spec("53:550:3/4/1") == WalkerSpec(53.0, 550.0, 3, 4, 1)
    assert parse_walker_spec(" 97.6:500.5:6/10/0 ") == WalkerSpec(97.6, 500.5, 6, 10, 0)


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("53:550:3/4", "INC_DEG:ALT_KM"),
        ("53-550-3-4-1", "INC_DEG:ALT_KM"),
        ("200:550:3/4/1", "inclination_deg"),
        ("53:50:3/4/1", "altitude_km"),
        ("53:550:0/4/1", "planes"),
        ("53:550:3/0/1", "sats_per_plane"),
        ("53:550:3/4/3", "phasing"),
    ],
)
def test_parse_walker_spec_errors_name_the_problem(spec: str, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        parse_walker_spec(spec)


def test_walker_from_topology_and_field_errors() -> None:
    walker = {"inclination_deg": 53.0, "altitude_km": 550.0, "planes": 2, "sats_per_plane": 3, "phasing": 1}
    sats = satellites_from_topology({"constellation": {"walker": walker}}, EPOCH)
    assert len(sats) == 6
    assert len(satellites_from_topology({"constellation": {"walker": "53:550:2/2/0"}}, EPOCH)) == 4
    with pytest.raises(ConfigError, match=r"constellation\.walker\.planes: expected int"):
        satellites_from_topology({"constellation": {"walker": {**walker, "planes": "two"}}}, EPOCH)
    with pytest.raises(ConfigError, match=r"constellation\.walker\.altitude_km: required"):
        satellites_from_topology(
            {"constellation": {"walker": {k: v for k, v in walker.items() if k != "altitude_km"}}}, EPOCH
        )
    with pytest.raises(ConfigError, match="exactly one of walker, tle_file or omm_file"):
        satellites_from_topology({"constellation": {}}, EPOCH)


def test_tle_two_and_three_line(tmp_path: Path) -> None:
    assert tle_checksum(ISS_1) == 7 and tle_checksum(ISS_2) == 7
    two = parse_tle_text(f"{ISS_1}\n{ISS_2}\n")
    assert [s.name for s in two] == ["TLE-25544"]
    path = tmp_path / "sats.tle"
    # 3-line, CelesTrak's "0 " name prefix, CRLF line ends and blank lines are all accepted.
    path.write_text(f"ISS (ZARYA)\r\n{ISS_1}\r\n{ISS_2}\r\n\r\n0 ISS COPY\r\n{ISS_1}\r\n{ISS_2}\r\n", encoding="utf-8")
    # The same catalogue entry under two names is accepted; the same name twice is not (tested below).
    sats = load_tle_file(path)
    assert [s.name for s in sats] == ["ISS (ZARYA)", "ISS COPY"]
    assert sats[0].model.satnum == 25544
    assert math.degrees(sats[0].model.inclo) == pytest.approx(51.6416)


def test_tle_bad_checksum_names_the_line(tmp_path: Path) -> None:
    bad = ISS_2[:-1] + "8"
    path = tmp_path / "bad.tle"
    path.write_text(f"ISS\n{ISS_1}\n{bad}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.tle line 3: bad checksum"):
        load_tle_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"ISS\n{ISS_1[:60]}\n{ISS_2}\n", r"line 2: a TLE line has 69 characters"),
        (f"ISS\n{ISS_2}\n{ISS_1}\n", r"line 2: expected a satellite name or TLE line 1|line 2: expected TLE line 1"),
        (f"{ISS_1}\n{ISS_1}\n", r"line 2: expected TLE line 2"),
        (f"ISS\n{ISS_1}\n", r"line 2: incomplete TLE"),
        (f"{ISS_1}\n{ISS_2[:2]}99999{ISS_2[7:68]}{tle_checksum(ISS_2[:2] + '99999' + ISS_2[7:])}\n", "catalogue"),
        (f"{ISS_1}\n{ISS_2}\n{ISS_1}\n{ISS_2}\n", "already defined at line 1"),
        ("\n\n", "no TLE found"),
        (f"{ISS_1[:68]}x\n{ISS_2}\n", r"line 1: the checksum \(column 69\) must be a digit"),
    ],
)
def test_tle_malformed_input(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_tle_text(text, "sats.tle")


def test_tle_malformed_field_is_reported() -> None:
    # Right length and checksum, but garbage where SGP4 expects the mean motion.
    broken = ISS_2[:52] + "xx.xxxxxxxx" + ISS_2[63:68]
    broken += str(tle_checksum(broken + "0"))
    with pytest.raises(ConfigError, match=r"sats\.tle line 2: malformed TLE: mean motion \(columns 53-63\)"):
        parse_tle_text(f"{ISS_1}\n{broken}\n", "sats.tle")


def test_missing_tle_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read TLE file"):
        load_tle_file(tmp_path / "none.tle")
