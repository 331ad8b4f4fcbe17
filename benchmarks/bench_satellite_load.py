"""Many clusters against one satellite node: commits, errors, commit latency and bounded memory.

A real satellite node process (`emsfl satellite run`, with an MQTT broker and a stand-in orbit service that
holds every cluster's link up, so nothing is gated or paced) serves `--clusters` clusters. Each cluster owns one
expert (a manifest of `--layers` layers with enough experts for all) and uploads small fresh updates of it back to
back for `--duration-s`, over its own gRPC channel; the clients run as asyncio tasks in `--procs` processes. The
node keeps the newest `--keep-versions` versions of each expert (satellite.keep_versions).

Reported: commits, errors (must be 0), commit latency p50/p99 (OfferUpdate sent -> commit acknowledged), the
satellite's RSS sampled every second (start, max, end, and a series), the expert versions kept, and whether every
acknowledged upload is recorded in the state. Writes `benchmarks/results/satellite_load.json`.

Run: `.venv/bin/python benchmarks/bench_satellite_load.py [--clusters 200] [--duration-s 60] [--procs 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "satellite_load.json"


def machine_info() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


class RssSampler(threading.Thread):
    """RSS of one process every `period_s` seconds, with the 1-minute load average."""

    def __init__(self, pid: int, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.status = Path(f"/proc/{pid}/status")  # Linux: VmRSS, no third-party package needed
        self.period_s = period_s
        self.samples: list[tuple[float, float, float]] = []  # (seconds since start, RSS MiB, load average)
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            rss_MiB = self.rss_kib() / 1024
            self.samples.append((round(time.monotonic() - self._t0, 1), round(rss_MiB, 1), os.getloadavg()[0]))
            self._halt.wait(self.period_s)

    def rss_kib(self) -> int:
        for line in self.status.read_text(encoding="ascii").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"{self.status}: no VmRSS")

    def stop(self) -> None:
        self._halt.set()
        self.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def versions_kept(state: Path) -> dict[str, Any]:
    """Expert versions and blobs still held after retention (read from the stopped node's state)."""
    db = sqlite3.connect(f"file:{state / 'state.sqlite'}?mode=ro", uri=True)
    try:
        rows, experts, most, newest = db.execute(
            "SELECT COALESCE(SUM(n), 0), COUNT(*), COALESCE(MAX(n), 0), COALESCE(MAX(top), 0) FROM"
            " (SELECT COUNT(*) AS n, MAX(version) AS top FROM expert_versions GROUP BY layer, expert)"
        ).fetchone()
    finally:
        db.close()
    blobs = list((state / "blobs").glob("*.safetensors"))
    return {
        "expert_version_rows": int(rows),
        "experts_with_versions": int(experts),
        "max_versions_per_expert": int(most),
        "newest_version_max": int(newest),
        "blobs_on_disk": len(blobs),
        "blob_bytes": sum(p.stat().st_size for p in blobs),
    }


def _client_argv(workdir: Path, target: str, start_wall: float, duration_s: float, index: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--client-proc",
        str(workdir),
        target,
        str(start_wall),
        str(duration_s),
        str(index),
    ]


def client_proc(workdir: Path, target: str, start_wall: float, duration_s: float, index: int) -> None:
    """One client process: the clusters of its share, from `owned-<index>.json`; writes `load-<index>.json`."""
    from satellite_node.loadgen import record_to_json, run_clients

    share = json.loads((workdir / f"owned-{index}.json").read_text(encoding="utf-8"))
    owned = {c: [(int(layer), int(e)) for layer, e in experts] for c, experts in share.items()}
    record = run_clients(target, workdir / "base", owned, start_wall, duration_s)
    (workdir / f"load-{index}.json").write_text(record_to_json(record), encoding="utf-8")


def run(clusters: int, layers: int, duration_s: float, procs: int, keep_versions: int) -> dict[str, Any]:
    from satellite_node import export
    from satellite_node.loadgen import LoadRecord, experts_per_layer, record_from_json, setup_clusters, topology_yaml
    from satellite_node.testing import OrbitStub, SatelliteProcess, write_tiny_base
    from testbed.broker import BrokerProcess, free_port

    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp, BrokerProcess("auto") as broker:
        workdir = Path(tmp)
        experts = experts_per_layer(clusters, layers)
        base = write_tiny_base(workdir / "base", num_layers=layers, num_experts=experts, hidden=32, inter=32, rank=8)
        orbit = OrbitStub(broker.host, broker.port).start()
        sat = SatelliteProcess(
            workdir / "sat", (broker.host, broker.port), topology_yaml(clusters, keep_versions), free_port(),
            ["--insecure"], base,
        )  # fmt: skip
        try:
            for c in range(clusters):
                orbit.set_link(f"c{c:03d}", True)
            sat.start()
            time.sleep(1.0)  # the node has the retained link states
            owned = setup_clusters(sat.target, clusters, layers)
            shares = [dict(list(owned.items())[i::procs]) for i in range(procs)]
            for i, share in enumerate(shares):
                (workdir / f"owned-{i}.json").write_text(json.dumps(share), encoding="utf-8")
            assert sat.proc is not None
            sampler = RssSampler(sat.proc.pid)
            sampler.start()
            start_wall = time.time() + 3.0  # every process has its channels ready by then
            clients = [
                subprocess.Popen(_client_argv(workdir, sat.target, start_wall, duration_s, i), cwd=ROOT)
                for i in range(procs)
            ]
            codes = [p.wait(timeout=duration_s + 600) for p in clients]
            time.sleep(2.0)  # a last sample after the load
            sampler.stop()
            if any(codes):
                raise RuntimeError(f"client processes exited with {codes}")
            sat.stop()
            total = LoadRecord()
            for i in range(procs):
                total.merge(record_from_json((workdir / f"load-{i}.json").read_text(encoding="utf-8")))
            on_record = {c["content_hash"] for c in export.commits(sat.state)}
            kept = versions_kept(sat.state)
        finally:
            sat.kill()
            orbit.stop()
    rss = [s[1] for s in sampler.samples]
    load = [s[2] for s in sampler.samples]
    missing = sorted(set(total.committed) - on_record)
    return {
        "clusters": clusters,
        "layers": layers,
        "experts_per_layer": experts,
        "client_processes": procs,
        "duration_s": duration_s,
        "keep_versions": keep_versions,
        "commits": len(total.committed),
        "commits_per_s": round(len(total.committed) / duration_s, 1),
        "errors": total.errors,
        "error_samples": total.error_samples,
        "acknowledged_not_on_record": len(missing),
        "commit_latency_p50_s": round(percentile(total.latencies_s, 50), 4),
        "commit_latency_p99_s": round(percentile(total.latencies_s, 99), 4),
        "commit_latency_max_s": round(max(total.latencies_s, default=float("nan")), 4),
        "satellite_rss_MiB": {"start": rss[0], "max": max(rss), "end": rss[-1]},
        "satellite_rss_series_MiB": [[t, r] for t, r, _ in sampler.samples[:: max(1, len(rss) // 30)]],
        "versions": kept,
        "load_avg_1m": {"at_start": load_start, "during_max": round(max(load), 2), "at_end": round(load[-1], 2)},
        "note": "clients and the satellite share the machine's cores; latency includes queueing behind the other"
        " clusters (the node serialises commits)",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--keep-versions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULT, help="where the JSON goes")
    parser.add_argument("--client-proc", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client_proc:
        workdir, target, start_wall, duration_s, index = args.client_proc
        client_proc(Path(workdir), target, float(start_wall), float(duration_s), int(index))
        return 0
    result: dict[str, Any] = {"machine": machine_info()}
    result.update(run(args.clusters, args.layers, args.duration_s, args.procs, args.keep_versions))
    write_result(args.out, result, shown={k: v for k, v in result.items() if k != "satellite_rss_series_MiB"})
    return 0 if result["errors"] == 0 and result["acknowledged_not_on_record"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
