"""Ground sites from the topology and from CSV, with errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emsfl.config import ConfigError, load_topology
from orbit_service.sites import GroundSite, load_sites_csv, parse_sites_csv, sites_from_topology

LOCAL = Path(__file__).resolve().parents[2] / "testbed" / "topologies" / "local.yaml"


def test_sites_from_local_topology() -> None:
    sites = sites_from_topology(load_topology(LOCAL))
    assert list(sites) == ["c0", "c1", "c2"]
    assert sites["c1"] == GroundSite("nairobi", -1.29, 36.82, 1700.0, 10.0)


def _topology(**site: Any) -> dict[str, Any]:
    base = {"name": "x", "lat_deg": 10.0, "lon_deg": 20.0, "alt_m": 0.0, "min_elevation_deg": 10.0}
    return {"clusters": [{"id": "c0", "site": {**base, **site}}]}


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ({"lat_deg": 95.0}, r"clusters\[0\]\.site\.lat_deg: must be in \[-90, 90\], got 95\.0"),
        ({"lat_deg": -90.5}, r"clusters\[0\]\.site\.lat_deg"),
        ({"lon_deg": 181}, r"clusters\[0\]\.site\.lon_deg: must be in \[-180, 180\]"),
        ({"alt_m": 20000.0}, r"clusters\[0\]\.site\.alt_m"),
        ({"min_elevation_deg": -5.0}, r"clusters\[0\]\.site\.min_elevation_deg"),
        ({"lat_deg": "north"}, r"clusters\[0\]\.site\.lat_deg: expected float"),
        ({"name": ""}, r"clusters\[0\]\.site\.name: must not be empty"),
        ({"lat_deg": float("nan")}, r"clusters\[0\]\.site\.lat_deg"),
    ],
)
def test_site_errors_name_the_field(site: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sites_from_topology(_topology(**site))


def test_missing_site_and_defaults() -> None:
    with pytest.raises(ConfigError, match=r"clusters\[0\]\.site: missing"):
        sites_from_topology({"clusters": [{"id": "c0"}]})
    minimal = sites_from_topology({"clusters": [{"id": "c0", "site": {"name": "a", "lat_deg": 1, "lon_deg": 2}}]})
    assert minimal["c0"].alt_m == 0.0 and minimal["c0"].min_elevation_deg == 10.0


def test_sites_csv(tmp_path: Path) -> None:
    path = tmp_path / "sites.csv"
    path.write_text(
        "name,lat_deg,lon_deg,alt_m,min_elevation_deg\nlisbon,38.72,-9.14,50,10\n\ntokyo,35.68,139.69,40,5\n"
    )
    sites = load_sites_csv(path)
    assert [s.name for s in sites] == ["lisbon", "tokyo"]
    assert sites[1].min_elevation_deg == 5.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("name,lat,lon\n", "line 1: expected the header"),
        (
            "name,lat_deg,lon_deg,alt_m,min_elevation_deg\na,91,0,0,10\n",
            r"sites\.csv line 2: lat_deg: must be in \[-90, 90\]",
        ),
        ("name,lat_deg,lon_deg,alt_m,min_elevation_deg\na,x,0,0,10\n", "line 2: lat_deg: not a number"),
        ("name,lat_deg,lon_deg,alt_m,min_elevation_deg\na,1,0,0\n", "line 2: expected 5 columns"),
        ("name,lat_deg,lon_deg,alt_m,min_elevation_deg\n", "no sites"),
        ("name,lat_deg,lon_deg,alt_m,min_elevation_deg\na,1,0,0,10\na,2,0,0,10\n", "duplicate site names"),
    ],
)
def test_sites_csv_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_sites_csv(text, "sites.csv")
