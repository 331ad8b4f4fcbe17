"""What the dashboard knows of a running testbed, and the deltas it sends to the page.

Pure data, no I/O: the MQTT and file sources feed it (`on_mqtt`, `on_event`, `on_satellite_status`,
`on_accuracy`), each call returns the deltas (JSON-ready dicts with a `type`) that the server pushes to every
open page over Server-Sent Events; `snapshot()` is what a page gets first.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from protos import payloads, topics

MAX_EVENTS = 1000  # the event log the page can scroll and filter
MAX_WINDOWS = 200  # contact windows kept per cluster (past and published)
# Orbit link events also arrive over MQTT (with seq, at once); the file copies would be duplicates.
_MQTT_DUPLICATES = {"link_up", "link_down", "handover"}

Delta = dict[str, Any]
_COUNTERS = ("steps", "uploads_staged", "uploads_acked", "bytes_uplinked")


def _ground_figures() -> dict[str, Any]:
    return {
        "steps": 0,
        "uploads_staged": 0,
        "uploads_acked": 0,
        "bytes_uplinked": 0,
        "bytes_downlinked": None,
        "peak_rss_mb": None,
        "peak_gpu_memory_mb": None,
        "assignment_version": None,
        "experts": None,
        "devices": {},
        "online": None,
    }


class DashboardState:
    def __init__(self, operator: bool = False) -> None:
        self.operator = operator
        self.clock: dict[str, Any] | None = None
        self.orbit_online = False
        self.orbit_offline_wall: float | None = None  # when the orbit service went offline: emulated time stops
        self.links: dict[str, dict[str, Any]] = {}
        self.link_recv_wall: dict[str, float] = {}
        self.windows: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}  # cluster -> (start, sat) -> window
        self.ground: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}  # "role/id" -> status payload
        self.satellites: dict[str, Any] | None = None  # the last satellites payload
        self.sites: dict[str, dict[str, Any]] = {}
        self.satellite: dict[str, Any] | None = None  # the satellite node's status (`satellite status --json`)
        self.accuracy: list[dict[str, Any]] = []
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.replies: deque[dict[str, Any]] = deque(maxlen=50)
        self.dropped = 0  # MQTT messages that failed their schema

    # -- clusters ---------------------------------------------------------------------------------------
    def clusters(self) -> list[str]:
        names = set(self.links) | set(self.windows) | set(self.sites) | set(self.ground)
        if self.satellite:
            names |= {c["cluster_id"] for c in self.satellite.get("clusters", [])}
        return sorted(names)

    def _ground(self, cluster: str) -> dict[str, Any]:
        return self.ground.setdefault(cluster, _ground_figures())

    # -- MQTT -------------------------------------------------------------------------------------------
    def on_mqtt(self, topic: str, data: bytes, wall: float) -> list[Delta]:
        """A message received on `emsfl/v1/#` at wall time `wall`; an invalid one is counted and dropped."""
        if not data:
            return []
        try:
            return self._dispatch(topic, data, wall)
        except payloads.PayloadError:
            self.dropped += 1
            return []

    def _dispatch(self, topic: str, data: bytes, wall: float) -> list[Delta]:
        if topic == topics.CLOCK:
            self.clock = payloads.decode("clock", data)
            return [{"type": "clock", "clock": self.clock}]
        if topic == topics.ORBIT_STATUS:
            self.orbit_online = payloads.decode("status", data)["state"] == "online"
            self.orbit_offline_wall = None if self.orbit_online else wall
            return [{"type": "orbit_status", "online": self.orbit_online, "offline_wall": self.orbit_offline_wall}]
        if topic == topics.ORBIT_SATELLITES:
            return self._on_satellites(payloads.decode("satellites", data))
        if topic == topics.ORBIT_CMD_REPLY:
            reply = payloads.decode("cmd_reply", data)
            self.replies.append(reply)
            event = {"t": None, "wall": wall, "role": "orbit", "id": "orbit", "event": "cmd_reply"}
            event |= {"verb": reply["verb"], "ok": reply["ok"], "error": reply["error"]}
            return [{"type": "cmd_reply", "reply": reply}, *self._event(event)]
        cluster = topics.cluster_of_link_topic(topic)
        if cluster is not None:
            return self._on_link(payloads.decode("link", data), wall)
        if topic.startswith(f"{topics.ROOT}/contacts/"):
            return self._on_contacts(payloads.decode("contacts", data))
        if topic.startswith(f"{topics.ROOT}/node/") and topic.endswith("/status"):
            return self._on_node_status(payloads.decode("status", data))
        return []  # commands and anything newer: not shown

    def _on_link(self, link: dict[str, Any], wall: float) -> list[Delta]:
        cluster = link["cluster"]
        last = self.links.get(cluster)
        if last is not None and link["seq"] < last["seq"] and link["seq"] != 0:
            return []  # late and older (seq 0: the orbit service restarted)
        self.links[cluster] = link
        self.link_recv_wall[cluster] = wall
        event = {"t": link["since"], "wall": wall, "role": "orbit", "id": "orbit", "event": f"link_{link['state']}"}
        event |= {"cluster": cluster, "satellite": link.get("satellite"), "seq": link["seq"]}
        if link.get("forced"):
            event["forced"] = True
        return [{"type": "link", "cluster": cluster, "link": link, "recv_wall": wall}, *self._event(event)]

    def _on_contacts(self, contacts: dict[str, Any]) -> list[Delta]:
        cluster = contacts["cluster"]
        known = self.windows.setdefault(cluster, {})
        for w in contacts["windows"]:
            known[(w["start"], w["satellite"])] = w
        if len(known) > MAX_WINDOWS:
            for key in sorted(known)[: len(known) - MAX_WINDOWS]:
                del known[key]
        return [{"type": "windows", "cluster": cluster, "windows": self.cluster_windows(cluster)}]

    def cluster_windows(self, cluster: str) -> list[dict[str, Any]]:
        return [w for _, w in sorted(self.windows.get(cluster, {}).items())]

    def _on_satellites(self, body: dict[str, Any]) -> list[Delta]:
        self.satellites = {"t": body["t"], "satellites": body["satellites"]}
        out: list[Delta] = [{"type": "satellites", **self.satellites}]
        sites = {s["cluster"]: s for s in body.get("sites", [])}
        if sites and sites != self.sites:
            self.sites = sites
            out.append({"type": "sites", "sites": sites})
        return out

    def _on_node_status(self, status: dict[str, Any]) -> list[Delta]:
        key = f"{status['role']}/{status['id']}"
        self.nodes[key] = status
        detail = status.get("detail") or {}
        cluster = detail.get("cluster")
        if status["role"] not in ("ground", "gateway") or not isinstance(cluster, str):
            return [{"type": "node", "key": key, "status": status}]
        figures = self._ground(cluster)
        device = detail.get("device")
        if isinstance(device, str):  # one device of a multi-device cluster
            figures["devices"].setdefault(device, {})["online"] = status["state"] == "online"
        else:
            figures["online"] = status["state"] == "online"
            for name in (*_ground_figures(), "coverage", "num_examples", "step_time_s"):
                if name not in detail or name in ("devices", "online"):
                    continue
                if name in _COUNTERS and isinstance(detail[name], int):
                    # counters only grow: the log's events may be ahead of a status sent a moment ago
                    figures[name] = max(int(figures.get(name) or 0), detail[name])
                else:
                    figures[name] = detail[name]
            if isinstance(detail.get("devices"), dict):
                for dev, facts in detail["devices"].items():
                    if isinstance(facts, dict):
                        figures["devices"].setdefault(dev, {}).update(facts)
        return [{"type": "node", "key": key, "status": status}, {"type": "ground", "cluster": cluster, **figures}]

    # -- files ------------------------------------------------------------------------------------------
    def on_event(self, row: dict[str, Any]) -> list[Delta]:
        """One line of a role's events.jsonl (emsfl/runtime/events.py shape)."""
        name = row.get("event")
        if not isinstance(name, str):
            return []
        if row.get("role") == "orbit" and name in _MQTT_DUPLICATES:
            return []
        out = self._event(row)
        if row.get("role") == "ground":
            out += self._ground_event(row, name)
        return out

    def _ground_event(self, row: dict[str, Any], name: str) -> list[Delta]:
        node = str(row.get("id", ""))
        cluster, _, device = node.partition("/")
        if not cluster:
            return []
        figures = self._ground(cluster)
        target = figures["devices"].setdefault(device, {}) if device else figures
        changed = True
        if name == "train" and isinstance(row.get("step"), int):
            target["steps"] = max(int(target.get("steps") or 0), row["step"])
        elif name == "staged":
            figures["uploads_staged"] += 1
            if isinstance(row.get("step"), int):
                target["steps"] = max(int(target.get("steps") or 0), row["step"])
        elif name == "upload_acked":
            figures["uploads_acked"] += 1
            figures["bytes_uplinked"] += int(row.get("bytes") or 0)
        elif name == "assigned":
            target["assignment_version"] = row.get("version")
        elif name == "device_update":
            dev = figures["devices"].setdefault(str(row.get("device")), {})
            dev["steps"] = max(int(dev.get("steps") or 0), int(row.get("step") or 0))
        else:
            changed = False
        if device and name == "train":
            figures["steps"] = sum(int(d.get("steps") or 0) for d in figures["devices"].values())
        return [{"type": "ground", "cluster": cluster, **figures}] if changed else []

    def _event(self, row: dict[str, Any]) -> list[Delta]:
        self.events.append(row)
        return [{"type": "event", "event": row}]

    def on_satellite_status(self, status: dict[str, Any]) -> list[Delta]:
        """The satellite node's `status_dict` (polled from its state directory); a delta only on change."""
        commits = sum(int(c.get("uploads_committed") or 0) for c in status.get("clusters", []))
        status = {**status, "commits": commits}
        status.pop("emulated_now", None)  # changes every poll, says nothing new
        if status == self.satellite:
            return []
        self.satellite = status
        return [{"type": "satellite", "satellite": status}]

    def on_accuracy(self, point: dict[str, Any]) -> list[Delta]:
        """One evaluated point {t: emulated UTC, accuracy} of the global model."""
        if not isinstance(point.get("t"), str) or not isinstance(point.get("accuracy"), (int, float)):
            return []
        self.accuracy.append({"t": point["t"], "accuracy": float(point["accuracy"])})
        self.accuracy.sort(key=lambda p: p["t"])
        return [{"type": "accuracy", "points": self.accuracy}]

    # -- the page's first view --------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {
            "type": "snapshot",
            "operator": self.operator,
            "clock": self.clock,
            "orbit_online": self.orbit_online,
            "orbit_offline_wall": self.orbit_offline_wall,
            "clusters": self.clusters(),
            "links": self.links,
            "link_recv_wall": self.link_recv_wall,
            "windows": {c: self.cluster_windows(c) for c in self.windows},
            "ground": self.ground,
            "nodes": self.nodes,
            "satellites": self.satellites,
            "sites": self.sites,
            "satellite": self.satellite,
            "accuracy": self.accuracy,
            "events": list(self.events),
        }


def sse_frame(delta: Delta) -> bytes:
    """One Server-Sent Events message (every delta is the default `message` event)."""
    return b"data: " + json.dumps(delta, separators=(",", ":"), default=str).encode("utf-8") + b"\n\n"
