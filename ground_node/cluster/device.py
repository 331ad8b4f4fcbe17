"""A device of a multi-device cluster (`emsfl ground run ... --gateway HOST:PORT --device ID`).

It trains the cluster's assigned experts on its own shard of the cluster's data and syncs with its gateway over
the LAN (never link-gated): after every local round (`training.stage_every_steps` steps) it uploads its expert
state, waits (at most `round_wait_s`) for the gateway to close the round, pulls the cluster average and goes on
from it. Its optimizer state stays local and is checkpointed with the step, so a restarted device resumes.

When the satellite re-assigns the cluster, the gateway pulls the gained experts' newest parts and makes them, with
the kept experts' average, its next version; the device sees the new `assignment_version` at its next sync,
rebuilds its sub-model (kept experts carry their parts and optimizer moments over) and pulls that version.

The cluster room imports no torch at module level (ARCHITECTURE §2): the learning room (trainer, profiling, the
sub-model) is imported where the device uses it, so `ground gateway` and the sync helpers here need no torch.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from safetensors.numpy import save as st_save

from emsfl.durable import atomic_write_json
from emsfl.runtime.client import FederationClient, offer_message, tensor_specs
from emsfl.runtime.events import EventLog
from emsfl.runtime.tls import TlsFiles
from ground_node.errors import GroundError
from ground_node.federation import handover
from ground_node.records import Assignment
from ground_node.settings import load_settings
from ground_node.usage import peak_rss_mb
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import CHUNK_SIZE

if TYPE_CHECKING:
    from ground_node.learning.profile import Profile
    from ground_node.learning.train import Trainer

log = logging.getLogger(__name__)

T = TypeVar("T")


def shard_of(device: str, devices: int, shard: int | None = None) -> int:
    """The shard index of a device: `shard`, else the trailing number of its id (`d1` -> 1), modulo `devices`."""
    if shard is not None:
        index = shard
    else:
        match = re.search(r"(\d+)$", device)
        if match is None:
            raise GroundError(f"--device {device!r}: no trailing number to pick a data shard from; pass --shard")
        index = int(match.group(1))
    if devices < 1:
        raise GroundError("devices must be >= 1")
    return index % devices


def shard(examples: Sequence[T], index: int, count: int) -> list[T]:
    """Every `count`-th example starting at `index`: disjoint shards that cover the cluster's data."""
    return list(examples[index::count])


@dataclass
class DeviceOptions:
    topology: dict[str, Any]
    cluster: str
    device: str
    gateway: str
    workdir: Path
    base_dir: Path
    shard: int | None = None
    tls: TlsFiles | None = None  # mutual TLS to the gateway: the device's identity is its certificate
    round_wait_s: float = 30.0
    train_event_every: int = 25


def upload_state(client: FederationClient, tensors: dict[str, np.ndarray], version: int, step: int, base: int) -> bool:
    """A device's expert state to its gateway (offer, then PushChunks of what it lacks); True once committed."""
    arrays = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in sorted(tensors)}
    blob = st_save(arrays)
    offer = offer_message(blob, tensor_specs(arrays), version, CHUNK_SIZE, local_step=step, base_version=base)
    return bool(client.upload(blob, offer, timeout_s=20, push_timeout_s=60).committed)


def pull_state(client: FederationClient, names: list[str]) -> dict[str, np.ndarray]:
    tensors = client.pull_tensors(names, timeout_s=60)
    if tensors is None:
        raise GroundError("pull from the gateway: the stream ended before its last chunk")
    return tensors


