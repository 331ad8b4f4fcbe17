"""The one Federation client: the ground agent's uplink, a gateway's uplink, a device's link to its gateway, the
baselines, the tests' client and the load generator all talk through it (channel settings: emsfl/runtime/channel.py).

Identity: under mutual TLS the server reads it from the client certificate and nothing else; on a plaintext
loopback lab the `emsfl-cluster` (and, to a gateway, `emsfl-device`) metadata says it. The metadata is sent either
way: a TLS server ignores it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from safetensors.numpy import load as st_load

from emsfl.runtime.channel import open_channel
from emsfl.runtime.tls import TlsFiles
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import CHUNK_SIZE, CLUSTER_METADATA_KEY, chunk_hashes, chunk_messages, sha256_hex

M = TypeVar("M")
# how often a sender blocked on the window checks whether the call already ended
_POLL_S = 0.5


def push_windowed(
    call: Callable[..., Iterator[pb.PushProgress]], messages: Iterable[M], window: int, **kwargs: Any
) -> pb.PushReply:
    """Stream `messages` through `call` (a stub's PushChunksWindowed, or a generic stream-stream callable whose
    responses are PushProgress) keeping at most `window` unanswered; returns the final reply.

    The server answers a chunk once it has taken it in, and keeps what it took in when the link is cut, so a hard
    cut costs at most `window` chunks sent again. Each answer takes a round trip: on a link whose rate x round-trip
    time approaches a chunk, a window of 1 idles the link between chunks, and a larger window buys goodput with
    resends. gRPC errors propagate as `grpc.RpcError` from the call, as with PushChunks."""
    if window < 1:
        raise ValueError(f"window: {window}, expected at least 1 chunk")
    slots = threading.Semaphore(window)
    ended = threading.Event()

    def send() -> Iterator[M]:
        pending = iter(messages)
        while True:
            # a slot first, then the message: a message is taken from `messages` only when it can go out
            while not slots.acquire(timeout=_POLL_S):
                if ended.is_set():  # the call failed: gRPC's sending thread must not stay blocked here
                    return
            message = next(pending, None)
            if message is None:
                return
            yield message

    try:
        for progress in call(send(), **kwargs):
            if progress.HasField("reply"):
                return progress.reply
            slots.release()
    finally:
        ended.set()
    raise RuntimeError("PushChunksWindowed ended without its reply")


DEVICE_METADATA_KEY = "emsfl-device"  # a device's id, to its gateway (plaintext labs; its certificate under TLS)


class TransferError(ValueError):
    """A pulled chunk out of order or corrupt, or a blob that does not match its content hash."""


def tensor_specs(tensors: Mapping[str, np.ndarray]) -> list[pb.TensorSpec]:
    return [
        pb.TensorSpec(name=n, dtype="F32" if a.dtype == np.float32 else str(a.dtype).upper(), shape=list(a.shape))
        for n, a in sorted(tensors.items())
    ]


def offer_message(
    blob: bytes,
    tensors: Sequence[pb.TensorSpec],
    assignment_version: int,
    chunk_size: int = CHUNK_SIZE,
    local_step: int = 0,
    base_version: int = 0,
    hashes: Sequence[str] | None = None,
    content_hash: str | None = None,
) -> pb.UpdateOffer:
    return pb.UpdateOffer(
        content_hash=content_hash or sha256_hex(blob),
        size_bytes=len(blob),
        chunk_size=chunk_size,
        chunk_hashes=list(hashes) if hashes is not None else chunk_hashes(blob, chunk_size),
        tensors=list(tensors),
        assignment_version=assignment_version,
        local_step=local_step,
        base_version=base_version,
    )


class ResumablePull:
    """A `PullTensors` download that survives cuts: the chunks received stay, and the next `fetch` of the same names
    asks only for the rest of the same blob (the server starts over, and so does this, when its blob changed).

    Without it a pull longer than a contact would restart at every pass and never finish."""

    def __init__(self) -> None:
        self.content_hash = ""
        self.parts: list[bytes] = []

    def fetch(
        self,
        stub: Any,
        metadata: Any,
        names: list[str],
        timeout: float,
        on_bytes: Callable[[int], None] | None = None,
    ) -> dict[str, np.ndarray] | None:
        """The tensors, or None when the stream ended before the last chunk; every chunk and the whole blob are
        checked against their hashes. A cut raises (grpc.RpcError) and keeps what arrived for the next call."""
        request = pb.PullRequest(
            names=names, resume_hash=self.content_hash, from_index=len(self.parts) if self.content_hash else 0
        )
        total = -1
        for chunk in stub.PullTensors(request, metadata=metadata, timeout=timeout):
            if chunk.content_hash != self.content_hash or chunk.index == 0:
                self.content_hash, self.parts = chunk.content_hash, []  # a new blob: start over
            if chunk.index != len(self.parts) or sha256_hex(chunk.data) != chunk.sha256:
                self.content_hash, self.parts = "", []
                raise TransferError(f"pull: chunk {chunk.index} out of order or corrupt")
            self.parts.append(bytes(chunk.data))
            if on_bytes is not None:
                on_bytes(len(chunk.data))
            total = int(chunk.total_chunks)
        if total < 0 or len(self.parts) != total:
            return None
        blob = b"".join(self.parts)
        digest, self.content_hash, self.parts = self.content_hash, "", []
        if sha256_hex(blob) != digest:
            raise TransferError("pull: the assembled blob does not match its content hash")
        return dict(st_load(blob))


class FederationClient:
    """Federation calls of one cluster (or, with `device`, one device of a cluster to its gateway)."""

    def __init__(
        self,
        target: str,
        cluster: str,
        tls: TlsFiles | None = None,
        device: str | None = None,
        server_name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.target = target
        self.cluster = cluster
        self.channel = open_channel(target, tls, server_name=server_name)
        self.stub = pb_grpc.FederationStub(self.channel)
        md = [(CLUSTER_METADATA_KEY, cluster)]
        if device is not None:
            md.append((DEVICE_METADATA_KEY, device))
        self.metadata: tuple[tuple[str, str], ...] = tuple(md)
        self.timeout_s = timeout_s  # per unary call; None: no deadline
        self.bytes_sent = 0  # chunk payload pushed
        self.bytes_pulled = 0

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def close(self) -> None:
        self.channel.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    # ---- unary calls ------------------------------------------------------------------------------

    def join(
        self,
        capacity: int,
        num_examples: int,
        device_id: str = "dev0",
        capabilities: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> pb.JoinReply:
        request = pb.JoinRequest(
            device_id=device_id,
            capacity_experts=capacity,
            num_examples=num_examples,
            capabilities=dict(capabilities or {}),
        )
        reply: Any = self.stub.Join(request, metadata=self.metadata, timeout=self._timeout(timeout_s))
        return reply  # type: ignore[no-any-return]

    def report_affinity(
        self, gate: np.ndarray, freq: np.ndarray | None = None, num_tokens: int = 100, timeout_s: float | None = None
    ) -> pb.AffinityAck:
        layers, experts = gate.shape
        request = pb.AffinityReport(
            num_tokens=num_tokens,
            num_layers=layers,
            num_experts=experts,
            gate=[float(x) for x in gate.reshape(-1)],
            freq=[] if freq is None else [float(x) for x in freq.reshape(-1)],
        )
        reply: Any = self.stub.ReportAffinity(request, metadata=self.metadata, timeout=self._timeout(timeout_s))
        return reply  # type: ignore[no-any-return]

    def report(self, gate: np.ndarray, num_tokens: int = 100) -> pb.AffinityAck:
        return self.report_affinity(gate, num_tokens=num_tokens)

    def assignment(self, timeout_s: float | None = None) -> pb.Assignment:
        reply: Any = self.stub.GetAssignment(
            pb.AssignmentRequest(), metadata=self.metadata, timeout=self._timeout(timeout_s)
        )
        return reply  # type: ignore[no-any-return]

    def reassign(self, reason: str = "", timeout_s: float | None = None) -> pb.Assignment:
        reply: Any = self.stub.RequestReassignment(
            pb.ReassignRequest(reason=reason), metadata=self.metadata, timeout=self._timeout(timeout_s)
        )
        return reply  # type: ignore[no-any-return]

    def status(self, timeout_s: float | None = None) -> pb.StatusReply:
        reply: Any = self.stub.GetStatus(pb.StatusRequest(), metadata=self.metadata, timeout=self._timeout(timeout_s))
        return reply  # type: ignore[no-any-return]

    def send_offer(self, offer: pb.UpdateOffer, timeout_s: float | None = None) -> pb.OfferReply:
        reply: Any = self.stub.OfferUpdate(offer, metadata=self.metadata, timeout=self._timeout(timeout_s))
        return reply  # type: ignore[no-any-return]

    def offer(
        self,
        blob: bytes,
        tensors: Mapping[str, np.ndarray],
        version: int,
        chunk_size: int = CHUNK_SIZE,
        base_version: int = 0,
        local_step: int = 0,
    ) -> pb.OfferReply:
        """Offer `blob` (the safetensors of `tensors`) for assignment `version`."""
        return self.send_offer(
            offer_message(blob, tensor_specs(tensors), version, chunk_size, local_step, base_version)
        )

    # ---- streams --------------------------------------------------------------------------------

    def _chunks(
        self,
        blob: bytes,
        indices: Sequence[int],
        chunk_size: int,
        hashes: Sequence[str] | None,
        content_hash: str | None,
        on_chunk: Callable[[int], None] | None,
    ) -> Iterator[pb.Chunk]:
        for message in chunk_messages(blob, indices, chunk_size, hashes=hashes, content_hash=content_hash):
            self.bytes_sent += len(message.data)
            if on_chunk is not None:
                on_chunk(len(message.data))
            yield message

    def push(
        self,
        blob: bytes,
        indices: Sequence[int],
        chunk_size: int = CHUNK_SIZE,
        hashes: Sequence[str] | None = None,
        content_hash: str | None = None,
        timeout_s: float | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> pb.PushReply:
        """PushChunks of the chunks of `blob` at `indices` (a gateway takes these from its devices)."""
        messages = self._chunks(blob, indices, chunk_size, hashes, content_hash, on_chunk)
        reply: Any = self.stub.PushChunks(messages, metadata=self.metadata, timeout=self._timeout(timeout_s))
        return reply  # type: ignore[no-any-return]

    def push_windowed(
        self,
        blob: bytes,
        indices: Sequence[int],
        chunk_size: int = CHUNK_SIZE,
        window: int = 1,
        hashes: Sequence[str] | None = None,
        content_hash: str | None = None,
        timeout_s: float | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> pb.PushReply:
        """PushChunksWindowed (`push_windowed` above): at most `window` chunks unanswered, so a hard cut resends at
        most that many."""
        messages = self._chunks(blob, indices, chunk_size, hashes, content_hash, on_chunk)
        return push_windowed(
            self.stub.PushChunksWindowed,
            messages,
            window,
            metadata=self.metadata,
            timeout=self._timeout(timeout_s),
        )

    def push_missing(
        self,
        blob: bytes,
        offer: pb.UpdateOffer,
        missing: Sequence[int],
        window: int | None = None,
        timeout_s: float | None = None,
        on_chunk: Callable[[int], None] | None = None,
    ) -> pb.PushReply:
        """Push the chunks of offered `blob` the server said it lacks (windowed when `window`)."""
        args = (blob, missing, offer.chunk_size)
        kwargs: dict[str, Any] = {
            "hashes": list(offer.chunk_hashes),
            "content_hash": offer.content_hash,
            "timeout_s": timeout_s,
            "on_chunk": on_chunk,
        }
        if window is None:
            return self.push(*args, **kwargs)
        return self.push_windowed(*args, window=window, **kwargs)

    def upload(
        self,
        blob: bytes,
        offer: pb.UpdateOffer,
        window: int | None = None,
        timeout_s: float | None = None,
        push_timeout_s: float | None = None,
    ) -> pb.PushReply:
        """Offer, then push only what the server lacks (windowed when `window`); the reply says if it committed."""
        reply = self.send_offer(offer, timeout_s)
        if reply.committed:
            return pb.PushReply(committed=True)
        return self.push_missing(blob, offer, sorted(set(reply.missing)), window, push_timeout_s)

    def pull_tensors(
        self, names: list[str], timeout_s: float | None = None, puller: ResumablePull | None = None
    ) -> dict[str, np.ndarray] | None:
        """The tensors `names` select (a resumable pull: `puller` keeps a cut pull's chunks); None when the stream
        ended early."""
        return (puller or ResumablePull()).fetch(
            self.stub, self.metadata, names, self._timeout(timeout_s) or 60.0, self._count_pulled
        )

    def pull(self, names: list[str]) -> bytes:
        """The raw blob `names` select, unchecked (tests look at what the server sends)."""
        parts = [c.data for c in self.stub.PullTensors(pb.PullRequest(names=names), metadata=self.metadata)]
        return b"".join(parts)

    def _count_pulled(self, nbytes: int) -> None:
        self.bytes_pulled += nbytes
