"""Clock fidelity: how late, in wall time, link transitions reach subscribers after their scheduled instant.

For each scale (1, 60, 600) a synthetic plan gives 100 clusters a transition every `--period` wall seconds
(staggered by 10 ms between clusters); `emsfl orbit run --replay` publishes it through Mosquitto and 100
subscribers (one MQTT session per cluster, each on its own link topic) record the arrival time. Latency =
arrival wall time - the wall time of `since` under the retained clock. Writes
benchmarks/results/clock_fidelity.json: p50/p99/max per scale and `p99_s_max` (target: under 0.2 s).
Run: .venv/bin/python benchmarks/bench_orbit_clock.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from _common import write_result
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emsfl.runtime.clock import EmulatedClock  # noqa: E402
from emsfl.runtime.timefmt import parse_iso, to_iso  # noqa: E402
from protos import payloads, topics  # noqa: E402
from testbed.broker import BrokerProcess  # noqa: E402

OUT = REPO / "benchmarks" / "results" / "clock_fidelity.json"
START = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
CLUSTERS = 100


def synthetic_plan(scale: float, seconds: float, period: float) -> dict[str, Any]:
    windows: dict[str, list[dict[str, Any]]] = {}
    lead = 3.0  # wall seconds before the first transition (startup)
    for c in range(CLUSTERS):
        out = []
        t = lead + c * 0.01
        while t + period < lead + seconds:
            start = START + timedelta(seconds=t * scale)
            end = START + timedelta(seconds=(t + period) * scale)
            out.append(
                {
                    "start": to_iso(start),
                    "end": to_iso(end),
                    "satellite": "SYN",
                    "peak_elevation_deg": 45.0,
                    "elevation_deg": 45.0,
                    "range_km": 800.0,
                    "handovers": [],
                }
            )
            t += 2 * period
        windows[f"c{c:03d}"] = out
    end_utc = START + timedelta(seconds=(seconds + lead + 5) * scale)
    return {"contacts": [], "windows": windows, "start_utc": to_iso(START), "end_utc": to_iso(end_utc), "scale": scale}


class Subscriber:
    def __init__(
        self, broker: BrokerProcess, cluster: str, sink: list[tuple[float, dict[str, Any]]], lock: threading.Lock
    ) -> None:
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{cluster}")
        self.client.on_connect = lambda c, *a: c.subscribe([(topics.link(cluster), 1), (topics.CLOCK, 1)])
        self.client.on_subscribe = lambda *a: self.ready.set()

        def on_message(c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
            now = time.time()
            kind = "clock" if msg.topic == topics.CLOCK else "link"
            with lock:
                sink.append((now, {"kind": kind, "retained": bool(msg.retain), **payloads.decode(kind, msg.payload)}))

        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def run_scale(broker: BrokerProcess, scale: float, seconds: float, period: float, tmp: Path) -> dict[str, Any]:
    plan_path = tmp / f"plan-{scale:g}.json"
    plan_path.write_text(json.dumps(synthetic_plan(scale, seconds, period)))
    sink: list[tuple[float, dict[str, Any]]] = []
    lock = threading.Lock()
    subs = [Subscriber(broker, f"c{c:03d}", sink, lock) for c in range(CLUSTERS)]
    for s in subs:
        s.ready.wait(10)
    log = open(tmp / f"orbit-{scale:g}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emsfl",
            "orbit",
            "run",
            "--replay",
            str(plan_path),
            "--broker",
            f"{broker.host}:{broker.port}",
            "--scale",
            str(scale),
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(seconds + 4.0)
    finally:
        proc.terminate()
        proc.wait(15)
        for s in subs:
            s.close()
        log.close()
    with lock:
        received = list(sink)
    clock: EmulatedClock | None = None
    latencies: list[float] = []
    for wall, body in sorted(received, key=lambda x: x[0]):
        if body["kind"] == "clock":
            clock = EmulatedClock.from_payload(body)
            continue
        if clock is None or body["seq"] == 0 or body["retained"]:
            continue
        at = parse_iso(body["since"])
        latencies.append(wall - clock.wall_of(at))
    return {
        "scale": scale,
        "transitions": len(latencies),
        "p50_s": round(percentile(latencies, 50), 4) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 4) if latencies else None,
        "max_s": round(max(latencies), 4) if latencies else None,
        "min_s": round(min(latencies), 4) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--period", type=float, default=1.0, help="wall seconds between a cluster's transitions")
    parser.add_argument("--scales", default="1,60,600")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp, BrokerProcess("mosquitto") as broker:
        for scale in (float(s) for s in args.scales.split(",")):
            results.append(run_scale(broker, scale, args.seconds, args.period, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    p99s = [r["p99_s"] for r in results if r["p99_s"] is not None]
    doc = {
        "broker": "mosquitto",
        "clusters": CLUSTERS,
        "seconds_per_scale": args.seconds,
        "period_wall_s": args.period,
        "scales": results,
        "p99_s_max": max(p99s) if p99s else None,
        "target_s": 0.2,
        "cpus": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    write_result(OUT, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
