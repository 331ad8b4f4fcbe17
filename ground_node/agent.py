"""A ground agent: profile local data, follow the link, wait for the assignment, train its experts, stage them.

The assignment is the only thing it waits for; after that training never waits for the link. When the satellite
hands out a new assignment version, the uplink thread pulls the newest parts of the experts gained (while the link
is up) and the training thread switches between two steps: it rebuilds the sub-model (lost experts dropped, gained
ones read from the base and given their handed-over parts), keeps what it can of the kept experts' state, and
checkpoints before it trains on (ground_node/federation/handover.py).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from emsfl.durable import atomic_write_json
from emsfl.runtime.client import ResumablePull
from emsfl.runtime.events import EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.tls import TlsFiles
from ground_node.federation import handover
from ground_node.federation.handover import Switch
from ground_node.federation.outbox import Outbox
from ground_node.federation.uplink import Uplink, UplinkHooks
from ground_node.learning import carryover
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.profile import Profile, coverage_from_probs, profile_base
from ground_node.learning.train import Trainer, checkpoint_assignment, load_expert_state, peak_gpu_memory_mb
from ground_node.model.base import read_manifest
from ground_node.model.submodel import load_base_split
from ground_node.records import Assignment
from ground_node.settings import load_settings
from ground_node.usage import Usage, peak_rss_mb

log = logging.getLogger(__name__)

ASSIGNMENT = "assignment.json"


@dataclass
class AgentOptions:
    topology: dict[str, Any]
    cluster: str
    workdir: Path
    base_dir: Path
    satellite: str
    progress: bool = False
    tls: TlsFiles | None = None  # mutual TLS to the satellite (emsfl/runtime/tls.py)
    train_event_every: int = 25


def _mean_step_s(train_seconds: float, steps: int) -> float | None:
    """Mean wall seconds per training step (None before the first)."""
    return round(train_seconds / steps, 4) if steps > 0 else None


class GroundAgent:
    def __init__(self, options: AgentOptions, link: LinkState, now: Any = None) -> None:
        self.opt = options
        self.settings = load_settings(options.topology)
        self.cluster = options.cluster
        self.settings.cluster_index(self.cluster)  # an unknown cluster id is a config error
        self.capacity = self.settings.capacities[self.cluster]
        self.workdir = Path(options.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.link = link
        self.events = EventLog(self.workdir / "events.jsonl", "ground", self.cluster, now)
        self.outbox = Outbox(self.workdir / "outbox")
        self.coverage: float | None = None
        self.num_examples = 0
        self.steps = 0
        self.uploads_staged = 0  # staged in this process (the dashboard's figure; the outbox keeps only the newest)
        self.uplink: Uplink | None = None
        self.usage = Usage(now)  # train/idle seconds, downlinked bytes (report.json)
        self.baseline: Any = None  # ground_node.federation.baseline.BaselineState under fedavg / fedasync
        self.profile: Profile | None = None
        self.expert_parts: list[str] = []  # what an update carries per expert (manifest.json `expert_parts`)
        # the assignment being trained (or resumed), and the next one, prepared by the uplink thread
        self._lock = threading.Lock()
        self.current: Assignment | None = None
        self._pending: Switch | None = None
        self._handover_pull = ResumablePull()  # a hand-over pull cut by the link resumes at the next pass
        self._switch_ready = threading.Event()
        self.trainer: Trainer | None = None

    def _on_join(self, reply: Any) -> None:
        """The satellite names the strategy: under a baseline the uplink's passes follow docs/STRATEGIES.md."""
        from ground_node.federation.baseline import BASELINES, BaselineClient, BaselineState

        if reply.strategy in BASELINES and self.uplink is not None and self.baseline is None:
            self.baseline = BaselineState(reply.strategy, int(reply.global_version))
            self.uplink.strategy = BaselineClient(self.baseline, reply.manifest, self.usage)
            self.events.emit("joined", strategy=reply.strategy, global_version=int(reply.global_version))

    def _saved_assignment(self) -> Assignment | None:
        path = self.workdir / ASSIGNMENT
        if not path.exists():
            return None
        try:
            return Assignment.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def _resumed_assignment(self) -> Assignment | None:
        """The assignment to resume under: `assignment.json`, or the checkpoint's when that is newer (a switch
        writes its checkpoint first, so a kill between the two writes still resumes under the new assignment)."""
        saved = self._saved_assignment()
        checkpointed = checkpoint_assignment(self.workdir)
        if checkpointed is not None and (saved is None or checkpointed.version > saved.version):
            return checkpointed
        return saved

    def run(self, stop: threading.Event) -> dict[str, Any]:
        s = self.settings
        torch.set_num_threads(1)
        tok = tokenizer_for(s.data)
        data = train_examples(s, self.cluster)
        self.num_examples = len(data)
        # streamed from base.safetensors layer by layer: the full model is never in memory
        self.profile = profile_base(self.opt.base_dir, data, tok, s.training.profile_examples)
        self.events.emit("profiled", num_tokens=self.profile.affinity.num_tokens)
        self.expert_parts = [str(p["name"]) for p in read_manifest(self.opt.base_dir)["expert_parts"]]
        self.current = self._resumed_assignment()
        self.uplink = Uplink(
            self.opt.satellite,
            self.cluster,
            self.link,
            self.outbox,
            self.capacity,
            self.num_examples,
            self.profile.affinity,
            UplinkHooks(
                on_join=self._on_join,
                before_assignment=self._prepare_switch,
            ),
            max_uploads_per_contact=s.training.uploads_per_contact or None,
            send_window_chunks=s.training.send_window_chunks,
            tls=self.opt.tls,
            events=self.events,
        )
        self.uplink.start()
        try:
            self.usage.idle_start()  # no model to train until the assignment (or, baselines, the join)
            while not self._assigned() and not stop.is_set() and self.baseline is None:
                self.usage.idle_tick()
                self._switch_ready.wait(0.5)
            self.usage.idle_stop()
            if self.baseline is not None:
                from ground_node.learning.baseline_train import train_baseline

                train_baseline(self, data, self.baseline, stop)
            elif self._assigned():
                self._train(data, tok, stop)
        finally:
            self.uplink.stop()
        return self.report()

    # ---- assignment switches (uplink thread prepares, training thread applies) ----------------

    def _assigned(self) -> bool:
        with self._lock:
            return self.current is not None or self._pending is not None

    def _switch_pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    def _take_pending(self) -> Switch | None:
        with self._lock:
            switch, self._pending = self._pending, None
            return switch

    def _prepare_switch(self, new: Assignment) -> None:
        """Uplink thread, link up: fetch the newest parts of the experts `new` gains, then hand it to training.

        Raises (and so the uplink does not adopt `new` yet) when the pull fails; the next pass tries again."""
        with self._lock:
            held = self._pending.assignment if self._pending is not None else self.current
        if new == held:
            return
        assert self.uplink is not None
        gained, _ = handover.diff(held, new)
        timeout = max(60.0, self.uplink.call_timeout_s)  # a paced pull of full expert weights takes a while
        up = self.uplink
        tensors = handover.fetch_gained(
            up.stub, up.metadata, gained, self.expert_parts, timeout, self._handover_pull, self.usage.add_downlink
        )
        if tensors:
            self.usage.add_pull()
        if held is not None:  # upload priorities are measured against what the satellite holds now
            self.outbox.rebase_acked(set(new.pairs()), tensors)
        with self._lock:
            # a switch still waiting keeps the parts it pulled for experts `new` holds too (an applied one is
            # already in the trainer, where they have trained since)
            waiting = self._pending.tensors if self._pending is not None else {}
            self._pending = Switch(new, {**handover.only_experts(waiting, set(new.pairs())), **tensors})
        self._switch_ready.set()
        log.info("assignment version %d ready (%d handed-over tensors)", new.version, len(tensors))

    def _build(self, assignment: Assignment, data: Any, tok: Any) -> Trainer:
        """A trainer on the sub-model of `assignment`, read from base.safetensors (held experts only)."""
        s = self.settings
        model, adapter = load_base_split(self.opt.base_dir, assignment if s.training.split == "mask" else None)
        return Trainer(model, adapter, s.training, assignment, data, s.seed, tok=tok)

    def _resume(self, data: Any, tok: Any) -> Trainer:
        assert self.current is not None
        trainer = self._build(self.current, data, tok)
        if trainer.load_checkpoint(self.workdir):
            from ground_node.learning.train import optimizer_digest

            log.info("resumed from step %d", trainer.step)
            self.events.emit(
                "resumed",
                step=trainer.step,
                optimizer_sha256=optimizer_digest(trainer.optimizer.state_dict()),
                assignment_version=self.current.version,
            )
        atomic_write_json(self.workdir / ASSIGNMENT, self.current.to_json())
        self._emit_assigned(self.current)
        return trainer

    def _apply(self, old: Trainer | None, switch: Switch, data: Any, tok: Any) -> Trainer:
        """Training thread: rebuild the sub-model and trainer for a new assignment, persist, report."""
        new = switch.assignment
        prev = old.assignment if old is not None else None
        gained, _ = handover.diff(prev, new)
        handed = handover.experts_of(switch.tensors)
        fresh = set(gained) | handed
        carry = carryover.carry_over(old, set(new.pairs()) - fresh) if old is not None else None
        del old
        self.trainer = None
        gc.collect()  # the old sub-model goes before the new one is read
        trainer = self._build(new, data, tok)
        if carry is not None:
            carryover.restore(trainer, carry, {layer for layer, _ in fresh})
        load_expert_state(trainer, switch.tensors)
        # checkpoint first, then the assignment (see _resumed_assignment)
        trainer.save_checkpoint(self.workdir)
        atomic_write_json(self.workdir / ASSIGNMENT, new.to_json())
        with self._lock:
            self.current = new
        if prev is not None:
            loaded = handover.only_experts(trainer.expert_state(), handed)
            self.events.emit("reassigned", step=trainer.step, **handover.reassigned_event(prev, new, loaded))
        self._emit_assigned(new)
        return trainer

    def _emit_assigned(self, assignment: Assignment) -> None:
        assert self.profile is not None
        self.coverage = coverage_from_probs(self.profile.probs, self.profile.top_k, assignment)
        self.events.emit("assigned", version=assignment.version, coverage=round(self.coverage, 4))

    def _train(self, data: Any, tok: Any, stop: threading.Event) -> None:
        self.trainer = self._resume(data, tok) if self.current is not None else None
        bar = None
        trainer: Trainer | None = None
        while not stop.is_set():
            switch = self._take_pending()
            if switch is not None:
                trainer = None  # no reference may keep the old sub-model alive while the new one is read
                self.trainer = self._apply(self.trainer, switch, data, tok)
            trainer = self.trainer
            assert trainer is not None
            if self.budget_spent(trainer.step):
                self.finish_budget(trainer.step, partial(self._stage, trainer))
                stop.wait()  # train no more while the uplink delivers the final state
                break
            if bar is None and self.opt.progress:
                from tqdm import tqdm

                bar = tqdm(desc=f"train {self.cluster}", initial=trainer.step, leave=False)
            self._step(trainer, bar)
        if bar is not None:
            bar.close()
        if self.trainer is not None and self.trainer.step > 0:
            self.trainer.save_checkpoint(self.workdir)

    def _step(self, trainer: Trainer, bar: Any) -> None:
        """One training step, then what is due: its event, staging, a checkpoint."""
        t = self.settings.training
        loss = self.usage.timed(trainer.train_step)
        self.steps = trainer.step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
        if trainer.step % self.opt.train_event_every == 0:
            self.events.emit("train", step=trainer.step, loss=round(loss, 5))
        if trainer.step % t.stage_every_steps == 0:
            self._stage(trainer)
        if trainer.step % t.checkpoint_every_steps == 0:
            trainer.save_checkpoint(self.workdir)

    def budget_spent(self, step: int) -> bool:
        budget = self.settings.step_budgets.get(self.cluster)
        return budget is not None and step >= budget

    def finish_budget(self, step: int, stage: Callable[[], None]) -> None:
        """The step budget is spent: stage the final state (unless this step was staged); the caller trains no
        more."""
        if step % self.settings.training.stage_every_steps:
            stage()
        self.events.emit("budget_spent", step=step)

    def _stage(self, trainer: Trainer) -> None:
        if self._switch_pending():
            return  # the assignment changes before the next step: nothing more goes up under the old one
        version = trainer.assignment.version
        update = self.outbox.stage(trainer.expert_state(), version, trainer.step)
        self.uploads_staged += 1
        self.events.emit("staged", step=trainer.step, content_hash=update.content_hash, assignment_version=version)

    def report(self) -> dict[str, Any]:
        report = {
            "cluster": self.cluster,
            "steps": self.steps,
            "uploads_acked": len(self.outbox.acked()),
            "bytes_uplinked": self.outbox.bytes_uplinked,
            "coverage": self.coverage,
            "num_examples": self.num_examples,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(),  # None unless training ran on CUDA
            "step_time_s": _mean_step_s(self.usage.train_seconds, self.steps),
            "strategy": self.baseline.strategy if self.baseline is not None else "emsfl",
            **self.usage.snapshot(),
        }
        atomic_write_json(self.workdir / "report.json", report)
        return report

    def live(self) -> dict[str, Any]:
        """What the node's status topic carries while it runs (the dashboard's cluster panel); read-only,
        safe from another thread."""
        with self._lock:
            current = self.current
        return {
            "steps": self.steps,
            "uploads_staged": self.uploads_staged,
            "uploads_acked": len(self.outbox.acked()),
            "bytes_uplinked": self.outbox.bytes_uplinked,
            "bytes_downlinked": self.usage.bytes_downlinked,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_memory_mb": peak_gpu_memory_mb(),
            "assignment_version": None if current is None else current.version,
            "experts": None if current is None else [[layer, list(current.held(layer))] for layer in current.layers],
        }

    def close(self) -> None:
        self.events.close()
