"""Where the dashboard's facts come from: the broker (`emsfl/v1/#`), the roles' event logs and the satellite's
state directory. Each source hands raw facts to a callback on the server's event loop; none changes anything.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from emsfl.runtime.tls import TlsFiles
from protos import payloads, topics

log = logging.getLogger(__name__)

MqttCallback = Callable[[str, bytes, float], None]


def apply_credentials(client: mqtt.Client, env: Mapping[str, str], tls: TlsFiles | None) -> None:
    """Broker credentials as every role's `Bus` takes them (deploy/ writes the environment), and TLS with the
    dashboard's certificate (a `monitor` one for a read-only view, `operator` to send commands)."""
    if env.get("EMSFL_MQTT_USERNAME"):
        client.username_pw_set(env["EMSFL_MQTT_USERNAME"], env.get("EMSFL_MQTT_PASSWORD") or None)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))


class MqttSource:
    """Subscribes to everything under `emsfl/v1/` (read-only; no presence of its own) and publishes operator
    commands when the server asks. `on_message(topic, payload, wall)` runs on paho's network thread."""

    def __init__(self, host: str, port: int, on_message: MqttCallback, tls: TlsFiles | None = None) -> None:
        self.host, self.port = host, port
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"dashboard-{uuid.uuid4().hex[:8]}")
        apply_credentials(self.client, os.environ, tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: on_message(m.topic, bytes(m.payload), time.time())
        self.client.reconnect_delay_set(min_delay=1, max_delay=5)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("MQTT connection refused: %s", reason)
            return
        client.subscribe(f"{topics.ROOT}/#", qos=1)
        self.connected.set()

    def start(self) -> None:
        self.client.connect_async(self.host, self.port, keepalive=10)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def command(self, verb: str, fields: Mapping[str, Any]) -> str:
        """Publish an operator command (validated against cmd.schema.json first); returns its id."""
        body: dict[str, Any] = {"schema": "emsfl.v1.cmd", "version": 1, "id": uuid.uuid4().hex}
        body.update({k: v for k, v in fields.items() if v is not None})
        data = payloads.encode("cmd", body)  # PayloadError names the bad field
        self.client.publish(f"{topics.ORBIT_CMD}/{verb}", data, qos=1)
        return str(body["id"])


class JsonlTail:
    """Reads the complete lines appended to a JSON-lines file since the last call (the file may appear later)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for its newline
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


class RunFiles:
    """The event logs and accuracy points of a lab run directory, and a satellite state directory's events."""

    def __init__(self, run_dir: Path | None, state_dir: Path | None) -> None:
        self.run_dir, self.state_dir = run_dir, state_dir
        self._tails: dict[Path, JsonlTail] = {}
        self.accuracy = JsonlTail(run_dir / "accuracy.jsonl") if run_dir is not None else None

    def _event_paths(self) -> list[Path]:
        paths: list[Path] = []
        if self.state_dir is not None:
            paths.append(self.state_dir / "events.jsonl")
        if self.run_dir is not None and self.run_dir.is_dir():
            # every role's own log; the run's top-level events.jsonl is their merge, written at the end
            paths += [p for p in sorted(self.run_dir.glob("*/**/events.jsonl")) if p.parent != self.run_dir]
        return paths

    def read_events(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for path in self._event_paths():
            resolved = path.resolve()
            if resolved not in self._tails:
                self._tails[resolved] = JsonlTail(path)
            rows += self._tails[resolved].read()
        return rows

    def read_accuracy(self) -> list[dict[str, Any]]:
        return self.accuracy.read() if self.accuracy is not None else []


class SatelliteState:
    """`emsfl satellite status` of a state directory, read while the satellite node runs (SQLite WAL)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._store: Any = None

    def read(self) -> dict[str, Any] | None:
        from satellite_node.status import stored_status
        from satellite_node.store import DB_FILE, Store

        if self._store is None:
            if not (self.state_dir / DB_FILE).is_file():
                return None  # the satellite node has not started yet
            self._store = Store(self.state_dir, create=False)
        store = self._store
        return stored_status(store)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