class DeviceAgent:
    def __init__(self, options: DeviceOptions, now: Any = None) -> None:
        self.opt = options
        self.settings = load_settings(options.topology)
        self.settings.cluster_index(options.cluster)
        devices = _devices_of(options.topology, options.cluster)
        self.shard_index = shard_of(options.device, devices, options.shard)
        self.devices = devices
        self.workdir = Path(options.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.workdir / "events.jsonl", "ground", f"{options.cluster}/{options.device}", now)
        self.client = FederationClient(options.gateway, options.cluster, tls=options.tls, device=options.device)
        self.coverage: float | None = None
        self.num_examples = 0
        self.steps = 0
        self.rounds = 0
        self.base_version = 0
        self.last_loss: float | None = None
        self.data: list[Any] = []
        self.tok: Any = None
        self.profile: Profile | None = None
        self.trainer: Trainer | None = None
        self.assignment: Assignment | None = None

    def _retry(self, call: Any, stop: threading.Event) -> Any:
        """A LAN call, retried while the gateway is not up yet (UNAVAILABLE)."""
        while not stop.is_set():
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                stop.wait(0.5)
        return None

    def run(self, stop: threading.Event) -> dict[str, Any]:
        import torch

        from ground_node.learning.data import tokenizer_for, train_examples
        from ground_node.learning.profile import profile_base

        s = self.settings
        torch.set_num_threads(1)
        tok = tokenizer_for(s.data)
        data = shard(train_examples(s, self.opt.cluster), self.shard_index, self.devices)
        if not data:
            raise GroundError(f"device {self.opt.device}: its shard of cluster {self.opt.cluster} is empty")
        self.num_examples = len(data)
        profile = profile_base(self.opt.base_dir, data, tok, s.training.profile_examples)  # streamed
        affinity = profile.affinity
        self.events.emit("profiled", num_tokens=affinity.num_tokens, shard=self.shard_index)
        client = self.client
        capacity, shard_caps = s.capacities[self.opt.cluster], {"shard": str(self.shard_index)}

        def join() -> pb.JoinReply:
            return client.join(capacity, self.num_examples, self.opt.device, shard_caps, timeout_s=10)

        if self._retry(join, stop) is None:
            return self.report()
        self._retry(lambda: client.report_affinity(affinity.gate, affinity.freq, affinity.num_tokens, 10), stop)
        assignment: Assignment | None = None
        while assignment is None and not stop.is_set():
            reply = self._retry(lambda: client.assignment(timeout_s=10), stop)
            if reply is not None and reply.ready:
                assignment = _from_reply(reply)
            else:
                stop.wait(0.5)
        if assignment is None:
            return self.report()
        self.data, self.tok, self.profile = data, tok, profile
        self._assigned(assignment)
        self.trainer = self._build(assignment)
        if self.trainer.load_checkpoint(self.workdir):
            log.info("resumed from step %d", self.trainer.step)
        self._catch_up(stop)
        try:
            self._loop(stop)
        finally:
            if self.trainer is not None and self.trainer.step > 0:
                self.trainer.save_checkpoint(self.workdir)
            self.client.close()
        return self.report()

    def _assigned(self, assignment: Assignment) -> None:
        from ground_node.learning.profile import coverage_from_probs

        assert self.profile is not None
        self.assignment = assignment
        self.coverage = coverage_from_probs(self.profile.probs, self.profile.top_k, assignment)
        self.events.emit("assigned", version=assignment.version, coverage=round(self.coverage, 4))

    def _build(self, assignment: Assignment) -> Trainer:
        """A trainer on the sub-model of `assignment`: only the held experts are read from base.safetensors
        (split=frozen keeps every expert)."""
        from ground_node.learning.train import Trainer
        from ground_node.model.submodel import load_base_split

        s = self.settings
        model, adapter = load_base_split(self.opt.base_dir, assignment if s.training.split == "mask" else None)
        return Trainer(model, adapter, s.training, assignment, self.data, s.seed, tok=self.tok)

    def _catch_up(self, stop: threading.Event) -> None:
        """A device that (re)joins a cluster whose gateway already averaged starts from the cluster average."""
        status = self._retry(self.client.status, stop)
        if status is not None and status.global_version > self.base_version:
            self._pull(int(status.global_version))

    def _pull(self, version: int) -> None:
        from ground_node.learning.train import load_expert_state

        assert self.trainer is not None
        tensors = pull_state(self.client, ["expert/"])
        load_expert_state(self.trainer, tensors)
        self.base_version = version
        self.rounds += 1
        self.events.emit("synced", version=version, step=self.trainer.step)

    def _loop(self, stop: threading.Event) -> None:
        t = self.settings.training
        while not stop.is_set():
            assert self.trainer is not None
            loss = self.trainer.train_step()
            step = self.trainer.step
            self.steps = step
            self.last_loss = loss
            if step % self.opt.train_event_every == 0:
                self.events.emit("train", step=step, loss=round(loss, 5))
            if step % t.stage_every_steps == 0:
                self._sync(stop)  # may switch `self.trainer` to a new assignment
            if step % t.checkpoint_every_steps == 0:
                self.trainer.save_checkpoint(self.workdir)

    def _switch(self) -> None:
        """The cluster was re-assigned: rebuild the sub-model for the gateway's assignment and start from the
        gateway's version of it (the kept experts' average, the gained experts' handed-over parts)."""
        from ground_node.learning import carryover
        from ground_node.learning.train import load_expert_state

        assert self.trainer is not None and self.assignment is not None
        prev = self.assignment
        reply = self.client.assignment(timeout_s=10)
        new = _from_reply(reply) if reply.ready else prev
        if new == prev:
            return
        status = self.client.status(timeout_s=10)
        version = int(status.global_version)  # made for `new` (the gateway switches both at once)
        pulled = pull_state(self.client, ["expert/"]) if version > 0 else {}
        tensors = handover.only_experts(pulled, set(new.pairs()))
        gained, _ = handover.diff(prev, new)
        carry = carryover.carry_over(self.trainer, set(new.pairs()) - set(gained))
        self.trainer = None
        gc.collect()  # the old sub-model goes before the new one is read
        trainer = self._build(new)
        carryover.restore(trainer, carry, {layer for layer, _ in gained})
        load_expert_state(trainer, tensors)
        self.trainer = trainer
        self.base_version = version
        trainer.save_checkpoint(self.workdir)
        handed = handover.only_experts(tensors, set(gained))
        self.events.emit("reassigned", step=trainer.step, **handover.reassigned_event(prev, new, handed))
        self._assigned(new)

    def _sync(self, stop: threading.Event) -> None:
        trainer, assignment = self.trainer, self.assignment
        assert trainer is not None and assignment is not None

        def reassigned(status: pb.StatusReply) -> bool:  # a version made for another assignment is not pulled
            return status.assignment_version not in (0, assignment.version)

        try:
            status = self.client.status(timeout_s=10)
            if reassigned(status):
                del trainer  # no reference to the old sub-model may outlive the switch
                return self._switch()
            if status.global_version < self.base_version:  # a gateway that lost its state counts rounds anew
                log.warning("gateway version went back to %d; following it", status.global_version)
                self.base_version = int(status.global_version)
            upload_state(self.client, trainer.expert_state(), assignment.version, trainer.step, self.base_version)
            self.events.emit("device_upload", step=trainer.step, base_version=self.base_version)
            del trainer
            deadline = time.monotonic() + self.opt.round_wait_s
            while not stop.is_set() and time.monotonic() < deadline:
                status = self.client.status(timeout_s=10)
                if reassigned(status):
                    return self._switch()
                if status.global_version > self.base_version:
                    self._pull(int(status.global_version))
                    self.report()  # the gateway folds the devices' reports into the cluster's
                    return
                stop.wait(0.1)
        except grpc.RpcError as exc:
            log.warning("sync with the gateway failed (%s); training on", exc.code())

    def report(self) -> dict[str, Any]:
        from ground_node.learning.train import peak_gpu_memory_mb

        report = {
            "cluster": self.opt.cluster,
            "device": self.opt.device,
            "role": "device",
            "shard": self.shard_index,
            "steps": self.steps,
            "rounds": self.rounds,
            "final_loss": None if self.last_loss is None else round(self.last_loss, 5),
            "coverage": self.coverage,
            "num_examples": self.num_examples,
            "bytes_to_gateway": self.client.bytes_sent,
            "bytes_from_gateway": self.client.bytes_pulled,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(),  # None unless training ran on CUDA
        }
        atomic_write_json(self.workdir / "report.json", report)
        return report

    def close(self) -> None:
        self.events.close()


def _from_reply(reply: pb.Assignment) -> Assignment:
    return Assignment.from_pairs(reply.version, [(la.layer, list(la.experts)) for la in reply.layers])


def _devices_of(topology: dict[str, Any], cluster: str) -> int:
    for c in topology.get("clusters") or []:
        if str(c.get("id")) == cluster:
            return int(c.get("devices", 1) or 1)
    return 1
