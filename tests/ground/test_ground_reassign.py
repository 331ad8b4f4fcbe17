"""Switching a trainer to a new assignment: lost experts go, gained ones come in with their handed-over parts,
kept ones keep their parts and (where their fused tensor gains nothing) their optimizer moments."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ground_node.federation import handover
from ground_node.learning import carryover
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.train import Trainer, checkpoint_assignment, load_expert_state
from ground_node.model.submodel import load_base_split
from ground_node.records import Assignment
from ground_node.settings import load_settings
from protos.wire import expert_name

OLD = Assignment(1, {0: (0, 1), 1: (2, 3)})
# layer 0 only loses expert 1 (its moments continue); layer 1 loses 2 and gains 1 (a fresh optimizer state)
NEW = Assignment(2, {0: (0,), 1: (1, 3)})


def _trainer(topology: dict[str, Any], base_dir: Path, assignment: Assignment, tune: str) -> Trainer:
    s = load_settings(topology)
    training = dataclasses.replace(s.training, tune=tune)
    model, adapter = load_base_split(base_dir, assignment)
    return Trainer(model, adapter, training, assignment, train_examples(s, "c0"), s.seed, tok=tokenizer_for(s.data))


def _handed_over(trainer: Trainer, expert: tuple[int, int]) -> dict[str, np.ndarray]:
    """Random parts shaped like the trainer's (what another cluster would have uploaded)."""
    rng = np.random.default_rng(7)
    shapes = {n.rsplit("/", 1)[1]: a.shape for n, a in trainer.expert_state().items()}
    return {expert_name(*expert, p): rng.standard_normal(shape).astype(np.float32) for p, shape in shapes.items()}


@pytest.mark.parametrize("tune", ["lora", "full"])
def test_switch_keeps_kept_loads_gained_drops_lost(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path, tune: str
) -> None:
    old = _trainer(topology, base_dir, OLD, tune)
    for _ in range(3):
        old.train_step()
    before = old.expert_state()
    gained, lost = handover.diff(OLD, NEW)
    assert gained == [(1, 1)] and lost == [(0, 1), (1, 2)]
    tensors = _handed_over(old, (1, 1))
    slots = carryover.trainable_slots(old)
    layer0 = {k: v for k, v in slots.items() if k[0] == 0}
    old_moments = {
        k: {m: carryover.expert_view(old, old.optimizer.state[p][m], 0, k[1], 0).clone() for m in carryover.MOMENTS}
        for k, p in layer0.items()
    }
    old_counts = {k: old.optimizer.state[p]["step"].clone() for k, p in layer0.items()}
    carry = carryover.carry_over(old, set(NEW.pairs()) - set(gained))
    del old

    new = _trainer(topology, base_dir, NEW, tune)
    carryover.restore(new, carry, {1})
    assert load_expert_state(new, tensors) == [(1, 1)]
    state = new.expert_state()
    assert handover.experts_of(state) == {(0, 0), (1, 1), (1, 3)}  # lost experts are gone from the update
    for name, value in state.items():
        want = tensors[name] if name.startswith("expert/1/1/") else before[name]
        assert np.array_equal(value, want), name
    assert new.step == 3
    for key, param in carryover.trainable_slots(new).items():
        opt_state = new.optimizer.state.get(param)
        if key[0] == 1:
            assert not opt_state  # gained an expert: fresh (Adam bias correction starts over)
            continue
        assert opt_state is not None and torch.equal(opt_state["step"], old_counts[key])
        for m in carryover.MOMENTS:
            assert torch.equal(carryover.expert_view(new, opt_state[m], 0, key[1], 0), old_moments[key][m])
    new.train_step()  # trains on: the gained expert moves, the update still names exactly the new set
    after = new.expert_state()
    assert handover.experts_of(after) == set(NEW.pairs())
    assert not all(np.array_equal(after[n], state[n]) for n in after if n.startswith("expert/1/1/"))
    new.save_checkpoint(tmp_path)
    assert checkpoint_assignment(tmp_path) == NEW


def test_tensors_digest_and_only_experts() -> None:
    a = {"expert/0/1/down_proj": np.ones((2, 2), np.float32), "expert/1/0/down_proj": np.zeros(3, np.float32)}
    assert handover.tensors_digest(a) == handover.tensors_digest(dict(reversed(list(a.items()))))
    assert handover.tensors_digest(a) != handover.tensors_digest({**a, "expert/1/0/down_proj": np.ones(3)})
    assert list(handover.only_experts(a, {(0, 1)})) == ["expert/0/1/down_proj"]
    assert handover.diff(None, Assignment(1, {0: (2,)})) == ([(0, 2)], [])
