"""Selection policies, the link model, clock control, overrides, replay, OMM input, azimuth masks, shells."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sgp4.api import Satrec
from sgp4.exporter import export_omm
from skyfield.api import EarthSatellite

from emsfl.config import ConfigError
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.timefmt import parse_iso
from orbit_service.commands import CommandError, check_command
from orbit_service.constellation import WalkerSpec, parse_omm_text, satellites_from_topology, walker_satellites
from orbit_service.contacts import Contact, Handover, Window
from orbit_service.fast import fast_contacts
from orbit_service.link import LinkModel, link_model_from
from orbit_service.plan import Plan, build_plan, load_plan, plan_dict, plan_from_dict
from orbit_service.publisher import OrbitPublisher
from orbit_service.selection import select_windows
from orbit_service.sites import GroundSite, site_from_mapping
from orbit_service.timescale import timescale
from protos import payloads

START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
ISS_1 = "1 25544U 98067A   08264.51782528 -.00002182  00000-0 -11606-4 0  2927"
ISS_2 = "2 25544  51.6416 247.4627 0006703 130.5360 325.0288 15.72125391563537"


def _c(sat: str, aos_min: float, los_min: float) -> Contact:
    return Contact("s", sat, START + timedelta(minutes=aos_min), START + timedelta(minutes=los_min), 40.0)


def _look(profiles: dict[str, Any]) -> Any:
    """A fake geometry: elevation of each satellite a function of seconds from START."""

    def look(sats: list[str], which: np.ndarray, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        el = np.array([profiles[sats[w]](t) for w, t in zip(which, t_s, strict=True)], dtype=float)
        return el, 500.0 + 10.0 * (90.0 - el)

    return look


# A at 0..10 min peaking at 5 min; B at 4..20 min peaking at 12 min; C at 8..14 min, low.
PROFILES = {
    "A": lambda t: 60.0 - abs(t - 300.0) / 6.0,
    "B": lambda t: 70.0 - abs(t - 720.0) / 8.0,
    "C": lambda t: 15.0,
}
CONTACTS = [_c("A", 0, 10), _c("B", 4, 20), _c("C", 8, 14)]


def test_highest_elevation_hands_over_when_another_climbs_above() -> None:
    (w,) = select_windows(CONTACTS, START, _look(PROFILES), "highest-elevation", step_s=10.0)
    assert (w.start, w.end, w.satellite) == (START, START + timedelta(minutes=20), "A")
    assert [h.satellite for h in w.handovers] == ["B"]
    # A and B cross where 60 - |t-300|/6 = 70 - |t-720|/8: t = 300 + 6 (10 + (t-720)/8) ... solved numerically:
    ts = np.arange(300.0, 720.0, 0.01)
    cross = ts[np.argmin(np.abs(np.array([PROFILES["A"](t) - PROFILES["B"](t) for t in ts])))]
    assert abs((w.handovers[0].at - START).total_seconds() - cross) < 1.0
    assert w.handovers[0].elevation_deg == pytest.approx(PROFILES["B"](cross), abs=0.2)


def test_sticky_keeps_the_satellite_until_it_sets() -> None:
    (w,) = select_windows(CONTACTS, START, _look(PROFILES), "sticky")
    assert w.satellite == "A"
    assert [(h.at, h.satellite) for h in w.handovers] == [(START + timedelta(minutes=10), "B")]


def test_longest_remaining_picks_the_latest_setting() -> None:
    contacts = [_c("A", 0, 10), _c("C", 0, 14), _c("B", 4, 20)]
    (w,) = select_windows(contacts, START, _look(PROFILES), "longest-remaining")
    assert w.satellite == "C"
    assert [(h.at, h.satellite) for h in w.handovers] == [(START + timedelta(minutes=14), "B")]


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"link\.selection"):
        select_windows(CONTACTS, START, _look(PROFILES), "random")


def test_link_model_tables_and_validation() -> None:
    model = link_model_from({"rate_table": [[10, 1e6], [50, 5e6], [90, 9e6]], "loss": 0.01})
    assert model.rate_bps(10) == 1e6 and model.rate_bps(30) == pytest.approx(3e6) and model.rate_bps(5) == 1e6
    assert model.rate_bps(89.0) == pytest.approx(8.9e6) and model.loss(40) == 0.01
    assert link_model_from({}).rate_bps(42) == 10_000_000.0 and link_model_from({}).loss(42) == 0.0
    assert link_model_from({"loss_table": [[10, 0.1], [90, 0.0]]}).loss(50) == pytest.approx(0.05)
    with pytest.raises(ConfigError, match=r"link\.rate_table"):
        link_model_from({"rate_table": [[50, 1e6], [10, 2e6]]})
    with pytest.raises(ConfigError, match=r"link\.loss"):
        link_model_from({"loss": 1.5})


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, kind: str, payload: dict[str, Any], retain: bool = False) -> None:
        payloads.encode(kind, payload)  # every payload matches its schema
        self.sent.append((topic, payload))

    def links(self, cluster: str) -> list[dict[str, Any]]:
        return [p for t, p in self.sent if t == f"emsfl/v1/link/{cluster}"]


def _plan() -> Plan:
    w0 = Window(START + timedelta(minutes=10), START + timedelta(minutes=20), "A", 60.0, 10.0, 1800.0)
    w1 = Window(
        START + timedelta(minutes=30),
        START + timedelta(minutes=50),
        "B",
        70.0,
        10.0,
        1800.0,
        (Handover(START + timedelta(minutes=40), "C", 35.0, 900.0),),
    )
    plan = Plan(START, START + timedelta(hours=1), 600.0, {}, {})
    plan.windows = {"c0": [w0, w1], "c1": []}
    return plan


def _run(plan: Plan, scale: float, wall_s: float, model: LinkModel | None = None) -> FakeBus:
    bus = FakeBus()
    clock = EmulatedClock(plan.start_utc, time.time(), scale)
    pub = OrbitPublisher(plan, bus, clock, model or LinkModel(), 3)  # type: ignore[arg-type]
    pub.start()
    time.sleep(wall_s)
    pub.stop()
    return bus


def test_handover_and_link_model_are_published() -> None:
    model = LinkModel(((10.0, 1e6), (90.0, 9e6)), ((0.0, 0.02),))
    bus = _run(_plan(), 6000.0, 0.7, model)  # an emulated hour in 0.6 s
    links = bus.links("c0")
    assert [(p["state"], p["satellite"]) for p in links] == [
        ("down", None),
        ("up", "A"),
        ("down", None),
        ("up", "B"),
        ("up", "C"),
        ("down", None),
    ]
    assert [p["seq"] for p in links] == list(range(6))
    handover = links[4]
    assert handover["since"] == links[3]["since"] and handover["rate_bps"] == pytest.approx(1e6 + 8e6 * 25 / 80)
    assert handover["delay_s"] == pytest.approx(900.0 / 299792.458) and handover["loss"] == 0.02


def _transitions(bus: FakeBus) -> list[tuple[Any, ...]]:
    return [
        (t, p["state"], p["seq"], p["since"], p.get("satellite"), p.get("rate_bps"))
        for t, p in bus.sent
        if "/link/" in t
    ]


def test_replay_of_a_recorded_plan_publishes_identical_sequences(tmp_path: Path) -> None:
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 4, 5, 1), START)
    sites = {"c0": GroundSite("lisbon", 38.72, -9.14), "c1": GroundSite("tokyo", 35.68, 139.69)}
    plan = build_plan(sites, sats, START, START + timedelta(hours=3), scale=40000.0)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_dict(plan)))
    first = _transitions(_run(load_plan(path), 40000.0, 0.6))
    second = _transitions(_run(load_plan(path), 40000.0, 0.6))
    assert first == second and len([t for t in first if "link" in t[0]]) > 6
    # The replayed plan is the recorded one.
    assert plan_dict(load_plan(path))["windows"] == plan_dict(plan)["windows"]
    with pytest.raises(ConfigError, match="windows"):
        plan_from_dict({"contacts": []})


def test_pause_resume_and_scale_keep_emulated_time_continuous() -> None:
    plan = _plan()
    bus = FakeBus()
    clock = EmulatedClock(plan.start_utc, time.time(), 60.0)
    pub = OrbitPublisher(plan, bus, clock, LinkModel(), 3)  # type: ignore[arg-type]
    pub.start()
    try:
        before = pub.clock.now()
        pub.pause()
        paused_at = pub.clock.now()
        time.sleep(0.3)
        assert pub.clock.now() == paused_at and pub.clock.paused
        assert abs((paused_at - before).total_seconds()) < 60.0 * 0.2
        pub.resume()
        assert abs((pub.clock.now() - paused_at).total_seconds()) < 60.0 * 0.1
        pub.set_scale(6000.0)
        t0 = pub.clock.now()
        assert abs((t0 - paused_at).total_seconds()) < 60.0 * 0.2  # continuous across the scale change
        # The rescheduled transitions follow the new scale: the first up (10 min in) is due within 0.2 s.
        deadline = time.time() + 2.0
        while time.time() < deadline and len(bus.links("c0")) < 2:
            time.sleep(0.02)
        assert [p["state"] for p in bus.links("c0")][:2] == ["down", "up"]
    finally:
        pub.stop()
    clocks = [p for t, p in bus.sent if t == "emsfl/v1/clock"]
    assert [c["paused"] for c in clocks] == [False, True, False, False] and clocks[-1]["scale"] == 6000.0


def test_force_down_then_release_back_to_the_plan() -> None:
    plan = _plan()
    bus = FakeBus()
    # Start inside the first window: up, then force down for 2 emulated minutes at scale 600 (0.2 s).
    clock = EmulatedClock(START + timedelta(minutes=12), time.time(), 600.0)
    pub = OrbitPublisher(plan, bus, clock, LinkModel(), 3)  # type: ignore[arg-type]
    pub.start()
    try:
        pub.force("c0", "down", 120.0)
        time.sleep(0.6)
        pub.force("c1", "up", None, delay_s=0.01, rate_bps=1e6)
        with pytest.raises(KeyError):
            pub.force("nope", "down", 10.0)
    finally:
        pub.stop()
    c0 = bus.links("c0")
    assert [(p["state"], p.get("forced", False)) for p in c0[:3]] == [("up", False), ("down", True), ("up", False)]
    assert [p["seq"] for p in c0] == list(range(len(c0)))
    c1 = bus.links("c1")[-1]
    assert c1["state"] == "up" and c1["forced"] and c1["delay_s"] == 0.01 and c1["rate_bps"] == 1e6


def test_malformed_commands_are_refused_with_the_reason() -> None:
    ok = {"schema": "emsfl.v1.cmd", "version": 1, "cluster": "c0", "state": "down", "duration_s": 60}
    assert check_command("link", json.dumps(ok))["cluster"] == "c0"
    cases = [
        ("link", "{not json", "not UTF-8 JSON"),
        ("link", json.dumps({**ok, "state": "sideways"}), "state"),
        ("link", json.dumps({k: v for k, v in ok.items() if k != "cluster"}), "missing field(s) cluster"),
        ("scale", json.dumps({"schema": "emsfl.v1.cmd", "version": 1, "scale": -1}), "scale"),
        ("pause", json.dumps({**ok}), "unexpected field"),
        ("explode", json.dumps({"schema": "emsfl.v1.cmd", "version": 1}), "unknown verb"),
    ]
    for verb, data, message in cases:
        with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_command(verb, data)


def test_omm_json_and_csv_match_the_tle() -> None:
    satrec = Satrec.twoline2rv(ISS_1, ISS_2)
    fields = export_omm(satrec, "ISS (ZARYA)")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields))
    writer.writeheader()
    writer.writerow(fields)
    ts = timescale()
    reference = EarthSatellite(ISS_1, ISS_2, "ISS", ts)
    t = ts.utc(2008, 9, 20, 13)
    for text in (json.dumps([fields]), out.getvalue()):
        (sat,) = parse_omm_text(text, "omm")
        assert sat.name == "ISS (ZARYA)"
        assert np.allclose(sat.at(t).position.km, reference.at(t).position.km, atol=1e-3)
    with pytest.raises(ConfigError, match="missing OMM field"):
        parse_omm_text(json.dumps([{"OBJECT_NAME": "X"}]), "omm")


def test_several_walker_shells_and_omm_file_in_topology(tmp_path: Path) -> None:
    topology = {
        "constellation": {
            "walker": ["53:550:2/3/1", {"inclination_deg": 97.6, "altitude_km": 800, "planes": 1, "sats_per_plane": 4}]
        }
    }
    sats = satellites_from_topology(topology, START)
    assert len(sats) == 10 and len({s.name for s in sats}) == 10
    assert sats[0].name.startswith("WALKER0-") and sats[-1].name.startswith("WALKER1-")
    (tmp_path / "iss.json").write_text(json.dumps([export_omm(Satrec.twoline2rv(ISS_1, ISS_2), "ISS")]))
    assert [s.name for s in satellites_from_topology({"constellation": {"omm_file": "iss.json"}}, START, tmp_path)] == [
        "ISS"
    ]


def test_azimuth_mask_against_a_brute_force_skyfield_scan() -> None:
    """A site whose mask rises to 40 deg towards the east: passes from a 1 s skyfield scan of el >= mask(az)."""
    site = site_from_mapping(
        {
            "name": "valley",
            "lat_deg": 38.72,
            "lon_deg": -9.14,
            "min_elevation_deg": 5.0,
            "mask": [[0, 5], [90, 40], [180, 5]],
        },
        "site",
    )
    assert site.mask_at(90.0) == 40.0 and site.mask_at(45.0) == pytest.approx(22.5) and site.mask_at(270.0) == 5.0
    sats = walker_satellites(WalkerSpec(53.0, 550.0, 3, 4, 1), START)
    end = START + timedelta(hours=3)
    found, _, _ = fast_contacts({"v": site}, sats, START, end)
    ts = timescale()
    seconds = np.arange(0, 3 * 3600 + 1, 1.0)
    times = ts.from_datetimes([START + timedelta(seconds=float(s)) for s in seconds])
    expected = []
    for sat in sats:
        alt, az, _ = (sat - site.topos()).at(times).altaz()
        up = alt.degrees >= np.array([site.mask_at(a) for a in az.degrees])
        padded = np.concatenate([[False], up, [False]]).astype(int)
        starts = seconds[np.flatnonzero(np.diff(padded) == 1)]
        ends = seconds[np.flatnonzero(np.diff(padded) == -1) - 1]
        expected += [(sat.name, a, b) for a, b in zip(starts, ends, strict=False) if b > a]
    got = [(c.satellite, (c.aos - START).total_seconds(), (c.los - START).total_seconds()) for c in found["v"]]
    assert len(got) == len(expected) > 0
    for name, a, b in expected:
        assert any(n == name and abs(a - ga) <= 2.0 and abs(b - gb) <= 2.0 for n, ga, gb in got), (name, a, b)
    assert parse_iso("2026-03-20T06:00:00Z") == START


def test_cli_replay_and_override_bad_input_returns_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orbit_service.cli import main

    assert main(["run", "--replay", str(tmp_path / "none.json"), "--broker", "127.0.0.1:1"]) == 2
    assert "cannot read plan file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"windows": {"c0": [{"start": "x"}]}, "start_utc": "2026-03-20T06:00:00Z"}')
    assert main(["run", "--replay", str(tmp_path / "bad.json"), "--broker", "127.0.0.1:1"]) == 2
    assert "end_utc" in capsys.readouterr().err
    assert main(["override", "--broker", "127.0.0.1:1", "link", "--cluster", "c0", "--state", "sideways"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["override", "--broker", "localhost", "pause"]) == 2
    assert "--broker" in capsys.readouterr().err
