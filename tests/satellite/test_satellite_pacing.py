"""Link budget (ARCHITECTURE §5.4): transfers are paced to rate_bps x clock scale, so they cost emulated time.

Only lower bounds on wall time are asserted (a busy machine may be slower, never faster)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from emsfl.runtime.bus import Bus
from emsfl.runtime.linkstate import wall_rate_bytes_of
from emsfl.runtime.linkview import LinkView
from protos.wire import chunk_hashes, sha256_hex, split_chunks
from satellite_node.admission import Pacer
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import Store
from satellite_node.testing import FakeLinks, OrbitStub, encode, expert_update, wait_until, write_tiny_base
from satellite_node.uploads import ChunkIn, Offer
from satellite_node.validate import specs_of
from testbed.broker import BrokerProcess


def test_paced_upload_costs_link_time(tmp_path: Path) -> None:
    base = write_tiny_base(tmp_path / "base", hidden=64, inter=64, rank=8)
    links = FakeLinks(rate_bps=200_000.0, scale=4.0)  # 100 kB per wall second
    store = Store(tmp_path / "state")
    node = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 8, "c1": 8}), links)
    for c in ("c0", "c1"):
        node.join(c, "d", 8, 1)
        node.report_affinity(c, 1, 2, 4, np.ones(8) if c == "c0" else np.zeros(8), [])
    tensors = expert_update(base, [(0, 0), (0, 1), (1, 0), (1, 1)])
    blob = encode(tensors)
    h = sha256_hex(blob)
    chunk = 4096
    node.uploads.offer("c0", Offer(h, len(blob), chunk, tuple(chunk_hashes(blob, chunk)), tuple(specs_of(tensors)), 1))
    chunks = [ChunkIn(h, i, bytes(c), sha256_hex(c)) for i, c in enumerate(split_chunks(blob, chunk))]
    started = time.monotonic()
    assert node.uploads.push("c0", chunks).committed
    elapsed = time.monotonic() - started
    expected = len(blob) * 8 / (links.rate_bps * links.scale)  # type: ignore[operator]
    assert expected > 0.2  # the update is large enough for the bound to mean something
    assert elapsed >= 0.95 * expected
    # a pull is paced the same way (the server paces each chunk it sends)
    started = time.monotonic()
    pulled = node.pull(["expert/0/0/"])
    for part in pulled.chunks:
        node.pacer.pace("c0", len(part))
    assert time.monotonic() - started >= 0.95 * pulled.size * 8 / (200_000.0 * 4.0)
    store.close()


def test_rate_from_link_payload_and_clock(broker: BrokerProcess) -> None:
    """The real LinkView over a real broker: the link payload's rate_bps x the clock's scale / 8."""
    orbit = OrbitStub(broker.host, broker.port, scale=240.0).start()
    bus = Bus(broker.host, broker.port, role="satellite", node_id="pacing")
    view = LinkView(bus, clusters=["c0", "c1"])
    bus.start()
    try:
        orbit.set_link("c0", True, rate_bps=1e6)
        orbit.set_link("c1", True)  # no rate announced
        wait_until("clock and both links", lambda: view.clock and view.link("c0") and view.link("c1"), 60.0)
        assert view.wall_rate_bytes("c0") == 1e6 * 240 / 8
        assert view.wall_rate_bytes("c1") is None  # no rate announced: unpaced
        assert view.wall_rate_bytes("c2") is None  # no link state at all
        pacer = Pacer(view, enabled=False)
        assert pacer.pace("c0", 10**9) == 0.0
    finally:
        bus.stop()
        orbit.stop()


def test_rate_of_a_link_payload() -> None:
    assert wall_rate_bytes_of({"state": "up", "rate_bps": 1e6}, 240.0) == 1e6 * 240 / 8
    assert wall_rate_bytes_of({"state": "up", "rate_bps": None}, 240.0) is None  # no rate announced: unpaced
    assert wall_rate_bytes_of({"state": "up", "rate_bps": 1e6}, None) is None  # no clock yet
    assert wall_rate_bytes_of(None, 240.0) is None
