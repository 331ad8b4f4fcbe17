"""`emsfl ground ...`: run | warmup | eval | profile | train | export | convert. Errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from emsfl import logs
from emsfl.config import ConfigError, load_topology, parse_host_port
from emsfl.errors import OneLineParser, positive_int
from emsfl.runtime.tls import add_tls_flags, mqtt_tls
from emsfl.runtime.tls import resolve as resolve_tls
from ground_node.errors import GroundError

BASE_HELP = "base directory written by `emsfl ground warmup` (must match --topology)"
WORKDIR_HELP = "this node's working directory: checkpoints, staged updates, report.json (created if absent)"


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="emsfl ground", description="a ground node of EMS-FL")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="profile, follow the link, train the assigned experts and upload them")
    run.add_argument("--topology", required=True)
    run.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    run.add_argument("--satellite", default=None, help="satellite node gRPC HOST:PORT (required without --gateway)")
    run.add_argument("--cluster", required=True)
    run.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    run.add_argument("--base", required=True, help=BASE_HELP)
    run.add_argument("--gateway", default=None, help="a device of a multi-device cluster: its gateway's HOST:PORT")
    run.add_argument("--device", default=None, help="this device's id in its cluster (with --gateway), e.g. d0")
    run.add_argument("--shard", type=int, default=None, help="data shard index (default: the device id's number)")
    add_tls_flags(run)
    _gateway_command(sub)
    warm = sub.add_parser("warmup", help="build the base directory")
    warm.add_argument("--topology", required=True)
    warm.add_argument("--out", required=True, help="base directory to write (kept if it already holds this base)")
    ev = sub.add_parser("eval", help="exact-match accuracy of base (+ uploaded tensors)")
    ev.add_argument("--topology", required=True)
    ev.add_argument("--base", required=True, help=BASE_HELP)
    ev.add_argument("--tensors", default=None, help="a safetensors file of manifest-named tensors")
    ev.add_argument("--cluster", default=None, help="evaluate on this cluster's test mix (default: global test set)")
    _extra_commands(sub)
    return parser


def _run(args: argparse.Namespace, topology: dict[str, Any]) -> int:
    from emsfl.runtime.bus import Bus
    from emsfl.runtime.linkview import LinkView
    from ground_node.agent import AgentOptions, GroundAgent

    host, port = parse_host_port(args.broker, "--broker")
    tls = resolve_tls(args, topology, args.topology)
    if args.gateway is not None or args.device is not None:
        from ground_node.cluster.gateway_cli import run_device

        return run_device(args, topology, tls)
    if args.satellite is None:
        raise ConfigError("--satellite: required (or --gateway and --device for a device of a multi-device cluster)")
    parse_host_port(args.satellite, "--satellite")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bus = Bus(host, port, role="ground", node_id=args.cluster, tls=mqtt_tls(topology, tls))
    view = LinkView(bus, clusters=[args.cluster])
    options = AgentOptions(
        topology=topology,
        cluster=args.cluster,
        workdir=Path(args.workdir),
        base_dir=Path(args.base),
        satellite=args.satellite,
        progress=sys.stderr.isatty(),
        tls=tls,
    )
    agent = GroundAgent(options, view, now=view.emulated_now)
    live = threading.Thread(target=_announce_live, args=(bus, agent, args.cluster, stop), daemon=True)
    try:
        bus.start()
        bus.announce({"cluster": args.cluster})
        live.start()
        agent.run(stop)
    finally:
        stop.set()
        if live.is_alive():
            live.join(5)  # its last announce must not follow (and undo) the offline status below
        agent.close()
        bus.stop()
    return 0


LIVE_STATUS_EVERY_S = 2.0


def _announce_live(bus: Any, agent: Any, cluster: str, stop: threading.Event) -> None:
    """Republish the node's retained status with its live figures (steps, uploads, memory) every few seconds."""
    while not stop.wait(LIVE_STATUS_EVERY_S):
        try:
            bus.announce({"cluster": cluster, **agent.live()})
        except Exception:  # a display feed must never stop training
            logging.getLogger("ground_node").exception("live status failed")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logs.setup('{"level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}', service=args.command in SERVICES)
    try:
        if args.command == "export":
            print(json.dumps(_export(args)))
            return 0
        if args.command == "convert":
            from ground_node.model.convert import convert_command

            print(json.dumps(convert_command(args, progress=sys.stderr.isatty())))
            return 0
        topology = load_topology(args.topology)
        if args.command in ("profile", "train", "eval", "run", "gateway"):
            _check_offline(args, topology)
        if args.command == "profile":
            print(json.dumps(_profile(args, topology)))
            return 0
        if args.command == "train":
            print(json.dumps(_train(args, topology)))
            return 0
        if args.command == "run":
            return _run(args, topology)
        if args.command == "gateway":
            from ground_node.cluster.gateway_cli import run_gateway

            return run_gateway(args, topology, resolve_tls(args, topology, args.topology))
        if args.command == "warmup":
            from ground_node.model.base import build_base

            out = build_base(topology, Path(args.out), progress=sys.stderr.isatty())
            print(json.dumps({"base": str(out)}))
            return 0
        tensors = _load_tensors(args.tensors) if args.tensors else None
        from ground_node.learning.evaluate import accuracy

        acc = accuracy(Path(args.base), tensors, topology, args.cluster)
        print(json.dumps({"accuracy": acc, "cluster": args.cluster}))
        return 0
    except (ConfigError, GroundError, ConnectionError, OSError) as exc:
        print(f"emsfl ground: {exc}", file=sys.stderr)
        return 2


