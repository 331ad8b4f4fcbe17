"""Upload throughput of the satellite node against the bare transports, and goodput over a limited link with a cut.

Throughput (loopback, measured in the same run):
- `upload_MBps`: end to end, a 256 MiB update: serialise (safetensors), chunk, hash (content and chunk SHA-256),
  OfferUpdate, PushChunks over gRPC, server-side verification (chunk hashes, content hash, safetensors layout,
  names, shapes, dtypes, finite values, ownership), durable store (fsync) and commit;
- `upload_tls_MBps`: the same upload over mutual TLS (`emsfl pki` certificates, ECDSA P-256; the channel and server
  credentials every role uses, emsfl/runtime/channel.py), to a second port of the same satellite node;
- `grpc_raw_MBps`: the same bytes streamed over bare gRPC (1 MiB messages, no protobuf, the server drops them);
- `tcp_raw_MBps`: the same bytes over a raw TCP socket.
The servers run in a separate process (their own GIL), as the satellite does. MB = 10^6 bytes.

Link (needs root: network namespaces, veth, tc): the real satellite node (`emsfl satellite run`, with its MQTT
broker and a stand-in orbit service) in one namespace, an uploader in another, joined by a veth pair limited to
`--link-mbit` by `tbf` (this kernel has no sch_netem). The link is cut once (`ip link set down`) half way through
an upload of `--link-mib`; the uploader (the ground uplink's keepalive settings, PushChunksWindowed with one
chunk unanswered at most) notices by gRPC keepalive, re-offers once the link is back and pushes only the missing
chunks. `goodput_fraction` = payload bytes / (link rate x seconds the link was up during the transfer);
`resent_chunks_per_cut` = chunk messages the uploader pushed beyond the update's chunk count.

Writes `benchmarks/results/transport.json`.
Run: `.venv/bin/python benchmarks/bench_transport.py [--mib 256] [--repeat 8] [--link-mib 96] [--no-link]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from emsfl.runtime.channel import MESSAGE_OPTIONS, open_channel  # noqa: E402
from emsfl.runtime.client import push_windowed  # noqa: E402
from emsfl.runtime.tls import TlsFiles  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "transport.json"
EXPERTS = 16  # one layer; each expert carries two parts of (mib / 32) MiB each
PARTS = ("down_proj", "gate_up_proj")
OPTIONS = MESSAGE_OPTIONS
PUSH_METHOD = "/emsfl.v1.Federation/PushChunks"
PUSH_WINDOWED_METHOD = "/emsfl.v1.Federation/PushChunksWindowed"
# Size of the probe for `page_cache_write_MBps`: how fast this machine takes writes into fresh page cache, which
# every upload's durable store pays. On the lab VM it swings between about 0.25 and 2.5 GB/s: it is slow when the
# pages are new to the guest (memory freed a few seconds earlier appears to go back to the host).
PROBE_BYTES = 256 << 20


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def write_base(base: Path, mib: int) -> None:
    """A base directory whose manifest makes one expert part (mib / 32) MiB of float32."""
    import numpy as np
    from safetensors.numpy import save_file

    from satellite_node.manifest import file_sha256

    base.mkdir(parents=True, exist_ok=True)
    save_file({"shared/embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(base / "base.safetensors"))
    rows = _rows(mib)
    manifest = {
        "family": "bench",
        "num_layers": 1,
        "num_experts": EXPERTS,
        "top_k": 2,
        "tune": "full",
        "base_hash": file_sha256(base / "base.safetensors"),
        "expert_parts": [{"name": p, "dtype": "F32", "shape": [rows, 1024]} for p in PARTS],
    }
    (base / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def _rows(mib: int) -> int:
    return mib * (1 << 20) // (EXPERTS * len(PARTS) * 4 * 1024)  # float32 rows of 1024 per part


def make_tensors(mib: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = _rows(mib)
    return {
        f"expert/0/{e}/{p}": rng.standard_normal((rows, 1024), dtype=np.float32) for e in range(EXPERTS) for p in PARTS
    }


# the client side of an upload: serialise, chunk, hash, encode


@dataclass(frozen=True)
class Serialised:
    blob: bytearray
    content_hash: str
    chunk_hashes: list[str]
    chunk_bytes: int


def serialise(tensors: dict[str, Any], pool: ThreadPoolExecutor) -> bytearray:
    """A safetensors blob (any safetensors reader loads it) written with one copy per tensor, straight into the
    output buffer and in parallel threads (numpy copies release the GIL); `safetensors.numpy.save` copies twice."""
    import numpy as np

    from satellite_node.manifest import dtype_name

    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        array = tensors[name]
        header[name] = {"dtype": dtype_name(array.dtype), "shape": list(array.shape)}
        header[name]["data_offsets"] = [offset, offset + array.nbytes]
        offset += array.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = bytearray(8 + len(head) + offset)
    out[:8] = len(head).to_bytes(8, "little")
    out[8 : 8 + len(head)] = head
    start = 8 + len(head)

    def copy(name: str) -> None:
        array = tensors[name]
        begin = start + header[name]["data_offsets"][0]
        dst = np.frombuffer(out, dtype=array.dtype.newbyteorder("<"), count=array.size, offset=begin)
        np.copyto(dst.reshape(array.shape), array)

    list(pool.map(copy, names))
    return out


def serialise_and_hash(tensors: dict[str, Any], chunk_bytes: int, pool: ThreadPoolExecutor) -> Serialised:
    """Serialise, then hash: the chunk hashes on a pool thread while this one computes the content hash
    (hashlib releases the GIL, so both cores work)."""
    blob = serialise(tensors, pool)
    view = memoryview(blob)
    chunks = pool.submit(
        lambda: [hashlib.sha256(view[i : i + chunk_bytes]).hexdigest() for i in range(0, len(blob), chunk_bytes)]
    )
    content_hash = hashlib.sha256(view).hexdigest()
    return Serialised(blob, content_hash, chunks.result(), chunk_bytes)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def chunk_message(s: Serialised, index: int) -> bytes:
    """One serialised `emsfl.v1.Chunk`, built with a single copy of its data: the small fields through protobuf,
    then field 5 (`data`) appended as tag, length and bytes (protobuf fields may come in any order)."""
    from protos.emsfl.v1 import federation_pb2 as pb

    lo = index * s.chunk_bytes
    data = memoryview(s.blob)[lo : lo + s.chunk_bytes]
    head = pb.Chunk(
        content_hash=s.content_hash,
        index=index,
        total_chunks=len(s.chunk_hashes),
        total_size=len(s.blob),
        sha256=s.chunk_hashes[index],
    ).SerializeToString()
    return b"".join((head, b"\x2a", _varint(len(data)), data))


def offer_message(s: Serialised, tensors: dict[str, Any], assignment_version: int = 1) -> Any:
    from protos.emsfl.v1 import federation_pb2 as pb

    specs = [pb.TensorSpec(name=n, dtype="F32", shape=list(a.shape)) for n, a in sorted(tensors.items())]
    return pb.UpdateOffer(
        content_hash=s.content_hash,
        size_bytes=len(s.blob),
        chunk_size=s.chunk_bytes,
        chunk_hashes=s.chunk_hashes,
        tensors=specs,
        assignment_version=assignment_version,
    )


def push_call(channel: Any) -> Callable[..., Any]:
    """PushChunks taking pre-serialised Chunk messages (see `chunk_message`)."""
    from protos.emsfl.v1 import federation_pb2 as pb

    call: Callable[..., Any] = channel.stream_unary(
        PUSH_METHOD, request_serializer=None, response_deserializer=pb.PushReply.FromString
    )
    return call


def push_windowed_call(channel: Any) -> Callable[..., Any]:
    """PushChunksWindowed taking pre-serialised Chunk messages."""
    from protos.emsfl.v1 import federation_pb2 as pb

    call: Callable[..., Any] = channel.stream_stream(
        PUSH_WINDOWED_METHOD, request_serializer=None, response_deserializer=pb.PushProgress.FromString
    )
    return call


def _check_encoding(s: Serialised) -> None:
    """`chunk_message` must read back as the Chunk protobuf would make it."""
    from protos.emsfl.v1 import federation_pb2 as pb

    parsed = pb.Chunk.FromString(chunk_message(s, 0))
    assert parsed.index == 0 and parsed.sha256 == s.chunk_hashes[0]
    assert parsed.data == bytes(memoryview(s.blob)[: s.chunk_bytes])


# throughput on loopback: the servers (a separate process)


def serve(workdir: Path, portfile: Path) -> None:
    import grpc
    import numpy as np

    from satellite_node.manifest import load_manifest
    from satellite_node.node import NodeConfig, SatelliteNode
    from satellite_node.server import make_server
    from satellite_node.store import Store
    from satellite_node.testing import FakeLinks

    base = workdir / "base"
    # keep_versions=1: the satellite.keep_versions retention a long run uses; old blobs go, the disk stays bounded
    store = Store(workdir / "state", keep_versions=1)
    config = NodeConfig({"c0": EXPERTS}, max_update_bytes=8 << 30)
    node = SatelliteNode(store, load_manifest(base), str(base), config, FakeLinks())
    node.join("c0", "bench", EXPERTS, 1)
    node.report_affinity("c0", 1, 1, EXPERTS, np.ones(EXPERTS), [])
    server, port = make_server(node, "127.0.0.1:0")
    tls_server, tls_port = make_server(node, "127.0.0.1:0", tls=bench_tls(workdir, "satellite"))

    def drain(requests: Iterator[bytes], context: Any) -> bytes:
        total = 0
        for message in requests:
            total += len(message)
        return total.to_bytes(8, "little")

    raw = grpc.server(ThreadPoolExecutor(4), options=OPTIONS)
    raw.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Raw", {"Push": grpc.stream_unary_rpc_method_handler(drain)}),)
    )
    raw_port = raw.add_insecure_port("127.0.0.1:0")
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_tcp_sink, args=(listener,), daemon=True).start()
    server.start()
    tls_server.start()
    raw.start()
    ports = {"upload": port, "upload_tls": tls_port, "grpc": raw_port, "tcp": listener.getsockname()[1]}
    portfile.write_text(json.dumps(ports), encoding="utf-8")
    threading.Event().wait()


def bench_tls(workdir: Path, name: str) -> TlsFiles:
    """The TLS files of `name` (satellite: server for 127.0.0.1; c0: the cluster's client), issued once per run."""
    from emsfl import pki

    d = workdir / "pki"
    if not (d / pki.CA_CERT).exists():
        pki.init_ca(d, days=1)
        pki.issue(d, "satellite", "server", sans=["127.0.0.1"], days=1)
        pki.issue(d, "c0", "client", cluster="c0", days=1)
    return TlsFiles(ca=d / pki.CA_CERT, cert=d / f"{name}.crt", key=d / f"{name}.key")


def _tcp_sink(listener: socket.socket) -> None:
    buffer = bytearray(4 << 20)
    while True:
        conn, _ = listener.accept()
        with conn:
            want = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "little")
            got = 0
            while got < want:
                n = conn.recv_into(buffer)
                if n == 0:
                    break
                got += n
            conn.sendall(got.to_bytes(8, "little"))


