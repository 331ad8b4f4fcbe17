"""Process wiring of `emsfl ground gateway` and `emsfl ground run --gateway ... --device ...`."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from emsfl.config import ConfigError, parse_host_port
from emsfl.runtime.tls import TlsFiles, mqtt_tls

log = logging.getLogger(__name__)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def cluster_devices(topology: dict[str, Any], cluster: str) -> int:
    for i, c in enumerate(topology.get("clusters") or []):
        if str(c.get("id")) == cluster:
            devices = c.get("devices", 1)
            if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
                raise ConfigError(f"clusters[{i}].devices: expected an integer >= 1, got {devices!r}")
            return devices
    raise ConfigError(f"--cluster: no cluster with id {cluster!r} in the topology")


def run_gateway(args: argparse.Namespace, topology: dict[str, Any], tls: TlsFiles | None = None) -> int:
    """The gateway: with `tls` it serves its devices mutual TLS only and dials the satellite with the same
    certificate (`emsfl pki issue --role gateway`); its MQTT session uses it too."""
    from emsfl.runtime.bus import Bus
    from emsfl.runtime.linkview import LinkView
    from ground_node.cluster.gateway import Gateway
    from ground_node.cluster.gateway_server import serve
    from ground_node.settings import load_settings

    settings = load_settings(topology)
    settings.cluster_index(args.cluster)
    devices = cluster_devices(topology, args.cluster)
    host, port = parse_host_port(args.broker, "--broker")
    parse_host_port(args.satellite, "--satellite")
    parse_host_port(args.listen, "--listen")
    strategy = str(topology.get("strategy", "emsfl"))
    if strategy != "emsfl":
        raise ConfigError(f"strategy: the cluster gateway supports 'emsfl' only, got {strategy!r}")
    stop = _stop_on_signals()
    bus = Bus(host, port, role="ground", node_id=args.cluster, tls=mqtt_tls(topology, tls))
    view = LinkView(bus, clusters=[args.cluster])
    gw = Gateway(
        args.cluster,
        devices,
        settings.capacities[args.cluster],
        args.satellite,
        view,
        Path(args.workdir),
        Path(args.base),
        strategy=strategy,
        round_timeout_s=args.round_timeout,
        now=view.emulated_now,
        send_window_chunks=settings.training.send_window_chunks,
        uploads_per_contact=settings.training.uploads_per_contact,
        tls=tls,
    )
    server, bound = serve(gw, args.listen)
    how = "mutual TLS" if tls is not None else "plaintext (no TLS files)"
    log.info("gateway of %s serves %d devices on port %d, %s", args.cluster, devices, bound, how)
    try:
        bus.start()
        gw.start()
        detail = {"cluster": args.cluster, "gateway": args.listen}
        bus.announce({**detail, "devices": str(devices)})
        while not stop.wait(1.0):
            report = gw.report()  # also the status topic's live figures (the dashboard's cluster panel)
            bus.announce({**detail, **report, "device_count": devices})
    finally:
        server.stop(2)
        gw.stop()
        gw.close()
        bus.stop()
    return 0


def run_device(args: argparse.Namespace, topology: dict[str, Any], tls: TlsFiles | None = None) -> int:
    from emsfl.runtime.bus import Bus
    from emsfl.runtime.linkview import LinkView
    from ground_node.cluster.device import DeviceAgent, DeviceOptions

    if not args.gateway or not args.device:
        raise ConfigError("--gateway and --device go together")
    parse_host_port(args.gateway, "--gateway")
    cluster_devices(topology, args.cluster)
    host, port = parse_host_port(args.broker, "--broker")
    stop = _stop_on_signals()
    bus = Bus(host, port, role="ground", node_id=f"{args.cluster}.{args.device}", tls=mqtt_tls(topology, tls))
    view = LinkView(bus, clusters=[])
    agent = DeviceAgent(
        DeviceOptions(
            topology=topology,
            cluster=args.cluster,
            device=args.device,
            gateway=args.gateway,
            workdir=Path(args.workdir),
            base_dir=Path(args.base),
            shard=args.shard,
            tls=tls,
        ),
        now=view.emulated_now,
    )
    try:
        bus.start()
        bus.announce({"cluster": args.cluster, "device": args.device, "gateway": args.gateway})
        agent.run(stop)
    finally:
        agent.close()
        bus.stop()
    return 0
