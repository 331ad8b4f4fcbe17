"""The dashboard in a real headless Chromium (Selenium, Debian's chromium-driver) watching a short lab run of real
processes on Mosquitto: the page follows the orbit's link states, the satellite's commits and the constellation,
with no console error and no request to any host but its own.

One lab run serves every test of the module (module-scoped fixture). Screenshots go to $EMSFL_SCREENSHOT_DIR
(docs/img/ for the README) or the test's temporary directory.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from emsfl.runtime.events import read_events
from emsfl.runtime.timefmt import parse_iso
from testbed.broker import BrokerProcess, free_port, wait_for_port
from testbed.dashboard import probe
from testbed.lab import DEFAULT_TOPOLOGY, LabOptions, LabRun, run_lab, stop_dashboard

pytestmark = pytest.mark.slow

if probe.find_chromium() is None:
    if os.environ.get("CI") == "true":
        pytest.fail("CI=true but chromium/chromedriver are missing: .ci/run installs chromium chromium-driver")
    pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)", allow_module_level=True)

LAB_SECONDS = 45.0


@dataclass
class Watched:
    lab: LabRun
    url: str
    samples: probe.PageSamples
    console_errors: list[dict[str, Any]]
    urls: list[str]
    csp_reports: list[Any]
    final: dict[str, Any]
    shots: list[Path]


class BrowserWatcher(threading.Thread):
    """Opens the page once the dashboard listens and reads it twice a second; takes the README's screenshot at the
    first moment with a commit and a serving link. The lab itself runs in the test's main thread (its role
    processes die with the thread that started them)."""

    def __init__(self, url: str, port: int, profile: Path, shot: Path) -> None:
        super().__init__(daemon=True)
        self.url, self.port, self.profile, self.shot = url, port, profile, shot
        self.driver: Any = None
        self.poller: probe.PagePoller | None = None
        self.error: BaseException | None = None
        self.shot_taken = False
        self.done = threading.Event()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 600
            while not self.done.is_set():  # the base model warms up before the dashboard starts
                try:
                    wait_for_port("127.0.0.1", self.port, 1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
            self.driver = probe.new_driver(self.profile)
            self.driver.get_log("performance")  # drop what the browser did before it opened the page
            self.driver.get(self.url + "/")
            probe.wait_for(self.driver, "window.emsfl && window.emsfl.snapshots > 0", 60, "its first snapshot")
            self.poller = probe.PagePoller(self.driver)
            shot_wall = 0.0
            while not self.done.wait(0.5):
                last = self.poller.read_once()
                # the README's picture: the latest moment (within 5 s) with a commit and a serving link
                if last["commits"] not in ("0", "") and last["serving"] and time.monotonic() - shot_wall > 5.0:
                    self.driver.save_screenshot(str(self.shot))
                    self.shot_taken, shot_wall = True, time.monotonic()
        except BaseException as exc:  # re-raised in the test's thread
            self.error = exc

    def finish(self) -> probe.PageSamples:
        self.done.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        assert self.poller is not None
        return self.poller.stop()


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory, module_broker: BrokerProcess) -> Watched:
    from testbed.outputs import write_outputs

    tmp = tmp_path_factory.mktemp("dashboard-lab")
    shots_dir = Path(os.environ.get("EMSFL_SCREENSHOT_DIR") or tmp / "shots")
    shots_dir.mkdir(parents=True, exist_ok=True)
    topology: dict[str, Any] = yaml.safe_load(DEFAULT_TOPOLOGY.read_text(encoding="utf-8"))
    # small: the page, not the model, is under test (the warm-up dominates the module's time)
    topology["data"]["train_per_cluster"] = 800
    topology["data"]["test_per_domain"] = 25
    topology["warmup"]["steps"] = 30
    topology["training"]["stage_every_steps"] = 10  # uploads early, even on a loaded machine
    topology["lab"]["eval_points"] = 3
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    opts = LabOptions(
        topology_path=path,
        broker=module_broker.address,
        duration_wall_s=LAB_SECONDS,
        runs_dir=tmp / "runs",
        run_id="dash",
        cache_dir=tmp / "cache",
        dashboard_port=port,
    )
    watcher = BrowserWatcher(url, port, tmp / "chromium-profile", shots_dir / "dashboard-lab.png")
    watcher.start()
    lab: LabRun | None = None
    try:
        lab = run_lab(opts)
        write_outputs(lab)  # the accuracy points appear on the page as they are evaluated
        driver = watcher.driver
        probe.wait_for(driver, "document.querySelectorAll('#accuracy circle').length >= 2", 60, "accuracy points")
        samples = watcher.finish()
        driver.save_screenshot(str(shots_dir / "dashboard-lab-end.png"))
        final = driver.execute_script(
            """return {
              steps: Array.from(document.querySelectorAll('#clusters td.steps')).map((td) => td.textContent),
              memory: Array.from(document.querySelectorAll('#clusters td.memory')).map((td) => td.textContent),
              assignment: Array.from(document.querySelectorAll('#clusters td.assignment')).map((td) => td.textContent),
              heatmap: document.querySelectorAll('#heatmap rect[data-owner]:not([data-owner=""])').length,
              accuracy: document.querySelectorAll('#accuracy circle').length,
              strategy: document.getElementById('strategy').textContent,
              operatorHidden: document.getElementById('operator-panel').classList.contains('hidden'),
            };"""
        )
        errors = probe.console_errors(driver)
        urls = probe.requested_urls(driver)
        with urllib.request.urlopen(url + "/api/csp-reports", timeout=10) as resp:
            csp_reports = json.loads(resp.read())
    finally:
        watcher.done.set()
        watcher.join(60)
        if watcher.driver is not None:
            watcher.driver.quit()
        if lab is not None:
            stop_dashboard(lab)
    shots = [shots_dir / "dashboard-lab.png", shots_dir / "dashboard-lab-end.png"]
    return Watched(lab, url, samples, errors, urls, csp_reports, final, shots)


def _plan_windows(lab: LabRun) -> dict[str, list[tuple[datetime, datetime]]]:
    plan = json.loads(lab.plan_path.read_text(encoding="utf-8"))
    return {c: [(parse_iso(w["start"]), parse_iso(w["end"])) for w in ws] for c, ws in plan["windows"].items()}


def _planned_up(windows: list[tuple[datetime, datetime]], at: datetime) -> bool:
    return any(start <= at < end for start, end in windows)


def _link_events(lab: LabRun) -> list[dict[str, Any]]:
    return [e for e in read_events(lab.orbit_events_path) if e.get("event") in ("link_up", "link_down", "handover")]


def test_every_link_event_reaches_the_page_with_its_state(watched: Watched) -> None:
    events = _link_events(watched.lab)
    rendered = watched.samples.rendered
    watching_from = min(float(r["wall"]) for r in rendered.values())
    seen = [e for e in events if float(e["wall"]) >= watching_from]
    assert seen, "no link event while the page was open"
    flips: dict[str, set[str]] = {c: set() for c in watched.lab.ground_dirs}
    for e in seen:
        shown = rendered.get(f"{e['cluster']}:{e['seq']}")
        assert shown is not None, f"the page never showed {e}"
        assert shown["state"] == ("down" if e["event"] == "link_down" else "up"), (e, shown)
        flips[e["cluster"]].add(shown["state"])
    assert all(states == {"up", "down"} for states in flips.values()), flips
    delays = probe.link_event_delays(events, rendered)
    print(f"event_to_dom: n={len(delays)} p95={probe.p95(delays)} s")


def test_link_states_flip_in_step_with_the_published_windows(watched: Watched) -> None:
    windows = _plan_windows(watched.lab)
    events = _link_events(watched.lab)
    scale = float(watched.lab.topology["clock"]["scale"])
    first = events[0]  # the initial states: emulated t at wall time `wall` (no pause or scale change in this run)
    t0, wall0 = parse_iso(first["t"]), float(first["wall"])
    # A sample may lag a transition by the page's own delay (measured) and the poll period: those are skipped.
    delays = probe.link_event_delays(events, watched.samples.rendered)
    band_s = max(delays, default=0.0) + 0.6
    edges = {c: [t for w in ws for t in w] for c, ws in windows.items()}
    checked: dict[str, set[str]] = {c: set() for c in windows}
    for sample in watched.samples.samples:
        if float(sample["wall"]) > watched.lab.stopped_wall:
            continue  # the page holds the last states once the orbit stops; the plan goes on (a flake of the suite)
        at = t0 + timedelta(seconds=(float(sample["wall"]) - wall0) * scale)
        for cluster, row in sample["rows"].items():
            if row["state"] not in ("up", "down"):
                continue
            if any(abs((at - edge).total_seconds()) <= band_s * scale for edge in edges[cluster]):
                continue
            planned = "up" if _planned_up(windows[cluster], at) else "down"
            assert row["state"] == planned, f"{cluster} shown {row['state']} at {at}, plan says {planned}"
            checked[cluster].add(planned)
    # every cluster was checked; short passes (a few wall tenths at x240) may lie wholly in the skipped bands
    assert all(checked.values()), checked
    assert any("up" in states for states in checked.values()), checked


def test_commit_counter_rises_with_the_satellite_commits(watched: Watched) -> None:
    from satellite_node.export import commits

    shown = [int(s["commits"]) for s in watched.samples.samples if s["commits"].isdigit()]
    assert shown == sorted(shown), "the commit counter went down"
    assert shown[-1] > shown[0] and shown[-1] >= 1
    assert shown[-1] == len(commits(watched.lab.state_dir))


def test_satellites_move_on_the_map(watched: Watched) -> None:
    with_sats = [s["sats"] for s in watched.samples.samples if s["sats"]]
    assert len(with_sats[0]) == 12  # the local topology's 3 x 4 Walker shell
    moved = [sat for sat, xy in with_sats[0].items() if with_sats[-1].get(sat) != xy]
    assert len(moved) == 12
    assert any(s["serving"] for s in watched.samples.samples), "no serving-link line while links were up"


def test_panels_show_training_assignment_and_accuracy(watched: Watched) -> None:
    final = watched.final
    reports = [json.loads((d / "report.json").read_text()) for _, d in sorted(watched.lab.ground_dirs.items())]
    # live figures: at most what each node reported on stopping; a cluster whose first pass came late may not train
    shown_steps = [int(s) for s in final["steps"]]
    assert all(s <= r["steps"] for s, r in zip(shown_steps, reports, strict=True)), (shown_steps, reports)
    assert sum(shown_steps) > 0
    assert all(m.endswith("MB") for m in final["memory"]), final["memory"]
    trained = [a for a, s in zip(final["assignment"], shown_steps, strict=True) if s > 0]
    assert trained and all(a.startswith("v") and "L0:" in a for a in trained), final["assignment"]
    from testbed.dashboard.sources import SatelliteState

    status = SatelliteState(watched.lab.state_dir)
    try:
        assignment = (status.read() or {})["assignment"]
    finally:
        status.close()
    owned = sum(len(experts) for per_layer in assignment.values() for _, experts in per_layer)
    assert final["heatmap"] == owned > 0
    assert final["strategy"] == "emsfl" and final["accuracy"] >= 2
    assert final["operatorHidden"] is True  # the lab's dashboard is read-only


def test_no_console_error_and_no_foreign_request(watched: Watched) -> None:
    assert watched.console_errors == []
    assert any(u.endswith("/api/stream") for u in watched.urls)
    assert probe.foreign_requests(watched.urls, watched.url) == []
    assert watched.csp_reports == []
    assert all(p.is_file() and p.stat().st_size > 10_000 for p in watched.shots)


def test_operator_page_pauses_the_clock_with_its_token(tmp_path: Path, module_broker: BrokerProcess) -> None:
    """The page's own controls: the token from the printed URL's fragment, a click, the orbit's event log."""
    import re

    from testbed.procs import RoleProcess

    events = tmp_path / "orbit-events.jsonl"
    args = ["run", "--topology", str(DEFAULT_TOPOLOGY), "--broker", module_broker.address, "--hours", "1"]
    orbit = RoleProcess("orbit", ["orbit", *args, "--events", str(events)], tmp_path / "orbit.log").start()
    port = free_port()
    dash_args = ["dashboard", "--broker", module_broker.address, "--listen", f"127.0.0.1:{port}", "--operator"]
    dash = RoleProcess("dashboard", dash_args, tmp_path / "dashboard.log").start()
    driver = None
    try:
        wait_for_port("127.0.0.1", port, 60)
        printed = re.search(r"(http://\S+#token=\S+)", dash.log_path.read_text())
        assert printed is not None
        driver = probe.new_driver(tmp_path / "profile")
        driver.get(printed[1])
        probe.wait_for(driver, "window.emsfl && window.emsfl.firstRenderMs", 120, "the orbit's clock")
        assert driver.execute_script("return !document.getElementById('operator-panel').classList.contains('hidden')")
        driver.find_element("id", "op-pause").click()
        probe.wait_for(driver, "document.getElementById('op-result').textContent === 'pause: done'", 30, "pause done")
        probe.wait_for(driver, "document.getElementById('clock-paused').textContent === 'paused'", 30, "paused")
        assert any(e.get("event") == "cmd" and e.get("verb") == "pause" for e in read_events(events))
        assert probe.console_errors(driver) == []
    finally:
        if driver is not None:
            driver.quit()
        dash.stop()
        orbit.stop()
