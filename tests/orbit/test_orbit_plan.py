"""Plan exports (JSON/CSV round-trip, --plan-out shape) and `emsfl orbit plan` including bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from emsfl.config import load_topology
from emsfl.runtime.timefmt import parse_iso
from orbit_service.cli import default_run_hours, main
from orbit_service.plan import (
    contacts_csv,
    contacts_json,
    parse_contacts_csv,
    parse_contacts_json,
    plan_dict,
    plan_from_topology,
)

LOCAL = Path(__file__).resolve().parents[2] / "testbed" / "topologies" / "local.yaml"
START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
ISS_1 = "1 25544U 98067A   08264.51782528 -.00002182  00000-0 -11606-4 0  2927"
ISS_2 = "2 25544  51.6416 247.4627 0006703 130.5360 325.0288 15.72125391563537"
SITES_CSV = "name,lat_deg,lon_deg,alt_m,min_elevation_deg\nlisbon,38.72,-9.14,50,10\ntokyo,35.68,139.69,40,10\n"


def test_plan_dict_shape() -> None:
    plan = plan_from_topology(load_topology(LOCAL), START, START + timedelta(hours=3), scale=240.0)
    doc = json.loads(json.dumps(plan_dict(plan)))
    assert doc["start_utc"] == "2026-03-20T06:00:00.000Z" and doc["end_utc"] == "2026-03-20T09:00:00.000Z"
    assert doc["scale"] == 240.0
    assert set(doc["windows"]) == {"c0", "c1", "c2"}
    assert {"site", "cluster", "satellite", "aos", "los", "peak_elevation_deg"} <= set(doc["contacts"][0])
    aos = [parse_iso(c["aos"]) for c in doc["contacts"]]
    assert aos == sorted(aos)
    for windows in doc["windows"].values():
        for w in windows:
            assert parse_iso(w["start"]) < parse_iso(w["end"]) and w["satellite"].startswith("WALKER-")


def test_contacts_json_and_csv_round_trip() -> None:
    plan = plan_from_topology(load_topology(LOCAL), START, START + timedelta(hours=3))
    contacts = [c for _, c in plan.all_contacts()]
    assert len(contacts) > 5
    assert parse_contacts_json(contacts_json(contacts)) == contacts
    assert parse_contacts_csv(contacts_csv(contacts)) == contacts


def test_cli_plan_topology_json(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "--topology", str(LOCAL), "--hours", "2", "--out", str(out)]) == 0
    contacts = json.loads(out.read_text())["contacts"]
    assert contacts and set(contacts[0]) == {"site", "satellite", "aos", "los", "peak_elevation_deg"}
    assert {c["site"] for c in contacts} <= {"lisbon", "nairobi", "tokyo"}
    assert parse_iso(contacts[0]["aos"]) >= START  # the topology's clock.start_utc is the default start


def test_cli_plan_walker_csv_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sites = tmp_path / "sites.csv"
    sites.write_text(SITES_CSV)
    argv = ["plan", "--walker", "53:550:3/4/1", "--sites", str(sites), "--start", "2026-03-20T06:00:00Z"]
    assert main([*argv, "--hours", "3", "--format", "csv"]) == 0
    contacts = parse_contacts_csv(capsys.readouterr().out)
    assert contacts and {c.site for c in contacts} == {"lisbon", "tokyo"}
    assert all(START <= c.aos < c.los <= START + timedelta(hours=3) for c in contacts)


def test_cli_plan_tle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tle, sites = tmp_path / "iss.tle", tmp_path / "sites.csv"
    tle.write_text(f"ISS (ZARYA)\n{ISS_1}\n{ISS_2}\n")
    sites.write_text(SITES_CSV)
    argv = ["plan", "--tle", str(tle), "--sites", str(sites), "--start", "2008-09-20T12:00:00Z", "--hours", "24"]
    assert main(argv) == 0
    contacts = json.loads(capsys.readouterr().out)["contacts"]
    assert contacts and all(c["satellite"] == "ISS (ZARYA)" for c in contacts)


@pytest.mark.parametrize(
    ("files", "argv", "message"),
    [
        (
            {"bad.tle": f"ISS\n{ISS_1}\n{ISS_2[:-1]}0\n"},
            ["--tle", "bad.tle", "--sites", "s.csv"],
            "bad.tle line 3: bad checksum",
        ),
        (
            {"bad.tle": f"ISS\n{ISS_1[:50]}\n{ISS_2}\n"},
            ["--tle", "bad.tle", "--sites", "s.csv"],
            "bad.tle line 2: a TLE line has 69",
        ),
        (
            {"s.csv": SITES_CSV.replace("38.72", "98.72")},
            ["--walker", "53:550:3/4/1", "--sites", "s.csv"],
            "s.csv line 2: lat_deg: must be in [-90, 90]",
        ),
        ({}, ["--walker", "53:550:3/4/1", "--sites", "s.csv", "--hours", "0"], "--hours: must be > 0"),
        ({}, ["--walker", "53:550:3/4", "--sites", "s.csv"], "walker spec '53:550:3/4'"),
        ({}, ["--walker", "53:550:3/4/1"], "--sites: required"),
        ({}, ["--walker", "53:550:3/4/1", "--sites", "s.csv", "--start", "yesterday"], "--start: not an ISO 8601 time"),
        ({}, ["--walker", "53:550:3/4/1", "--tle", "x.tle"], "not allowed with argument"),
        (
            {"t.yaml": "clusters: [{id: c0, site: {name: a, lat_deg: -91, lon_deg: 0}}]\n"},
            ["--topology", "t.yaml"],
            "lat_deg",
        ),
    ],
)
def test_cli_plan_bad_input_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, str], argv: list[str], message: str
) -> None:
    (tmp_path / "s.csv").write_text(SITES_CSV)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = [str(tmp_path / a) if (tmp_path / a).exists() or a.endswith((".tle", ".csv", ".yaml")) else a for a in argv]
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_run_bad_input_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--topology", str(LOCAL), "--broker", "localhost"]) == 2
    assert "--broker: expected HOST:PORT" in capsys.readouterr().err
    assert main(["run", "--topology", str(LOCAL), "--broker", "127.0.0.1:1", "--scale", "-3"]) == 2
    assert "--scale: must be > 0" in capsys.readouterr().err
    assert main(["run", "--topology", str(tmp_path / "none.yaml"), "--broker", "127.0.0.1:1"]) == 2
    assert "cannot read topology file" in capsys.readouterr().err
    assert main(["run", "--broker", "127.0.0.1:1"]) == 2
    assert "--topology" in capsys.readouterr().err


def test_default_run_hours() -> None:
    topology = load_topology(LOCAL)
    # 150 wall s at 240x is 10 emulated hours, plus 10 %.
    assert default_run_hours(topology, 240.0) == pytest.approx(11.0)
    assert default_run_hours({}, 240.0) == 24.0


def test_cli_imports_no_heavy_modules() -> None:
    code = (
        "import sys, orbit_service.cli, orbit_service.publisher\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'grpc'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_cli_help_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--help"]) == 0
    assert "--walker" in capsys.readouterr().out
