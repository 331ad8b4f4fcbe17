"""`emsfl dashboard` as a process against a real Mosquitto: the page and its headers, the live snapshot and
stream, and operator commands (refused when read-only or without the token, carried out with it)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.runtime.events import read_events
from protos import payloads, topics
from testbed.broker import BrokerProcess, free_port, wait_for_port
from testbed.lab import DEFAULT_TOPOLOGY
from testbed.procs import RoleProcess

LINK_UP: dict[str, Any] = {
    "schema": "emsfl.v1.link",
    "version": 1,
    "cluster": "c7",
    "state": "up",
    "seq": 1,
    "since": "2026-03-20T06:00:00.000Z",
    "until": "2026-03-20T06:07:30.000Z",
    "satellite": "S1",
}


def _start_dashboard(tmp: Path, broker: BrokerProcess, *extra: str) -> tuple[RoleProcess, str]:
    port = free_port()
    proc = RoleProcess(
        "dashboard",
        ["dashboard", "--broker", broker.address, "--listen", f"127.0.0.1:{port}", *extra],
        tmp / f"dashboard-{port}.log",
    ).start()
    wait_for_port("127.0.0.1", port, 60)
    return proc, f"http://127.0.0.1:{port}"


def _request(url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Emsfl-Token"] = token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            return resp.status, resp.headers, json.loads(raw) if "json" in resp.headers["Content-Type"] else raw
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, err.headers, json.loads(raw) if "json" in err.headers["Content-Type"] else raw


@pytest.fixture
def readonly(tmp_path: Path, broker: BrokerProcess) -> Iterator[str]:
    proc, url = _start_dashboard(tmp_path, broker)
    yield url
    proc.stop()


def test_page_is_served_with_a_strict_content_security_policy(readonly: str) -> None:
    status, headers, body = _request(readonly + "/")
    assert status == 200 and b'<script src="/static/app.js"' in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/land-110m.json"):
        assert _request(readonly + asset)[0] == 200
    assert _request(readonly + "/static/../server.py")[0] == 404


def test_a_foreign_host_name_is_refused_on_loopback(readonly: str) -> None:
    req = urllib.request.Request(readonly + "/api/snapshot", headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 421


def test_snapshot_and_stream_follow_the_broker(readonly: str, broker: BrokerProcess) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the dashboard may subscribe a moment after its port opens
            client.publish(topics.link("c7"), payloads.encode("link", LINK_UP), qos=1).wait_for_publish(5)
            snap = _request(readonly + "/api/snapshot")[2]
            if "c7" in snap["links"]:
                break
            time.sleep(0.5)
        assert snap["links"]["c7"]["satellite"] == "S1" and snap["operator"] is False
        with urllib.request.urlopen(readonly + "/api/stream", timeout=30) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            first = json.loads(_next_sse_data(stream))
            assert first["type"] == "snapshot" and first["links"]["c7"]["seq"] == 1
            client.publish(topics.link("c7"), payloads.encode("link", {**LINK_UP, "seq": 2, "state": "down"}), qos=1)
            for _ in range(20):  # repeats of seq 1 from the loop above may come first
                delta = json.loads(_next_sse_data(stream))
                if delta["type"] == "link" and delta["link"]["seq"] == 2:
                    break
            assert delta["type"] == "link" and delta["link"]["seq"] == 2 and delta["link"]["state"] == "down"
    finally:
        client.loop_stop()
        client.disconnect()


def _next_sse_data(stream: Any) -> bytes:
    for line in stream:
        if line.startswith(b"data: "):
            return bytes(line[len(b"data: ") :])
    raise AssertionError("the stream ended")


def test_read_only_dashboard_refuses_operator_commands(readonly: str) -> None:
    status, _, body = _request(readonly + "/api/cmd/pause", {})
    assert status == 403 and "--operator" in body["error"]


def test_operator_dashboard_needs_its_token_and_carries_out_commands(tmp_path: Path, broker: BrokerProcess) -> None:
    orbit_events = tmp_path / "orbit-events.jsonl"
    args = ["run", "--topology", str(DEFAULT_TOPOLOGY), "--broker", broker.address, "--hours", "1"]
    orbit = RoleProcess("orbit", ["orbit", *args, "--events", str(orbit_events)], tmp_path / "orbit.log").start()
    proc, url = _start_dashboard(tmp_path, broker, "--operator")
    try:
        token = re.search(r"#token=(\S+)", proc.log_path.read_text())
        assert token is not None
        assert _request(url + "/api/cmd/pause", {})[0] == 401
        assert _request(url + "/api/cmd/pause", {}, token="wrong")[0] == 401
        assert _request(url + "/api/cmd/reload", {}, token=token[1])[0] == 404
        status, _, body = _request(url + "/api/cmd/scale", {"scale": -1}, token=token[1])
        assert status == 400 and "scale" in body["error"]
        body = {"cluster": "c1", "state": "down", "duration_s": 600}
        deadline = time.monotonic() + 60
        while True:  # the orbit service listens for commands once its plan is computed
            status, _, reply = _request(url + "/api/cmd/link", body, token=token[1])
            if status != 504 or time.monotonic() > deadline:
                break
        assert status == 200 and reply["ok"] is True, reply
        forced = [e for e in read_events(orbit_events) if e.get("forced") and e.get("cluster") == "c1"]
        assert forced and forced[-1]["event"] == "link_down"
        status, _, reply = _request(url + "/api/cmd/link", {"cluster": "nope", "state": "down"}, token=token[1])
        assert status == 409 and "unknown cluster" in reply["error"]
    finally:
        proc.stop()
        orbit.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--broker", "nohost"], "--broker"),
        (["--broker", "127.0.0.1:1883", "--listen", "127.0.0.1:x"], "--listen"),
        (["--broker", "127.0.0.1:1883", "--bogus"], "unrecognized"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emsfl", "dashboard", *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_lab_up_refuses_a_bad_dashboard_port_before_starting_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emsfl", "lab", "up", "--dashboard-port", "70000", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "--dashboard-port" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_lab_goes_on_without_a_dashboard_when_its_port_is_taken(tmp_path: Path) -> None:
    import socket

    from testbed.lab import LabRun, _start_dashboard

    lab = LabRun(tmp_path, {}, tmp_path, tmp_path / "state", tmp_path / "plan.json", tmp_path / "orbit.jsonl", {})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _start_dashboard(lab, "127.0.0.1:1", port, []) is None
    assert not (tmp_path / "logs" / "dashboard.log").exists()  # nothing was started
