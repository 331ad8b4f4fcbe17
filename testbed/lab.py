"""`emsfl lab up`: the whole testbed on one machine, every role as its own OS process.

The lab starts exactly the commands a deployment runs (`emsfl orbit|satellite|ground run`), waits for
them to come up, lets the emulated clock run for a bounded wall time, stops everything in order, and
writes `runs/<run-id>/` (ARCHITECTURE §8). Loopback only; plaintext (said out loud: the satellite runs
`--insecure`) unless `tls` (`emsfl lab up --tls`): then a throwaway CA in the run directory, Mosquitto with TLS and
the deployed ACL, and mutual TLS on every gRPC hop (testbed/labtls.py).
"""

from __future__ import annotations

import copy
import logging
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from emsfl.config import ConfigError, cluster_ids, field, load_topology, parse_host_port, positive, section
from emsfl.runtime.bus import Bus
from emsfl.runtime.linkview import LinkView
from protos import topics
from testbed.broker import BrokerProcess, free_port
from testbed.procs import RoleProcess

log = logging.getLogger("emsfl.lab")

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent / "topologies" / "local.yaml"
READY_TIMEOUT_S = 180.0


@dataclass
class LabOptions:
    topology_path: Path = DEFAULT_TOPOLOGY
    broker: str | None = None  # HOST:PORT of an existing broker; None starts the embedded one
    duration_wall_s: float | None = None
    runs_dir: Path = Path("runs")
    run_id: str | None = None
    cache_dir: Path = Path(".cache/emsfl")
    satellite_port: int | None = None  # loopback port of the satellite node; None picks a free one
    replay_plan: Path | None = None  # drive the links from this recorded plan (`emsfl orbit run --replay`)
    tls: bool = False  # every hop over (mutual) TLS with a throwaway CA in the run directory
    dashboard_port: int | None = None  # serve `emsfl dashboard` on this loopback port; None: no dashboard


@dataclass
class LabRun:
    run_dir: Path
    topology: dict[str, Any]
    base_dir: Path
    state_dir: Path
    plan_path: Path
    orbit_events_path: Path
    ground_dirs: dict[str, Path]
    started_wall: float = 0.0
    stopped_wall: float = 0.0
    interrupted: bool = False
    tls: bool = False
    dashboard: RoleProcess | None = None  # left running for the outputs (accuracy); `stop_dashboard` ends it


def resolve_topology(opts: LabOptions) -> dict[str, Any]:
    """The topology with the command-line overrides applied, validated enough to start."""
    topology = copy.deepcopy(load_topology(opts.topology_path))
    cluster_ids(topology)
    lab = topology.setdefault("lab", {})
    if opts.duration_wall_s is not None:
        lab["duration_wall_s"] = opts.duration_wall_s
    positive(field(lab, "duration_wall_s", float, "lab", 150.0), "lab.duration_wall_s")
    clock = section(topology, "clock")
    positive(field(clock, "scale", float, "clock"), "clock.scale")
    broker = topology.setdefault("broker", {})
    if opts.broker is not None:
        host, port = parse_host_port(opts.broker, "--broker")
        broker.update(host=host, port=port)
    if opts.tls:
        if opts.broker is not None:
            raise ConfigError("--broker: --tls starts its own Mosquitto with TLS; the two go without each other")
        broker.update(host=None, tls=True)  # every MQTT session over TLS ...
        topology.setdefault("satellite", {})["tls"] = True  # ... and every gRPC hop: no role falls back to plaintext
    return topology


def _progress(line: str, final: bool = False) -> None:
    if sys.stdout.isatty():
        sys.stdout.write("\r\033[K" + line + ("\n" if final else ""))
    else:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Presence:
    """Which roles have said they are online (their retained status topics)."""

    def __init__(self, bus: Bus) -> None:
        self.online: set[str] = set()
        self._lock = threading.Lock()
        bus.subscribe(f"{topics.ROOT}/node/+/+/status", "status", self._on_status)

    def _on_status(self, topic: str, payload: dict[str, Any]) -> None:
        name = f"{payload['role']}/{payload['id']}"
        with self._lock:
            if payload["state"] == "online":
                self.online.add(name)
            else:
                self.online.discard(name)

    def has(self, names: set[str]) -> bool:
        with self._lock:
            return names <= self.online