# throughput on loopback: the client


def upload_once(
    target: str, tensors: dict[str, Any], chunk: int, pool: ThreadPoolExecutor, tls: TlsFiles | None = None
) -> dict[str, float]:
    """One end-to-end upload (over mutual TLS with `tls`); returns its phases and total in seconds."""
    from protos.emsfl.v1 import federation_pb2 as pb
    from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
    from protos.wire import CLUSTER_METADATA_KEY

    md = ((CLUSTER_METADATA_KEY, "c0"),)
    with open_channel(target, tls) as channel:  # what every role dials with (caps, keepalive, credentials)
        stub = pb_grpc.FederationStub(channel)
        stub.GetStatus(pb.StatusRequest(), metadata=md)  # connected before the clock starts
        push = push_call(channel)
        started = time.perf_counter()
        s = serialise_and_hash(tensors, chunk, pool)
        hashed = time.perf_counter()
        reply = stub.OfferUpdate(offer_message(s, tensors), metadata=md)
        offered = time.perf_counter()
        result = push((chunk_message(s, i) for i in reply.missing), metadata=md)
        done = time.perf_counter()
        if not result.committed:
            raise RuntimeError(f"upload not committed: missing {list(result.missing)[:5]}")
    return {
        "serialise_and_hash_s": hashed - started,
        "offer_s": offered - hashed,
        "push_and_commit_s": done - offered,
        "total_s": done - started,
        "bytes": float(len(s.blob)),
    }


