"""Helpers for tests and the lab: a tiny base directory, a link publisher standing in for the orbit
service, and the Federation client with test helpers. numpy only; no pytest, no torch.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from safetensors.numpy import save as st_save
from safetensors.numpy import save_file

from emsfl.runtime.bus import Bus
from emsfl.runtime.client import FederationClient
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.linkstate import LinkState, wall_rate_bytes_of
from emsfl.runtime.timefmt import to_iso
from emsfl.runtime.tls import TlsFiles
from protos import topics
from protos.wire import expert_name
from satellite_node.manifest import file_sha256


def wait_until(what: str, check: Any, timeout_s: float = 90.0) -> Any:
    """Poll `check()` every 0.1 s until it returns something truthy (returned); AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


LORA_PARTS = ("gate_up_proj.lora_A", "gate_up_proj.lora_B", "down_proj.lora_A", "down_proj.lora_B")


def write_tiny_base(
    out: str | Path, num_layers: int = 2, num_experts: int = 4, hidden: int = 8, inter: int = 6, rank: int = 2
) -> Path:
    """A base directory with `manifest.json` and `base.safetensors` (tune=lora), no model files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {
        "shared/embed_tokens.weight": rng.standard_normal((16, hidden)).astype(np.float32)
    }
    for layer in range(num_layers):
        tensors[f"shared/layers.{layer}.router.weight"] = rng.standard_normal((num_experts, hidden)).astype(np.float32)
        for e in range(num_experts):
            tensors[expert_name(layer, e, "gate_up_proj")] = rng.standard_normal((2 * inter, hidden)).astype(np.float32)
            tensors[expert_name(layer, e, "down_proj")] = rng.standard_normal((hidden, inter)).astype(np.float32)
    save_file(tensors, str(out / "base.safetensors"))
    parts = [
        {"name": "gate_up_proj.lora_A", "dtype": "F32", "shape": [rank, hidden]},
        {"name": "gate_up_proj.lora_B", "dtype": "F32", "shape": [2 * inter, rank]},
        {"name": "down_proj.lora_A", "dtype": "F32", "shape": [rank, inter]},
        {"name": "down_proj.lora_B", "dtype": "F32", "shape": [hidden, rank]},
    ]
    manifest = {
        "family": "olmoe",
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": 2,
        "tune": "lora",
        "lora_rank": rank,
        "lora_alpha": 2 * rank,
        "base_hash": file_sha256(out / "base.safetensors"),
        "expert_parts": parts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out


def expert_update(base_dir: str | Path, experts: list[tuple[int, int]], seed: int = 1) -> dict[str, np.ndarray]:
    """Random, valid update tensors for the given (layer, expert) pairs, shaped after the manifest."""
    manifest = json.loads((Path(base_dir) / "manifest.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer, e in experts:
        for part in manifest["expert_parts"]:
            out[expert_name(layer, e, part["name"])] = rng.standard_normal(part["shape"]).astype(np.float32)
    return out


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    return st_save({n: np.ascontiguousarray(tensors[n]) for n in sorted(tensors)})


class OrbitStub:
    """Publishes what the orbit service would (retained): its presence, the clock, link states."""

    def __init__(
        self, host: str, port: int, scale: float = 1.0, epoch: datetime | None = None, tls: TlsFiles | None = None
    ) -> None:
        self.bus = Bus(host, port, role="orbit", node_id="orbit", status_topic=topics.ORBIT_STATUS, tls=tls)
        self.clock = EmulatedClock(epoch or datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc), time.time(), scale)
        self._seq: dict[str, int] = {}

    def start(self) -> OrbitStub:
        self.bus.start()
        self.bus.publish(topics.CLOCK, "clock", self.clock.to_payload(), retain=True)
        return self

    def set_link(self, cluster: str, up: bool, rate_bps: float | None = None) -> None:
        """Publish a link state; `rate_bps` makes the satellite pace the cluster's transfers to that rate."""
        seq = self._seq.get(cluster, 0) + 1
        self._seq[cluster] = seq
        payload: dict[str, Any] = {
            "schema": "emsfl.v1.link",
            "version": 1,
            "cluster": cluster,
            "state": "up" if up else "down",
            "seq": seq,
            "since": to_iso(self.clock.now()),
            "until": None,
        }
        if rate_bps is not None:
            payload["rate_bps"] = rate_bps
        self.bus.publish(topics.link(cluster), "link", payload, retain=True)

    def stop(self) -> None:
        self.bus.stop()


