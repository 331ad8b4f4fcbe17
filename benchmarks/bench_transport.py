"""Upload throughput of the satellite node against the bare transports, measured in the same run.

- `upload_MBps`: end to end, a 256 MiB update over loopback: serialise (safetensors), chunk, hash (content and
  chunk SHA-256), OfferUpdate, PushChunks over gRPC, server-side verification (chunk hashes, content hash,
  safetensors layout, names, shapes, dtypes, finite values, ownership), durable store (fsync) and commit;
- `grpc_raw_MBps`: the same bytes streamed over bare gRPC (1 MiB messages, no protobuf, the server drops them);
- `tcp_raw_MBps`: the same bytes over a raw TCP socket.
The servers run in a separate process (their own GIL), as the satellite does. MB = 10^6 bytes.
Writes `benchmarks/results/transport.json`.

Run: `.venv/bin/python benchmarks/bench_transport.py [--mib 256] [--repeat 3] [--chunk-mib 1]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "transport.json"
EXPERTS = 16  # one layer; each expert carries two parts of (mib / 32) MiB each
OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _write_base(base: Path, mib: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from satellite_node.manifest import file_sha256

    base.mkdir(parents=True, exist_ok=True)
    save_file({"shared/embed_tokens.weight": np.zeros((4, 4), np.float32)}, str(base / "base.safetensors"))
    rows = mib * (1 << 20) // (EXPERTS * 2 * 4 * 1024)  # float32 rows of 1024 per part
    parts = [{"name": p, "dtype": "F32", "shape": [rows, 1024]} for p in ("down_proj", "gate_up_proj")]
    manifest = {
        "family": "bench",
        "num_layers": 1,
        "num_experts": EXPERTS,
        "top_k": 2,
        "tune": "full",
        "base_hash": file_sha256(base / "base.safetensors"),
        "expert_parts": parts,
    }
    (base / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


# server process


def _serve(workdir: Path, portfile: Path) -> None:
    import grpc
    import numpy as np

    from satellite_node.manifest import load_manifest
    from satellite_node.node import NodeConfig, SatelliteNode
    from satellite_node.server import make_server
    from satellite_node.store import Store
    from satellite_node.testing import FakeLinks

    base = workdir / "base"
    store = Store(workdir / "state")
    node = SatelliteNode(
        store, load_manifest(base), str(base), NodeConfig({"c0": EXPERTS}, max_update_bytes=8 << 30), FakeLinks()
    )
    node.join("c0", "bench", EXPERTS, 1)
    node.report_affinity("c0", 1, 1, EXPERTS, np.ones(EXPERTS), [])
    server, port = make_server(node, "127.0.0.1:0")

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
    tcp_port = listener.getsockname()[1]

    def tcp_sink() -> None:
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

    threading.Thread(target=tcp_sink, daemon=True).start()
    server.start()
    raw.start()
    portfile.write_text(json.dumps({"upload": port, "grpc": raw_port, "tcp": tcp_port}), encoding="utf-8")
    threading.Event().wait()


# client


def _tensors(mib: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = mib * (1 << 20) // (EXPERTS * 2 * 4 * 1024)
    return {
        f"expert/0/{e}/{p}": rng.standard_normal((rows, 1024), dtype=np.float32)
        for e in range(EXPERTS)
        for p in ("down_proj", "gate_up_proj")
    }


def encode_safetensors(tensors: dict[str, Any], pool: ThreadPoolExecutor) -> bytearray:
    """A safetensors blob written with one copy per tensor (straight into the output buffer, in parallel threads);
    `safetensors.numpy.save` copies twice. Same format: any safetensors reader loads it."""
    import numpy as np

    from satellite_node.manifest import dtype_name

    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        array = tensors[name]
        header[name] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
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


def _hashes(blob: bytes | bytearray, chunk: int, pool: ThreadPoolExecutor) -> tuple[str, list[str]]:
    """Content hash and chunk hashes, in parallel threads (hashlib releases the GIL)."""
    view = memoryview(blob)
    whole = pool.submit(lambda: hashlib.sha256(view).hexdigest())
    chunks = list(pool.map(lambda i: hashlib.sha256(view[i : i + chunk]).hexdigest(), range(0, len(blob), chunk)))
    return whole.result(), chunks


def _upload(
    target: str, tensors: dict[str, Any], chunk: int, pool: ThreadPoolExecutor
) -> tuple[float, int, dict[str, float]]:
    import grpc

    from protos.emsfl.v1 import federation_pb2 as pb
    from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
    from protos.wire import CLUSTER_METADATA_KEY

    md = ((CLUSTER_METADATA_KEY, "c0"),)
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        stub = pb_grpc.FederationStub(channel)
        stub.GetStatus(pb.StatusRequest(), metadata=md)  # connected before the clock starts
        started = time.perf_counter()
        blob = encode_safetensors(tensors, pool)
        serialised = time.perf_counter()
        content_hash, hashes = _hashes(blob, chunk, pool)
        hashed = time.perf_counter()
        specs = [pb.TensorSpec(name=n, dtype="F32", shape=list(a.shape)) for n, a in tensors.items()]
        offer = pb.UpdateOffer(
            content_hash=content_hash,
            size_bytes=len(blob),
            chunk_size=chunk,
            chunk_hashes=hashes,
            tensors=specs,
            assignment_version=1,
        )
        reply = stub.OfferUpdate(offer, metadata=md)
        offered = time.perf_counter()
        view = memoryview(blob)
        total = len(hashes)

        def gen() -> Iterator[Any]:
            for i in reply.missing:
                yield pb.Chunk(
                    content_hash=content_hash,
                    index=i,
                    total_chunks=total,
                    total_size=len(blob),
                    data=bytes(view[i * chunk : (i + 1) * chunk]),
                    sha256=hashes[i],
                )

        result = stub.PushChunks(gen(), metadata=md)
        done = time.perf_counter()
        if not result.committed:
            raise RuntimeError(f"upload not committed: missing {list(result.missing)[:5]}")
        phases = {
            "serialise_s": serialised - started,
            "hash_s": hashed - serialised,
            "offer_s": offered - hashed,
            "push_and_commit_s": done - offered,
        }
        return done - started, len(blob), phases


def _grpc_raw(target: str, blob: bytes | bytearray, chunk: int) -> float:
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


def _tcp_raw(port: int, blob: bytes | bytearray) -> float:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(len(blob).to_bytes(8, "little"))
        sock.sendall(memoryview(blob))
        got = int.from_bytes(sock.recv(8, socket.MSG_WAITALL), "little")
        elapsed = time.perf_counter() - started
    assert got == len(blob)
    return elapsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-mib", type=float, default=1.0)
    parser.add_argument("--serve", nargs=2, metavar=("WORKDIR", "PORTFILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(Path(args.serve[0]), Path(args.serve[1]))
        return 0
    chunk = int(args.chunk_mib * (1 << 20))
    with tempfile.TemporaryDirectory(prefix="bench-transport-", dir=os.environ.get("BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        _write_base(workdir / "base", args.mib)
        portfile = workdir / "ports.json"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(workdir), str(portfile)], cwd=ROOT)
        try:
            deadline = time.monotonic() + 60
            while not portfile.exists() or not portfile.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("benchmark server did not start")
                time.sleep(0.1)
            ports = json.loads(portfile.read_text())
            runs: dict[str, list[float]] = {"upload": [], "grpc_raw": [], "tcp_raw": []}
            phases: list[dict[str, float]] = []
            size = 0
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
                for r in range(args.repeat):
                    tensors = _tensors(args.mib, seed=r)  # a fresh update each time: nothing is deduplicated
                    elapsed, size, phase = _upload(f"127.0.0.1:{ports['upload']}", tensors, chunk, pool)
                    runs["upload"].append(size / elapsed / 1e6)
                    phases.append({k: round(v, 3) for k, v in phase.items()})
                    blob = encode_safetensors(tensors, pool)
                    del tensors
                    runs["grpc_raw"].append(len(blob) / _grpc_raw(f"127.0.0.1:{ports['grpc']}", blob, chunk) / 1e6)
                    runs["tcp_raw"].append(len(blob) / _tcp_raw(ports["tcp"], blob) / 1e6)
                    del blob
                    print(
                        f"run {r}: " + ", ".join(f"{k} {v[-1]:.0f} MB/s" for k, v in runs.items()) + f" {phases[-1]}",
                        flush=True,
                    )
        finally:
            server.kill()
            server.wait()
    result = {
        "upload_MBps": round(max(runs["upload"]), 1),
        "grpc_raw_MBps": round(max(runs["grpc_raw"]), 1),
        "tcp_raw_MBps": round(max(runs["tcp_raw"]), 1),
        "runs_MBps": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "upload_phases": phases,
        "bytes": size,
        "chunk_bytes": chunk,
        "repeat": args.repeat,
        "note": "best of `repeat` runs; MB = 1e6 bytes; upload includes serialise, hash, verify and fsync",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