def _wait_ready(presence: _Presence, names: set[str], procs: list[RoleProcess]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not presence.has(names):
        for proc in procs:
            if not proc.running:
                raise RuntimeError(f"{proc.name} {proc.exit_description} while starting:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            missing = sorted(names - presence.online)
            raise RuntimeError(f"not online after {READY_TIMEOUT_S:.0f} s: {', '.join(missing)}")
        time.sleep(0.2)


def run_lab(opts: LabOptions) -> LabRun:
    """Run the testbed and write its run directory; returns where everything is."""
    topology = resolve_topology(opts)
    clusters = cluster_ids(topology)
    run_id = opts.run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = opts.runs_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    _progress(f"[lab] run {run_id}: {len(clusters)} clusters, strategy {topology.get('strategy', 'emsfl')}")

    from ground_node.model.base import ensure_base  # torch is only needed here, for the warm-up

    _progress("[lab] preparing the base model (cached after the first run)")
    base_dir = ensure_base(topology, opts.cache_dir)

    lab = LabRun(
        run_dir=run_dir,
        topology=topology,
        base_dir=base_dir,
        state_dir=run_dir / "satellite" / "state",
        plan_path=run_dir / "orbit" / "plan.json",
        orbit_events_path=run_dir / "orbit" / "events.jsonl",
        ground_dirs={c: run_dir / "ground" / c for c in clusters},
        tls=opts.tls,
    )
    from testbed.labtls import LabPki, device_name, gateway_name, issue_lab_pki

    lab_pki: LabPki | None = None
    if opts.tls:
        lab_pki = issue_lab_pki(run_dir / "pki", {c: _devices(topology, c) for c in clusters})
        _progress(f"[lab] TLS on every hop: throwaway CA and certificates in {lab_pki.directory}")

    def tls_args(name: str) -> list[str]:
        return lab_pki.args(name) if lab_pki is not None else []

    topology_path = run_dir / "topology.yaml"
    import yaml

    topology_path.write_text(yaml.safe_dump(topology, sort_keys=False), encoding="utf-8")

    broker_cfg = topology["broker"]
    embedded: BrokerProcess | None = None
    if broker_cfg.get("host"):
        broker_addr = f"{broker_cfg['host']}:{broker_cfg['port']}"
    elif lab_pki is not None:
        embedded = BrokerProcess("mosquitto", log_path=run_dir / "logs" / "broker.log", tls=lab_pki.broker())
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        embedded.start()
        broker_addr = embedded.address
        _progress(f"[lab] Mosquitto on {broker_addr}: TLS, client certificates, the deployed ACL", final=True)
    else:
        embedded = BrokerProcess("amqtt", log_path=run_dir / "logs" / "broker.log")
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        embedded.start()
        broker_addr = embedded.address
        _progress(f"[lab] embedded amqtt broker on {broker_addr} (loopback, no TLS)", final=True)
    watch_host, watch_port = parse_host_port(broker_addr, "broker")
    # kept on screen (final): the port is free-picked per run, so this is the command that works for this run
    watch_tls = ""
    if lab_pki is not None:  # the read-only `monitor` certificate of this run
        m = lab_pki.files("monitor")
        watch_tls = f" --cafile {m.ca} --cert {m.cert} --key {m.key}"
    _progress(
        f"[lab] watch it: mosquitto_sub -h {watch_host} -p {watch_port}{watch_tls} -v -t 'emsfl/v1/#'", final=True
    )
    if opts.dashboard_port is not None:  # read-only: the `monitor` certificate under TLS
        monitor = lab_pki.args("monitor") if lab_pki is not None else []
        lab.dashboard = _start_dashboard(lab, broker_addr, opts.dashboard_port, monitor)
    sat_addr = f"127.0.0.1:{opts.satellite_port or free_port()}"
    logs = run_dir / "logs"
    common = ["--topology", str(topology_path), "--broker", broker_addr]

    def ground_args(c: str) -> list[str]:  # the satellite a cluster's single node or gateway talks to, its dirs
        return ["--satellite", sat_addr, "--cluster", c, "--workdir", str(lab.ground_dirs[c]), "--base", str(base_dir)]

    satellite = RoleProcess(
        "satellite",
        [
            "satellite",
            "run",
            *common,
            "--listen",
            sat_addr,
            "--state",
            str(lab.state_dir),
            "--base",
            str(base_dir),
            # the plaintext loopback profile is said out loud
            *(tls_args("satellite") if lab_pki is not None else ["--insecure"]),
        ],
        logs / "satellite.log",
    )
    grounds = [
        RoleProcess(
            f"ground {c}",
            ["ground", "run", *common, *ground_args(c), *tls_args(c)],
            logs / f"ground-{c}.log",
        )
        for c in clusters
        if _devices(topology, c) == 1
    ]
    device_names: set[str] = set()
    for c in clusters:  # a cluster of several devices: one gateway + one process per device (ARCHITECTURE §3 step 5)
        if (n := _devices(topology, c)) == 1:
            continue
        gw_addr = f"127.0.0.1:{free_port()}"
        grounds.append(
            RoleProcess(
                f"gateway {c}",
                ["ground", "gateway", *common, *ground_args(c), "--listen", gw_addr, *tls_args(gateway_name(c))],
                logs / f"ground-{c}.log",
            )
        )
        for i in range(n):
            dev_dir = lab.ground_dirs[c] / "devices" / f"d{i}"
            dev_args = ["--cluster", c, "--gateway", gw_addr, "--device", f"d{i}", "--workdir", str(dev_dir)]
            dev_args += tls_args(device_name(c, f"d{i}"))
            grounds.append(
                RoleProcess(
                    f"device {c}/d{i}",
                    ["ground", "run", *common, *dev_args, "--base", str(base_dir)],
                    logs / f"ground-{c}-d{i}.log",
                )
            )
            device_names.add(f"ground/{c}.d{i}")
    duration_s = float(topology["lab"]["duration_wall_s"])
    scale = float(topology["clock"]["scale"])
    hours = duration_s * scale / 3600.0 * 1.1 + 0.1
    orbit = RoleProcess(
        "orbit",
        [
            "orbit",
            "run",
            *common,
            "--plan-out",
            str(lab.plan_path),
            "--events",
            str(lab.orbit_events_path),
            "--hours",
            f"{hours:.4f}",
            *(["--replay", str(opts.replay_plan)] if opts.replay_plan is not None else []),
            *tls_args("orbit"),
        ],
        logs / "orbit.log",
    )

    host, port = parse_host_port(broker_addr, "broker")
    watcher = Bus(host, port, "lab", run_id.replace(":", "-"), tls=lab_pki.files("monitor") if lab_pki else None)
    presence = _Presence(watcher)
    links = LinkView(watcher, clusters)
    started: list[RoleProcess] = []
    try:
        watcher.start()
        for proc in [satellite, *grounds]:
            started.append(proc.start())
        _progress("[lab] waiting for the satellite node and the ground nodes to come up")
        _wait_ready(presence, {"satellite/satellite", *(f"ground/{c}" for c in clusters), *device_names}, started)
        started.append(orbit.start())
        lab.started_wall = time.time()
        _progress(f"[lab] orbit service started: clock x{scale:g}, running for {duration_s:.0f} s of wall time")
        _supervise(lab, links, clusters, started, duration_s)
    except KeyboardInterrupt:
        lab.interrupted = True
        _progress("[lab] interrupted: stopping every process", final=True)
    except BaseException:
        stop_dashboard(lab)
        raise
    finally:
        lab.stopped_wall = time.time()
        for proc in [*grounds, satellite, orbit]:
            code = proc.stop()
            if code not in (None, 0):
                log.warning("%s %s; see %s", proc.name, proc.exit_description, proc.log_path)
        watcher.stop()
        if embedded is not None:
            embedded.stop()
    return lab


def _start_dashboard(lab: LabRun, broker_addr: str, port: int, tls_args: list[str]) -> RoleProcess | None:
    """`emsfl dashboard` on loopback, read-only, over this run's broker, satellite state and run directory."""
    import socket

    from testbed.broker import wait_for_port

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: a closing socket is no owner
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            _progress(f"[lab] port {port} is taken: no dashboard (--dashboard-port N picks another)", final=True)
            return None
    args = ["dashboard", "--broker", broker_addr, "--listen", f"127.0.0.1:{port}", *tls_args]
    args += ["--state", str(lab.state_dir), "--run-dir", str(lab.run_dir)]
    proc = RoleProcess("dashboard", args, lab.run_dir / "logs" / "dashboard.log").start()
    try:
        wait_for_port("127.0.0.1", port, 30.0)
        if not proc.running:
            raise TimeoutError
    except TimeoutError:
        proc.stop()
        _progress(f"[lab] the dashboard did not start (port {port} taken?); see {proc.log_path}; going on without it")
        return None
    _progress(f"[lab] dashboard: http://127.0.0.1:{port}/ (read-only)", final=True)
    return proc


def stop_dashboard(lab: LabRun) -> None:
    if lab.dashboard is not None:
        lab.dashboard.stop()
        lab.dashboard = None


def _devices(topology: dict[str, Any], cluster: str) -> int:
    """`clusters[i].devices` (default 1) of a cluster."""
    for i, c in enumerate(topology["clusters"]):
        if c["id"] == cluster:
            return int(positive(field(c, "devices", int, f"clusters[{i}]", 1), f"clusters[{i}].devices"))
    return 1


def _supervise(lab: LabRun, links: LinkView, clusters: list[str], procs: list[RoleProcess], duration_s: float) -> None:
    from emsfl.runtime.events import read_events
    from testbed.report import count_events

    end = lab.started_wall + duration_s
    next_line = 0.0
    while (now := time.time()) < end:
        for proc in procs:
            if not proc.running:
                raise RuntimeError(f"{proc.name} {proc.exit_description}:\n{proc.log_tail()}")
        if now >= next_line:
            emulated = links.emulated_now()
            up = [c for c in clusters if links.is_up(c)]
            commits = count_events(read_events(lab.state_dir / "events.jsonl"), "upload_committed")
            when = emulated.strftime("%Y-%m-%d %H:%M") if emulated else "--"
            _progress(
                f"[lab] {now - lab.started_wall:5.0f}/{duration_s:.0f} s  emulated {when}  "
                f"links up: {','.join(up) or '-':<12} uploads committed: {commits}"
            )
            next_line = now + (2.0 if sys.stdout.isatty() else 15.0)
        time.sleep(0.25)
    _progress("[lab] time is up: stopping every process", final=True)
