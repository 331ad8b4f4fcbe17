"""A ground agent: profile local data, follow the link, wait for the assignment, train its experts, stage them.

The assignment is the only thing it waits for; after that training never waits for the link.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from emsfl.durable import atomic_write_json
from ground_node.base import load_base
from ground_node.data import tokenizer_for, train_examples
from ground_node.outbox import Outbox, StagedUpdate
from ground_node.profile import coverage_from_probs, profile_affinity
from ground_node.settings import load_settings
from ground_node.split import Assignment
from ground_node.train import Trainer
from ground_node.uplink import Link, Uplink
from ground_node.usage import Usage
from protos.events import EventLog

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
    train_event_every: int = 25


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


class GroundAgent:
    def __init__(self, options: AgentOptions, link: Link, now: Any = None) -> None:
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
        self.uplink: Uplink | None = None
        self.usage = Usage(now)  # train/idle seconds, downlinked bytes (report.json)
        self.baseline: Any = None  # ground_node.baseline.BaselineState under fedavg / fedasync

    def _on_join(self, reply: Any) -> None:
        """The satellite names the strategy: under a baseline the uplink's passes follow docs/STRATEGIES.md."""
        from ground_node.baseline import BASELINES, BaselineClient, BaselineState

        if reply.strategy in BASELINES and self.uplink is not None and self.uplink.client is None:
            self.baseline = BaselineState(reply.strategy, int(reply.global_version))
            self.uplink.client = BaselineClient(self.baseline, reply.manifest, self.usage)
            self.events.emit("joined", strategy=reply.strategy, global_version=int(reply.global_version))

    def _on_ack(self, update: StagedUpdate) -> None:
        self.events.emit("upload_acked", content_hash=update.content_hash, bytes=update.size)

    def _on_push(self, content_hash: str, chunks: list[int], total: int) -> None:
        self.events.emit("pushing", content_hash=content_hash, chunks=chunks, total_chunks=total)

    def _saved_assignment(self) -> Assignment | None:
        path = self.workdir / ASSIGNMENT
        if not path.exists():
            return None
        try:
            return Assignment.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return None

    def run(self, stop: threading.Event) -> dict[str, Any]:
        s = self.settings
        torch.set_num_threads(1)
        tok = tokenizer_for(s.data)
        base = load_base(self.opt.base_dir)
        data = train_examples(s, self.cluster)
        self.num_examples = len(data)
        affinity, probs = profile_affinity(base.model, base.adapter, data, tok, s.training.profile_examples)
        _, _, top_k = base.adapter.dims(base.model)
        self.events.emit("profiled", num_tokens=affinity.num_tokens)
        self.uplink = Uplink(
            self.opt.satellite,
            self.cluster,
            self.link,
            self.outbox,
            self.capacity,
            self.num_examples,
            affinity,
            on_ack=self._on_ack,
            on_join=self._on_join,
            on_push=self._on_push,
            max_uploads_per_contact=s.training.uploads_per_contact or None,
        )
        self.uplink.start()
        assignment = self._saved_assignment()
        try:
            self.usage.idle_start()  # no model to train until the assignment (or, baselines, the join)
            while assignment is None and not stop.is_set() and self.baseline is None:
                self.usage.idle_tick()
                if self.uplink.assigned.wait(0.5):
                    assignment = self.uplink.assignment
            self.usage.idle_stop()
            if self.baseline is not None:
                from ground_node.baseline import train_baseline

                train_baseline(self, base, data, self.baseline, stop)
                return self.report()
            if assignment is None:
                return self.report()
            self._train(base, data, assignment, probs, top_k, stop)
        finally:
            self.uplink.stop()
        return self.report()

    def _train(
        self, base: Any, data: Any, assignment: Assignment, probs: Any, top_k: int, stop: threading.Event
    ) -> None:
        s = self.settings
        atomic_write_json(self.workdir / ASSIGNMENT, assignment.to_json())
        self.coverage = coverage_from_probs(probs, top_k, assignment)
        self.events.emit("assigned", version=assignment.version, coverage=round(self.coverage, 4))
        trainer = Trainer(base.model, base.adapter, s.training, assignment, data, s.seed, tok=tokenizer_for(s.data))
        if trainer.load_checkpoint(self.workdir):
            from ground_node.train import optimizer_digest

            log.info("resumed from step %d", trainer.step)
            self.events.emit(
                "resumed", step=trainer.step, optimizer_sha256=optimizer_digest(trainer.optimizer.state_dict())
            )
        bar = None
        if self.opt.progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"train {self.cluster}", initial=trainer.step, leave=False)
        t = s.training
        while not stop.is_set():
            current = self.uplink.assignment if self.uplink is not None else None
            if current is not None and current.version != assignment.version and current != assignment:
                log.warning("assignment changed to version %d; hand-over is not supported yet", current.version)
            loss = self.usage.timed(trainer.train_step)
            self.steps = trainer.step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if trainer.step % self.opt.train_event_every == 0:
                self.events.emit("train", step=trainer.step, loss=round(loss, 5))
            if trainer.step % t.stage_every_steps == 0:
                self._stage(trainer, assignment)
            if trainer.step % t.checkpoint_every_steps == 0:
                trainer.save_checkpoint(self.workdir)
        if bar is not None:
            bar.close()
        if trainer.step > 0:
            trainer.save_checkpoint(self.workdir)

    def _stage(self, trainer: Trainer, assignment: Assignment) -> None:
        update = self.outbox.stage(trainer.expert_state(), assignment.version, trainer.step)
        self.events.emit("staged", step=trainer.step, content_hash=update.content_hash)

    def report(self) -> dict[str, Any]:
        report = {
            "cluster": self.cluster,
            "steps": self.steps,
            "uploads_acked": len(self.outbox.acked()),
            "bytes_uplinked": self.outbox.bytes_uplinked,
            "coverage": self.coverage,
            "num_examples": self.num_examples,
            "peak_rss_mb": peak_rss_mb(),
            "strategy": self.baseline.strategy if self.baseline is not None else "emsfl",
            **self.usage.snapshot(),
        }
        atomic_write_json(self.workdir / "report.json", report)
        return report

    def close(self) -> None:
        self.events.close()
