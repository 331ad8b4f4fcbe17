"""The training side of the baselines FedAvg and FedAsync (docs/STRATEGIES.md): the whole model, from the newest
global model the uplink pulled (`ground_node/federation/baseline.py`); FedAvg idles between its rounds."""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import numpy as np
import torch

from ground_node.federation.baseline import BaselineState, PulledModel
from ground_node.learning.data import tokenizer_for
from ground_node.learning.train import Trainer
from ground_node.model.submodel import load_base_split
from ground_node.records import full_assignment
from ground_node.usage import Usage
from protos.wire import parse_expert_name


def load_global(trainer: Any, model: PulledModel) -> int:
    """Put a pulled global model's expert parts into the trainer's model; returns how many experts changed."""
    by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, value in model.tensors.items():
        parsed = parse_expert_name(name)
        if parsed is None:
            continue
        key, part = parsed
        by_expert.setdefault((key.layer, key.expert), {})[part] = torch.from_numpy(np.array(value, np.float32))
    t = trainer.training
    for (layer, expert), parts in sorted(by_expert.items()):
        if t.tune == "lora":
            trainer.adapter.insert_lora(trainer.model, layer, expert, t.lora_rank, parts)
        else:
            with torch.no_grad():
                trainer.adapter.insert_expert(trainer.model, layer, expert, parts)
    return len(by_expert)


def train_baseline(agent: Any, data: Any, state: BaselineState, stop: threading.Event) -> None:
    """The training side: whole model, from the newest global model; FedAvg idles between its rounds.

    The model is read as an EMS-FL board reads its sub-model (`load_base_split`, every expert), so no file stays
    mapped and the two boards' peak RSS compare like with like: read with `from_pretrained`, the SmolLM2 base's
    `model.safetensors` stayed mapped, 8.0 GB at the peak of the first steps against 5.3 GB."""
    s = agent.settings
    usage: Usage = agent.usage
    model, adapter = load_base_split(agent.opt.base_dir, None)
    num_layers, num_experts, _ = adapter.dims(model)
    assignment = full_assignment(num_layers, num_experts)
    agent.coverage = 1.0
    trainer = Trainer(model, adapter, s.training, assignment, data, s.seed, tok=tokenizer_for(s.data))
    current = 0 if state.join_version == 0 else None  # version the local model trains from (None: none yet)
    if current == 0:
        state.loaded(0)
    agent.events.emit("baseline", strategy=state.strategy, join_version=state.join_version)
    t = s.training
    while not stop.is_set():
        current = _load_newer(agent, trainer, state, current)
        waiting = current is None or (state.strategy == "fedavg" and current in state.uploaded_rounds)
        if waiting:
            usage.idle_start()
            usage.idle_tick()
            state.wait(0.5)
            continue
        usage.idle_stop()
        assert current is not None
        if agent.budget_spent(trainer.step):
            agent.finish_budget(trainer.step, partial(_stage, agent, trainer, current))
            _serve_pulled(agent, trainer, state, current, stop)
            break
        loss = usage.timed(trainer.train_step)
        agent.steps = trainer.step
        if trainer.step % agent.opt.train_event_every == 0:
            agent.events.emit("train", step=trainer.step, loss=round(loss, 5), version=current)
        if trainer.step % t.stage_every_steps == 0:
            _stage(agent, trainer, current)
    usage.idle_stop()


def _load_newer(agent: Any, trainer: Any, state: BaselineState, current: int | None) -> int | None:
    """Load the newest pulled global model if it is newer than `current`; returns the version now loaded."""
    pulled = state.take_pulled()
    if pulled is None or (current is not None and pulled.version <= current):
        return current
    agent.usage.idle_stop()
    changed = load_global(trainer, pulled)
    state.loaded(pulled.version)
    agent.events.emit("model_loaded", version=pulled.version, experts=changed)
    return pulled.version


def _serve_pulled(agent: Any, trainer: Any, state: BaselineState, current: int | None, stop: threading.Event) -> None:
    """After the step budget: train no more, but load each newer global model the uplink pulls, as a deployed
    board answers with the newest model it has (the served accuracy reads `model_loaded`). Before this, a FedAsync
    board that pulled only after its last step kept serving what it trained from (the base, for one cluster)."""
    while not stop.is_set():
        current = _load_newer(agent, trainer, state, current)
        state.wait(0.5)


def _stage(agent: Any, trainer: Any, version: int) -> None:
    update = agent.outbox.stage(trainer.expert_state(), version, trainer.step)
    agent.events.emit("staged", step=trainer.step, content_hash=update.content_hash, base_version=version)