def grpc_raw_s(target: str, blob: bytearray, chunk: int) -> float:
    import grpc

    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        push = channel.stream_unary("/bench.Raw/Push")
        push(iter([b"x"]))  # connected
        view = memoryview(blob)
        started = time.perf_counter()
        got = push(bytes(view[i : i + chunk]) for i in range(0, len(blob), chunk))
        elapsed = time.perf_counter() - started
    assert int.from_bytes(got, "little") == len(blob)
    return elapsed


def tcp_raw_s(port: int, blob: bytearray) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(len(blob).to_bytes(8, "little"))
        sock.sendall(memoryview(blob))
        got = int.from_bytes(sock.recv(8, socket.MSG_WAITALL), "little")
        elapsed = time.perf_counter() - started
    assert got == len(blob)
    return elapsed


def page_cache_write_MBps(folder: Path, nbytes: int) -> float:
    """Rate of writing `nbytes` into a new file (page cache only: no fsync in the timing); the file is deleted."""
    block = os.urandom(8 << 20)
    path = folder / "probe.bin"
    with open(path, "wb", buffering=0) as handle:
        started = time.perf_counter()
        for _ in range(nbytes // len(block)):
            handle.write(block)
        elapsed = time.perf_counter() - started
    path.unlink()
    return nbytes / elapsed / 1e6


def _start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    portfile = workdir / "ports.json"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(workdir), str(portfile)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not portfile.exists() or not portfile.read_text():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("benchmark server did not start")
        time.sleep(0.1)
    return server, json.loads(portfile.read_text())


def run_throughput(mib: int, repeat: int, chunk: int) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-transport-", dir=os.environ.get("BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        page_cache_MBps = page_cache_write_MBps(workdir, PROBE_BYTES)
        write_base(workdir / "base", mib)
        server, ports = _start_server(workdir)
        runs: dict[str, list[float]] = {"upload": [], "upload_tls": [], "grpc_raw": [], "tcp_raw": []}
        phases: list[dict[str, float]] = []
        client_tls = bench_tls(workdir, "c0")
        size = 0
        try:
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                _check_encoding(serialise_and_hash(make_tensors(1, seed=99), chunk, pool))
                for r in range(repeat):
                    tensors = make_tensors(mib, seed=r)  # a fresh update each time: nothing is deduplicated
                    phase = upload_once(f"127.0.0.1:{ports['upload']}", tensors, chunk, pool)
                    size = int(phase.pop("bytes"))
                    runs["upload"].append(size / phase["total_s"] / 1e6)
                    phases.append({k: round(v, 3) for k, v in phase.items()})
                    tensors = make_tensors(mib, seed=1000 + r)  # fresh again: the TLS upload is a new update too
                    tls_phase = upload_once(f"127.0.0.1:{ports['upload_tls']}", tensors, chunk, pool, client_tls)
                    runs["upload_tls"].append(int(tls_phase.pop("bytes")) / tls_phase["total_s"] / 1e6)
                    blob = serialise_and_hash(tensors, chunk, pool).blob
                    del tensors
                    runs["grpc_raw"].append(size / grpc_raw_s(f"127.0.0.1:{ports['grpc']}", blob, chunk) / 1e6)
                    runs["tcp_raw"].append(size / tcp_raw_s(ports["tcp"], blob) / 1e6)
                    del blob
                    line = ", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in runs.items())
                    print(f"run {r}: {line} {phases[-1]}", flush=True)
        finally:
            server.kill()
            server.wait()
    return {
        "upload_MBps": round(max(runs["upload"]), 1),
        "grpc_raw_MBps": round(max(runs["grpc_raw"]), 1),
        "tcp_raw_MBps": round(max(runs["tcp_raw"]), 1),
        "upload_median_MBps": round(sorted(runs["upload"])[len(runs["upload"]) // 2], 1),
        # the same upload over mutual TLS, measured in the same runs (interleaved with the plaintext ones)
        "upload_tls_MBps": round(max(runs["upload_tls"]), 1),
        "upload_tls_median_MBps": round(sorted(runs["upload_tls"])[len(runs["upload_tls"]) // 2], 1),
        "tls_cost_fraction": round(1 - max(runs["upload_tls"]) / max(runs["upload"]), 3),
        # the satellite side alone: OfferUpdate reply to the commit acknowledgement (receive, verify, store, commit)
        "push_and_commit_MBps": round(max(size / p["push_and_commit_s"] for p in phases) / 1e6, 1),
        "runs_MBps": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "upload_phases": phases,
        "bytes": size,
        "chunk_bytes": chunk,
        "repeat": repeat,
        "page_cache_write_MBps": round(page_cache_MBps, 1),
        "load_avg_1m_at_start": load_start,
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "note": "best of `repeat` runs (median also given); MB = 1e6 bytes; upload includes serialise, hash,"
        " verify and fsync; the client and the server share the machine's cores (and with other jobs: see the"
        " load averages); page_cache_write_MBps is this machine's rate of writing into fresh page cache, which"
        " the durable store of every upload pays; upload_tls is the same upload over mutual TLS (ECDSA P-256),"
        " interleaved with the plaintext runs, so both see the same load; tls_cost_fraction compares the bests",
    }


# goodput over a limited link with one hard cut (network namespaces)

SAT_ADDR, GND_ADDR = "10.213.78.1", "10.213.78.2"  # a /30 of its own (tests/orbit uses 10.213.77.0/30)
SAT_PORT, METRICS_PORT = 50061, 9461
LINK_TOPOLOGY = f"""
strategy: emsfl
clusters:
  - {{id: c0, capacity_experts: {EXPERTS}}}
satellite: {{keep_versions: 1}}
"""
# chunks the uploader sends ahead of the satellite's answers (PushChunksWindowed), as the ground uplink does
SEND_WINDOW_CHUNKS = 1
SHAPING = "tbf (no sch_netem in this kernel)"


class NetnsUnavailable(RuntimeError):
    """Network namespaces, veth or tbf cannot be set up here."""


def _sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


class NetnsLink:
    """Namespaces `sat` and `gnd` joined by a veth pair whose ends both send at most `mbit` (tbf); `cut()` and
    `restore()` take the ground end down and up (a hard cut: no FIN, no RST, packets just stop)."""

    def __init__(self, mbit: float) -> None:
        tag = uuid.uuid4().hex[:6]
        self.sat, self.gnd = f"emsfl-bsat-{tag}", f"emsfl-bgnd-{tag}"
        self.sat_dev, self.gnd_dev = f"vs{tag}", f"vg{tag}"
        self.mbit = mbit

    def __enter__(self) -> NetnsLink:
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise NetnsUnavailable("iproute2 (ip, tc) is not installed")
        for ns in (self.sat, self.gnd):
            r = _sh("ip", "netns", "add", ns)
            if r.returncode != 0:
                self.__exit__()
                raise NetnsUnavailable(f"cannot create network namespaces: {r.stderr.strip()}")
        rate = f"{self.mbit}mbit"
        steps = [
            ("ip", "link", "add", self.sat_dev, "netns", self.sat, "type", "veth", "peer", "name", self.gnd_dev,
             "netns", self.gnd),
            ("ip", "-n", self.sat, "addr", "add", f"{SAT_ADDR}/30", "dev", self.sat_dev),
            ("ip", "-n", self.gnd, "addr", "add", f"{GND_ADDR}/30", "dev", self.gnd_dev),
            ("ip", "-n", self.sat, "link", "set", "lo", "up"),
            ("ip", "-n", self.gnd, "link", "set", "lo", "up"),
            ("ip", "-n", self.sat, "link", "set", self.sat_dev, "up"),
            ("ip", "-n", self.gnd, "link", "set", self.gnd_dev, "up"),
            ("tc", "-n", self.sat, "qdisc", "add", "dev", self.sat_dev, "root", "tbf", "rate", rate, "burst", "32kb",
             "latency", "50ms"),
            ("tc", "-n", self.gnd, "qdisc", "add", "dev", self.gnd_dev, "root", "tbf", "rate", rate, "burst", "32kb",
             "latency", "50ms"),
        ]  # fmt: skip
        for step in steps:
            r = _sh(*step)
            if r.returncode != 0:
                self.__exit__()
                raise NetnsUnavailable(f"{' '.join(step)}: {r.stderr.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.sat, self.gnd):
            _sh("ip", "netns", "del", ns)

    def exec_in(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def cut(self) -> None:
        _sh("ip", "-n", self.gnd, "link", "set", self.gnd_dev, "down")

    def restore(self) -> None:
        _sh("ip", "-n", self.gnd, "link", "set", self.gnd_dev, "up")

    def uplink_bytes(self) -> int:
        """Bytes the ground end has sent (tc counter, headers and retransmissions included)."""
        out = _sh("tc", "-n", self.gnd, "-s", "qdisc", "show", "dev", self.gnd_dev).stdout
        words = out.split()
        return int(words[words.index("Sent") + 1]) if "Sent" in words else 0


def sat_side(workdir: Path) -> None:
    """In the satellite namespace: an MQTT broker, a stand-in orbit service that holds c0's link up, and the real
    satellite node process; on SIGTERM, write the node's chunk counters and stop them all."""
    import urllib.request

    from satellite_node.testing import OrbitStub, SatelliteProcess
    from testbed.broker import BrokerProcess

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with BrokerProcess("auto") as broker:
        orbit = OrbitStub(broker.host, broker.port).start()
        orbit.set_link("c0", True)
        extra = ["--insecure", "--metrics-port", str(METRICS_PORT)]
        sat = SatelliteProcess(
            workdir / "sat", (broker.host, broker.port), LINK_TOPOLOGY, SAT_PORT, extra, workdir / "base", "0.0.0.0"
        )
        try:
            sat.start()
            (workdir / "sat-ready").write_text("ready", encoding="utf-8")
            stop.wait()
            text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
            (workdir / "sat-metrics.json").write_text(json.dumps(_counters(text)), encoding="utf-8")
        finally:
            sat.kill()
            orbit.stop()


def _counters(text: str) -> dict[str, float]:
    """The satellite's chunk, byte and upload counters (summed over clusters) from its /metrics text."""
    wanted = {
        "emsfl_satellite_chunks_received_total": "chunks_received",
        "emsfl_satellite_chunks_resent_total": "chunks_resent",
        "emsfl_satellite_bytes_received_total": "bytes_received",
        "emsfl_satellite_uploads_committed_total": "uploads_committed",
    }
    out = dict.fromkeys(wanted.values(), 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in wanted:
            out[wanted[name]] += float(line.rsplit(" ", 1)[1])
    return out


def uploader(workdir: Path, target: str, mib: int, seed: int) -> None:
    """In the ground namespace: join, report, take the assignment, then upload one update until it is committed,
    resuming through OfferUpdate (which answers with the missing chunks) after any failure. Writes its record."""
    import grpc
    import numpy as np

    from protos.emsfl.v1 import federation_pb2 as pb
    from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
    from protos.wire import CLUSTER_METADATA_KEY

    md = ((CLUSTER_METADATA_KEY, "c0"),)
    channel = open_channel(target, None)  # the ground uplink's settings (emsfl/runtime/channel.py)
    stub = pb_grpc.FederationStub(channel)
    push = push_windowed_call(channel)
    stub.Join(pb.JoinRequest(device_id="bench", capacity_experts=EXPERTS, num_examples=1), metadata=md, timeout=30)
    gate = np.ones(EXPERTS, dtype=np.float32).tolist()
    stub.ReportAffinity(pb.AffinityReport(num_tokens=1, num_layers=1, num_experts=EXPERTS, gate=gate), metadata=md)
    while not stub.GetAssignment(pb.AssignmentRequest(), metadata=md, timeout=30).ready:
        time.sleep(0.2)
    tensors = make_tensors(mib, seed)
    with ThreadPoolExecutor(max_workers=2) as pool:
        s = serialise_and_hash(tensors, 1 << 20, pool)
    offer = offer_message(s, tensors)
    record: dict[str, Any] = {"bytes": len(s.blob), "chunks": len(s.chunk_hashes), "pushed": 0, "events": []}

    def event(kind: str, **fields: Any) -> None:
        record["events"].append({"kind": kind, "wall": time.time(), **fields})

    def stream(missing: list[int]) -> Iterator[bytes]:
        for i in missing:
            record["pushed"] += 1
            yield chunk_message(s, i)

    record["start_wall"] = time.time()
    (workdir / f"pushing-{seed}").write_text("pushing", encoding="utf-8")
    while True:
        try:
            reply = stub.OfferUpdate(offer, metadata=md, timeout=5)
            event("offer", missing=len(reply.missing), committed=reply.committed)
            if reply.committed:
                break
            pushed = push_windowed(push, stream(list(reply.missing)), SEND_WINDOW_CHUNKS, metadata=md, timeout=600)
            if pushed.committed:
                break
        except grpc.RpcError as exc:
            event("error", code=exc.code().name if hasattr(exc, "code") else "?")
            time.sleep(0.2)
    record["committed_wall"] = time.time()
    channel.close()
    (workdir / f"upload-{seed}.json").write_text(json.dumps(record), encoding="utf-8")


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before writing {path.name}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} did not appear within {timeout_s:.0f} s")
        time.sleep(0.05)


def _one_upload(link: NetnsLink, workdir: Path, mib: int, seed: int, cut_s: float) -> dict[str, Any]:
    """Run the uploader once; with `cut_s`, cut the link for that long once half the update has gone out."""
    argv = [*link.exec_in(link.gnd), sys.executable, __file__, "--uploader", str(workdir), f"{SAT_ADDR}:{SAT_PORT}"]
    proc = subprocess.Popen([*argv, str(mib), str(seed)], cwd=ROOT)
    cut: dict[str, float] = {}
    try:
        _wait_file(workdir / f"pushing-{seed}", proc, 120)
        sent0 = link.uplink_bytes()
        if cut_s > 0:
            while link.uplink_bytes() - sent0 < mib * (1 << 20) / 2 and proc.poll() is None:
                time.sleep(0.05)
            cut["down_wall"] = time.time()
            link.cut()
            time.sleep(cut_s)
            link.restore()
            cut["up_wall"] = time.time()
        if proc.wait(timeout=600) != 0:
            raise RuntimeError(f"uploader exited with {proc.returncode}")
        wire_bytes = link.uplink_bytes() - sent0
    finally:
        if proc.poll() is None:
            proc.kill()
    record = json.loads((workdir / f"upload-{seed}.json").read_text(encoding="utf-8"))
    return _link_figures(record, cut, wire_bytes, link.mbit)


def _link_figures(record: dict[str, Any], cut: dict[str, float], wire_bytes: int, mbit: float) -> dict[str, Any]:
    transfer_s = record["committed_wall"] - record["start_wall"]
    down_s = cut["up_wall"] - cut["down_wall"] if cut else 0.0
    up_s = transfer_s - down_s
    t0 = record["start_wall"]
    events = _compact(record["events"], t0)
    out: dict[str, Any] = {
        "payload_bytes": record["bytes"],
        "chunks": record["chunks"],
        "chunks_pushed": record["pushed"],
        "resent_chunks": record["pushed"] - record["chunks"],
        "transfer_s": round(transfer_s, 3),
        "link_down_s": round(down_s, 3),
        "link_up_s": round(up_s, 3),
        "goodput_fraction": round(record["bytes"] / (mbit * 1e6 / 8 * up_s), 3),
        "wire_bytes": wire_bytes,
        "events": events,
    }
    if cut:
        out["cut_at_s"] = round(cut["down_wall"] - t0, 3)
        out["restored_at_s"] = round(cut["up_wall"] - t0, 3)
    return out


def _compact(events: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    """Events in seconds from `t0`; a run of failed calls with one code becomes one entry with a count."""
    out: list[dict[str, Any]] = []
    for e in events:
        t_s = round(e["wall"] - t0, 3)
        last = out[-1] if out else None
        if e["kind"] == "error" and last is not None and last["kind"] == "errors" and last["code"] == e["code"]:
            last["count"] += 1
            last["last_t_s"] = t_s
        elif e["kind"] == "error":
            out.append({"kind": "errors", "code": e["code"], "count": 1, "t_s": t_s, "last_t_s": t_s})
        else:
            out.append({**{k: v for k, v in e.items() if k != "wall"}, "t_s": t_s})
    return out


def run_link(mib: int, mbit: float, cut_s: float) -> dict[str, Any]:
    """An upload without a cut, then one with a cut of `cut_s`, through the real satellite over a `mbit` link."""
    if os.geteuid() != 0:
        return {"link_skipped": "needs root (network namespaces, veth and tc)"}
    load_start = round(os.getloadavg()[0], 2)
    try:
        with NetnsLink(mbit) as link, tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
            workdir = Path(tmp)
            write_base(workdir / "base", mib)
            argv = [*link.exec_in(link.sat), sys.executable, __file__, "--sat-side", str(workdir)]
            sat = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
            try:
                _wait_file(workdir / "sat-ready", sat, 60)
                clean = _one_upload(link, workdir, mib, seed=1, cut_s=0)
                print(f"link, no cut: goodput {clean['goodput_fraction']}", flush=True)
                one_cut = _one_upload(link, workdir, mib, seed=2, cut_s=cut_s)
                print(f"link, one cut: goodput {one_cut['goodput_fraction']}, resent {one_cut['resent_chunks']}")
                sat.send_signal(signal.SIGTERM)
                sat.wait(timeout=60)
                counters = json.loads((workdir / "sat-metrics.json").read_text(encoding="utf-8"))
            finally:
                if sat.poll() is None:
                    os.killpg(sat.pid, signal.SIGKILL)
                    sat.wait()
    except NetnsUnavailable as exc:
        return {"link_skipped": str(exc)}
    return {
        "goodput_fraction": one_cut["goodput_fraction"],
        "resent_chunks_per_cut": one_cut["resent_chunks"],
        "link_shaping": SHAPING,
        "link_rate_Mbps": mbit,
        "link_cut_s": cut_s,
        "send_window_chunks": SEND_WINDOW_CHUNKS,
        "link_no_cut": clean,
        "link_one_cut": one_cut,
        "satellite_counters": counters,
        "link_load_avg_1m_at_start": load_start,
        "link_load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "link_note": "goodput_fraction = payload bytes / (link rate x seconds the link was up between the first"
        " OfferUpdate and the commit acknowledgement); resent_chunks_per_cut = chunk messages the uploader pushed"
        " beyond the update's chunk count (PushChunksWindowed with send_window_chunks unanswered at most);"
        " satellite_counters cover both uploads",
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--chunk-mib", type=float, default=1.0)
    parser.add_argument("--link-mib", type=int, default=96, help="update size for the link run (~16 s at 50)")
    parser.add_argument("--link-mbit", type=float, default=50.0)
    parser.add_argument("--cut-s", type=float, default=6.0)
    parser.add_argument("--no-link", action="store_true", help="skip the network namespace run")
    parser.add_argument("--no-throughput", action="store_true", help="skip the loopback throughput run")
    parser.add_argument("--serve", nargs=2, metavar=("WORKDIR", "PORTFILE"), help=argparse.SUPPRESS)
    parser.add_argument("--sat-side", metavar="WORKDIR", help=argparse.SUPPRESS)
    parser.add_argument("--uploader", nargs=4, metavar=("WORKDIR", "TARGET", "MIB", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return 0
    if args.sat_side:
        sat_side(Path(args.sat_side))
        return 0
    if args.uploader:
        workdir, target, mib, seed = args.uploader
        uploader(Path(workdir), target, int(mib), int(seed))
        return 0
    result: dict[str, Any] = {}
    if (args.no_throughput or args.no_link) and RESULT.exists():  # a partial run keeps the other part's figures
        result = json.loads(RESULT.read_text(encoding="utf-8"))
    result["machine"] = machine_info()
    if not args.no_throughput:
        result.update(run_throughput(args.mib, args.repeat, int(args.chunk_mib * (1 << 20))))
    if not args.no_link:
        result.update(run_link(args.link_mib, args.link_mbit, args.cut_s))
    write_result(RESULT, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
