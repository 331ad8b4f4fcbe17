"""Regression (test_no_call_succeeds_while_the_link_is_down, flaky under load): a call admitted just before LOS
could report, or be recorded at, an emulated time just after it, because the satellite read the clock again after
the link gate had decided. At x240, 10 ms of scheduling delay is 2.4 emulated seconds. A GetStatus reply, a join,
an affinity report and a commit now carry the instant the gate admitted them at."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from emsfl.runtime.client import FederationClient
from emsfl.runtime.events import EventLog, read_events
from emsfl.runtime.timefmt import parse_iso
from ground_node.federation.outbox import Outbox
from ground_node.federation.uplink import Uplink
from ground_node.records import Affinity
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.server import make_server
from satellite_node.store import Store
from satellite_node.testing import FakeLinks, expert_update, write_tiny_base


class _ClockMovesOn(FakeLinks):
    """The gate decides at `now`; every later read of the clock is 5 emulated seconds on, past LOS."""

    def emulated_now(self) -> datetime:
        return self.now + timedelta(seconds=5)


def test_status_reply_carries_the_instant_the_gate_admitted_the_call_at(tmp_path: Path) -> None:
    base = write_tiny_base(tmp_path / "base")
    links = _ClockMovesOn()
    node = SatelliteNode(Store(tmp_path / "state"), load_manifest(base), str(base), NodeConfig({"c0": 8}), links, None)
    server, port = make_server(node, "127.0.0.1:0")
    server.start()
    client = FederationClient(f"127.0.0.1:{port}", "c0", timeout_s=10)
    try:
        reply = client.status()
    finally:
        client.close()
        server.stop(0)
        node.store.close()
    assert parse_iso(reply.emulated_now) == links.now


def test_join_affinity_and_commit_are_recorded_at_the_instant_the_gate_admitted_them(tmp_path: Path) -> None:
    base = write_tiny_base(tmp_path / "base")
    links = _ClockMovesOn()
    events = EventLog(tmp_path / "satellite.jsonl", "satellite", "satellite", links.emulated_now)
    node = SatelliteNode(
        Store(tmp_path / "state"), load_manifest(base), str(base), NodeConfig({"c0": 8}), links, events
    )
    server, port = make_server(node, "127.0.0.1:0")
    server.start()
    affinity = Affinity(np.full((2, 4), 0.25, np.float32), np.full((2, 4), 0.25, np.float32), 100)
    uplink = Uplink(f"127.0.0.1:{port}", "c0", links, Outbox(tmp_path / "outbox"), 8, 10, affinity)
    try:
        assert uplink.run_pass() is False  # join, affinity, assignment
        assert uplink.assignment is not None
        uplink.outbox.stage(expert_update(base, uplink.assignment.pairs()), uplink.assignment.version, 10)
        uplink.run_pass()
        commits = node.store.commits()
    finally:
        uplink.client.close()
        server.stop(0)
        node.store.close()
    accepted = [
        e for e in read_events(tmp_path / "satellite.jsonl") if e["event"] in {"joined", "affinity", "upload_committed"}
    ]
    assert [e["event"] for e in accepted] == ["joined", "affinity", "upload_committed"]
    assert all(parse_iso(e["t"]) == links.now for e in accepted), accepted
    assert len(commits) == 1 and parse_iso(commits[0]["t"]) == links.now
