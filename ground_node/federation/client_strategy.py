"""The client side of a federation strategy (ARCHITECTURE §4.5, docs/STRATEGIES.md): what the uplink does at a pass.

The uplink owns the connection, the outbox and the contact bookkeeping; a `ClientStrategy` decides what a pass does
(EMS-FL: affinity and assignment, experts by priority; FedAvg/FedAsync: pull the global model, upload the whole
model against a base version). Strategies see the uplink only through `UplinkPort`, so neither imports the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from emsfl.runtime.client import FederationClient
from emsfl.runtime.linkstate import LinkState
from ground_node.federation.outbox import Outbox, StagedUpdate
from ground_node.records import Assignment


class UplinkPort(Protocol):
    """What a strategy may use of the uplink."""

    cluster: str
    client: FederationClient
    outbox: Outbox
    link: LinkState
    call_timeout_s: float
    assignment: Assignment | None

    def next_update(self) -> StagedUpdate | None:
        """The newest staged update still to send, unless it was refused or this contact's quota is spent."""
        ...

    def reject(self, content_hash: str) -> None:
        """Never offer this update again (the next staged one may pass)."""
        ...

    def upload(self, update: StagedUpdate) -> bool:
        """Offer and push `update`; True when it progressed without committing (go on at once)."""
        ...

    def adopt(self, assignment: Assignment) -> None:
        """Take a new assignment (after fetching what it hands over)."""
        ...

    def contact_budget_bytes(self) -> float | None:
        """Bytes the rest of the current contact can carry (None: unknown)."""
        ...

    def contact_id(self) -> str | None:
        """The current contact (the link's `since`), None when the link view does not say."""
        ...


class ClientStrategy(ABC):
    name: str = ""

    @abstractmethod
    def run_pass(self, uplink: UplinkPort) -> bool:
        """One pass while the link is up, after the join; True when an upload progressed."""

    def prepare(self, uplink: UplinkPort, update: StagedUpdate) -> StagedUpdate | None:
        """The update to send in place of `update` (None: send nothing now)."""
        return update

    def base_version(self, update: StagedUpdate) -> int:
        """`UpdateOffer.base_version`: the global version the update was trained from (0: not versioned)."""
        return 0

    def acked(self, uplink: UplinkPort, update: StagedUpdate) -> None:
        """Called once the satellite committed `update`."""
        return None
