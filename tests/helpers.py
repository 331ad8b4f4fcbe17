"""Helpers shared by tests of several roles: the tiny model every fast test trains, and process clean-up."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from emsfl.runtime.linkstate import LinkState

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from testbed.lab import LabOptions

REPO = Path(__file__).resolve().parents[1]

# The tiny OLMoE that trains in seconds on a CPU; a test that needs another size overrides keys of a copy.
TINY_MODEL: dict[str, Any] = {
    "family": "olmoe",
    "checkpoint": None,
    "num_layers": 2,
    "num_experts": 4,
    "top_k": 2,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_attention_heads": 2,
}


def tiny_model(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of `TINY_MODEL` with `overrides` applied (a topology's `model` section)."""
    return {**TINY_MODEL, **overrides}


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process still running, then wait for each; one that outlives `timeout_s` is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ground_agent(
    tmp_path: Path, topo_text: str, broker: str, satellite: str, base: Path, cluster: str = "c0"
) -> tuple[Callable[[], subprocess.Popen[bytes]], IO[bytes]]:
    """A starter of a real `emsfl ground run` process for `cluster` (topology written to tmp_path/topology.yaml,
    workdir tmp_path/ground), each start appending its output to tmp_path/ground.log; and that log, which the
    caller closes."""
    topo_path = tmp_path / "topology.yaml"
    topo_path.write_text(topo_text, encoding="utf-8")
    argv = [sys.executable, "-m", "emsfl", "ground", "run", "--topology", str(topo_path)]
    argv += ["--broker", broker, "--satellite", satellite, "--cluster", cluster]
    argv += ["--workdir", str(tmp_path / "ground"), "--base", str(base)]
    log = open(tmp_path / "ground.log", "ab")  # noqa: SIM115 - the caller closes it

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    return start, log


# A two-by-two lab small enough to finish in about a minute on a loaded 2-core machine.
QUICK_TWO_BY_TWO: dict[str, dict[str, Any]] = {
    "data": {"train_per_cluster": 600, "test_per_domain": 20},
    "warmup": {"steps": 60},
    "training": {"batch_size": 16, "stage_every_steps": 10, "profile_examples": 64},
    "lab": {"eval_points": 2},
}


