"""Sub-satellite points on `emsfl/v1/orbit/satellites` (`satellites.schema.json`), for displays only.

A low-rate thread (about once a wall second) computes where each satellite of the current plan is at the
current emulated time and publishes it retained, so that a dashboard that connects later sees the
constellation at once. Nothing gates on it; a replayed plan (no orbital elements) publishes an empty list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from emsfl.runtime.bus import Bus
from emsfl.runtime.timefmt import to_iso
from orbit_service.plan import Plan
from orbit_service.publisher import OrbitPublisher
from orbit_service.timescale import to_time
from protos import topics

log = logging.getLogger(__name__)

DEFAULT_EVERY_S = 1.0


def subpoints(satellites: Mapping[str, Any], at: datetime) -> list[dict[str, Any]]:
    """Geodetic latitude, longitude (WGS84) and height of each satellite at `at`, in id order."""
    from skyfield.api import wgs84

    t = to_time(at)
    out = []
    for sat_id in sorted(satellites):
        position = satellites[sat_id].at(t)
        lat, lon = wgs84.latlon_of(position)
        out.append(
            {
                "id": sat_id,
                "lat_deg": round(float(lat.degrees), 3),
                "lon_deg": round(float(lon.degrees), 3),
                "alt_km": round(float(wgs84.height_of(position).km), 1),
            }
        )
    return out


def satellites_payload(plan: Plan, at: datetime) -> dict[str, Any]:
    sites = [
        {"cluster": key, "name": site.name, "lat_deg": round(site.lat_deg, 4), "lon_deg": round(site.lon_deg, 4)}
        for key, site in sorted(plan.sites.items())
        if key in plan.windows  # the clusters' sites (a plan of bare sites has no clusters)
    ]
    return {
        "schema": "emsfl.v1.satellites",
        "version": 1,
        "t": to_iso(at),
        "satellites": subpoints(plan.satellites, at),
        "sites": sites,
    }


class SubpointPublisher:
    """Publishes the plan's sub-satellite points every `every_s` wall seconds (also while paused: the map
    then shows where the constellation stands)."""

    def __init__(self, bus: Bus, orbit: OrbitPublisher, every_s: float = DEFAULT_EVERY_S) -> None:
        self.bus, self.orbit, self.every_s = bus, orbit, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orbit-subpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def publish_once(self) -> None:
        # plan and clock are replaced whole by reload/scale/pause, so one read of each is consistent
        plan, clock = self.orbit.plan, self.orbit.clock
        payload = satellites_payload(plan, clock.now())
        self.bus.client.publish(topics.ORBIT_SATELLITES, _encode(payload), qos=0, retain=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish_once()
            except Exception:  # a display feed must never take the orbit service down
                log.exception("publishing sub-satellite points failed")
            self._stop.wait(self.every_s)


def _encode(payload: dict[str, Any]) -> bytes:
    from protos import payloads

    return payloads.encode("satellites", payload)
