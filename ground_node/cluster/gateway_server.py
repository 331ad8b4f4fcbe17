"""The device-facing side of a cluster gateway (ARCHITECTURE §3 step 5): the `Federation` service its devices call
over the LAN (never link-gated), with their identity checked (the device certificate under mutual TLS, else the
`emsfl-cluster`/`emsfl-device` metadata on a plaintext loopback lab). What the calls do is `gateway.Gateway`'s."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np

from emsfl.runtime.channel import add_port, new_server
from emsfl.runtime.client import DEVICE_METADATA_KEY
from ground_node.cluster.gateway import Gateway
from ground_node.records import Affinity
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from protos.wire import CHUNK_SIZE, CLUSTER_METADATA_KEY, chunk_messages, sha256_hex


class GatewayServicer(pb_grpc.FederationServicer):  # type: ignore[misc]
    """The Federation service of a gateway, for its devices (LAN, never link-gated)."""

    def __init__(self, gw: Gateway, tls: bool = False) -> None:
        self.gw = gw
        self.tls = tls
        self.refused = 0  # calls refused for their identity (a device of another cluster, no device certificate)

    def _identity(self, context: grpc.ServicerContext) -> tuple[str | None, str | None]:
        """(cluster, device): under mutual TLS from the verified device certificate only, else from metadata."""
        if self.tls:
            from emsfl.pki import device_id_from_pem

            pems = (context.auth_context() or {}).get("x509_pem_cert") or []
            identity = device_id_from_pem(pems[0]) if pems else None
            return identity if identity is not None else (None, None)
        md = dict(context.invocation_metadata())
        return md.get(CLUSTER_METADATA_KEY), md.get(DEVICE_METADATA_KEY)

    def _device(self, context: grpc.ServicerContext) -> str:
        cluster, device = self._identity(context)
        if cluster is None and self.tls:
            self.refused += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a device certificate (emsfl pki issue --role device)")
        if cluster != self.gw.cluster:
            self.refused += 1
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this gateway serves cluster {self.gw.cluster!r}")
        if not device:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"no {DEVICE_METADATA_KEY} metadata")
        return str(device)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        device = self._device(context)
        self.gw.join(device, request.num_examples, dict(request.capabilities))
        m = self.gw.manifest
        manifest = pb.ModelManifest(
            family=str(m.get("family", "")),
            num_layers=int(m.get("num_layers", 0)),
            num_experts=int(m.get("num_experts", 0)),
            top_k=int(m.get("top_k", 0)),
            tune=str(m.get("tune", "")),
            expert_parts=[
                pb.TensorSpec(name=p["name"], dtype=p["dtype"], shape=p["shape"]) for p in m.get("expert_parts", [])
            ],
            base_hash=str(m.get("base_hash", "")),
        )
        return pb.JoinReply(
            cluster_id=self.gw.cluster, manifest=manifest, strategy=self.gw.strategy, global_version=self.gw.version
        )

    def ReportAffinity(self, request: pb.AffinityReport, context: grpc.ServicerContext) -> pb.AffinityAck:
        device = self._device(context)
        shape = (request.num_layers, request.num_experts)
        n = shape[0] * shape[1]
        if n == 0 or len(request.gate) != n or len(request.freq) not in (0, n):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gate/freq do not match num_layers x num_experts")
        gate = np.asarray(request.gate, np.float32).reshape(shape)
        freq = np.asarray(request.freq, np.float32).reshape(shape) if len(request.freq) else gate.copy()
        reported, expected = self.gw.report_affinity(device, Affinity(gate, freq, int(request.num_tokens)))
        return pb.AffinityAck(accepted=True, clusters_reported=reported, clusters_expected=expected)

    def GetAssignment(self, request: pb.AssignmentRequest, context: grpc.ServicerContext) -> pb.Assignment:
        self._device(context)
        return self.gw.assignment()

    def RequestReassignment(self, request: pb.ReassignRequest, context: grpc.ServicerContext) -> pb.Assignment:
        self._device(context)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "re-assignment is the gateway's call, not a device's")
        raise AssertionError("unreachable")

    def OfferUpdate(self, request: pb.UpdateOffer, context: grpc.ServicerContext) -> pb.OfferReply:
        device = self._device(context)
        problem = self.gw.check_offer(device, request)
        if problem is not None:
            code = grpc.StatusCode.FAILED_PRECONDITION if "version" in problem or "no assignment" in problem else None
            context.abort(code or grpc.StatusCode.PERMISSION_DENIED, problem)
        committed, missing = self.gw.offer(device, request)
        return pb.OfferReply(committed=committed, missing=missing)

    def PushChunks(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        device = self._device(context)
        committed, missing, problem = self.gw.push(device, request_iterator)
        if problem is not None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return pb.PushReply(committed=committed, missing=missing)

    def PushChunksWindowed(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> Iterator[pb.PushProgress]:
        # devices push with PushChunks: the send window is for the satellite link, which is cut in mid-pass
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a gateway takes PushChunks from its devices")
        raise AssertionError("context.abort returned")

    def PullTensors(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self._device(context)
        blob = self.gw.pull_blob(list(request.names))
        if not blob:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no cluster average yet")
        content_hash = sha256_hex(blob)
        start = request.from_index if request.resume_hash == content_hash else 0
        yield from chunk_messages(blob, range(start, -(-len(blob) // CHUNK_SIZE)), content_hash=content_hash)

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        self._device(context)
        return self.gw.status()


def serve(gw: Gateway, listen: str, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """A started gRPC server of the gateway on `listen` (mutual TLS when the gateway has TLS files, else plaintext:
    never both); returns it and the bound port."""
    server = new_server(max_workers, "gateway")
    pb_grpc.add_FederationServicer_to_server(GatewayServicer(gw, tls=gw.tls is not None), server)
    port = add_port(server, listen, gw.tls)
    server.start()
    return server, port
