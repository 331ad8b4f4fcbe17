"""The dashboard's state: what each published message or logged event changes, and what it sends to the page."""

from __future__ import annotations

import json
from typing import Any

from protos import payloads, topics
from testbed.dashboard.state import DashboardState, sse_frame
from tests.helpers import LINK_UP


def _msg(kind: str, body: dict[str, Any]) -> bytes:
    return payloads.encode(kind, body)


def test_link_message_updates_the_cluster_and_logs_an_event() -> None:
    state = DashboardState()
    deltas = state.on_mqtt(topics.link("c0"), _msg("link", LINK_UP), wall=100.0)
    assert [d["type"] for d in deltas] == ["link", "event"]
    assert deltas[0]["recv_wall"] == 100.0 and deltas[0]["link"]["satellite"] == "S1"
    assert state.clusters() == ["c0"]
    assert state.events[-1]["event"] == "link_up" and state.events[-1]["seq"] == 3


def test_an_older_link_message_is_ignored_but_a_restart_is_not() -> None:
    state = DashboardState()
    state.on_mqtt(topics.link("c0"), _msg("link", LINK_UP), 1.0)
    assert state.on_mqtt(topics.link("c0"), _msg("link", {**LINK_UP, "seq": 2, "state": "down"}), 2.0) == []
    assert state.links["c0"]["state"] == "up"
    state.on_mqtt(topics.link("c0"), _msg("link", {**LINK_UP, "seq": 0, "state": "down"}), 3.0)
    assert state.links["c0"]["seq"] == 0


def test_an_invalid_message_is_counted_and_changes_nothing() -> None:
    state = DashboardState()
    assert state.on_mqtt(topics.link("c0"), b'{"schema": "emsfl.v1.link"}', 1.0) == []
    assert state.on_mqtt(topics.CLOCK, b"not json", 1.0) == []
    assert state.dropped == 2 and state.links == {} and state.clock is None


def test_contact_windows_accumulate_past_and_published() -> None:
    state = DashboardState()
    first = {"start": "2026-03-20T06:00:00Z", "end": "2026-03-20T06:05:00Z", "satellite": "S1"}
    first["peak_elevation_deg"] = 30
    second = {**first, "start": "2026-03-20T07:00:00Z", "end": "2026-03-20T07:04:00Z"}
    body = {"schema": "emsfl.v1.contacts", "version": 1, "cluster": "c1", "windows": [first, second]}
    state.on_mqtt(topics.contacts("c1"), _msg("contacts", body), 1.0)
    state.on_mqtt(topics.contacts("c1"), _msg("contacts", {**body, "windows": [second]}), 2.0)
    assert [w["start"] for w in state.cluster_windows("c1")] == [first["start"], second["start"]]


def test_satellites_payload_gives_positions_and_sites() -> None:
    state = DashboardState()
    body = {
        "schema": "emsfl.v1.satellites",
        "version": 1,
        "t": "2026-03-20T06:00:00Z",
        "satellites": [{"id": "S1", "lat_deg": 10.0, "lon_deg": 20.0, "alt_km": 550.0}],
        "sites": [{"cluster": "c0", "name": "lisbon", "lat_deg": 38.7, "lon_deg": -9.1}],
    }
    deltas = state.on_mqtt(topics.ORBIT_SATELLITES, _msg("satellites", body), 1.0)
    assert [d["type"] for d in deltas] == ["satellites", "sites"]
    # the same sites again: only the positions go to the page
    assert [d["type"] for d in state.on_mqtt(topics.ORBIT_SATELLITES, _msg("satellites", body), 2.0)] == ["satellites"]
    assert state.sites["c0"]["name"] == "lisbon"


