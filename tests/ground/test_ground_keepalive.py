"""Ground channels notice a hard cut by keepalive (emsfl/runtime/channel.py): a call in flight when every packet
stops (no FIN, no RST: a TCP proxy that stops forwarding but keeps both sockets open) fails with UNAVAILABLE long
before its deadline, instead of hanging until DEADLINE_EXCEEDED."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from emsfl.runtime.channel import CLIENT_KEEPALIVE_OPTIONS, SERVER_KEEPALIVE_OPTIONS, open_channel
from protos.emsfl.v1 import federation_pb2 as pb
from protos.emsfl.v1 import federation_pb2_grpc as pb_grpc
from satellite_node.testing import CutProxy

DEADLINE_S = 40.0  # far above keepalive time + timeout (5 s): only keepalive can end the call as UNAVAILABLE


class SlowSatellite(pb_grpc.FederationServicer):  # type: ignore[misc]
    """GetStatus answers only when released: a call that stays in flight across the cut."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def GetStatus(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        self.entered.set()
        self.release.wait(DEADLINE_S + 5)
        return pb.StatusReply()


@pytest.fixture
def satellite() -> Iterator[tuple[SlowSatellite, int]]:
    servicer = SlowSatellite()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_KEEPALIVE_OPTIONS)
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    servicer.release.set()
    server.stop(0)


def test_client_options_ping_often_and_unanswered_pings_end_the_call() -> None:
    options = dict(CLIENT_KEEPALIVE_OPTIONS)
    assert options["grpc.keepalive_permit_without_calls"] == 1 and options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_time_ms"] + options["grpc.http2.ping_timeout_ms"] <= 10_000
    # the server permits pings at least as often as the client sends them (else GOAWAY too_many_pings)
    permitted_ms = dict(SERVER_KEEPALIVE_OPTIONS)["grpc.http2.min_ping_interval_without_data_ms"]
    assert permitted_ms <= options["grpc.keepalive_time_ms"]


def test_hard_cut_fails_the_call_with_unavailable(satellite: tuple[SlowSatellite, int]) -> None:
    servicer, port = satellite
    proxy = CutProxy(("127.0.0.1", port))
    channel = open_channel(f"127.0.0.1:{proxy.port}", None)
    stub = pb_grpc.FederationStub(channel)
    try:
        call = stub.GetStatus.future(pb.StatusRequest(), timeout=DEADLINE_S)
        assert servicer.entered.wait(10), "the call never reached the server"
        proxy.cut()
        with pytest.raises(grpc.RpcError) as info:
            call.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    finally:
        servicer.release.set()
        channel.close()
        proxy.close()


def test_idle_client_pings_are_permitted_no_goaway_too_many_pings(satellite: tuple[SlowSatellite, int]) -> None:
    """Regression test: the server option was spelled `grpc.http2.min_recv_ping_interval_without_data_ms`, a name
    gRPC core does not know, so servers kept the default (one ping per 5 min without data) and answered an idle
    client's 2 s pings with GOAWAY too_many_pings; the CLINC150 comparison's ground logs show it, with calls then
    cut (CANCELLED, DEADLINE_EXCEEDED). A dropped connection shows as the channel leaving READY."""
    servicer, port = satellite
    servicer.release.set()  # GetStatus answers at once
    channel = open_channel(f"127.0.0.1:{port}", None)
    states: list[grpc.ChannelConnectivity] = []
    try:
        pb_grpc.FederationStub(channel).GetStatus(pb.StatusRequest(), timeout=10)
        channel.subscribe(states.append, try_to_connect=False)
        threading.Event().wait(15)  # idle: about 7 client pings, 3 past the default policy's strikes
        assert states and set(states) == {grpc.ChannelConnectivity.READY}, states
    finally:
        channel.close()
