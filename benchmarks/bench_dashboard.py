"""Dashboard latency: from a link event to the page's DOM showing it, and the page's first render.

For 3 and for 100 clusters at clock scale 600 (the clock-fidelity benchmark's load: every cluster's link flips
once a wall second, `bench_orbit_clock.synthetic_plan`), real processes on Mosquitto: `emsfl orbit run --replay`
publishes the plan, `emsfl dashboard` serves the page, headless Chromium (Selenium) shows it. The delay of one
event is the page's render time of that (cluster, seq) minus the wall time the orbit service logged on publishing
it (one machine, one clock). First render: from navigation start to the first render with data, on fresh loads
once the run is under way (median of 3). Writes benchmarks/results/dashboard.json (goal: p95 <= 0.5 s).
Run: .venv/bin/python benchmarks/bench_dashboard.py [--seconds 30] [--screenshots docs/img]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_orbit_clock import synthetic_plan  # noqa: E402

from emsfl.runtime.events import read_events  # noqa: E402
from testbed.broker import BrokerProcess, free_port, wait_for_port  # noqa: E402
from testbed.dashboard import probe  # noqa: E402
from testbed.procs import RoleProcess  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "dashboard.json"
SCALE = 600.0
PERIOD_WALL_S = 1.0


def _case(clusters: int, seconds: float, tmp: Path, shots: Path | None) -> dict[str, Any]:
    plan = synthetic_plan(SCALE, seconds, PERIOD_WALL_S)
    plan["windows"] = {c: w for c, w in sorted(plan["windows"].items())[:clusters]}
    plan_path = tmp / f"plan-{clusters}.json"
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    events_path = tmp / f"orbit-{clusters}.jsonl"
    with BrokerProcess("mosquitto") as broker:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        dash = RoleProcess(
            "dashboard",
            ["dashboard", "--broker", broker.address, "--listen", f"127.0.0.1:{port}"],
            tmp / f"dashboard-{clusters}.log",
        ).start()
        driver = None
        orbit = None
        try:
            wait_for_port("127.0.0.1", port, 60)
            driver = probe.new_driver(tmp / f"profile-{clusters}")
            driver.get(url)
            probe.wait_for(driver, "window.emsfl && window.emsfl.snapshots > 0", 60, "its first snapshot")
            orbit_args = ["orbit", "run", "--replay", str(plan_path), "--broker", broker.address]
            orbit_args += ["--events", str(events_path)]
            orbit = RoleProcess("orbit", orbit_args, tmp / f"orbit-{clusters}.log").start()
            poller = probe.PagePoller(driver, every_s=1.0)
            poller.start()
            time.sleep(seconds + 5.0)
            samples = poller.stop()
            if shots is not None:
                driver.save_screenshot(str(shots / f"dashboard-{clusters}-clusters.png"))
            first_render_ms = []
            for _ in range(3):  # fresh loads with the run's state in place
                driver.get("about:blank")
                driver.get(url)
                first_render_ms.append(
                    float(probe.wait_for(driver, "window.emsfl && window.emsfl.firstRenderMs", 60, "a render"))
                )
            errors = probe.console_errors(driver)
        finally:
            if orbit is not None:
                orbit.stop()
            if driver is not None:
                driver.quit()
            dash.stop()
    events = [e for e in read_events(events_path) if e.get("event") in ("link_up", "link_down") and e.get("t")]
    delays = probe.link_event_delays(events, samples.rendered)
    return {
        "clusters": clusters,
        "scale": SCALE,
        "seconds": seconds,
        "link_events": len(events),
        "rendered": len(delays),
        "event_to_dom_p50_s": round(statistics.median(delays), 4) if delays else None,
        "event_to_dom_p95_s": round(probe.p95(delays) or 0.0, 4) if delays else None,
        "event_to_dom_max_s": round(max(delays), 4) if delays else None,
        "first_render_ms": round(statistics.median(first_render_ms), 1),
        "first_render_ms_all": [round(v, 1) for v in first_render_ms],
        "console_errors": len(errors),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="wall seconds of link flips per case")
    parser.add_argument("--clusters", default="3,100", help="comma-separated cluster counts (default: 3,100)")
    parser.add_argument("--screenshots", type=Path, help="also save a screenshot of each case here")
    args = parser.parse_args()
    if probe.find_chromium() is None:
        print("bench_dashboard: no chromium/chromedriver (apt-get install chromium chromium-driver); nothing written")
        return 0
    cases = []
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        for n in [int(x) for x in args.clusters.split(",") if x.strip()]:
            case = _case(n, args.seconds, Path(tmp), args.screenshots)
            print(json.dumps(case))
            cases.append(case)
    result = {
        "what": "link event (orbit publish, its event log's wall time) to the dashboard page's DOM, headless Chromium",
        "broker": "mosquitto",
        "load": f"every cluster's link flips every {PERIOD_WALL_S:g} wall s (bench_orbit_clock.synthetic_plan)",
        "goal_event_to_dom_p95_s": 0.5,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cases": cases,
    }
    OUT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