def test_ground_status_detail_and_events_fill_the_cluster_panel() -> None:
    state = DashboardState()
    for row in (
        {"role": "ground", "id": "c0", "event": "train", "step": 50},
        {"role": "ground", "id": "c0", "event": "staged", "step": 50},
        {"role": "ground", "id": "c0", "event": "upload_acked", "bytes": 1200},
        {"role": "ground", "id": "c1/d0", "event": "train", "step": 7},
        {"role": "ground", "id": "c1/d1", "event": "train", "step": 5},
    ):
        state.on_event(row)
    assert state.ground["c0"]["steps"] == 50 and state.ground["c0"]["uploads_staged"] == 1
    assert state.ground["c0"]["bytes_uplinked"] == 1200
    assert state.ground["c1"]["steps"] == 12 and set(state.ground["c1"]["devices"]) == {"d0", "d1"}
    status = {
        "schema": "emsfl.v1.status",
        "version": 1,
        "role": "ground",
        "id": "c0",
        "state": "online",
        "detail": {"cluster": "c0", "steps": 75, "peak_rss_mb": 812.5, "experts": [[0, [1, 2]]], "uploads_acked": 2},
    }
    deltas = state.on_mqtt(topics.node_status("ground", "c0"), _msg("status", status), 5.0)
    assert deltas[-1]["type"] == "ground" and deltas[-1]["peak_rss_mb"] == 812.5
    assert state.ground["c0"]["steps"] == 75 and state.ground["c0"]["experts"] == [[0, [1, 2]]]
    older = {**status, "detail": {**status["detail"], "steps": 60}}  # sent before the newest event: no step back
    state.on_mqtt(topics.node_status("ground", "c0"), _msg("status", older), 6.0)
    assert state.ground["c0"]["steps"] == 75


def test_orbit_link_events_from_the_file_are_not_logged_twice() -> None:
    state = DashboardState()
    assert state.on_event({"role": "orbit", "id": "orbit", "event": "link_up", "cluster": "c0", "seq": 1}) == []
    assert state.on_event({"role": "orbit", "id": "orbit", "event": "cmd", "verb": "pause"})[0]["type"] == "event"


def test_satellite_status_counts_commits_and_sends_only_changes() -> None:
    state = DashboardState()
    status = {
        "strategy": "emsfl",
        "global_version": 2,
        "assignment": {"c0": [[0, [0, 1]]]},
        "clusters": [{"cluster_id": "c0", "uploads_committed": 2}, {"cluster_id": "c1", "uploads_committed": 1}],
        "experts": [],
        "emulated_now": "2026-03-20T06:00:00Z",
    }
    assert state.on_satellite_status(status)[0]["satellite"]["commits"] == 3
    assert state.on_satellite_status({**status, "emulated_now": "2026-03-20T06:00:09Z"}) == []
    assert state.clusters() == ["c0", "c1"]


def test_accuracy_points_are_kept_in_time_order() -> None:
    state = DashboardState()
    state.on_accuracy({"t": "2026-03-20T08:00:00Z", "accuracy": 0.5})
    state.on_accuracy({"t": "2026-03-20T06:00:00Z", "accuracy": 0.1})
    assert state.on_accuracy({"t": 3, "accuracy": "x"}) == []
    assert [p["accuracy"] for p in state.accuracy] == [0.1, 0.5]


def test_snapshot_and_sse_frame_are_json() -> None:
    state = DashboardState(operator=True)
    state.on_mqtt(topics.link("c0"), _msg("link", LINK_UP), 1.0)
    frame = sse_frame(state.snapshot())
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    snap = json.loads(frame[len(b"data: ") :])
    assert snap["operator"] is True and snap["links"]["c0"]["seq"] == 3


def test_orbit_going_offline_stops_the_page_clock_where_it_went() -> None:
    state = DashboardState()
    status = {"schema": "emsfl.v1.status", "version": 1, "role": "orbit", "id": "orbit", "state": "online"}
    state.on_mqtt(topics.ORBIT_STATUS, _msg("status", status), 10.0)
    assert state.orbit_online and state.orbit_offline_wall is None
    deltas = state.on_mqtt(topics.ORBIT_STATUS, _msg("status", {**status, "state": "offline"}), 20.0)
    assert deltas == [{"type": "orbit_status", "online": False, "offline_wall": 20.0}]
    assert state.snapshot()["orbit_offline_wall"] == 20.0
