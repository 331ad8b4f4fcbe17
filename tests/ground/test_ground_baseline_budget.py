"""A baseline board keeps taking the global models it pulls after its step budget is spent.

Regression test for the FedAsync board that served the base: in the CLINC150 comparison (commit 541d70d) cluster c0
trained its 12 steps, then pulled global versions 1 to 4, but `finish_budget` had parked its training thread, so it
never loaded one and its served accuracy was the base's (0.117). A deployed board answers with the newest model it
has, trained on or not.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from emsfl.runtime.events import read_events
from ground_node.agent import AgentOptions, GroundAgent
from ground_node.federation.baseline import BaselineState, PulledModel
from ground_node.learning.baseline_train import train_baseline
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.train import Trainer
from ground_node.model.base import load_base
from ground_node.records import full_assignment
from testbed.served import loaded_global_version
from tests.helpers import FixedLink


def _events(workdir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in read_events(workdir / "events.jsonl") if e.get("event") == name]


def _wait_for(workdir: Path, name: str, timeout_s: float = 120.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while not _events(workdir, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _events(workdir, name)


def test_fedasync_board_loads_a_model_pulled_after_its_budget(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path
) -> None:
    topology["strategy"] = "fedasync"
    topology["clusters"][0]["max_training_steps"] = 2
    agent = GroundAgent(
        AgentOptions(topology, "c0", tmp_path / "c0", base_dir, satellite="127.0.0.1:1"), FixedLink(up=False)
    )
    s = agent.settings
    state = BaselineState("fedasync", join_version=0)

    # what the satellite's global model would hold: every expert's parts after one step from the base
    base = load_base(base_dir)
    num_layers, num_experts, _ = base.adapter.dims(base.model)
    other = Trainer(
        base.model, base.adapter, s.training, full_assignment(num_layers, num_experts),
        train_examples(s, "c1"), s.seed, tokenizer_for(s.data),
    )  # fmt: skip
    other.train_step()
    global_v3 = PulledModel(3, dict(other.expert_state()))

    stop = threading.Event()
    thread = threading.Thread(
        target=train_baseline,
        args=(agent, train_examples(s, "c0"), state, stop),
        daemon=True,
    )
    thread.start()
    try:
        assert [e["step"] for e in _wait_for(agent.workdir, "budget_spent")] == [2]
        assert loaded_global_version(agent.workdir) == 0  # it trained from the base (version 0)
        state.offer_pulled(global_v3)  # the uplink pulls version 3 after the last step
        loaded = _wait_for(agent.workdir, "model_loaded")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert [(e["version"], e["experts"]) for e in loaded] == [(3, num_layers * num_experts)]
    assert loaded_global_version(agent.workdir) == 3  # what testbed/served.py serves for this board
    assert agent.steps == 2  # loading is not training
