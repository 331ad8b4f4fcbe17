"""Publishes a contact plan over MQTT in emulated time: clock, each cluster's link state and contacts.

One scheduler thread walks a heap of every cluster's transitions and sleeps until the wall time of
the next one; a late wake-up still publishes the planned emulated instant as `since`.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orbit_service.contacts import Window
from orbit_service.events import EventLog
from orbit_service.link import geometry_at
from orbit_service.plan import Plan
from protos import topics
from protos.bus import Bus
from protos.clock import EmulatedClock
from protos.timefmt import to_iso

log = logging.getLogger(__name__)

UP, DOWN = "up", "down"


@dataclass(frozen=True, order=True)
class Transition:
    """A cluster's link changing state at emulated time `at`.

    `window` is the index of the window that starts (up) or of the next window to come (down).
    """

    at: datetime
    order: int  # cluster position in the plan: a stable order between clusters at one instant
    cluster: str = field(compare=False)
    state: str = field(compare=False)
    window: int = field(compare=False)


def initial_transition(plan: Plan, cluster: str, order: int) -> Transition:
    """The state at the plan start: up if the first window starts there (windows never start before it)."""
    windows = plan.windows[cluster]
    if windows and windows[0].start <= plan.start_utc < windows[0].end:
        return Transition(plan.start_utc, order, cluster, UP, 0)
    return Transition(plan.start_utc, order, cluster, DOWN, 0)


def later_transitions(plan: Plan, cluster: str, order: int) -> list[Transition]:
    """Every transition after the initial state, in time order."""
    out = []
    for i, window in enumerate(plan.windows[cluster]):
        if window.start > plan.start_utc:
            out.append(Transition(window.start, order, cluster, UP, i))
        out.append(Transition(window.end, order, cluster, DOWN, i + 1))
    return out


class OrbitPublisher:
    def __init__(
        self,
        plan: Plan,
        bus: Bus,
        clock: EmulatedClock,
        rate_bps: float,
        contacts_published: int = 5,
        events: EventLog | None = None,
    ) -> None:
        self.plan, self.bus, self.clock = plan, bus, clock
        self.rate_bps = rate_bps
        self.contacts_published = contacts_published
        self.events = events
        self.seq: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._heap: list[Transition] = []

    def link_payload(self, tr: Transition) -> dict[str, Any]:
        windows = self.plan.windows[tr.cluster]
        body: dict[str, Any] = {
            "schema": "emsfl.v1.link",
            "version": 1,
            "cluster": tr.cluster,
            "state": tr.state,
            "seq": self.seq[tr.cluster],
        }
        if tr.state == UP:
            window = windows[tr.window]
            site = self.plan.sites[tr.cluster]
            geometry = geometry_at(site, self.plan.satellites[window.satellite], window.start)
            body |= {
                "since": to_iso(window.start),
                "until": to_iso(window.end),
                "satellite": window.satellite,
                "elevation_deg": round(geometry.elevation_deg, 3),
                "range_km": round(geometry.range_km, 3),
                "delay_s": round(geometry.delay_s, 9),
                "rate_bps": self.rate_bps,
            }
        else:
            since = windows[tr.window - 1].end if tr.window > 0 else self.plan.start_utc
            until = windows[tr.window].start if tr.window < len(windows) else None
            body |= {
                "since": to_iso(since),
                "until": None if until is None else to_iso(until),
                "satellite": None,
                "elevation_deg": None,
                "range_km": None,
                "delay_s": None,
                "rate_bps": None,
            }
        return body

    def upcoming_windows(self, cluster: str, now: datetime) -> list[Window]:
        """The next `contacts_published` windows not yet over at `now` (the current one included)."""
        upcoming = [w for w in self.plan.windows[cluster] if w.end > now]
        return upcoming[: self.contacts_published]

    def contacts_payload(self, cluster: str, now: datetime) -> dict[str, Any]:
        return {
            "schema": "emsfl.v1.contacts",
            "version": 1,
            "cluster": cluster,
            "windows": [
                {
                    "start": to_iso(w.start),
                    "end": to_iso(w.end),
                    "satellite": w.satellite,
                    "peak_elevation_deg": w.peak_elevation_deg,
                }
                for w in self.upcoming_windows(cluster, now)
            ],
        }

    def _publish(self, tr: Transition) -> None:
        payload = self.link_payload(tr)
        self.bus.publish(topics.link(tr.cluster), "link", payload, retain=True)
        self.bus.publish(topics.contacts(tr.cluster), "contacts", self.contacts_payload(tr.cluster, tr.at), retain=True)
        if self.events is not None:
            self.events.write(
                f"link_{tr.state}", tr.at, cluster=tr.cluster, satellite=payload["satellite"], seq=payload["seq"]
            )
        log.info("link %s %s at %s (seq %d)", tr.cluster, tr.state, to_iso(tr.at), payload["seq"])

    def start(self) -> None:
        """Publish the clock and every cluster's initial state, then follow the plan in a thread."""
        self.bus.publish(topics.CLOCK, "clock", self.clock.to_payload(), retain=True)
        for order, cluster in enumerate(self.plan.windows):
            self.seq[cluster] = 0
            self._publish(initial_transition(self.plan, cluster, order))
            self._heap.extend(later_transitions(self.plan, cluster, order))
        heapq.heapify(self._heap)
        self._thread = threading.Thread(target=self._run, name="orbit-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._heap:
            tr = self._heap[0]
            wait_s = self.clock.wall_of(tr.at) - time.time()
            if self._stop.wait(max(0.0, wait_s)):
                return
            heapq.heappop(self._heap)
            self.seq[tr.cluster] += 1
            try:
                self._publish(tr)
            except Exception:  # a failed publish must not stop the other clusters' schedule
                log.exception("publishing %s of %s failed", tr.state, tr.cluster)
        log.info("contact plan exhausted at %s; holding the last states", to_iso(self.plan.end_utc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
