"""The uploader's side of `PushChunksWindowed`: at most `window` chunks unanswered at any time.

The server answers a chunk once it has taken it in, and keeps what it took in when the link is cut, so a hard cut
costs at most `window` chunks sent again. Each answer takes a round trip: on a link whose rate x round-trip time
approaches a chunk, a window of 1 idles the link between chunks, and a larger window buys goodput with resends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from protos.emsfl.v1 import federation_pb2 as pb

M = TypeVar("M")
# how often a sender blocked on the window checks whether the call already ended
_POLL_S = 0.5


def push_windowed(
    call: Callable[..., Iterator[pb.PushProgress]], messages: Iterable[M], window: int, **kwargs: Any
) -> pb.PushReply:
    """Stream `messages` through `call` (a stub's PushChunksWindowed, or a generic stream-stream callable whose
    responses are PushProgress) keeping at most `window` unanswered; returns the final reply.

    gRPC errors propagate as `grpc.RpcError` from the call, as with PushChunks."""
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