def topology_with(source: Path, sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The topology file `source` with the given keys of its sections replaced."""
    topology: dict[str, Any] = yaml.safe_load(source.read_text(encoding="utf-8"))
    for name, values in sections.items():
        topology[name].update(values)
    return topology


def write_topology(directory: Path, topology: dict[str, Any]) -> Path:
    """`topology` written as directory/topology.yaml; its path."""
    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(topology), encoding="utf-8")
    return path


# A valid `emsfl.v1.link` payload (protos/payloads.py): cluster c0's link up for 7.5 minutes.
LINK_UP: dict[str, Any] = {
    "schema": "emsfl.v1.link",
    "version": 1,
    "cluster": "c0",
    "state": "up",
    "seq": 3,
    "since": "2026-03-20T06:00:00.000Z",
    "until": "2026-03-20T06:07:30.000Z",
    "satellite": "S1",
    "rate_bps": 1e7,
}


def wait_for(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll `check()` until it is true or `timeout_s` has passed; its last value (the caller asserts what it needs)."""
    deadline = time.monotonic() + timeout_s
    while not (done := check()) and time.monotonic() < deadline:
        time.sleep(poll_s)
    return done


# The emulated clock of the process tests: real time from the vernal equinox 2026, 06:00 UTC.
CLOCK: dict[str, Any] = {"start_utc": "2026-03-20T06:00:00Z", "scale": 1}


def agent_topology(
    name: str, pace: bool, clusters: list[dict[str, Any]], model: dict[str, Any], training: dict[str, Any]
) -> dict[str, Any]:
    """A topology for tests that run real ground agent processes against a real satellite: strategy emsfl on
    `CLOCK`, 200 synthetic examples a cluster and a five-step warm-up; `pace`: the satellite paces uploads."""
    return {
        "name": name,
        "seed": 5,
        "strategy": "emsfl",
        "clock": dict(CLOCK),
        "satellite": {"pace": pace},
        "clusters": clusters,
        "model": model,
        "data": {"task": "synthetic", "train_per_cluster": 200, "test_per_domain": 5, "dominant_share": 0.7},
        "warmup": {"steps": 5, "lr": 0.003, "batch_size": 8},
        "training": training,
    }


def satellite_topology(name: str, capacities: dict[str, int]) -> str:
    """YAML of a topology for satellite tests: strategy emsfl, the emulated clock at scale 1 from 2026-03-20 06:00 UTC,
    the satellite on loopback (its port given on the command line), a cluster per capacity in experts."""
    clusters = [{"id": cluster, "capacity_experts": n} for cluster, n in capacities.items()]
    return yaml.safe_dump(
        {
            "name": name,
            "strategy": "emsfl",
            "clock": CLOCK,
            "satellite": {"host": "127.0.0.1", "port": 0},
            "clusters": clusters,
        },
        sort_keys=False,
    )


def serve_fake_satellite(servicer: Any, max_workers: int = 4) -> tuple[Any, str]:
    """A real gRPC server on a loopback port (plaintext: tests only) that answers with `servicer`, a stand-in for
    the satellite's Federation service; (the started server, its target HOST:PORT)."""
    import grpc

    from emsfl.runtime.channel import SERVER_KEEPALIVE_OPTIONS
    from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=SERVER_KEEPALIVE_OPTIONS)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def lab_options(tmp: Path, topology: Path, run_id: str, duration_wall_s: float, **extra: Any) -> LabOptions:
    """The options of a lab run kept under `tmp`: its run directory in tmp/runs, base models cached in tmp/cache."""
    from testbed.lab import LabOptions

    return LabOptions(
        topology_path=topology,
        duration_wall_s=duration_wall_s,
        runs_dir=tmp / "runs",
        run_id=run_id,
        cache_dir=tmp / "cache",
        **extra,
    )


def mqtt_connect(
    client: mqtt.Client,
    port: int,
    ctx: ssl.SSLContext | None = None,
    user: str | None = None,
    password: str | None = None,
    on_message: Callable[[str, bytes], None] | None = None,
) -> Any:
    """Connect `client` to the broker on loopback `port` (TLS with `ctx`, an MQTT login with `user`) and start its
    loop; what the broker answered: the CONNACK reason code, or the exception (a refused handshake, a socket error,
    TimeoutError when no CONNACK came in 10 s)."""
    if ctx is not None:
        client.tls_set_context(ctx)
    if user is not None:
        client.username_pw_set(user, password)
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        connected.set()

    def deliver(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if on_message is not None:
            on_message(msg.topic, bytes(msg.payload))

    client.on_connect = on_connect
    client.on_message = deliver
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (ssl.SSLError, OSError) as exc:
        return exc
    client.loop_start()
    if not connected.wait(10):
        client.loop_stop()
        return TimeoutError("no CONNACK")
    return result["reason"]


class FixedLink(LinkState):
    """Up or down as the test says; no link payload and no clock, so no contact budget or per-contact quota."""

    def __init__(self, up: bool = True) -> None:
        self.up = up

    def is_up(self, cluster: str) -> bool:
        return self.up

    def up_now(self, cluster: str) -> tuple[bool, None]:
        return self.up, None

    def wait_up(self, cluster: str, timeout_s: float) -> bool:
        time.sleep(min(timeout_s, 0.05))  # a poll's pause, up or not, as a real wait would take
        return self.up

    def down_reason(self, cluster: str) -> str:
        return f"link of cluster {cluster!r} is down (test)"

    def emulated_now(self) -> None:
        return None

    def link(self, cluster: str) -> None:
        return None

    def wall_rate_bytes(self, cluster: str) -> None:
        return None
