"""gRPC channel settings of every ground-side client (uplink to the satellite, device to its gateway) and the
matching server settings of the gateway, in one place.

A hard cut (the satellite sets, a cable is pulled: no FIN, no RST, packets just stop) is invisible to TCP for
minutes, so without keepalive a call in flight hangs until its deadline (60 s for a push). The client pings
every 2 s, with or without calls in flight, and drops the connection when a ping stays unanswered for 3 s: a cut
is noticed within about 5 s and the call fails with UNAVAILABLE, which the uplink treats as the end of the pass.
The timeout leaves room for a ping queued behind a full uplink's send buffer at a shaped link rate (the satellite
node answers pings at once; its own pings are every 10 s). Reconnection backs off at most 1 s, so a link that
comes back is used at once: at an accelerated clock a whole pass can last a few wall seconds.

The satellite node (satellite_node/server.py) permits client pings every 0.5 s; the gateway serves with
`SERVER_KEEPALIVE_OPTIONS`, the same permission, so its devices can use these client settings too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

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
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
]


def insecure_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A plaintext channel with the ground keepalive settings (`options` add to or override them)."""
    merged = dict(CLIENT_KEEPALIVE_OPTIONS)
    merged.update(dict(options))
    return grpc.insecure_channel(target, options=list(merged.items()))
