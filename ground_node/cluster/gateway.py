"""The cluster gateway (ARCHITECTURE §3 step 5): the devices of one cluster train, the gateway averages them.

The gateway serves the same `Federation` service to its devices over the terrestrial LAN (never link-gated;
devices name themselves with the `emsfl-cluster` metadata key plus `emsfl-device` on a plaintext loopback lab; under
mutual TLS with their device certificate, `emsfl pki issue --role device`, and nothing else), and is the only node
of its cluster that talks to the satellite:

- devices `Join` (data size) and `ReportAffinity`; once every expected device has reported, the gateway joins
  the satellite with the cluster's total data size and reports the token-weighted mean of its devices' affinity;
- `GetAssignment` answers the satellite's assignment of the cluster (not ready until the satellite solved it);
- on a re-assignment (before the uplink adopts it) the gateway pulls the newest parts of the experts the cluster
  gains from the satellite; with the kept experts' average they become its next version, and `GetAssignment` and
  `GetStatus.assignment_version` switch to the new assignment only then, so a device that sees it finds them;
- a device uploads its expert state after every local round (`OfferUpdate`/`PushChunks`, `base_version` = the
  gateway round it trained from); a round closes when every device uploaded for it (or `round_timeout_s` after its
  first upload, with the devices that did): the example-weighted average becomes gateway version r+1, which devices
  fetch with `PullTensors` (`GetStatus.global_version` tells them), and is staged in the gateway's outbox, from
  where the uplink sends it to the satellite at the next contact (resumable, link-aware, as a single node does).

Its version, assignment and latest average are on disk (`gateway.json`, `average.safetensors`) before a device can
see them, so a gateway restarted after `kill -9` goes on where it stopped: its devices' rounds still match.

No torch: the gateway only moves and averages numpy arrays. This module is the cluster's side of it (devices,
rounds, the average, the uplink); `gateway_server.py` serves it to the devices over gRPC.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from emsfl.durable import atomic_write_bytes, atomic_write_json
from emsfl.runtime.client import ResumablePull
from emsfl.runtime.events import EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.tls import TlsFiles
from ground_node.federation import handover
from ground_node.federation.outbox import Outbox
from ground_node.federation.uplink import Uplink, UplinkHooks
from ground_node.records import Affinity, Assignment
from ground_node.usage import peak_rss_mb
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import parse_expert_name, sha256_hex

log = logging.getLogger(__name__)

STATE = "gateway.json"  # version and assignment, so that a restarted gateway goes on where it stopped
AVERAGE = "average.safetensors"  # the cluster average of that version


@dataclass
class DeviceState:
    device_id: str
    num_examples: int = 0
    affinity: Affinity | None = None
    capabilities: dict[str, str] = field(default_factory=dict)
    last_step: int = 0
    uploads: int = 0
    bytes_received: int = 0
    rounds: int = 0  # rounds this device's update went into


@dataclass
class _Incoming:
    device: str
    offer: Any
    chunks: dict[int, bytes] = field(default_factory=dict)


def average(updates: list[tuple[dict[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Weighted mean of tensors with the same names (weights need not sum to 1)."""
    total = sum(w for _, w in updates)
    if not updates or total <= 0:
        raise ValueError("nothing to average")
    names = set(updates[0][0])
    for tensors, _ in updates[1:]:
        if set(tensors) != names:
            raise ValueError("updates of one round name different tensors")
    out: dict[str, np.ndarray] = {}
    for name in sorted(names):
        acc = np.zeros_like(updates[0][0][name], dtype=np.float64)
        for tensors, w in updates:
            acc += tensors[name].astype(np.float64) * (w / total)
        out[name] = acc.astype(np.float32)
    return out


def aggregate_affinity(reports: list[Affinity]) -> Affinity:
    """Token-weighted mean of the devices' gate and freq matrices."""
    tokens = sum(a.num_tokens for a in reports)
    weights = [a.num_tokens / tokens if tokens else 1.0 / len(reports) for a in reports]
    gate = sum(w * a.gate.astype(np.float64) for w, a in zip(weights, reports, strict=True))
    freq = sum(w * a.freq.astype(np.float64) for w, a in zip(weights, reports, strict=True))
    return Affinity(np.asarray(gate, np.float32), np.asarray(freq, np.float32), int(tokens))


