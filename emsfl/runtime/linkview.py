"""What a process knows of the links: follows clock, link and orbit status topics.

Used by the satellite's link gate and by ground uplinks, through the `LinkState` protocol (linkstate.py). A link
counts as up only if its last state is `up`, the orbit service is online, and the emulated time is before the
state's predicted `until`: a late `down` message can then never let a call through after LOS.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.linkstate import LinkState, wall_rate_bytes_of
from emsfl.runtime.timefmt import parse_iso
from protos import topics


class LinkView(LinkState):
    """The `LinkState` of the MQTT topics."""

    def __init__(self, bus: Bus, clusters: list[str] | None = None) -> None:
        """Follow every cluster's link (`clusters=None`) or only the listed ones."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._links: dict[str, dict[str, Any]] = {}
        self._contacts: dict[str, list[dict[str, Any]]] = {}
        self._clock: EmulatedClock | None = None
        self._orbit_online = False
        bus.subscribe(topics.CLOCK, "clock", self._on_clock)
        bus.subscribe(topics.ORBIT_STATUS, "status", self._on_orbit_status)
        for cluster in clusters or ["+"]:
            bus.subscribe(topics.link(cluster), "link", self._on_link)
            bus.subscribe(topics.contacts(cluster), "contacts", self._on_contacts)

    def _on_clock(self, topic: str, payload: dict[str, Any]) -> None:
        with self._changed:
            self._clock = EmulatedClock.from_payload(payload)
            self._changed.notify_all()

    def _on_orbit_status(self, topic: str, payload: dict[str, Any]) -> None:
        with self._changed:
            self._orbit_online = payload["state"] == "online"
            self._changed.notify_all()

    def _on_link(self, topic: str, payload: dict[str, Any]) -> None:
        cluster = payload["cluster"]
        with self._changed:
            last = self._links.get(cluster)
            if last is not None and payload["seq"] < last["seq"] and payload["seq"] != 0:
                return  # an older message delivered late; seq 0 marks an orbit service restart
            self._links[cluster] = payload
            self._changed.notify_all()

    def _on_contacts(self, topic: str, payload: dict[str, Any]) -> None:
        with self._changed:
            self._contacts[payload["cluster"]] = payload["windows"]
            self._changed.notify_all()

    @property
    def clock(self) -> EmulatedClock | None:
        with self._lock:
            return self._clock

    def emulated_now(self) -> datetime | None:
        clock = self.clock
        return None if clock is None else clock.now()

    def link(self, cluster: str) -> dict[str, Any] | None:
        with self._lock:
            return self._links.get(cluster)

    def wall_rate_bytes(self, cluster: str) -> float | None:
        with self._lock:
            scale = None if self._clock is None else self._clock.scale
            return wall_rate_bytes_of(self._links.get(cluster), scale)

    def contacts(self, cluster: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._contacts.get(cluster, []))

    def is_up(self, cluster: str) -> bool:
        return self.up_now(cluster)[0]

    def up_now(self, cluster: str) -> tuple[bool, datetime | None]:
        with self._lock:
            now = self._now_locked()
            return self._is_up_locked(cluster, now), now

    def _now_locked(self) -> datetime | None:
        return None if self._clock is None else self._clock.now()

    def _is_up_locked(self, cluster: str, now: datetime | None) -> bool:
        link = self._links.get(cluster)
        if not self._orbit_online or now is None or link is None or link["state"] != "up":
            return False
        until = link.get("until")
        if until is not None and now >= parse_iso(until):
            return False
        # Belt and braces: the published contact windows must agree that this instant is inside a contact.
        windows = self._contacts.get(cluster)
        if windows and not link.get("forced"):
            return any(parse_iso(w["start"]) <= now < parse_iso(w["end"]) for w in windows)
        return True

    def wait_up(self, cluster: str, timeout_s: float) -> bool:
        """Block until the cluster's link is up or the timeout passes; re-checks at least every second."""
        import time

        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._is_up_locked(cluster, self._now_locked()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 1.0))
            return True

    def down_reason(self, cluster: str) -> str:
        """Why the cluster's link is down, for UNAVAILABLE messages."""
        with self._lock:
            if not self._orbit_online:
                return "orbit service offline: every link counts as down"
            if self._clock is None:
                return "no emulated clock received yet"
            link = self._links.get(cluster)
            if link is None:
                return f"no link state known for cluster {cluster!r}"
            if link["state"] != "up":
                return f"link of cluster {cluster!r} is down since {link['since']} (next pass expected later)"
            return f"link of cluster {cluster!r} ended at {link.get('until')}"
