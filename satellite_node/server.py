"""gRPC adapter: the `Federation` service (protos/emsfl/v1/federation.proto) around `SatelliteNode`.

Every call is admitted by the node (identity, link gate); an upload then goes to the node's upload service
(`uploads.py`: `OfferUpdate` -> `Uploads.offer`, `PushChunks*` -> `Uploads.push`), each chunk read by the zero-copy
`decode_chunk` at the end of this file. Refusals become gRPC status codes here and nowhere else."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, NoReturn

import grpc

from emsfl.runtime.channel import add_port, new_server
from emsfl.runtime.tls import TlsFiles
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import CLUSTER_METADATA_KEY, sha256_hex
from satellite_node.node import SatelliteNode
from satellite_node.store import ExpertVersionRow
from satellite_node.uploads import ChunkIn, Offer, PushResult
from satellite_node.validate import Refusal, RefusalCode, Spec

SERVICE = "emsfl.v1.Federation"
CLUSTER_OU = "cluster"  # `emsfl pki issue --role client --cluster c0`: O=emsfl, OU=cluster, CN=c0


def cluster_of_certificate(pem: bytes) -> str | None:
    """The cluster id of a client certificate: its CN, when the OU (if any) says `cluster`. A device's certificate
    (OU `device`, `emsfl pki issue --role device`) names no cluster here: devices talk to their gateway only."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) != 1 or not isinstance(cns[0], str) or ous not in ([], [CLUSTER_OU]):
        return None
    return cns[0]


def caller_cluster(context: grpc.ServicerContext, tls: bool) -> str | None:
    """The caller's cluster: under mTLS the verified client certificate's CN, and nothing else (metadata claiming a
    cluster is ignored); on plaintext labs only, the `emsfl-cluster` metadata key."""
    if tls:
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        return cluster_of_certificate(pems[0]) if pems else None
    for key, value in context.invocation_metadata() or ():
        if key == CLUSTER_METADATA_KEY:
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return None