SERVICES = ("run", "gateway")  # long-running: INFO logs by default (emsfl.logs)


def _check_offline(args: argparse.Namespace, topology: dict[str, Any]) -> None:
    """Everything an offline command can check before it loads a model or writes a file."""
    from ground_node.model.basecheck import check_base
    from ground_node.settings import load_settings

    settings = load_settings(topology)
    if args.cluster is not None and args.cluster not in settings.clusters:
        have = ", ".join(settings.clusters)
        raise ConfigError(f"--cluster: no cluster {args.cluster!r} in the topology (have: {have})")
    check_base(Path(args.base), settings)
    if getattr(args, "experts", None):
        cap, m = settings.capacities[args.cluster], settings.model
        for layer, experts in _experts_arg(args.experts):
            if len(set(experts)) > cap:
                raise GroundError(
                    f"--experts: layer {layer} lists {len(set(experts))} experts, more than cluster {args.cluster}'s"
                    f" capacity_experts={cap}"
                )
            if not 0 <= layer < m.num_layers:
                raise GroundError(f"--experts: layer {layer} does not exist (model.num_layers={m.num_layers})")
            bad = [e for e in experts if not 0 <= e < m.num_experts]
            if bad:
                raise GroundError(
                    f"--experts: expert {bad[0]} does not exist in layer {layer} (model.num_experts={m.num_experts})"
                )


def _load_tensors(path: str) -> dict[str, Any]:
    """A safetensors file (`--tensors`); a missing or corrupt one is a GroundError naming the flag."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise GroundError(f"--tensors: {path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise GroundError(f"--tensors: {path} is not a readable safetensors file ({exc})") from None


def _experts_arg(text: str) -> list[tuple[int, list[int]]]:
    """`0:1,2;1:0` -> [(0, [1, 2]), (1, [0])]."""
    out = []
    try:
        for item in text.split(";"):
            if not item.strip():
                continue
            layer, _, experts = item.partition(":")
            out.append((int(layer), [int(e) for e in experts.split(",") if e.strip()]))
    except ValueError:
        raise GroundError(f"--experts: expected LAYER:E,E;LAYER:E..., got {text!r}") from None
    return out


def _profile(args: argparse.Namespace, topology: dict[str, Any]) -> dict[str, Any]:
    from ground_node.learning.data import tokenizer_for, train_examples
    from ground_node.learning.profile import profile_base
    from ground_node.settings import load_settings

    s = load_settings(topology)
    data = train_examples(s, args.cluster)
    affinity = profile_base(Path(args.base), data, tokenizer_for(s.data), s.training.profile_examples).affinity
    cap = s.capacities[args.cluster]
    top = [[int(e) for e in row.argsort()[::-1][:cap]] for row in affinity.gate]
    return {
        "cluster": args.cluster,
        "num_tokens": affinity.num_tokens,
        "gate": affinity.gate.round(5).tolist(),
        "freq": affinity.freq.round(5).tolist(),
        "top_experts": top,
    }


def _train(args: argparse.Namespace, topology: dict[str, Any]) -> dict[str, Any]:
    """Offline training (no satellite): the given experts, or the cluster's top-affinity experts."""
    import math
    import time

    from emsfl.durable import atomic_write_json
    from ground_node.federation.outbox import Outbox
    from ground_node.learning.data import tokenizer_for, train_examples
    from ground_node.learning.profile import coverage_from_probs, profile_base
    from ground_node.learning.train import Trainer, peak_gpu_memory_mb
    from ground_node.model.submodel import load_base_split
    from ground_node.records import Assignment
    from ground_node.settings import load_settings
    from ground_node.usage import peak_rss_mb

    s = load_settings(topology)
    tok = tokenizer_for(s.data)
    data = train_examples(s, args.cluster)
    profile = profile_base(Path(args.base), data, tok, s.training.profile_examples)
    affinity, probs, top_k = profile.affinity, profile.probs, profile.top_k
    if args.experts:
        assignment = Assignment.from_pairs(0, _experts_arg(args.experts))
    else:
        cap = s.capacities[args.cluster]
        assignment = Assignment(
            0, {la: tuple(sorted(int(e) for e in row.argsort()[::-1][:cap])) for la, row in enumerate(affinity.gate)}
        )
    num_layers, num_experts = affinity.gate.shape
    assignment.validate(num_layers, num_experts)
    workdir = Path(args.workdir)
    model, adapter = load_base_split(Path(args.base), assignment if s.training.split == "mask" else None)
    trainer = Trainer(model, adapter, s.training, assignment, data, s.seed, tok=tok)
    resumed = trainer.load_checkpoint(workdir)
    outbox = Outbox(workdir / "outbox")
    start = time.monotonic()
    while trainer.step < args.steps:
        trainer.train_step()
        if trainer.step % s.training.checkpoint_every_steps == 0:
            trainer.save_checkpoint(workdir)
    trainer.save_checkpoint(workdir)
    update = outbox.stage(trainer.expert_state(), assignment.version, trainer.step)
    report = {
        "cluster": args.cluster,
        "steps": trainer.step,
        "resumed": resumed,
        "loss": trainer.last_loss if math.isfinite(trainer.last_loss) else None,  # no step this call: no loss
        "experts": assignment.to_json()["layers"],
        "coverage": coverage_from_probs(probs, top_k, assignment),
        "staged": str(update.path),
        "seconds": round(time.monotonic() - start, 2),
        "training_device": trainer.device_type,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_memory_mb": peak_gpu_memory_mb(),  # None unless training ran on CUDA
    }
    atomic_write_json(workdir / "report.json", report)
    return report


