"""Ground-side clients of the baselines FedAvg and FedAsync (docs/STRATEGIES.md, ARCHITECTURE §4.5).

With `strategy: fedavg` or `fedasync` (learnt from `JoinReply.strategy`) a cluster trains the **whole model**:
LoRA (or full slices) on every expert of every layer, no split, no affinity and no assignment. It uploads every
expert's parts with `base_version` = the global version it trained from (FedAvg: the round), and at each contact
pulls the global model when it advanced and continues from it.

Two halves share a `BaselineState`:
- `BaselineClient` is the uplink's `ClientStrategy`: at every pass GetStatus, pull the newer global model
  (resumable, chunk by chunk), upload the newest staged update if the strategy still takes it.
- `train_baseline` (`ground_node/learning/baseline_train.py`) runs in the agent's thread: load a newer pulled
  model when there is one, train, stage.
  FedAvg: once the round's upload is committed the device waits (idle) for the next round's model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from emsfl.runtime.client import ResumablePull
from ground_node.errors import GroundError
from ground_node.federation.client_strategy import ClientStrategy, UplinkPort
from ground_node.federation.outbox import StagedUpdate
from ground_node.usage import Usage
from protos.wire import expert_name, parse_expert_name

log = logging.getLogger(__name__)

BASELINES = ("fedavg", "fedasync")


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
        self._status: Any = None  # the GetStatus reply of the current pass

    def base_version(self, update: StagedUpdate) -> int:
        """Baseline updates are staged with their base version in the outbox's version field."""
        return update.assignment_version

    def run_pass(self, uplink: UplinkPort) -> bool:
        st = self.state
        status = uplink.client.status()
        version = int(status.global_version)
        self._status = status
        with st.cond:
            st.server_version = max(st.server_version, version)
            st.contact = uplink.contact_id()
        # True: the global model moved during the pull (or it was cut): go on at once
        return version > st.have_version and version > 0 and not self._pull(uplink, version)

    def prepare(self, uplink: UplinkPort, update: StagedUpdate, budget_bytes: float | None) -> StagedUpdate | None:
        """The whole model goes up (no planning); FedAvg sends a round's update once, in a later contact than the
        one its model arrived in."""
        st, status = self.state, self._status
        base = self.base_version(update)
        if st.strategy == "fedavg" and status is not None:
            if base < int(status.global_version):  # trained for a round that closed meanwhile: it would be refused
                uplink.reject(update.content_hash)
                return None
            if base in st.uploaded_rounds or uplink.cluster in status.round_uploaded:
                st.committed(base)
                return None
            if st.contact is not None and st.loaded_contact.get(base, "") == st.contact:
                return None  # loaded in this very contact: train through the gap, upload at the next one
        return update

    def refused(self, uplink: UplinkPort, update: StagedUpdate, exc: grpc.RpcError) -> bool:
        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # stale: pull at the next pass, drop this one
            log.info("uplink: %s refused as stale: %s", update.content_hash[:12], exc.details())
            uplink.reject(update.content_hash)
            return True
        return False

    def acked(self, uplink: UplinkPort, update: StagedUpdate) -> None:
        self.state.committed(self.base_version(update))

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