def _version_proto(v: ExpertVersionRow) -> pb.ExpertVersion:
    return pb.ExpertVersion(layer=v.layer, expert=v.expert, version=v.version, owner=v.owner, committed_at=v.t)


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, node: SatelliteNode, tls: bool = False) -> None:
        self.node = node
        self.uploads = node.uploads
        self.tls = tls

    def _caller(self, context: grpc.ServicerContext) -> str | None:
        return caller_cluster(context, self.tls)

    def _refuse(self, context: grpc.ServicerContext, cluster: str | None, refusal: Refusal) -> NoReturn:
        self.node.refused(cluster, refusal)
        context.abort(grpc.StatusCode[refusal.code.name], refusal.message)
        raise AssertionError("context.abort returned")  # abort always raises

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        cluster = self._caller(context)
        try:
            cluster, admitted_at = self.node.admit_at(cluster)
            self.node.join(cluster, request.device_id, request.capacity_experts, request.num_examples, admitted_at)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return pb.JoinReply(
            cluster_id=cluster,
            manifest=self.node.manifest.to_proto(),
            strategy=self.node.strategy.name,
            global_version=self.node.global_version(),
        )

    def ReportAffinity(self, request: pb.AffinityReport, context: grpc.ServicerContext) -> pb.AffinityAck:
        cluster = self._caller(context)
        try:
            cluster, admitted_at = self.node.admit_at(cluster)
            reported, expected = self.node.report_affinity(
                cluster,
                request.num_tokens,
                request.num_layers,
                request.num_experts,
                request.gate,
                request.freq,
                admitted_at,
            )
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return pb.AffinityAck(accepted=True, clusters_reported=reported, clusters_expected=expected)

    def GetAssignment(self, request: pb.AssignmentRequest, context: grpc.ServicerContext) -> pb.Assignment:
        cluster = self._caller(context)
        try:
            cluster = self.node.admit(cluster)
            ready, version, layers = self.node.assignment_for(cluster)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        handed = self.node.handed_over(cluster, version) if ready else []
        return pb.Assignment(
            ready=ready,
            version=version,
            layers=[pb.LayerExperts(layer=i, experts=es) for i, es in enumerate(layers)] if ready else [],
            handed_over=[_version_proto(v) for v in handed],
        )

    def RequestReassignment(self, request: pb.ReassignRequest, context: grpc.ServicerContext) -> pb.Assignment:
        cluster = self._caller(context)
        try:
            cluster = self.node.admit(cluster)
            version, handed = self.node.reassign(cluster, request.reason)
            ready, version, layers = self.node.assignment_for(cluster)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return pb.Assignment(
            ready=ready,
            version=version,
            layers=[pb.LayerExperts(layer=i, experts=es) for i, es in enumerate(layers)],
            handed_over=[_version_proto(v) for v in handed],
        )

    def PullTensors(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        cluster = self._caller(context)
        try:
            cluster = self.node.admit(cluster)
            blob = self.node.pull(list(request.names))
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        # Resume only when the blob is still the one the caller started on; otherwise start over.
        start = request.from_index if request.resume_hash == blob.content_hash else 0
        total = len(blob.chunks)
        for index in range(start, total):
            if not self.node.links.is_up(cluster):
                self._refuse(context, cluster, Refusal(RefusalCode.UNAVAILABLE, self.node.links.down_reason(cluster)))
            data = bytes(blob.chunks[index])
            self.node.pacer.pace(cluster, len(data))
            yield pb.Chunk(
                content_hash=blob.content_hash,
                index=index,
                total_chunks=total,
                total_size=blob.size,
                data=data,
                sha256=sha256_hex(data),
            )

    def OfferUpdate(self, request: pb.UpdateOffer, context: grpc.ServicerContext) -> pb.OfferReply:
        cluster = self._caller(context)
        try:
            cluster = self.node.admit(cluster)
            offer = Offer(
                content_hash=request.content_hash,
                size_bytes=request.size_bytes,
                chunk_size=request.chunk_size,
                chunk_hashes=tuple(request.chunk_hashes),
                tensors=tuple(Spec(t.name, t.dtype, tuple(int(d) for d in t.shape)) for t in request.tensors),
                assignment_version=request.assignment_version,
                local_step=request.local_step,
                base_version=request.base_version,
            )
            committed, missing = self.uploads.offer(cluster, offer)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return pb.OfferReply(committed=committed, missing=missing)

    def PushChunks(self, request_iterator: Iterator[ChunkIn | pb.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        cluster = self._caller(context)
        try:
            cluster = self.node.admit(cluster)
            chunks = (_chunk_in(c) for c in request_iterator)
            result = self.uploads.push(cluster, chunks)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return _push_reply(result)

    def PushChunksWindowed(
        self, request_iterator: Iterator[ChunkIn | pb.Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.PushProgress]:
        """PushChunks that answers each chunk as soon as `Uploads.push` has taken it in, which is when it asks for the
        next one; the push runs on its own thread so that this handler can stream the answers meanwhile."""
        cluster = self._caller(context)
        taken: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def chunks() -> Iterator[ChunkIn]:
            for c in request_iterator:
                chunk = _chunk_in(c)
                yield chunk
                taken.put(chunk.index)

        def push() -> PushResult:
            try:
                return self.uploads.push(self.node.admit(cluster), chunks())
            finally:
                taken.put(None)

        pushed: Future[PushResult] = Future()
        threading.Thread(target=_run_into, args=(push, pushed), name="push-windowed", daemon=True).start()
        while (index := taken.get()) is not None:
            yield pb.PushProgress(taken_index=index)
        try:
            result = pushed.result()
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        yield pb.PushProgress(reply=_push_reply(result))

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        cluster = self._caller(context)
        try:
            cluster, admitted_at = self.node.admit_at(cluster)
            status = self.node.status(admitted_at)
        except Refusal as refusal:
            self._refuse(context, cluster, refusal)
        return status_proto(status)


def _push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(
        committed=result.committed, missing=result.missing, versions=[_version_proto(v) for v in result.versions]
    )


def _run_into(fn: Callable[[], PushResult], future: Future[PushResult]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the handler thread, which refuses or re-raises it
        future.set_exception(exc)


def _chunk_in(chunk: ChunkIn | pb.Chunk) -> ChunkIn:
    """Chunks come decoded by `decode_chunk` from the server; a `pb.Chunk` when a caller drives the servicer."""
    if isinstance(chunk, ChunkIn):
        return chunk
    c = chunk
    return ChunkIn(c.content_hash, c.index, c.data, c.sha256, c.total_chunks, c.total_size)


class _HandlerCapture:
    """Stands in for a server to capture the method handlers the generated `add_FederationServicer_to_server`
    builds, so that one of them can be swapped while every other stays exactly as generated."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_federation(servicer: FederationServicer, server: grpc.Server) -> None:
    """Register the Federation service; the PushChunks calls read their chunks with the zero-copy `decode_chunk`."""
    capture = _HandlerCapture()
    pb_grpc.add_FederationServicer_to_server(servicer, capture)
    handlers = capture.handlers
    if "PushChunks" not in handlers:
        raise RuntimeError("the generated Federation stubs did not register their method handlers")
    handlers["PushChunks"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushChunks, request_deserializer=decode_chunk, response_serializer=pb.PushReply.SerializeToString
    )
    handlers["PushChunksWindowed"] = grpc.stream_stream_rpc_method_handler(
        servicer.PushChunksWindowed,
        request_deserializer=decode_chunk,
        response_serializer=pb.PushProgress.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def status_proto(status: dict[str, Any]) -> pb.StatusReply:
    return pb.StatusReply(
        strategy=status["strategy"],
        assignment_version=status["assignment_version"],
        clusters=[
            pb.ClusterStatus(
                cluster_id=c["cluster_id"],
                link_up=bool(c["link_up"]),
                joined=c["joined"],
                affinity_reported=c["affinity_reported"],
                experts_owned=c["experts_owned"],
                uploads_committed=c["uploads_committed"],
                bytes_received=c["bytes_received"],
            )
            for c in status["clusters"]
        ],
        experts=[
            pb.ExpertVersion(
                layer=e["layer"],
                expert=e["expert"],
                version=e["version"],
                owner=e["owner"],
                committed_at=e["committed_at"],
            )
            for e in status["experts"]
        ],
        emulated_now=status["emulated_now"] or "",
        global_version=status["global_version"],
        round_uploaded=status["round_uploaded"],
        assignment_history=[
            pb.AssignmentRecord(
                version=a["version"],
                committed_at=a["committed_at"] or "",
                reason=a["reason"],
                requested_by=a["requested_by"],
            )
            for a in status["assignment_history"]
        ],
    )


def make_server(
    node: SatelliteNode, listen: str, max_workers: int = 8, tls: TlsFiles | None = None
) -> tuple[grpc.Server, int]:
    """A started-later sync gRPC server on `listen`; returns it and the bound port.

    With `tls`, mutual TLS: clients must present a certificate signed by `tls.ca`, and the cluster identity is the
    certificate's CN. Without, plaintext with the identity from metadata (loopback labs only)."""
    server = new_server(max_workers, "federation")
    add_federation(FederationServicer(node, tls=tls is not None), server)
    port = add_port(server, listen, tls)
    return server, port


# The zero-copy Chunk reader of the PushChunks hot path. The generated parser copies a chunk's data twice (into the
# message, then into a new `bytes` on `.data`); at about 1 GB/s per copy that is a large share of the satellite's CPU
# during a big upload. This reader returns the data as a `memoryview` into the received message instead. It follows
# the protobuf encoding rules the generated parser follows for this message: fields in any order, the last occurrence
# of a field wins, a known field with another wire type and unknown fields are skipped, `uint32` values are truncated
# to 32 bits, strings must be UTF-8. Groups (deprecated wire types 3 and 4), which no client of this proto can
# produce, are refused like any malformed message (gRPC answers INTERNAL, as for a message the generated parser
# rejects). tests/satellite/test_satellite_chunkwire.py checks it against the generated parser.

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_FIELD = (1 << 29) - 1
# field number -> (wire type, kind) of emsfl.v1.Chunk
_FIELDS = {1: (2, "str"), 2: (0, "u32"), 3: (0, "u32"), 4: (0, "u64"), 5: (2, "bytes"), 6: (2, "str")}


class WireError(ValueError):
    """The bytes are not a well-formed Chunk message."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; at most 10 bytes, as protobuf allows."""
    value = 0
    for i in range(10):
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    raise WireError("varint longer than 10 bytes")


def _skip(buf: bytes, pos: int, wire_type: int) -> int:
    """Position after a field value of `wire_type` (for unknown fields)."""
    if wire_type == 0:
        return _varint(buf, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == 5:
        end = pos + 4
    elif wire_type == 2:
        length, pos = _varint(buf, pos)
        end = pos + length
    else:
        raise WireError(f"wire type {wire_type} not supported")
    if end > len(buf):
        raise WireError("truncated field")
    return end


def decode_chunk(buf: bytes) -> ChunkIn:
    """A `ChunkIn` from a serialised `emsfl.v1.Chunk`; its `data` is a view into `buf` (no copy)."""
    ints: dict[int, int] = {}
    spans: dict[int, memoryview] = {}
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD or key > _U32:
            raise WireError(f"bad field number {number}")
        known = _FIELDS.get(number)
        if known is None or known[0] != wire_type:
            pos = _skip(buf, pos, wire_type)
            continue
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            ints[number] = value & (_U32 if known[1] == "u32" else _U64)
            continue
        length, pos = _varint(buf, pos)
        if pos + length > end:
            raise WireError("truncated field")
        spans[number] = view[pos : pos + length]
        pos += length
    return ChunkIn(
        content_hash=_text(spans.get(1)),
        index=ints.get(2, 0),
        data=spans.get(5, view[0:0]),
        sha256=_text(spans.get(6)),
        total_chunks=ints.get(3, 0),
        total_size=ints.get(4, 0),
    )


def _text(value: memoryview | None) -> str:
    if value is None:
        return ""
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("string field is not UTF-8") from exc
