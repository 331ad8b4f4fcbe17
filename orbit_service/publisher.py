"""Publishes a contact plan over MQTT in emulated time: clock, each cluster's link state and contacts.

One scheduler thread walks a heap of every cluster's transitions (up, down, handover, end of an override)
and sleeps on a condition until the wall time of the next one, so that a pause, a scale change, an override
or a plan reload wakes it and the wait is recomputed from the new clock. A late wake-up still publishes the
planned emulated instant as `since`.

Operator controls (thread-safe): `pause`, `resume`, `set_scale` (the retained clock is republished with a new
epoch and wall reference, so emulated time is continuous), `force` (a cluster's link up or down for an
emulated duration, or until released), `reload` (a new plan, followed from the current emulated time).
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.events import EventLog
from emsfl.runtime.timefmt import to_iso
from orbit_service.contacts import Window
from orbit_service.link import SPEED_OF_LIGHT_KM_S, LinkModel, geometry_at
from orbit_service.plan import Plan
from protos import topics

log = logging.getLogger(__name__)

UP, DOWN, HANDOVER, RELEASE = "up", "down", "handover", "release"
DEFAULT_FORCED_RANGE_KM = 1000.0  # geometry of a link forced up outside any pass


@dataclass(frozen=True, order=True)
class Transition:
    """A cluster's link changing state at emulated time `at`.

    `window` is the index of the window that starts (up), of the next window to come (down), or of the
    window a handover happens in (`handover` is then the index in its `handovers`).
    """

    at: datetime
    order: int  # cluster position in the plan: a stable order between clusters at one instant
    cluster: str = field(compare=False)
    state: str = field(compare=False)
    window: int = field(compare=False)
    handover: int = field(default=-1, compare=False)
    generation: int = field(default=0, compare=False)  # transitions of a replaced plan or override are stale


def initial_transition(plan: Plan, cluster: str, order: int) -> Transition:
    """The state at the plan start: up if the first window starts there (windows never start before it)."""
    return state_at(plan, cluster, order, plan.start_utc)


def state_at(plan: Plan, cluster: str, order: int, at: datetime, generation: int = 0) -> Transition:
    """The planned state of a cluster at emulated time `at`, as a transition at `at`."""
    windows = plan.windows[cluster]
    for i, w in enumerate(windows):
        if w.start <= at < w.end:
            h = max((k for k, ho in enumerate(w.handovers) if ho.at <= at), default=-1)
            return Transition(at, order, cluster, UP, i, h, generation)
        if at < w.start:
            return Transition(at, order, cluster, DOWN, i, -1, generation)
    return Transition(at, order, cluster, DOWN, len(windows), -1, generation)


def later_transitions(
    plan: Plan, cluster: str, order: int, after: datetime | None = None, generation: int = 0
) -> list[Transition]:
    """Every transition strictly after `after` (default: the plan start), in time order."""
    after = plan.start_utc if after is None else after
    out = []
    for i, window in enumerate(plan.windows[cluster]):
        if window.start > after:
            out.append(Transition(window.start, order, cluster, UP, i, -1, generation))
        for k, h in enumerate(window.handovers):
            if h.at > after:
                out.append(Transition(h.at, order, cluster, HANDOVER, i, k, generation))
        if window.end > after:
            out.append(Transition(window.end, order, cluster, DOWN, i + 1, -1, generation))
    return out


@dataclass
class Force:
    state: str
    until: datetime | None
    generation: int
    delay_s: float | None = None
    rate_bps: float | None = None
    loss: float | None = None


class OrbitPublisher:
    def __init__(
        self,
        plan: Plan,
        bus: Bus,
        clock: EmulatedClock,
        rate_bps: float | LinkModel = 10_000_000.0,
        contacts_published: int = 5,
        events: EventLog | None = None,
    ) -> None:
        self.plan, self.bus, self.clock = plan, bus, clock
        self.model = rate_bps if isinstance(rate_bps, LinkModel) else LinkModel(((0.0, float(rate_bps)),))
        self.contacts_published = contacts_published
        self.events = events
        self.seq: dict[str, int] = {}
        self.forced: dict[str, Force] = {}
        self._generation: dict[str, int] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._heap: list[Transition] = []
        self._order: dict[str, int] = {}

    # -- payloads -------------------------------------------------------------------------------------
    def _geometry(
        self, cluster: str, window: Window, handover: int, at: datetime
    ) -> tuple[str, float | None, float | None]:
        if handover >= 0:
            h = window.handovers[handover]
            sat, el, rng = h.satellite, h.elevation_deg, h.range_km
        else:
            sat, el, rng = window.satellite, window.elevation_deg, window.range_km
        if (el is None or rng is None) and sat in self.plan.satellites and cluster in self.plan.sites:
            when = window.start if handover < 0 else window.handovers[handover].at
            g = geometry_at(self.plan.sites[cluster], self.plan.satellites[sat], when)
            el, rng = g.elevation_deg, g.range_km
        return sat, el, rng

    def link_payload(self, tr: Transition) -> dict[str, Any]:
        windows = self.plan.windows[tr.cluster]
        body: dict[str, Any] = {
            "schema": "emsfl.v1.link",
            "version": 1,
            "cluster": tr.cluster,
            "state": DOWN if tr.state == DOWN else UP,
            "seq": self.seq[tr.cluster],
        }
        if tr.state in (UP, HANDOVER):
            window = windows[tr.window]
            sat, el, rng = self._geometry(tr.cluster, window, tr.handover, tr.at)
            body |= {
                "since": to_iso(window.start),
                "until": to_iso(window.end),
                "satellite": sat,
                "elevation_deg": None if el is None else round(el, 3),
                "range_km": None if rng is None else round(rng, 3),
                "delay_s": None if rng is None else round(rng / SPEED_OF_LIGHT_KM_S, 9),
                "rate_bps": self.model.rate_bps(el),
                "loss": self.model.loss(el),
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

    def forced_payload(self, cluster: str, force: Force, at: datetime) -> dict[str, Any]:
        planned = state_at(self.plan, cluster, self._order[cluster], at)
        body: dict[str, Any] = {
            "schema": "emsfl.v1.link",
            "version": 1,
            "cluster": cluster,
            "state": force.state,
            "seq": self.seq[cluster],
            "since": to_iso(at),
            "until": None if force.until is None else to_iso(force.until),
            "forced": True,
        }
        if force.state == UP:
            sat: str | None = None
            el: float | None = None
            rng = DEFAULT_FORCED_RANGE_KM
            if planned.state != DOWN:
                sat, el, planned_rng = self._geometry(
                    cluster, self.plan.windows[cluster][planned.window], planned.handover, at
                )
                rng = planned_rng if planned_rng is not None else rng
            delay = force.delay_s if force.delay_s is not None else rng / SPEED_OF_LIGHT_KM_S
            body |= {
                "satellite": sat,
                "elevation_deg": None if el is None else round(el, 3),
                "range_km": round(delay * SPEED_OF_LIGHT_KM_S, 3),
                "delay_s": round(delay, 9),
                "rate_bps": force.rate_bps if force.rate_bps is not None else self.model.rate_bps(el),
                "loss": force.loss if force.loss is not None else self.model.loss(el),
            }
        else:
            body |= {"satellite": None, "elevation_deg": None, "range_km": None, "delay_s": None, "rate_bps": None}
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

    # -- publishing -----------------------------------------------------------------------------------
    def _send(self, cluster: str, payload: dict[str, Any], at: datetime, event: str, **extra: Any) -> None:
        self.bus.publish(topics.link(cluster), "link", payload, retain=True)
        self.bus.publish(topics.contacts(cluster), "contacts", self.contacts_payload(cluster, at), retain=True)
        if self.events is not None:
            self.events.emit(event, at, cluster=cluster, satellite=payload["satellite"], seq=payload["seq"], **extra)
        log.info("link %s %s at %s (seq %d)", cluster, event, to_iso(at), payload["seq"])

    def _publish(self, tr: Transition) -> None:
        payload = self.link_payload(tr)
        if tr.state == HANDOVER and tr.handover >= 0:
            window = self.plan.windows[tr.cluster][tr.window]
            previous = window.handovers[tr.handover - 1].satellite if tr.handover > 0 else window.satellite
            if tr.at > window.start:
                self._send(tr.cluster, payload, tr.at, "handover", previous=previous)
                return
        self._send(tr.cluster, payload, tr.at, f"link_{payload['state']}")

    def publish_clock(self) -> None:
        self.bus.publish(topics.CLOCK, "clock", self.clock.to_payload(), retain=True)

    def start(self) -> None:
        """Publish the clock and every cluster's initial state, then follow the plan in a thread."""
        # The clock may start anywhere in the plan (its epoch): the state there, then what follows.
        begin = max(self.plan.start_utc, self.clock.epoch_utc)
        with self._cond:
            self.publish_clock()
            for order, cluster in enumerate(self.plan.windows):
                self._order[cluster] = order
                self.seq[cluster] = 0
                self._generation[cluster] = 0
                self._publish(state_at(self.plan, cluster, order, begin))
                self._heap.extend(later_transitions(self.plan, cluster, order, begin))
            heapq.heapify(self._heap)
        self._thread = threading.Thread(target=self._run, name="orbit-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while not self._stopping:
                if not self._heap or self.clock.paused:
                    self._cond.wait(1.0 if self._heap else None)
                    continue
                tr = self._heap[0]
                wait_s = self.clock.wall_of(tr.at) - time.time()
                if wait_s > 0:
                    self._cond.wait(wait_s)
                    continue
                heapq.heappop(self._heap)
                if tr.generation != self._generation.get(tr.cluster, 0):
                    continue  # from a replaced plan or a lifted override
                try:
                    self._due(tr)
                except Exception:  # a failed publish must not stop the other clusters' schedule
                    log.exception("publishing %s of %s failed", tr.state, tr.cluster)

    def _due(self, tr: Transition) -> None:
        if tr.state == RELEASE:
            self.forced.pop(tr.cluster, None)
            self.seq[tr.cluster] += 1
            self._publish(state_at(self.plan, tr.cluster, tr.order, tr.at))
            return
        if tr.cluster in self.forced:
            return  # the override holds the link; the plan resumes when it ends
        self.seq[tr.cluster] += 1
        self._publish(tr)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- operator controls ----------------------------------------------------------------------------
    def _set_clock(self, clock: EmulatedClock, what: str) -> None:
        self.clock = clock
        self.publish_clock()
        if self.events is not None:
            self.events.emit("clock", clock.epoch_utc, scale=clock.scale, paused=clock.paused, change=what)
        log.info("clock %s: epoch %s scale %g paused %s", what, to_iso(clock.epoch_utc), clock.scale, clock.paused)
        self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            if not self.clock.paused:
                now = time.time()
                self._set_clock(EmulatedClock(self.clock.at_wall(now), now, self.clock.scale, paused=True), "pause")

    def resume(self) -> None:
        with self._cond:
            if self.clock.paused:
                self._set_clock(EmulatedClock(self.clock.epoch_utc, time.time(), self.clock.scale), "resume")

    def set_scale(self, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        with self._cond:
            now = time.time()
            self._set_clock(EmulatedClock(self.clock.at_wall(now), now, scale, self.clock.paused), "scale")

    def force(self, cluster: str, state: str, duration_s: float | None = None, **link: float | None) -> None:
        """Hold a cluster's link `up` or `down` for `duration_s` emulated seconds (None: until `auto`);
        `auto` lifts an override at once."""
        with self._cond:
            if cluster not in self.seq:
                raise KeyError(f"unknown cluster {cluster!r}; known: {', '.join(self.seq)}")
            now = self.clock.now()
            self._generation[cluster] = self._generation.get(cluster, 0) + 1
            gen = self._generation[cluster]
            # The plan's transitions of this cluster are rebuilt under the new generation.
            self._heap = [t for t in self._heap if t.cluster != cluster]
            self._heap.extend(later_transitions(self.plan, cluster, self._order[cluster], now, gen))
            if state == "auto":
                self.forced.pop(cluster, None)
                self.seq[cluster] += 1
                self._publish(state_at(self.plan, cluster, self._order[cluster], now, gen))
            else:
                until = None if duration_s is None else now + timedelta(seconds=duration_s)
                force = Force(state, until, gen, link.get("delay_s"), link.get("rate_bps"), link.get("loss"))
                self.forced[cluster] = force
                self.seq[cluster] += 1
                payload = self.forced_payload(cluster, force, now)
                self._send(cluster, payload, now, f"link_{state}", forced=True)
                if until is not None:
                    self._heap.append(Transition(until, self._order[cluster], cluster, RELEASE, -1, -1, gen))
            heapq.heapify(self._heap)
            self._cond.notify_all()

    def reload(self, plan: Plan) -> None:
        """Follow a new plan from the current emulated time; each cluster's state is republished."""
        with self._cond:
            unknown = set(plan.windows) - set(self.seq)
            if unknown:
                raise KeyError(f"the new plan has clusters this run does not: {', '.join(sorted(unknown))}")
            self.plan = plan
            now = self.clock.now()
            self._heap = []
            for cluster in self.seq:
                self._generation[cluster] += 1
                gen = self._generation[cluster]
                if cluster not in plan.windows:
                    plan.windows[cluster] = []
                self.forced.pop(cluster, None)
                self.seq[cluster] += 1
                self._publish(state_at(plan, cluster, self._order[cluster], now, gen))
                self._heap.extend(later_transitions(plan, cluster, self._order[cluster], now, gen))
            heapq.heapify(self._heap)
            self._cond.notify_all()
