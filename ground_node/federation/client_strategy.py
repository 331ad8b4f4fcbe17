"""The client side of a federation strategy (ARCHITECTURE §4.5, docs/STRATEGIES.md): what the uplink does at a pass.

The uplink owns the connection, the outbox and the contact bookkeeping; a `ClientStrategy` decides what a pass does
(EMS-FL: affinity and assignment, experts by priority; FedAvg/FedAsync: pull the global model, upload the whole
model against a base version). Strategies see the uplink only through `UplinkPort`, so neither imports the other;
the uplink uploads the newest staged update itself after the strategy's pass, so a strategy never drives it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import grpc

from emsfl.runtime.client import FederationClient
from ground_node.federation.outbox import Outbox, StagedUpdate
from ground_node.records import Assignment


class UplinkPort(Protocol):
    """What a strategy may use of the uplink."""

    cluster: str
    client: FederationClient
    outbox: Outbox
    call_timeout_s: float
    assignment: Assignment | None

    def reject(self, content_hash: str) -> None:
        """Never offer this update again (the next staged one may pass)."""
        ...

    def adopt(self, assignment: Assignment) -> None:
        """Take a new assignment (after fetching what it hands over)."""
        ...

    def contact_id(self) -> str | None:
        """The current contact (the link's `since`), None when the link view does not say."""
        ...


class ClientStrategy(ABC):
    name: str = ""

    @abstractmethod
    def run_pass(self, uplink: UplinkPort) -> bool:
        """A pass's own calls while the link is up, after the join, before the uplink uploads the newest staged
        update; True when the pass made progress of its own and the upload waits for the next pass."""

    def prepare(self, uplink: UplinkPort, update: StagedUpdate, budget_bytes: float | None) -> StagedUpdate | None:
        """The update to send in place of `update` (None: send nothing now); `budget_bytes`: what the rest of the
        contact can carry (None: unknown)."""
        return update

    def base_version(self, update: StagedUpdate) -> int:
        """`UpdateOffer.base_version`: the global version the update was trained from (0: not versioned)."""
        return 0

    def refused(self, uplink: UplinkPort, update: StagedUpdate, exc: grpc.RpcError) -> bool:
        """The satellite refused `update`; True when the strategy handled it (the pass ends quietly)."""
        return False

    def acked(self, uplink: UplinkPort, update: StagedUpdate) -> None:
        """Called once the satellite committed `update`."""
        return None