class FakeLinks(LinkState):
    """Link state without MQTT: every cluster's link is up unless listed in `down`; a fixed emulated time;
    `rate_bps` and `scale` give the link budget (None: unpaced)."""

    def __init__(self, rate_bps: float | None = None, scale: float = 1.0) -> None:
        self.down: set[str] = set()
        self.now = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)
        self.rate_bps = rate_bps
        self.scale = scale

    def is_up(self, cluster: str) -> bool:
        return cluster not in self.down

    def up_now(self, cluster: str) -> tuple[bool, datetime | None]:
        return self.is_up(cluster), self.now

    def down_reason(self, cluster: str) -> str:
        return f"link of cluster {cluster!r} is down"

    def emulated_now(self) -> datetime | None:
        return self.now

    def wait_up(self, cluster: str, timeout_s: float) -> bool:
        return self.is_up(cluster)  # nothing changes it but the test itself

    def link(self, cluster: str) -> dict[str, Any] | None:
        state = "down" if cluster in self.down else "up"
        return {"cluster": cluster, "state": state, "until": None, "rate_bps": self.rate_bps}

    def wall_rate_bytes(self, cluster: str) -> float | None:
        return wall_rate_bytes_of(self.link(cluster), self.scale)


def code_of(call: Callable[[], object]) -> grpc.StatusCode | None:
    """The gRPC status code `call` fails with, None when it succeeds."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return None


def _unless_unavailable(call: Callable[[], Any]) -> bool:
    try:
        call()
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
    return True


class Client(FederationClient):
    """The Federation client (emsfl/runtime/client.py) of one cluster, as tests use it: plaintext with identity in
    metadata, or mutual TLS with `tls` (identity from the certificate; `cluster` then only goes into metadata,
    which a TLS server must ignore)."""

    def __init__(self, target: str, cluster: str, tls: TlsFiles | None = None, server_name: str | None = None) -> None:
        super().__init__(target, cluster, tls=tls, server_name=server_name)

    def try_join(self, capacity: int, num_examples: int) -> bool:
        """`join`, False while the satellite refuses with UNAVAILABLE (not up yet, or the link is down)."""
        return _unless_unavailable(lambda: self.join(capacity, num_examples))

    def link_up(self) -> bool:
        """Whether a link-gated call goes through: the satellite is up and sees this cluster's link up."""
        return _unless_unavailable(self.status)


class CutProxy:
    """A loopback TCP proxy to `upstream` for fault tests. `cut()` turns every connection open at that moment into a
    black hole, as when a link drops: bytes stay unread and nothing is closed (no FIN, no RST), while connections
    made later pass. `rate_Bps` throttles the client-to-upstream direction; `upstream_bytes` counts what it passed."""

    def __init__(self, upstream: tuple[str, int], rate_Bps: float | None = None) -> None:
        self.upstream = upstream
        self.rate_Bps = rate_Bps
        self.upstream_bytes = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._open: list[tuple[threading.Event, socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            cut = threading.Event()
            self._open.append((cut, client, server))
            threading.Thread(target=self._pump, args=(client, server, cut, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, cut, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: threading.Event, upstream: bool) -> None:
        src.settimeout(0.1)
        size = 16384 if upstream and self.rate_Bps else 65536
        while not self._stop.is_set():
            if cut.is_set():
                self._stop.wait(0.1)
                continue
            try:
                data = src.recv(size)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if upstream and self.rate_Bps:
                time.sleep(len(data) / self.rate_Bps)
            try:
                dst.sendall(data)
            except OSError:
                return
            if upstream:
                self.upstream_bytes += len(data)

    def cut(self) -> None:
        for cut, _, _ in self._open:
            cut.set()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for _, client, server in self._open:
            client.close()
            server.close()


class SatelliteProcess:
    """`emsfl satellite run` as a real OS process (tests, benchmarks): start, kill, restart on the same state."""

    def __init__(
        self,
        workdir: str | Path,
        broker: tuple[str, int],
        topology: str,
        port: int,
        extra_args: list[str] | None = None,
        base: Path | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.target = f"127.0.0.1:{port}"  # where a client on this machine connects
        self.listen = f"{listen_host}:{port}"  # e.g. 0.0.0.0 to serve another network namespace as well
        self.state = workdir / "state"
        self.base = base or write_tiny_base(workdir / "base")
        self.topology = workdir / "topology.yaml"
        self.topology.write_text(topology, encoding="utf-8")
        self.log = workdir / "satellite.log"
        self.broker = broker
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "emsfl", "satellite", "run", "--topology", str(self.topology)]
        argv += ["--broker", f"{self.broker[0]}:{self.broker[1]}", "--listen", self.listen]
        # plaintext on loopback unless the caller gives TLS files: said out loud, as the node requires
        tls = any(a.startswith("--tls-") for a in self.extra_args) or "--insecure" in self.extra_args
        return [
            *argv,
            "--state",
            str(self.state),
            "--base",
            str(self.base),
            *self.extra_args,
            *([] if tls else ["--insecure"]),
        ]

    def start(self, timeout_s: float = 30.0) -> None:
        repo = Path(__file__).resolve().parents[1]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=repo, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"satellite exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"satellite did not listen on {self.target}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
