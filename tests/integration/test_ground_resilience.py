"""`kill -9` of a ground agent during training and during an upload, with the real satellite process.

The link is published by a stand-in orbit publisher over a real broker, with a rate the satellite paces uploads to,
so an upload of six 1 MiB chunks takes seconds and can be cut by the kill. After each restart: training resumes
from the checkpoint with its optimizer state, the cut upload completes with only the missing chunks, and the
satellite commits every content hash once.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.numpy import load as st_load

from emsfl.runtime.events import read_events
from protos import topics
from satellite_node.testing import Client, OrbitStub, SatelliteProcess, wait_until
from testbed.broker import BrokerProcess, free_port
from tests.helpers import agent_topology, ground_agent, stop_processes, tiny_model

pytestmark = pytest.mark.slow

RATE_BPS = 4 * 1024 * 1024  # 4 Mibit/s at clock scale 1: 0.5 MiB/s, a 1 MiB chunk takes 2 s

TOPOLOGY = agent_topology(
    "resilience",
    pace=True,
    clusters=[{"id": "c0", "capacity_experts": 2, "devices": 1}],
    # full tuning of wide experts: 4 held experts x 1.5 MiB = 6 chunks of 1 MiB per update
    model=tiny_model(hidden_size=128, intermediate_size=1024),
    training={
        "tune": "full",
        "split": "mask",
        "lr": 0.0005,
        "batch_size": 4,
        "stage_every_steps": 10,
        "checkpoint_every_steps": 10,
        "profile_examples": 16,
        "uploads_per_contact": 0,  # one long contact here: keep uploading so that an upload can be cut
    },
)


def _events(workdir: Path) -> list[dict[str, Any]]:
    return read_events(workdir / "events.jsonl")


def _wait(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    return wait_until(what, check, timeout_s)


def _link_up(orbit: OrbitStub, cluster: str) -> None:
    payload = {
        "schema": "emsfl.v1.link",
        "version": 1,
        "cluster": cluster,
        "state": "up",
        "seq": 1,
        "since": "2026-03-20T06:00:00Z",
        "until": None,
        "rate_bps": float(RATE_BPS),
    }
    orbit.bus.publish(topics.link(cluster), "link", payload, retain=True)


def test_kill_9_during_training_and_during_upload(broker: BrokerProcess, tmp_path: Path) -> None:
    from ground_node.learning.train import optimizer_digest
    from ground_node.model.base import ensure_base
    from satellite_node.export import commits

    topology = dict(TOPOLOGY, broker={"host": broker.host, "port": broker.port})
    base = ensure_base(topology, tmp_path / "cache")
    topo_text = yaml.safe_dump(topology)
    sat = SatelliteProcess(tmp_path / "sat", (broker.host, broker.port), topo_text, free_port(), base=base)
    sat.start()
    orbit = OrbitStub(broker.host, broker.port, scale=1.0).start()
    _link_up(orbit, "c0")
    workdir = tmp_path / "ground"
    start, log = ground_agent(tmp_path, topo_text, broker.address, sat.target, base)

    agent = start()
    try:
        # ---- 1. kill -9 while training ----------------------------------------------------------------
        _wait("a checkpoint at step >= 20", lambda: any(e.get("step", 0) >= 20 for e in _events(workdir)))
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        checkpoint = torch.load(workdir / "checkpoint.pt", weights_only=True)
        step, digest = int(checkpoint["step"]), optimizer_digest(checkpoint["optimizer"])
        seen = len(_events(workdir))
        agent = start()
        resumed = _wait("the resume", lambda: [e for e in _events(workdir)[seen:] if e["event"] == "resumed"])
        assert resumed[0]["step"] == step and resumed[0]["optimizer_sha256"] == digest
        _wait(
            "training past the checkpoint",
            lambda: any(e["event"] == "staged" and e["step"] > step for e in _events(workdir)[seen:]),
        )

        # ---- 2. kill -9 in the middle of a paced upload ------------------------------------------------
        def fresh_push() -> list[dict[str, Any]]:
            return [
                e
                for e in _events(workdir)[seen:]
                if e["event"] == "pushing" and e["chunks"][0] == 0 and len(e["chunks"]) == e["total_chunks"] >= 4
            ]

        push = _wait("an upload from chunk 0", fresh_push)[-1]
        time.sleep(5.0)  # ~2 of its chunks arrive at 2 s per chunk
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        cut = push["content_hash"]
        state = json.loads((workdir / "outbox" / "state.json").read_text(encoding="utf-8"))
        assert cut not in state["acked"] and state["inflight"]["hash"] == cut
        blob = (workdir / "outbox" / state["inflight"]["file"]).read_bytes()
        probe = Client(sat.target, "c0")
        version = int(state["inflight"]["assignment_version"])
        # the satellite records what arrived once its handler sees the cut (after the paced chunk it sleeps on)
        held = _wait(
            "the satellite to record the cut upload's chunks",
            lambda: (r := probe.offer(blob, st_load(blob), version)).committed or len(r.missing) < push["total_chunks"],
            timeout_s=20,
        )
        held = probe.offer(blob, st_load(blob), version)
        probe.close()
        missing = sorted(held.missing)
        assert not held.committed and 0 < len(missing) < push["total_chunks"], missing
        seen = len(_events(workdir))
        agent = start()
        _wait(
            "the cut upload's acknowledgement",
            lambda: any(e["event"] == "upload_acked" and e["content_hash"] == cut for e in _events(workdir)[seen:]),
        )
        pushes = [e for e in _events(workdir)[seen:] if e["event"] == "pushing" and e["content_hash"] == cut]
        assert [i for e in pushes for i in e["chunks"]] == missing  # nothing the satellite held went again
    finally:
        stop_processes([agent], 30)
        log.close()
        orbit.stop()
        sat.stop()
    committed = [c["content_hash"] for c in commits(sat.state)]
    assert cut in committed
    assert all(n == 1 for n in Counter(committed).values())  # every content hash committed once
