"""EMS-FL's client side (ARCHITECTURE §4.1-4.5): report the affinity once, follow the assignment, and send the owned
experts of the newest staged update, the most-changed first when the contact cannot carry them all."""

from __future__ import annotations

import logging

from ground_node.federation.client_strategy import ClientStrategy, UplinkPort
from ground_node.federation.outbox import StagedUpdate
from ground_node.records import Affinity, Assignment

log = logging.getLogger(__name__)


class EmsflClient(ClientStrategy):
    name = "emsfl"

    def __init__(self, affinity: Affinity) -> None:
        self.affinity = affinity
        self.affinity_sent = False

    def run_pass(self, uplink: UplinkPort) -> bool:
        if not self.affinity_sent:
            a = self.affinity
            uplink.client.report_affinity(a.gate, a.freq, a.num_tokens)
            self.affinity_sent = True
        reply = uplink.client.assignment()
        if reply.ready:
            new = Assignment.from_pairs(reply.version, [(la.layer, list(la.experts)) for la in reply.layers])
            if uplink.assignment is None or new != uplink.assignment:
                uplink.adopt(new)
        return False

    def prepare(self, uplink: UplinkPort, update: StagedUpdate, budget_bytes: float | None) -> StagedUpdate | None:
        """A short contact sends experts by priority (`Outbox.plan`); the uplink already dropped a stale update."""
        return uplink.outbox.plan(update, budget_bytes)

    def acked(self, uplink: UplinkPort, update: StagedUpdate) -> None:
        try:
            uplink.outbox.record_acked(update.read())
        except OSError as exc:
            log.warning("uplink: cannot record the acknowledged experts: %s", exc)
