"""`emsfl orbit shaper`: enforce one cluster's published link state on real traffic with `tc netem`.

While the link is up: `netem delay <delay_s> rate <rate_bps> loss <loss>` on the egress of `--dev`; while it
is down, past its predicted `until`, or while the orbit service is offline: `netem loss 100%` (nothing
passes). The qdisc is removed on exit. `--netns NAME` runs `tc` inside a network namespace (the shaper itself
stays where it can reach the broker). One shaper shapes one direction (the egress of its device); put one on
each end for a symmetric link. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from emsfl.runtime.bus import Bus
from emsfl.runtime.clock import EmulatedClock
from emsfl.runtime.timefmt import parse_iso
from protos import topics

log = logging.getLogger(__name__)

CHECK_S = 0.1  # how often an up state is checked against its `until`


class ShaperError(RuntimeError):
    pass


DROP_FALLBACK = ["pfifo", "limit", "0"]  # drops every packet, for kernels without sch_netem


def fallback_args(state: dict[str, Any] | None) -> list[str]:
    """Without sch_netem: drop with a zero-length FIFO; while up, the rate with tbf (no delay, no loss)."""
    if state is None or state.get("state") != "up":
        return DROP_FALLBACK
    rate = state.get("rate_bps")
    if not rate:
        return ["pfifo", "limit", "1000"]
    burst = max(1600, int(float(rate) / 8 / 250))  # ~4 ms of traffic, at least one full frame
    return ["tbf", "rate", f"{float(rate):.0f}bit", "burst", str(burst), "latency", "200ms"]


def netem_args(state: dict[str, Any] | None) -> list[str]:
    """The `tc qdisc replace ... netem` parameters for a link payload (None or down: drop everything)."""
    if state is None or state.get("state") != "up":
        return ["netem", "loss", "100%"]
    args = ["netem"]
    delay = state.get("delay_s")
    if delay:
        args += ["delay", f"{float(delay) * 1e6:.0f}us"]
    loss = state.get("loss")
    if loss:
        args += ["loss", f"{float(loss) * 100:.4f}%"]
    rate = state.get("rate_bps")
    if rate:
        args += ["rate", f"{float(rate):.0f}bit"]
    return args


class Shaper:
    def __init__(self, bus: Bus, cluster: str, dev: str, netns: str | None = None) -> None:
        self.bus, self.cluster, self.dev, self.netns = bus, cluster, dev, netns
        self._lock = threading.Lock()
        self._link: dict[str, Any] | None = None
        self._clock: EmulatedClock | None = None
        self._online = False
        self._applied: list[str] | None = None
        self.no_netem = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        bus.subscribe(topics.CLOCK, "clock", self._on_clock)
        bus.subscribe(topics.ORBIT_STATUS, "status", self._on_status)
        bus.subscribe(topics.link(cluster), "link", self._on_link)

    def _tc(self, *args: str) -> None:
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + ["tc", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ShaperError(f"{' '.join(argv)}: {proc.stderr.strip()}")

    def effective(self) -> dict[str, Any] | None:
        """The link state to enforce now: the last one, unless the service is offline or `until` passed."""
        with self._lock:
            link, clock, online = self._link, self._clock, self._online
        if link is None or not online or link.get("state") != "up":
            return None
        until = link.get("until")
        if until is not None and clock is not None and clock.now() >= parse_iso(until):
            return None
        return link

    def apply(self) -> None:
        state = self.effective()
        args = fallback_args(state) if self.no_netem else netem_args(state)
        if args == self._applied:
            return
        try:
            self._tc("qdisc", "replace", "dev", self.dev, "root", *args)
        except ShaperError as exc:
            if self.no_netem or "unknown" not in str(exc):
                raise
            # This kernel has no sch_netem: keep the link's on/off (and rate) rather than nothing at all.
            log.error(
                "tc netem unavailable (no sch_netem in this kernel): delay and loss NOT enforced, only up/down, rate"
            )
            self.no_netem = True
            args = fallback_args(state)
            self._tc("qdisc", "replace", "dev", self.dev, "root", *args)
        self._applied = args
        log.info("shaper %s on %s: %s", self.cluster, self.dev, " ".join(args))

    def _on_clock(self, topic: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._clock = EmulatedClock.from_payload(payload)
        self._safe_apply()

    def _on_status(self, topic: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._online = payload["state"] == "online"
        self._safe_apply()

    def _on_link(self, topic: str, payload: dict[str, Any]) -> None:
        with self._lock:
            last = self._link
            if last is not None and payload["seq"] < last["seq"] and payload["seq"] != 0:
                return
            self._link = payload
        self._safe_apply()

    def _safe_apply(self) -> None:
        try:
            self.apply()
        except ShaperError as exc:
            log.error("%s", exc)

    def start(self) -> None:
        self.apply()  # down until told otherwise
        self._thread = threading.Thread(target=self._watch, name="shaper-until", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_S):
            self._safe_apply()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        try:
            self._tc("qdisc", "del", "dev", self.dev, "root")
        except ShaperError as exc:
            log.warning("removing the qdisc: %s", exc)


def check_tools(argv: Sequence[str] = ("tc", "-V")) -> None:
    try:
        subprocess.run(list(argv), capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ShaperError(f"tc (iproute2) is not usable: {exc}") from None