class Gateway:
    """Intra-cluster state (devices, rounds, the average) and the uplink to the satellite."""

    def __init__(
        self,
        cluster: str,
        expected_devices: int,
        capacity: int,
        satellite: str,
        link: LinkState,
        workdir: Path,
        base_dir: Path,
        strategy: str = "emsfl",
        round_timeout_s: float = 30.0,
        now: Any = None,
        send_window_chunks: int = 1,
        uploads_per_contact: int = 1,
        tls: TlsFiles | None = None,
    ) -> None:
        self.cluster = cluster
        self.tls = tls  # its certificate (a gateway's: `emsfl pki issue --role gateway`) to the satellite too
        self.send_window_chunks = send_window_chunks
        self.uploads_per_contact = uploads_per_contact  # `training.uploads_per_contact`: 0 = no limit
        self.expected = expected_devices
        self.capacity = capacity
        self.satellite = satellite
        self.link = link
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.manifest: dict[str, Any] = json.loads((Path(base_dir) / "manifest.json").read_text(encoding="utf-8"))
        self.strategy = strategy
        self.round_timeout_s = round_timeout_s
        self.events = EventLog(self.workdir / "events.jsonl", "ground", cluster, now)
        self.outbox = Outbox(self.workdir / "outbox")
        self.devices: dict[str, DeviceState] = {}
        self.version = 0  # gateway rounds closed so far = version of the cluster average
        self.average: dict[str, np.ndarray] | None = None
        self.average_blob: bytes = b""
        self.submissions: dict[str, tuple[int, dict[str, np.ndarray], int, int]] = {}  # device -> (base, t, step, av)
        self.round_started: float | None = None
        self.uplink: Uplink | None = None
        self.current: Assignment | None = None  # what the devices train under: adopted once its hand-over is ready
        self._handover_pull = ResumablePull()
        self._incoming: dict[tuple[str, str], _Incoming] = {}
        self._committed: dict[str, set[str]] = {}
        self._lock = threading.RLock()
        self._halt = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name=f"gateway-{cluster}", daemon=True)
        self._restore()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker.start()

    def stop(self) -> None:
        self._halt.set()
        if self._ticker.is_alive():
            self._ticker.join(5)
        if self.uplink is not None:
            self.uplink.stop()
        self.report()

    def close(self) -> None:
        self.events.close()

    def _tick_loop(self) -> None:
        while not self._halt.wait(0.5):
            try:
                self._maybe_close_round(timed=True)
                self._maybe_start_uplink()
            except Exception:  # never let the ticker die
                log.exception("gateway tick failed")

    # ---- devices --------------------------------------------------------------------------------

    def join(self, device: str, num_examples: int, capabilities: dict[str, str]) -> None:
        with self._lock:
            state = self.devices.setdefault(device, DeviceState(device))
            state.num_examples = int(num_examples)
            state.capabilities.update(capabilities)
            self._persist()
        self.events.emit("device_joined", device=device, num_examples=int(num_examples))

    def report_affinity(self, device: str, affinity: Affinity) -> tuple[int, int]:
        with self._lock:
            self.devices.setdefault(device, DeviceState(device)).affinity = affinity
            reported = sum(1 for d in self.devices.values() if d.affinity is not None)
            self._persist()
        self._maybe_start_uplink()
        return reported, self.expected

    def _maybe_start_uplink(self) -> None:
        with self._lock:
            if self.uplink is not None:
                return
            reports = [d.affinity for d in self.devices.values() if d.affinity is not None]
            if len(reports) < self.expected:
                return
            affinity = aggregate_affinity(reports)
            num_examples = sum(d.num_examples for d in self.devices.values())
            self.uplink = Uplink(
                self.satellite,
                self.cluster,
                self.link,
                self.outbox,
                self.capacity,
                num_examples,
                affinity,
                UplinkHooks(
                    before_assignment=self._prepare_assignment,
                    on_assignment=lambda a: self.events.emit("assigned", version=a.version),
                ),
                send_window_chunks=self.send_window_chunks,
                max_uploads_per_contact=self.uploads_per_contact or None,
                tls=self.tls,
                events=self.events,
            )
        self.events.emit("profiled", num_tokens=affinity.num_tokens, devices=len(reports))
        self.uplink.start()

    def _prepare_assignment(self, new: Assignment) -> None:
        """Uplink thread, link up: pull the newest parts of the experts `new` gains; with the kept experts'
        average they become the next cluster version, which the devices pull when they switch.

        Raises (so the uplink does not adopt `new` yet; the next pass tries again) when the pull fails."""
        with self._lock:
            old = self.current
        if new == old:
            return
        assert self.uplink is not None
        gained, _ = handover.diff(old, new)
        parts = [str(p["name"]) for p in self.manifest.get("expert_parts", [])]
        timeout = max(60.0, self.uplink.call_timeout_s)  # a paced pull of full expert weights takes a while
        pulled: list[int] = []
        up, puller = self.uplink, self._handover_pull
        tensors = handover.fetch_gained(up.stub, up.metadata, gained, parts, timeout, puller, pulled.append)
        if old is not None:  # upload priorities are measured against what the satellite holds now
            self.outbox.rebase_acked(set(new.pairs()), tensors)
        with self._lock:
            version = {**handover.only_experts(self.average or {}, set(new.pairs())), **tensors}
            self.current = new
            self.submissions.clear()  # trained under the old assignment: no round of the new one takes them
            self.round_started = None
            if version:
                self._set_average(version)
            else:
                self._persist()
        if old is not None:
            self.events.emit(
                "reassigned",
                bytes_pulled=sum(pulled),  # in this pass (a resumed pull got the rest of it earlier)
                cluster_version=self.version,
                **handover.reassigned_event(old, new, tensors),
            )

    def _set_average(self, tensors: dict[str, np.ndarray]) -> None:
        """The next cluster version (lock held), on disk before any device can pull it."""
        self.version += 1
        self.average = tensors
        self.average_blob = st_save({n: np.ascontiguousarray(tensors[n]) for n in sorted(tensors)})
        atomic_write_bytes(self.workdir / AVERAGE, self.average_blob)
        self._persist()

    def _persist(self) -> None:
        """Devices, assignment and version (lock held). A restarted gateway goes on from them: it starts its uplink
        without waiting for devices that joined long ago, its devices' rounds still match its version, and it does
        not hand over again what it already holds."""
        devices = {
            d: {"num_examples": s.num_examples, "affinity": _affinity_json(s.affinity)} for d, s in self.devices.items()
        }
        state = {
            "version": self.version,
            "assignment": self.current.to_json() if self.current else None,
            "devices": devices,
        }
        atomic_write_json(self.workdir / STATE, state)

    def _restore(self) -> None:
        state_path, average_path = self.workdir / STATE, self.workdir / AVERAGE
        if not state_path.exists():
            return
        state = json.loads(state_path.read_text(encoding="utf-8"))
        self.version = int(state["version"])
        if state.get("assignment"):
            self.current = Assignment.from_json(state["assignment"])
        for d, saved in state.get("devices", {}).items():
            device = self.devices.setdefault(d, DeviceState(d))
            device.num_examples = int(saved["num_examples"])
            device.affinity = _affinity_from_json(saved.get("affinity"))
        if average_path.exists():
            self.average_blob = average_path.read_bytes()
            self.average = dict(st_load(self.average_blob))
        log.info("gateway of %s resumes at version %d", self.cluster, self.version)

    def assignment(self) -> pb.Assignment:
        a = self.current
        if a is None:
            return pb.Assignment(ready=False)
        return pb.Assignment(
            ready=True,
            version=a.version,
            layers=[pb.LayerExperts(layer=la, experts=list(a.held(la))) for la in sorted(a.layers)],
        )

    # ---- uploads from devices -------------------------------------------------------------------

    def status(self) -> pb.StatusReply:
        """`GetStatus` for a device: the assignment and the version it goes with, read together."""
        with self._lock:
            a = self.current
            version = self.version
            clusters = [
                pb.ClusterStatus(cluster_id=d, joined=True, affinity_reported=s.affinity is not None)
                for d, s in sorted(self.devices.items())
            ]
        return pb.StatusReply(
            strategy=self.strategy,
            assignment_version=a.version if a is not None else 0,
            clusters=clusters,
            global_version=version,
        )

    def check_offer(self, device: str, offer: Any) -> str | None:
        """A refusal message, or None when the offer may go on."""
        a = self.current
        if a is None:
            return "no assignment yet"
        if offer.assignment_version != a.version:
            return f"assignment version {offer.assignment_version} is not the current {a.version}"
        held = set(a.pairs())
        for spec in offer.tensors:
            parsed = parse_expert_name(spec.name)
            if parsed is None or (parsed[0].layer, parsed[0].expert) not in held:
                return f"{spec.name} is not an expert of cluster {self.cluster}"
        return None

    def offer(self, device: str, offer: Any) -> tuple[bool, list[int]]:
        with self._lock:
            if offer.content_hash in self._committed.get(device, set()):
                return True, []
            key = (device, offer.content_hash)
            incoming = self._incoming.setdefault(key, _Incoming(device, offer))
            incoming.offer = offer
            return False, [i for i in range(len(offer.chunk_hashes)) if i not in incoming.chunks]

    def push(self, device: str, chunks: Iterator[Any]) -> tuple[bool, list[int], str | None]:
        incoming: _Incoming | None = None
        for chunk in chunks:
            with self._lock:
                incoming = self._incoming.get((device, chunk.content_hash))
                if incoming is None:
                    return False, [], "chunk of an update never offered"
                if sha256_hex(chunk.data) != chunk.sha256 or chunk.index >= len(incoming.offer.chunk_hashes):
                    return False, [], f"chunk {chunk.index}: bad index or hash"
                if incoming.offer.chunk_hashes[chunk.index] != chunk.sha256:
                    return False, [], f"chunk {chunk.index} does not match the offer"
                incoming.chunks[chunk.index] = bytes(chunk.data)
                self.devices.setdefault(device, DeviceState(device)).bytes_received += len(chunk.data)
        if incoming is None:
            return False, [], "empty push"
        with self._lock:
            offer = incoming.offer
            missing = [i for i in range(len(offer.chunk_hashes)) if i not in incoming.chunks]
            if missing:
                return False, missing, None
            blob = b"".join(incoming.chunks[i] for i in range(len(offer.chunk_hashes)))
            del self._incoming[(device, offer.content_hash)]
            if sha256_hex(blob) != offer.content_hash:
                return False, [], "content hash mismatch"
            try:
                tensors = st_load(blob)
            except Exception as exc:
                return False, [], f"not a safetensors blob: {exc}"
            if not all(np.isfinite(t).all() for t in tensors.values()):
                return False, [], "non-finite values"
            self._committed.setdefault(device, set()).add(offer.content_hash)
            state = self.devices.setdefault(device, DeviceState(device))
            state.uploads += 1
            state.last_step = int(offer.local_step)
            self.submissions[device] = (
                int(offer.base_version),
                tensors,
                int(offer.local_step),
                offer.assignment_version,
            )
            if self.round_started is None:
                self.round_started = time.monotonic()
        self.events.emit("device_update", device=device, step=int(offer.local_step), base_version=offer.base_version)
        self._maybe_close_round(timed=False)
        return True, [], None

    def _maybe_close_round(self, timed: bool) -> None:
        with self._lock:
            current = {d: s for d, s in self.submissions.items() if s[0] == self.version}
            a = self.current
            if not current or a is None:
                return
            current = {d: s for d, s in current.items() if s[3] == a.version}
            if not current:
                return
            everyone = len(current) >= self.expected
            late = self.round_started is not None and time.monotonic() - self.round_started >= self.round_timeout_s
            if not everyone and not (timed and late):
                return
            weights = [(s[1], float(max(self.devices[d].num_examples, 1))) for d, s in current.items()]
            try:
                avg = average(weights)
            except ValueError as exc:
                log.warning("round %d: cannot average: %s", self.version, exc)
                return
            self._set_average(avg)
            for d in current:
                self.devices[d].rounds += 1
                del self.submissions[d]
            self.round_started = time.monotonic() if self.submissions else None
            step = max(s[2] for s in current.values())
        update = self.outbox.stage(avg, a.version, step)
        self.events.emit(
            "round_closed",
            version=self.version,
            devices=sorted(current),
            cause="all" if everyone else "timeout",
            content_hash=update.content_hash,
        )
        self.events.emit("staged", step=step, content_hash=update.content_hash)

    def pull_blob(self, names: list[str]) -> bytes:
        with self._lock:
            if self.average is None:
                return b""
            if not names:
                return self.average_blob
            chosen = {
                n: v
                for n, v in self.average.items()
                if any(n == p or (p.endswith("/") and n.startswith(p)) for p in names)
            }
            return st_save({n: np.ascontiguousarray(chosen[n]) for n in sorted(chosen)})

    def report(self) -> dict[str, Any]:
        with self._lock:
            devices: dict[str, dict[str, Any]] = {
                d: {
                    "num_examples": s.num_examples,
                    "steps": s.last_step,
                    "uploads_to_gateway": s.uploads,
                    "bytes_to_gateway": s.bytes_received,
                    "rounds": s.rounds,
                }
                for d, s in sorted(self.devices.items())
            }
        coverage: float | None = None
        dev_reports = _device_reports(self.workdir)
        weighted: list[tuple[float, int]] = []
        for d, r in dev_reports.items():
            n = int(devices.get(d, {}).get("num_examples") or r.get("num_examples") or 0)
            if r.get("coverage") is not None and n:
                weighted.append((float(r["coverage"]), n))
            entry: dict[str, Any] = devices.setdefault(d, {})
            entry["steps"] = r.get("steps", entry.get("steps"))
            entry["coverage"] = r.get("coverage")
            entry["peak_rss_mb"] = r.get("peak_rss_mb")
            entry["peak_gpu_memory_mb"] = r.get("peak_gpu_memory_mb")
            entry["final_loss"] = r.get("final_loss")
        if weighted:
            coverage = sum(c * n for c, n in weighted) / sum(n for _, n in weighted)
        gpu = [v for v in devices.values() if v.get("peak_gpu_memory_mb") is not None]
        report = {
            "cluster": self.cluster,
            "role": "gateway",
            "steps": sum(int(v.get("steps") or 0) for v in devices.values()),
            "rounds": self.version,
            "uploads_acked": len(self.outbox.acked()),
            "bytes_uplinked": self.outbox.bytes_uplinked,
            "coverage": coverage,
            "num_examples": sum(int(v.get("num_examples") or 0) for v in devices.values()),
            "peak_rss_mb": peak_rss_mb(),
            # the gateway does not train: the cluster's GPU peak is its busiest device's (None: no CUDA device)
            "peak_gpu_memory_mb": max((v["peak_gpu_memory_mb"] for v in gpu), default=None),
            "devices": devices,
        }
        atomic_write_json(self.workdir / "report.json", report)
        return report


def _affinity_json(affinity: Affinity | None) -> dict[str, Any] | None:
    if affinity is None:
        return None
    return {"gate": affinity.gate.tolist(), "freq": affinity.freq.tolist(), "num_tokens": affinity.num_tokens}


def _affinity_from_json(saved: dict[str, Any] | None) -> Affinity | None:
    if saved is None:
        return None
    return Affinity(
        np.asarray(saved["gate"], np.float32), np.asarray(saved["freq"], np.float32), int(saved["num_tokens"])
    )


def _device_reports(workdir: Path) -> dict[str, dict[str, Any]]:
    """`<workdir>/devices/<id>/report.json` of devices that run beside the gateway (the lab's layout)."""
    out: dict[str, dict[str, Any]] = {}
    root = Path(workdir) / "devices"
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*/report.json")):
        try:
            out[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return out


def device_reports(workdir: Path) -> dict[str, dict[str, Any]]:
    return _device_reports(workdir)
