"""Regression (test_no_call_succeeds_while_the_link_is_down, flaky under load): a GetStatus call admitted just before
LOS could report an emulated time just after it, because the reply read the clock again after the link gate had
decided. At x240, 10 ms of scheduling delay is 2.4 emulated seconds. The reply now carries the gate's instant."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from emsfl.runtime.client import FederationClient
from emsfl.runtime.timefmt import parse_iso
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.server import make_server
from satellite_node.store import Store
from satellite_node.testing import FakeLinks, write_tiny_base


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