def _export(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ground_node.model.base import read_manifest
    from ground_node.model.export import check_onnx, export_model, providers

    read_manifest(Path(args.base))  # a missing or foreign --base named before the exporter starts
    tensors = _load_tensors(args.tensors) if args.tensors else None
    module, summary = export_model(Path(args.base), tensors, Path(args.out), submodel=args.submodel)
    ids = torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    summary["max_abs_diff"] = check_onnx(Path(args.out), module, ids)
    summary["providers"] = providers()
    return summary


def _gateway_command(sub: Any) -> None:
    gw = sub.add_parser("gateway", help="a cluster gateway: serves its devices over the LAN, uploads their average")
    gw.add_argument("--topology", required=True)
    gw.add_argument("--broker", required=True, help="MQTT broker HOST:PORT")
    gw.add_argument("--satellite", required=True, help="satellite node gRPC HOST:PORT")
    gw.add_argument("--cluster", required=True)
    gw.add_argument("--listen", required=True, help="HOST:PORT the devices reach the gateway at")
    gw.add_argument("--workdir", required=True, help=WORKDIR_HELP)
    gw.add_argument("--base", required=True, help="base directory (only its manifest.json is read)")
    gw.add_argument("--round-timeout", type=float, default=30.0, help="wall s a round waits for late devices")
    add_tls_flags(gw, serves=True)


def _extra_commands(sub: Any) -> None:
    prof = sub.add_parser("profile", help="affinity of the cluster's local data (gate, freq, top experts)")
    prof.add_argument("--topology", required=True)
    prof.add_argument("--base", required=True, help=BASE_HELP)
    prof.add_argument("--cluster", required=True)
    tr = sub.add_parser("train", help="offline training of the cluster's experts (no satellite)")
    tr.add_argument("--topology", required=True)
    tr.add_argument("--base", required=True, help=BASE_HELP)
    tr.add_argument("--cluster", required=True)
    tr.add_argument("--workdir", required=True, help=WORKDIR_HELP + "; training resumes from its checkpoint")
    tr.add_argument(
        "--steps", type=positive_int, default=100, help="train until this many steps in total (>= 1, default: 100)"
    )
    tr.add_argument("--experts", default=None, help="LAYER:E,E;LAYER:E (default: top-affinity up to capacity)")
    ex = sub.add_parser("export", help="ONNX export of the global model or (--submodel) the cluster's sub-model")
    ex.add_argument("--base", required=True, help=BASE_HELP)
    ex.add_argument("--tensors", default=None, help="manifest-named safetensors (uploads, LoRA or full)")
    ex.add_argument("--submodel", action="store_true", help="only the experts named in --tensors")
    ex.add_argument("--out", required=True)
    from ground_node.model.convert_options import add_convert_command

    add_convert_command(sub)
