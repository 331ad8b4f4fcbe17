"""gRPC transport settings of every Federation client and server, in one place: message caps, keepalive, and
plaintext or mutual-TLS channels and server ports (emsfl/runtime/tls.py says where the TLS files come from).

Message caps: a chunk is at most 16 MiB (protos/wire.py) plus framing, and a pull answers in chunks too; 64 MiB
both ways, for clients and servers alike, leaves room without letting one message take a device's memory.

A hard cut (the satellite sets, a cable is pulled: no FIN, no RST, packets just stop) is invisible to TCP for
minutes, so without keepalive a call in flight hangs until its deadline (60 s for a push). The client pings
every 2 s, with or without calls in flight, and drops the connection when a ping stays unanswered for 3 s: a cut
is noticed within about 5 s and the call fails with UNAVAILABLE, which the uplink treats as the end of the pass.
The timeout leaves room for a ping queued behind a full uplink's send buffer at a shaped link rate (the servers
answer pings at once). Reconnection backs off at most 1 s, so a link that comes back is used at once: at an
accelerated clock a whole pass can last a few wall seconds.

The servers (satellite node, cluster gateway) ping each connection every 10 s and drop one that leaves a ping
unanswered for 20 s, so that a handler whose client vanished in a hard cut does not hold a worker thread for hours;
they permit client pings every 0.5 s, so clients with the settings above are not told off (GOAWAY too_many_pings).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from emsfl.runtime.tls import TlsFiles

MAX_MESSAGE_BYTES = 64 << 20

MESSAGE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

CLIENT_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 2_000),
    # gRPC core (grpcio 1.85) waits for a ping's ACK `grpc.http2.ping_timeout_ms` (default 60 s once keepalive is
    # on); `keepalive_timeout_ms` alone does not shorten that (tests/ground/test_ground_keepalive.py): set both
    ("grpc.http2.ping_timeout_ms", 3_000),
    ("grpc.keepalive_timeout_ms", 3_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a call waits for the server's answer
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]

# what a server must allow for clients with the settings above not to be told off (GOAWAY too_many_pings)
SERVER_KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 500),  # the name gRPC core reads (no "recv")
]


def client_options(options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """Message caps and client keepalive; `options` add to or override them."""
    merged: dict[str, Any] = dict([*MESSAGE_OPTIONS, *CLIENT_KEEPALIVE_OPTIONS])
    merged.update(dict(options))
    return list(merged.items())


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    pems = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=pems.ca, private_key=pems.key, certificate_chain=pems.cert)


def open_channel(
    target: str,
    tls: TlsFiles | None,
    options: Sequence[tuple[str, Any]] = (),
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to `target`: mutual TLS with `tls` (the server's certificate must be signed by `tls.ca` and name
    the target's host, or `server_name`), plaintext without. Never falls back from one to the other."""
    merged = client_options(options)
    if tls is None:
        return grpc.insecure_channel(target, options=merged)
    if server_name:
        merged.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(tls), options=merged)


def open_aio_channel(target: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]] = ()) -> Any:
    """`open_channel` for asyncio callers (the load generator: hundreds of clusters in one process)."""
    merged = client_options(options)
    if tls is None:
        return grpc.aio.insecure_channel(target, options=merged)
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=merged)


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Mutual TLS: a client must present a certificate signed by `tls.ca`."""
    pems = tls.read()
    return grpc.ssl_server_credentials([(pems.key, pems.cert)], root_certificates=pems.ca, require_client_auth=True)


def new_server(max_workers: int, thread_name_prefix: str) -> grpc.Server:
    """A sync gRPC server with the shared message caps and server keepalive (no port yet: `add_port`)."""
    return grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix),
        options=[*MESSAGE_OPTIONS, *SERVER_KEEPALIVE_OPTIONS],
    )


def add_port(server: grpc.Server, listen: str, tls: TlsFiles | None) -> int:
    """Bind `listen`: mutual TLS with `tls`, else plaintext; returns the port; OSError when it cannot bind."""
    port = (
        server.add_secure_port(listen, server_credentials(tls)) if tls is not None else server.add_insecure_port(listen)
    )
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return int(port)
