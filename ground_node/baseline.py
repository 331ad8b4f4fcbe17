"""Ground-side clients of the baselines FedAvg and FedAsync (docs/STRATEGIES.md, ARCHITECTURE §4.5).

With `strategy: fedavg` or `fedasync` (learnt from `JoinReply.strategy`) a cluster trains the **whole model**:
LoRA (or full slices) on every expert of every layer, no split, no affinity and no assignment. It uploads every
expert's parts with `base_version` = the global version it trained from (FedAvg: the round), and at each contact
pulls the global model when it advanced and continues from it.

Two halves share a `BaselineState`:
- `BaselineClient` is the uplink's `ClientStrategy`: at every pass GetStatus, pull the newer global model
  (resumable, chunk by chunk), upload the newest staged update if the strategy still takes it.
- `train_baseline` runs in the agent's thread: load a newer pulled model when there is one, train, stage.
  FedAvg: once the round's upload is committed the device waits (idle) for the next round's model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import grpc
import numpy as np
import torch

from emsfl.runtime.client import ResumablePull
from ground_node.client_strategy import ClientStrategy, UplinkPort
from ground_node.errors import GroundError
from ground_node.outbox import StagedUpdate
from ground_node.records import Assignment
from ground_node.usage import Usage
from protos.wire import expert_name, parse_expert_name

log = logging.getLogger(__name__)

BASELINES = ("fedavg", "fedasync")


def full_assignment(num_layers: int, num_experts: int) -> Assignment:
    """Every expert of every layer: what FedAvg and FedAsync train."""
    return Assignment(0, {layer: tuple(range(num_experts)) for layer in range(num_layers)})


@dataclass(frozen=True)
class PulledModel:
    version: int
    tensors: dict[str, np.ndarray]


class BaselineState:
    """What the uplink thread and the training thread share (guarded by one condition)."""

    def __init__(self, strategy: str, join_version: int) -> None:
        if strategy not in BASELINES:
            raise GroundError(f"strategy {strategy!r} is not a baseline ({', '.join(BASELINES)})")
        self.strategy = strategy
        self.cond = threading.Condition()
        self.join_version = join_version
        self.server_version = join_version  # newest global version the server reported
        self.pulled: PulledModel | None = None  # newest pulled model, until the trainer loads it
        self.have_version = 0 if join_version == 0 else -1  # newest version pulled or loaded (-1: none yet)
        self.uploaded_rounds: set[int] = set()  # fedavg: rounds whose upload is committed
        # fedavg: a round's model is trained through the gap until the next contact, not sent back in the contact
        # it arrived in (that would send a few steps' worth and then idle); contacts are told apart by link `since`
        self.contact: str | None = None
        self.loaded_contact: dict[int, str | None] = {}  # version -> the contact during which it was loaded

    def offer_pulled(self, model: PulledModel) -> None:
        with self.cond:
            if model.version > self.have_version:
                self.pulled = model
                self.have_version = model.version
                self.cond.notify_all()

    def take_pulled(self) -> PulledModel | None:
        with self.cond:
            model, self.pulled = self.pulled, None
            return model

    def loaded(self, version: int) -> None:
        with self.cond:
            self.loaded_contact[version] = self.contact

    def committed(self, base_version: int) -> None:
        with self.cond:
            self.uploaded_rounds.add(base_version)
            self.cond.notify_all()

    def wait(self, timeout_s: float) -> None:
        with self.cond:
            self.cond.wait(timeout_s)


class BaselineClient(ClientStrategy):
    """The uplink side: the uplink's strategy once the satellite named a baseline strategy."""

    def __init__(self, state: BaselineState, manifest: Any, usage: Usage) -> None:
        self.name = state.strategy
        self.state = state
        self.usage = usage
        self.names = [
            expert_name(layer, expert, part.name)
            for layer in range(int(manifest.num_layers))
            for expert in range(int(manifest.num_experts))
            for part in manifest.expert_parts
        ]
        self._puller = ResumablePull()  # a pull cut by the link resumes at the next pass

    def base_version(self, update: StagedUpdate) -> int:
        """Baseline updates are staged with their base version in the outbox's version field."""
        return update.assignment_version

    def run_pass(self, uplink: UplinkPort) -> bool:
        st = self.state
        status = uplink.client.status()
        version = int(status.global_version)
        with st.cond:
            st.server_version = max(st.server_version, version)
            st.contact = uplink.contact_id()
        if version > st.have_version and version > 0 and not self._pull(uplink, version):
            return True  # the global model moved during the pull (or it was cut): go on at once
        update = uplink.next_update()
        if update is None:
            return False
        base = self.base_version(update)
        if st.strategy == "fedavg":
            if base < version:  # trained for a round that closed meanwhile: its upload would be refused
                uplink.reject(update.content_hash)
                return False
            if base in st.uploaded_rounds or uplink.cluster in status.round_uploaded:
                st.committed(base)
                return False
            if st.contact is not None and st.loaded_contact.get(base, "") == st.contact:
                return False  # loaded in this very contact: train through the gap, upload at the next one
        try:
            progressed = uplink.upload(update)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # stale: pull at the next pass, drop this one
                log.info("uplink: %s refused as stale: %s", update.content_hash[:12], exc.details())
                uplink.reject(update.content_hash)
                return False
            raise
        if update.content_hash in uplink.outbox.acked():
            st.committed(base)
        return progressed

    def _pull(self, uplink: UplinkPort, version: int) -> bool:
        """Pull the trainable expert parts of global version `version`, resuming a cut pull; True when loaded."""
        timeout = max(60.0, uplink.call_timeout_s)
        pulled = self._puller.fetch(
            uplink.client.stub, uplink.client.metadata, self.names, timeout, self.usage.add_downlink
        )
        if pulled is None:
            return False
        after = uplink.client.status()
        if int(after.global_version) != version:
            return False  # a commit landed during the pull: the blob may be newer than `version`
        tensors = {n: a for n, a in pulled.items() if parse_expert_name(n) is not None}
        self.usage.add_pull()
        self.state.offer_pulled(PulledModel(version, tensors))
        log.info("pulled global version %d (%d tensors)", version, len(tensors))
        return True


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


