"""`emsfl orbit run` as a real process against a real broker, watched by real MQTT subscribers."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.timefmt import parse_iso
from protos import payloads, topics
from testbed.broker import BrokerProcess

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "testbed" / "topologies" / "local.yaml"
SCALE = 3000.0  # emulated seconds per wall second: ~8 h of passes in the ~10 s the test watches
# Delivery latency allowed after a planned transition, in wall seconds (a loaded 2-core machine is slow).
LATE_WALL_S = 0.3

KINDS = {"clock": "clock", "link": "link", "contacts": "contacts"}
ORBIT_KINDS = {topics.ORBIT_STATUS: "status", topics.ORBIT_SATELLITES: "satellites"}


@dataclass
class Message:
    wall: float
    topic: str
    retained: bool
    payload: dict[str, Any]


class Watcher:
    """A plain paho subscriber to `emsfl/v1/#` that decodes every message with the shared schemas."""

    def __init__(self, broker: BrokerProcess, name: str) -> None:
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(f"{topics.ROOT}/#", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        kind = ORBIT_KINDS[msg.topic] if msg.topic in ORBIT_KINDS else KINDS[msg.topic.split("/")[2]]
        body = payloads.decode(kind, msg.payload)  # a payload off-schema fails the test here
        with self._cond:
            self.messages.append(Message(time.time(), msg.topic, bool(msg.retain), body))
            self._cond.notify_all()

    def wait_for(self, check: Callable[[list[Message]], bool], timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: check(self.messages), timeout_s)

    def on(self, topic: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _orbit_states(messages: list[Message]) -> list[str]:
    return [m.payload["state"] for m in messages if m.topic == topics.ORBIT_STATUS]


@pytest.fixture
def orbit_run(broker: BrokerProcess, tmp_path: Path) -> Iterator[Callable[[float], subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    topology = yaml.safe_load(LOCAL.read_text())
    topology_path = tmp_path / "topology.yaml"
    topology_path.write_text(yaml.safe_dump(topology))

    def start(hours: float) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "emsfl", "orbit", "run", "--topology", str(topology_path)]
        argv += ["--broker", f"{broker.host}:{broker.port}", "--scale", str(SCALE), "--hours", str(hours)]
        argv += ["--plan-out", str(tmp_path / "plan.json"), "--events", str(tmp_path / "events.jsonl")]
        log = open(tmp_path / "orbit.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_publisher_follows_the_plan_and_dies_offline(
    broker: BrokerProcess, orbit_run: Callable[[float], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    live = Watcher(broker, "watch-live")
    try:
        proc = orbit_run(9.0)
        assert live.wait_for(lambda ms: "online" in _orbit_states(ms), 30), (tmp_path / "orbit.log").read_text()
        assert live.wait_for(lambda ms: any(m.topic == topics.CLOCK for m in ms), 5)
        clock = EmulatedClock.from_payload(live.on(topics.CLOCK)[0].payload)
        assert clock.scale == SCALE and clock.epoch_utc == parse_iso("2026-03-20T06:00:00Z")

        # A late subscriber gets the retained state of everything.
        time.sleep(1.0)
        late = Watcher(broker, "watch-late")
        wanted = {topics.CLOCK, topics.ORBIT_STATUS} | {topics.link(c) for c in ("c0", "c1", "c2")}
        wanted |= {topics.contacts(c) for c in ("c0", "c1", "c2")}
        assert late.wait_for(lambda ms: wanted <= {m.topic for m in ms}, 10)
        late.close()
        # The broker sends a topic's retained message first; live transitions may follow it.
        first: dict[str, Message] = {}
        for m in late.messages:
            first.setdefault(m.topic, m)
        assert all(m.retained for m in first.values()), [t for t, m in first.items() if not m.retained]
        assert first[topics.ORBIT_STATUS].payload["state"] == "online"
        contacts = first[topics.contacts("c0")].payload
        assert 1 <= len(contacts["windows"]) <= 5  # link.contacts_published

        time.sleep(7.0)  # ~21000 emulated seconds of passes
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The broker sends the last will as soon as the killed process's socket closes.
        assert live.wait_for(lambda ms: _orbit_states(ms)[-1:] == ["offline"], 15)
    finally:
        live.close()

    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["scale"] == SCALE and set(plan["windows"]) == {"c0", "c1", "c2"}
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    for cluster in ("c0", "c1", "c2"):
        windows = [(parse_iso(w["start"]), parse_iso(w["end"])) for w in plan["windows"][cluster]]
        links = live.on(topics.link(cluster))
        assert len(links) >= 3, f"too few transitions for {cluster}"
        seqs = [m.payload["seq"] for m in links]
        assert seqs == list(range(len(links))), f"{cluster}: seq not consecutive from 0: {seqs}"
        # States alternate, except a handover: up again inside the same window with another satellite.
        for a, b in itertools.pairwise(m.payload for m in links):
            if a["state"] == b["state"]:
                assert a["state"] == "up" and a["satellite"] != b["satellite"], f"{cluster}: states do not alternate"
                assert (a["since"], a["until"]) == (b["since"], b["until"])
        handover_seqs = {
            b.payload["seq"] for a, b in itertools.pairwise(links) if a.payload["state"] == b.payload["state"] == "up"
        }
        for m in links:
            body = m.payload
            received = clock.at_wall(m.wall)
            since = parse_iso(body["since"])
            late_s = LATE_WALL_S * SCALE
            if body["state"] == "up":
                window = (since, parse_iso(body["until"]))
                assert window in windows, f"{cluster}: up {window} is not a planned window"
                assert body["satellite"].startswith("WALKER-") and body["rate_bps"] == 10_000_000
                at_aos = body["seq"] not in handover_seqs and since != clock.epoch_utc
                assert body["elevation_deg"] == pytest.approx(10.0, abs=0.1) or not at_aos
                assert body["delay_s"] == pytest.approx(body["range_km"] / 299792.458)
                # Received after the planned AOS and before LOS; a pass shorter than the delivery
                # tolerance (a few emulated seconds at this scale) may see its `up` just after LOS.
                assert since <= received + timedelta(seconds=1)
                assert received <= max(window[1], since + timedelta(seconds=late_s))
            else:
                assert body["satellite"] is None and body["rate_bps"] is None
                assert since <= received + timedelta(seconds=1) and received <= since + timedelta(seconds=late_s)
                if body["until"] is not None:
                    assert any(parse_iso(body["until"]) == w[0] for w in windows)
        logged = [(e["event"], e["seq"], e["satellite"]) for e in events if e["cluster"] == cluster]
        published = [
            (
                "handover" if m.payload["seq"] in handover_seqs else f"link_{m.payload['state']}",
                m.payload["seq"],
                m.payload["satellite"],
            )
            for m in links
        ]
        assert logged[: len(published)] == published
    assert all(e["role"] == "orbit" and e["id"] == "orbit" and isinstance(e["wall"], float) for e in events)


def test_publisher_sigterm_is_clean(
    broker: BrokerProcess, orbit_run: Callable[[float], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    watcher = Watcher(broker, "watch-term")
    try:
        proc = orbit_run(2.0)
        assert watcher.wait_for(lambda ms: "online" in _orbit_states(ms), 30), (tmp_path / "orbit.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert watcher.wait_for(lambda ms: _orbit_states(ms)[-1:] == ["offline"], 5)
    finally:
        watcher.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    initial = [e for e in events if e["seq"] == 0]
    assert sorted(e["cluster"] for e in initial) == ["c0", "c1", "c2"]
    assert all(e["t"] == "2026-03-20T06:00:00.000Z" for e in initial)
