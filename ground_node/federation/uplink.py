"""The uplink (ARCHITECTURE §3 steps 2-6): a thread that talks to the satellite node whenever the link is up.

Per pass: Join (once), then what the client strategy does (`client_strategy.py`; EMS-FL: ReportAffinity once,
GetAssignment), which names the update to send; the uplink uploads it: OfferUpdate with the newest unacknowledged
staged update and PushChunksWindowed of only the missing chunks.
UNAVAILABLE (the link went down) is expected: the pass ends and the next one resumes the cut upload
(re-offering the same content hash makes the server answer with only what it still lacks).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from emsfl.runtime.client import FederationClient, offer_message
from emsfl.runtime.events import EventLog
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import parse_iso
from emsfl.runtime.tls import TlsFiles
from ground_node.federation.client_strategy import ClientStrategy
from ground_node.federation.emsfl_client import EmsflClient
from ground_node.federation.outbox import Outbox, StagedUpdate
from ground_node.records import Affinity, Assignment
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import CHUNK_SIZE, chunk_hashes, parse_expert_name, sha256_hex

log = logging.getLogger(__name__)

BUDGET_MARGIN = 0.9  # share of the rest of a contact an upload may plan for


@dataclass(frozen=True)
class UplinkHooks:
    """What the uplink tells its owner (a single node or a gateway); each is called in the uplink's thread. The
    upload itself is reported as events (`pushing`, `upload_acked`), not to the owner."""

    on_join: Callable[[Any], None] | None = None  # the satellite's JoinReply
    # before a new assignment is adopted, to fetch what it hands over; if it raises, the assignment is not adopted
    # and the next pass tries again
    before_assignment: Callable[[Assignment], None] | None = None
    on_assignment: Callable[[Assignment], None] | None = None


class Uplink(threading.Thread):
    def __init__(
        self,
        target: str,
        cluster: str,
        link: LinkState,
        outbox: Outbox,
        capacity: int,
        num_examples: int,
        affinity: Affinity,
        hooks: UplinkHooks | None = None,
        poll_s: float = 0.5,
        max_uploads_per_contact: int | None = 1,
        call_timeout_s: float = 20.0,
        send_window_chunks: int = 1,
        tls: TlsFiles | None = None,
        events: EventLog | None = None,
    ) -> None:
        super().__init__(name=f"uplink-{cluster}", daemon=True)
        self.cluster = cluster
        self.link = link
        self.outbox = outbox
        self.capacity = capacity
        self.num_examples = num_examples
        self.hooks = hooks or UplinkHooks()
        self.events = events
        self.poll_s = poll_s
        self.call_timeout_s = call_timeout_s
        # chunks sent ahead of the satellite's answers: a hard cut resends at most this many (`push_windowed`)
        self.send_window_chunks = send_window_chunks
        # keepalive (emsfl/runtime/channel.py): a hard cut ends a call in seconds, not at its deadline
        self.client = FederationClient(target, cluster, tls=tls, timeout_s=call_timeout_s)
        self.stub = self.client.stub
        self.metadata = self.client.metadata
        self.joined = False
        self.assignment: Assignment | None = None
        self.uploads_acked = 0
        self.refusals = 0
        self._rejected: set[str] = set()
        self._halt = threading.Event()
        self.assigned = threading.Event()
        # what a pass does; replaced (by on_join) when the satellite runs a baseline strategy (baseline.py)
        self.strategy: ClientStrategy = EmsflClient(affinity)
        # ARCHITECTURE §3 step 6: at every contact the newest state goes up once (not again at every staging while the
        # link stays up, which would multiply the uplink bytes); None: no limit. Contacts are told apart by `since`.
        self.max_uploads_per_contact = max_uploads_per_contact
        self._acks_in_contact: dict[str, int] = {}

    @property
    def bytes_pushed(self) -> int:
        return self.client.bytes_sent

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout_s)
        self.client.close()

    def run(self) -> None:
        while not self._halt.is_set():
            if not self.link.is_up(self.cluster):
                self.link.wait_up(self.cluster, 1.0)
                continue
            try:
                busy = self.run_pass()
            except grpc.RpcError as exc:
                self._on_error(exc)
                busy = False
            except Exception:  # a bug in one pass must not kill the uplink
                log.exception("uplink pass failed")
                busy = False
            if not busy:
                self._halt.wait(self.poll_s)

    def _on_error(self, exc: grpc.RpcError) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        self.refusals += 1
        if code == grpc.StatusCode.UNAVAILABLE:
            log.info(
                "uplink: unavailable (%s); waiting for the next pass", exc.details() if hasattr(exc, "details") else ""
            )
        elif code == grpc.StatusCode.FAILED_PRECONDITION:
            log.info("uplink: stale assignment; fetching it again")
            self.assignment = None
        else:
            log.warning("uplink: call refused: %s %s", code, exc.details() if hasattr(exc, "details") else exc)

    def run_pass(self) -> bool:
        """One pass over what is due; returns True when an upload progressed (so the loop goes on at once)."""
        if not self.joined:
            joined = self.client.join(self.capacity, self.num_examples, device_id=self.cluster)
            self.joined = True
            if self.hooks.on_join is not None:
                self.hooks.on_join(joined)
        if self.strategy.run_pass(self):
            return True  # the pass made progress of its own (a pull): the upload waits for the next one
        update = self.next_update()
        if update is None:
            return False
        try:
            return self.upload(update)
        except grpc.RpcError as exc:
            if self.strategy.refused(self, update, exc):
                return False
            raise

    def adopt(self, assignment: Assignment) -> None:
        if self.hooks.before_assignment is not None:
            self.hooks.before_assignment(assignment)  # raises: not adopted, the next pass tries again
        self.assignment = assignment
        self.assigned.set()
        if self.hooks.on_assignment is not None:
            self.hooks.on_assignment(assignment)

    def next_update(self) -> StagedUpdate | None:
        update = self.outbox.pending()
        if update is None or update.content_hash in self._rejected or self.contact_quota_spent():
            return None
        return update

    def reject(self, content_hash: str) -> None:
        self._rejected.add(content_hash)

    def rejected(self, content_hash: str) -> bool:
        return content_hash in self._rejected

    def contact_id(self) -> str | None:
        payload = self.link.link(self.cluster)
        return str(payload["since"]) if payload is not None and payload.get("since") else None

    def contact_budget_bytes(self) -> float | None:
        """Bytes the rest of the current contact can carry: (until - now) x rate_bps / 8 x a margin; None when the
        link view does not say (then the whole update goes, and a cut resumes at the next pass)."""
        payload = self.link.link(self.cluster)
        now = self.link.emulated_now()
        if not payload or now is None or payload.get("state") != "up":
            return None
        until, rate = payload.get("until"), payload.get("rate_bps")
        if not until or not rate:
            return None
        seconds = (parse_iso(until) - now).total_seconds()
        return float(max(0.0, seconds) * float(rate) / 8.0 * BUDGET_MARGIN)

    def contact_quota_spent(self) -> bool:
        """True when this contact already carried `max_uploads_per_contact` committed uploads."""
        contact = self.contact_id()
        limit = self.max_uploads_per_contact
        return limit is not None and contact is not None and self._acks_in_contact.get(contact, 0) >= limit

    def upload(self, update: StagedUpdate) -> bool:
        """Offer `update` (or what the strategy makes of it) and push the chunks the satellite lacks; True when it
        progressed without committing (the next pass follows at once)."""
        if self.assignment is not None and update.assignment_version < self.assignment.version:
            log.info("uplink: dropping update %s of assignment %d", update.content_hash[:12], update.assignment_version)
            self.outbox.drop_inflight(update.content_hash)
            self.reject(update.content_hash)
            return False
        prepared = self.strategy.prepare(self, update, self.contact_budget_bytes())
        if prepared is None:
            return False
        update = prepared
        if not self.outbox.mark_inflight(update):
            return True  # superseded just now: the next pass takes the newer update
        blob = update.read()
        if sha256_hex(blob) != update.content_hash:
            log.error("outbox blob %s is corrupt; skipping it", update.path)
            self._rejected.add(update.content_hash)
            return False
        hashes = chunk_hashes(blob, CHUNK_SIZE)
        offer = offer_message(
            blob,
            _tensor_specs(blob),
            update.assignment_version,
            CHUNK_SIZE,
            local_step=update.step,
            base_version=self.strategy.base_version(update),
            hashes=hashes,
            content_hash=update.content_hash,
        )

        try:
            reply = self.client.send_offer(offer)
            if reply.committed:
                pushed = pb.PushReply(committed=True)
            else:
                missing = sorted(set(reply.missing))
                if missing and self.events is not None:
                    self.events.emit(
                        "pushing", content_hash=update.content_hash, chunks=missing, total_chunks=len(hashes)
                    )
                pushed = self.client.push_missing(
                    blob,
                    offer,
                    missing,
                    window=self.send_window_chunks,
                    timeout_s=max(60.0, self.call_timeout_s),
                    on_chunk=self.outbox.add_bytes,
                )
        except grpc.RpcError as exc:
            self._maybe_reject(exc, update)
            raise
        if pushed.committed:
            self._acked(update)
            return False
        return bool(pushed.missing)

    def _maybe_reject(self, exc: grpc.RpcError, update: StagedUpdate) -> None:
        code = exc.code() if hasattr(exc, "code") else None
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED):
            self._rejected.add(update.content_hash)  # do not resend it; the next staged update may pass
        if code in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.FAILED_PRECONDITION,
        ):
            self.outbox.drop_inflight(update.content_hash)

    def _acked(self, update: StagedUpdate) -> None:
        contact = self.contact_id()
        if contact is not None:
            self._acks_in_contact[contact] = self._acks_in_contact.get(contact, 0) + 1
        self.strategy.acked(self, update)
        self.outbox.mark_acked(update.content_hash, update.size)
        self.uploads_acked += 1
        if self.events is not None:
            self.events.emit("upload_acked", content_hash=update.content_hash, bytes=update.size)


def _tensor_specs(blob: bytes) -> list[pb.TensorSpec]:
    """Names, dtypes and shapes from the safetensors header."""
    import json
    import struct

    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    specs = []
    for name, info in sorted(header.items()):
        if name == "__metadata__" or parse_expert_name(name) is None:
            continue
        specs.append(pb.TensorSpec(name=name, dtype=info["dtype"], shape=info["shape"]))
    return specs