def train_baseline(agent: Any, base: Any, data: Any, state: BaselineState, stop: threading.Event) -> None:
    """The training side: whole model, from the newest global model; FedAvg idles between its rounds."""
    from ground_node.data import tokenizer_for
    from ground_node.train import Trainer

    s = agent.settings
    usage: Usage = agent.usage
    num_layers, num_experts, _ = base.adapter.dims(base.model)
    assignment = full_assignment(num_layers, num_experts)
    agent.coverage = 1.0
    trainer = Trainer(base.model, base.adapter, s.training, assignment, data, s.seed, tok=tokenizer_for(s.data))
    current = 0 if state.join_version == 0 else None  # version the local model trains from (None: none yet)
    if current == 0:
        state.loaded(0)
    agent.events.emit("baseline", strategy=state.strategy, join_version=state.join_version)
    t = s.training
    while not stop.is_set():
        pulled = state.take_pulled()
        if pulled is not None and (current is None or pulled.version > current):
            usage.idle_stop()
            changed = load_global(trainer, pulled)
            current = pulled.version
            state.loaded(current)
            agent.events.emit("model_loaded", version=current, experts=changed)
        waiting = current is None or (state.strategy == "fedavg" and current in state.uploaded_rounds)
        if waiting:
            usage.idle_start()
            usage.idle_tick()
            state.wait(0.5)
            continue
        usage.idle_stop()
        assert current is not None
        if agent.budget_spent(trainer.step):
            agent.finish_budget(trainer.step, partial(_stage, agent, trainer, current), stop)
            break
        loss = usage.timed(trainer.train_step)
        agent.steps = trainer.step
        if trainer.step % agent.opt.train_event_every == 0:
            agent.events.emit("train", step=trainer.step, loss=round(loss, 5), version=current)
        if trainer.step % t.stage_every_steps == 0:
            _stage(agent, trainer, current)
    usage.idle_stop()


def _stage(agent: Any, trainer: Any, version: int) -> None:
    update = agent.outbox.stage(trainer.expert_state(), version, trainer.step)
    agent.events.emit("staged", step=trainer.step, content_hash=update.content_hash, base_version=version)
