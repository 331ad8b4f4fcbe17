"""Re-assignment with hand-over, end to end: a real satellite process, a real ground agent process, real gRPC.

Cluster c1 is played by the test (a Federation client with a large data weight, so its affinity decides the
assignment): it owns experts 0 and 1 of each layer first and uploads a version of expert 0. Then it reports the
opposite affinity and asks for a re-assignment; the agent of c0 must pull the handed-over parts of expert 0,
start expert 1 from the base, drop experts 2 and 3, survive a `kill -9` right after the switch, and upload exactly
its new experts, which the satellite accepts.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from emsfl.runtime.events import read_events
from satellite_node.testing import Client, OrbitStub, SatelliteProcess, encode, expert_update, wait_until
from testbed.broker import BrokerProcess, free_port
from tests.helpers import agent_topology, ground_agent, stop_processes, tiny_model

pytestmark = pytest.mark.slow

LR = 1e-4
TOPOLOGY = agent_topology(
    "reassign",
    pace=False,
    clusters=[{"id": "c0", "capacity_experts": 2, "devices": 1}, {"id": "c1", "capacity_experts": 2, "devices": 1}],
    model=tiny_model(),
    training={
        "tune": "lora",
        "split": "mask",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lr": LR,
        "batch_size": 4,
        "stage_every_steps": 5,
        "checkpoint_every_steps": 50,
        "profile_examples": 16,
        "uploads_per_contact": 0,  # one long contact: keep uploading
    },
)
FIRST = np.array([[1.0, 1.0, 0.0, 0.0]] * 2, np.float32)  # c1 wants experts 0 and 1 ...
SECOND = FIRST[:, ::-1].copy()  # ... then 2 and 3
HANDED = [(0, 0), (1, 0)]  # the experts c1 uploads a version of before it gives them up
NEW_SET = {(0, 0), (0, 1), (1, 0), (1, 1)}


def _events(workdir: Path) -> list[dict[str, Any]]:
    return read_events(workdir / "events.jsonl")


def _wait(what: str, check: Any, timeout_s: float = 120.0) -> Any:
    return wait_until(what, check, timeout_s)


def _of(workdir: Path, kind: str, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in _events(workdir)[since:] if e["event"] == kind]


@pytest.fixture
def lab(broker: BrokerProcess, tmp_path: Path) -> Iterator[tuple[SatelliteProcess, Path, str]]:
    """The satellite process on the tiny base, both links up; whatever happens, nothing outlives the test."""
    from ground_node.model.base import ensure_base

    topology = dict(TOPOLOGY, broker={"host": broker.host, "port": broker.port})
    base = ensure_base(topology, tmp_path / "cache")
    topo_text = yaml.safe_dump(topology)
    sat = SatelliteProcess(tmp_path / "sat", (broker.host, broker.port), topo_text, free_port(), base=base)
    orbit = OrbitStub(broker.host, broker.port, scale=1.0)
    try:
        sat.start()
        orbit.start()
        for cluster in ("c0", "c1"):
            orbit.set_link(cluster, True)
        yield sat, base, topo_text
    finally:
        orbit.stop()
        sat.kill()  # a no-op when the test stopped it


def test_reassignment_hands_over_and_the_agent_switches(
    lab: tuple[SatelliteProcess, Path, str], broker: BrokerProcess, tmp_path: Path
) -> None:
    from ground_node.federation.handover import tensors_digest
    from ground_node.learning.train import optimizer_digest
    from satellite_node.export import commits, global_tensors

    sat, base, topo_text = lab
    workdir = tmp_path / "ground"
    start, log = ground_agent(tmp_path, topo_text, broker.address, sat.target, base)

    c1 = Client(sat.target, "c1")
    agent: subprocess.Popen[bytes] | None = None
    try:
        # c1's large data weight makes its affinity decide the assignment
        _wait("the satellite to see c1's link", lambda: c1.try_join(2, 1_000_000), timeout_s=30)
        c1.report(FIRST)
        agent = start()
        # ---- version 1: c0 trains and uploads experts 2 and 3; c1 commits a version of expert 0 -----------
        _wait("c0's first upload", lambda: _of(workdir, "upload_acked"))
        assert [[la, list(es)] for la, es in json.loads((workdir / "assignment.json").read_text())["layers"]] == [
            [0, [2, 3]],
            [1, [2, 3]],
        ]
        theirs = expert_update(base, HANDED, seed=7)
        blob = encode(theirs)
        offer = c1.offer(blob, theirs, 1)
        assert c1.push(blob, list(offer.missing)).committed

        # ---- c1's data drifted: it reports the opposite affinity and asks for a new assignment -------------
        c1.report(SECOND)
        reply = c1.reassign("drift")
        assert reply.version == 2 and [list(x.experts) for x in reply.layers] == [[2, 3], [2, 3]]
        switched = _wait("the agent's switch", lambda: _of(workdir, "reassigned"))[0]
        agent.send_signal(signal.SIGKILL)  # right after the switch
        agent.wait()
        assert (switched["old_version"], switched["new_version"]) == (1, 2)
        assert {tuple(x) for x in switched["gained"]} == NEW_SET
        assert {tuple(x) for x in switched["lost"]} == {(0, 2), (0, 3), (1, 2), (1, 3)}
        assert [tuple(x) for x in switched["handed_over"]] == HANDED
        # the gained experts started from exactly the parts c1 uploaded (expert 1 has no version: from the base)
        assert switched["handed_over_sha256"] == tensors_digest(theirs)
        checkpoint = torch.load(workdir / "checkpoint.pt", weights_only=True)
        assert checkpoint["assignment"]["version"] == 2

        # ---- restarted after kill -9: resumes under version 2 and uploads exactly the new set ---------------
        seen = len(_events(workdir))
        agent = start()
        resumed = _wait("the resume", lambda: _of(workdir, "resumed", seen))[0]
        assert resumed["assignment_version"] == 2 and resumed["step"] == int(checkpoint["step"])
        assert resumed["optimizer_sha256"] == optimizer_digest(checkpoint["optimizer"])
        acked = _wait("an upload after the restart", lambda: _of(workdir, "upload_acked", seen))[0]
    finally:
        if agent is not None:
            stop_processes([agent], 30)
        log.close()
        c1.close()
    sat.stop()

    events = _events(workdir)
    after = events[events.index(switched) :]
    assert all(e["assignment_version"] == 2 for e in after if e["event"] == "staged")
    mine = [c for c in commits(sat.state) if c["cluster"] == "c0"]
    first_new = next(i for i, c in enumerate(mine) if {(la, e) for la, e, _ in c["experts"]} & NEW_SET)
    assert first_new > 0 and all({(la, e) for la, e, _ in c["experts"]} == NEW_SET for c in mine[first_new:])
    assert acked["content_hash"] in {c["content_hash"] for c in mine[first_new:]}
    # the newest global parts of the gained experts are c0's last upload: trained on from the handed-over parts
    last = mine[-1]["content_hash"]
    step = next(e["step"] for e in events if e["event"] == "staged" and e["content_hash"] == last)
    bound = 4 * LR * (step - switched["step"])  # AdamW moves a value by at most ~3.2 lr per step
    assert bound > 0
    tensors = global_tensors(sat.state, base)
    for name, value in theirs.items():
        assert not np.array_equal(tensors[name], value), f"{name} was not trained"
        assert np.allclose(tensors[name], value, rtol=0, atol=bound), name
    for layer in (0, 1):  # expert 1 had no version: its LoRA B started at zero (the base)
        for part in ("gate_up_proj.lora_B", "down_proj.lora_B"):
            b = tensors[f"expert/{layer}/1/{part}"]
            assert np.abs(b).max() <= bound and np.abs(b).max() > 0


def test_reassignment_of_a_gateway_cluster_reaches_its_devices(
    lab: tuple[SatelliteProcess, Path, str], broker: BrokerProcess, tmp_path: Path
) -> None:
    """c0 is a gateway and two device processes: the gateway pulls the handed-over parts, the devices switch to
    them; then a `kill -9` of the gateway. Regressions: devices kept training the old assignment while the gateway
    refused their uploads for ever; the gateway ignored `training.uploads_per_contact` (one upload per contact, here
    one in the whole test); a restarted gateway counted its rounds from 0, so no round of its devices ever closed."""
    from ground_node.federation.handover import tensors_digest
    from satellite_node.export import commits

    sat, base, topo_text = lab
    topology = yaml.safe_load(topo_text)
    topology["clusters"][0]["devices"] = 2
    topo_path = tmp_path / "topology.yaml"
    topo_path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    gw_dir = tmp_path / "gateway"
    gw_addr = f"127.0.0.1:{free_port()}"
    ground = [sys.executable, "-m", "emsfl", "ground"]
    shared = ["--topology", str(topo_path), "--broker", broker.address, "--cluster", "c0", "--base", str(base)]
    argvs = [[*ground, "gateway", *shared, "--satellite", sat.target, "--listen", gw_addr, "--workdir", str(gw_dir)]]
    dev_dirs = [tmp_path / f"d{i}" for i in range(2)]
    for i, d in enumerate(dev_dirs):
        argvs.append([*ground, "run", *shared, "--gateway", gw_addr, "--device", f"d{i}", "--workdir", str(d)])
    log = open(tmp_path / "ground.log", "ab")  # noqa: SIM115 - closed at the end
    repo = Path(__file__).resolve().parents[2]
    c1 = Client(sat.target, "c1")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _wait("the satellite to see c1's link", lambda: c1.try_join(2, 1_000_000), timeout_s=30)
        c1.report(FIRST)
        procs = [subprocess.Popen(a, cwd=repo, stdout=log, stderr=subprocess.STDOUT) for a in argvs]
        _wait("the gateway's first upload", lambda: _of(gw_dir, "upload_acked"))
        theirs = expert_update(base, HANDED, seed=7)
        blob = encode(theirs)
        offer = c1.offer(blob, theirs, 1)
        assert c1.push(blob, list(offer.missing)).committed
        c1.report(SECOND)
        assert c1.reassign("drift").version == 2

        gw_switch = _wait("the gateway's hand-over", lambda: _of(gw_dir, "reassigned"))[0]
        assert (gw_switch["old_version"], gw_switch["new_version"]) == (1, 2)
        assert [tuple(x) for x in gw_switch["handed_over"]] == HANDED
        assert gw_switch["handed_over_sha256"] == tensors_digest(theirs)
        for d in dev_dirs:
            switched = _wait(f"{d.name}'s switch", lambda d=d: _of(d, "reassigned"))[0]
            assert (switched["old_version"], switched["new_version"]) == (1, 2)
            assert {tuple(x) for x in switched["gained"]} == NEW_SET
            assert [tuple(x) for x in switched["handed_over"]] == HANDED
            # the device started the gained experts from exactly what c1 had committed
            assert switched["handed_over_sha256"] == tensors_digest(theirs)
        seen = len(_events(gw_dir))
        _wait("a round of the new assignment", lambda: _of(gw_dir, "round_closed", seen))
        _wait("its upload", lambda: _of(gw_dir, "upload_acked", seen))

        # kill -9 the gateway: restarted, it goes on from its version and assignment, and its devices' rounds close
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        last = max(e["version"] for e in _of(gw_dir, "round_closed"))
        seen = len(_events(gw_dir))
        procs[0] = subprocess.Popen(argvs[0], cwd=repo, stdout=log, stderr=subprocess.STDOUT)
        resumed = _wait("a round after the restart", lambda: _of(gw_dir, "round_closed", seen))[0]
        assert resumed["version"] == last + 1
        _wait("an upload after the restart", lambda: _of(gw_dir, "upload_acked", seen))
        assert not _of(gw_dir, "reassigned", seen)  # nothing handed over again
    finally:
        stop_processes(procs, 30)
        log.close()
        c1.close()
    sat.stop()
    mine = [c for c in commits(sat.state) if c["cluster"] == "c0"]
    assert {(la, e) for la, e, _ in mine[-1]["experts"]} == NEW_SET
