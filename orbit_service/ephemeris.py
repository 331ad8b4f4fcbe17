"""Satellite positions for the vectorised contact finder (`fast.py`): SGP4 for all satellites at once on a coarse
grid, Earth-fixed, with cubic Hermite interpolation between samples; the sites' local frames; the finder's settings."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from sgp4.api import SatrecArray
from skyfield.sgp4lib import theta_GMST1982

from orbit_service.contacts import check_interval
from orbit_service.sites import GroundSite
from orbit_service.timescale import timescale

FloatArray = NDArray[Any]
IntArray = NDArray[Any]
T = TypeVar("T")
R = TypeVar("R")

EARTH_ROTATION_RAD_S = 7.2921158553e-5
DEFAULT_STEP_S = 60.0
MIN_STEP_S = 5.0
GEODETIC_MARGIN_DEG = 0.5  # geodetic vs geocentric vertical (<= 0.19 deg) and an ellipsoid site radius
ROOT_TOL_S = 1e-3  # AOS/LOS to a millisecond, the precision they are rounded to
PEAK_TOL_S = 1e-4  # the peak instant, where no quadratic model is trusted (near the zenith el = asin(sin el) is
# ill-conditioned and the elevation falls off linearly, up to 1 deg/s)
PEAK_MODEL_S = 1.0  # a Newton step this short ends the peak search: the quadratic model's value is within 1e-4 deg
PEAK_MODEL_MAX_SIN = 0.999  # ... below 87.4 deg of elevation
MAX_NEWTON_STEPS = 60  # safeguarded: every step at least halves the bracket or converges quadratically
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
SOLVE_PIECE = 1 << 15  # entries per piece of the Newton solvers
WORKERS = 2  # threads for independent groups of sites (the target machine has two cores)
CHUNK_SAMPLES = 1 << 21  # grid samples (sites x satellites x instants) per group of sites in `find_passes`
GRID_PIECE = 16384  # entries per piece of `Ephemeris.grid_elevation`


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """fn over items, in order, on up to WORKERS threads: numpy releases the GIL in its loops, so independent
    groups of sites overlap on the cores (one thread: a plain loop)."""
    items = list(items)
    workers = min(WORKERS, os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _unix(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _dot(a: FloatArray, b: FloatArray) -> FloatArray:
    """Row-wise dot products of two (M, 3) arrays."""
    out: FloatArray = np.einsum("ij,ij->i", a, b)
    return out


def _dot3(a: FloatArray, b: FloatArray) -> FloatArray:
    """Dot products of vectors stored by component, (3, M) each: contiguous rows, no small inner loops."""
    out: FloatArray = a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
    return out


@dataclass(frozen=True)
class SiteFrame:
    """A site's Earth-fixed position and local east/north/up axes, and its elevation mask sampled per degree."""

    ecef_km: FloatArray  # (S, 3)
    east: FloatArray
    north: FloatArray
    up: FloatArray
    mask_deg: FloatArray  # (S, 361): the effective minimum elevation at azimuth 0..360 deg
    min_mask_deg: FloatArray  # (S,)
    any_azimuth_mask: bool  # whether some site's mask depends on the azimuth (asked in every inner loop)


def site_frames(sites: Sequence[GroundSite]) -> SiteFrame:
    ecef, east, north, up, masks = [], [], [], [], []
    azimuths = np.arange(361, dtype=np.float64)
    for site in sites:
        ecef.append(np.asarray(site.topos().itrs_xyz.km, dtype=np.float64))
        lat, lon = math.radians(site.lat_deg), math.radians(site.lon_deg)
        up.append([math.cos(lat) * math.cos(lon), math.cos(lat) * math.sin(lon), math.sin(lat)])
        east.append([-math.sin(lon), math.cos(lon), 0.0])
        north.append([-math.sin(lat) * math.cos(lon), -math.sin(lat) * math.sin(lon), math.cos(lat)])
        masks.append(np.array([site.mask_at(float(az)) for az in azimuths]))
    mask = np.array(masks, dtype=np.float64).reshape(len(sites), 361)
    min_mask = mask.min(axis=1) if len(sites) else np.zeros(0)
    return SiteFrame(
        np.array(ecef).reshape(-1, 3),
        np.array(east).reshape(-1, 3),
        np.array(north).reshape(-1, 3),
        np.array(up).reshape(-1, 3),
        mask,
        min_mask,
        bool(np.any(mask.max(axis=1, initial=-90.0) != min_mask)),
    )


@dataclass(frozen=True)
class Motion:
    """Earth-fixed position (km) of each entry and, when asked for, its velocity (km/s) and acceleration (km/s^2)
    in the rotating frame."""

    r: FloatArray  # (3, M): by component
    v: FloatArray | None = None
    a: FloatArray | None = None


class Ephemeris:
    """All satellites on a uniform grid from `start`, with Hermite interpolation between samples."""

    def __init__(self, satellites: Sequence[Any], start: datetime, end: datetime, step_s: float | None = None) -> None:
        check_interval(start, end)
        self.names = [sat.name for sat in satellites]
        self.index = {name: i for i, name in enumerate(self.names)}
        models = [sat.model for sat in satellites]
        if step_s is None:
            # Hermite error grows with (step / period)^4: keep >= 90 samples per orbit of the fastest satellite.
            min_period_s = min((2.0 * math.pi / m.no_kozai * 60.0 for m in models), default=5400.0)
            step_s = max(MIN_STEP_S, min(DEFAULT_STEP_S, min_period_s / 90.0))
        self.step_s = float(step_s)
        self.start_unix = _unix(start)
        self.duration_s = _unix(end) - self.start_unix
        self.n = max(1, math.ceil(self.duration_s / self.step_s))
        offsets = np.arange(self.n + 1, dtype=np.float64) * self.step_s
        unix = self.start_unix + offsets
        # SGP4 takes UTC Julian dates (as skyfield calls it); GMST 1982 takes UT1.
        jd = unix / 86400.0 + 2440587.5
        whole = np.floor(jd)
        frac = jd - whole
        if models:
            errors, r, v = SatrecArray(models).sgp4(whole, frac)
            bad = errors != 0
            r[bad] = np.nan
            v[bad] = np.nan
        else:
            r = np.zeros((0, self.n + 1, 3))
            v = np.zeros((0, self.n + 1, 3))
        self.r_teme: FloatArray = r
        self.v_teme: FloatArray = v
        base = datetime.fromtimestamp(self.start_unix, timezone.utc)
        t = timescale().from_datetimes([base + timedelta(seconds=float(s)) for s in offsets])
        theta, theta_dot = theta_GMST1982(t.whole, t.ut1_fraction)
        self.theta: FloatArray = np.unwrap(np.asarray(theta, dtype=np.float64))
        omega = np.asarray(theta_dot, dtype=np.float64) / 86400.0  # rad/s
        # Hermite data per sample: Earth-fixed position (Rz(theta) r) and velocity times the step; the velocity is
        # the rotated TEME one plus the frame's turn, d Rz/d theta r = (y, -x, 0) omega.
        c, s = np.cos(self.theta), np.sin(self.theta)
        rm = np.empty((*r.shape[:2], 6))
        x, y, vx, vy = r[..., 0], r[..., 1], v[..., 0], v[..., 1]
        rm[..., 0] = c * x + s * y
        rm[..., 1] = c * y - s * x
        rm[..., 2] = r[..., 2]
        rm[..., 3] = (c * vx + s * vy + omega * rm[..., 1]) * self.step_s
        rm[..., 4] = (c * vy - s * vx - omega * rm[..., 0]) * self.step_s
        rm[..., 5] = v[..., 2] * self.step_s
        self._rm = rm.reshape(-1, 6)
        # Earth-fixed positions (km), (satellites x samples, 3), contiguous: gathers of many samples stay cheap.
        self.r_flat: FloatArray = np.ascontiguousarray(self._rm[:, :3])
        self.r_ecef: FloatArray = self.r_flat.reshape(rm.shape[0], rm.shape[1], 3)
        # Samples k and k + 1 side by side in one row k: one contiguous gather of twelve values per entry (rows
        # that would mix two satellites are never used).
        self._pairs: FloatArray = np.lib.stride_tricks.as_strided(
            self._rm,
            shape=(max(0, self._rm.shape[0] - 1), 12),
            strides=(self._rm.strides[0], self._rm.strides[1]),
            writeable=False,
        )

    def _interval(self, sat: IntArray, t_s: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(Hermite data of the grid interval holding each instant, by component (12, M); the fraction elapsed)."""
        i = np.clip(np.floor(t_s / self.step_s).astype(np.int64), 0, self.n - 1)
        u = t_s / self.step_s - i
        return self._pairs[sat * (self.n + 1) + i].T.copy(), u

    def motion(self, sat: IntArray, t_s: FloatArray, order: int = 0) -> Motion:
        """Earth-fixed position of satellites `sat` at `t_s` seconds from the start (arrays of one shape), and up
        to `order` (0..2) time derivatives, from the cubic Hermite interpolant of Earth-fixed positions and
        velocities (sub-metre at the grid step for LEO, like the TEME one)."""
        x, u = self._interval(sat, t_s)
        r0, m0, r1, m1 = x[0:3], x[3:6], x[6:9], x[9:12]
        u2 = u * u
        u3 = u2 * u
        h00 = 2.0 * u3 - 3.0 * u2 + 1.0
        p = h00 * r0 + (u3 - 2.0 * u2 + u) * m0 + (1.0 - h00) * r1 + (u3 - u2) * m1
        if order == 0:
            return Motion(p)
        dr = r0 - r1
        # Derivatives of the basis: h01' = -h00', so r0 and r1 enter as their difference.
        step, step2 = self.step_s, self.step_s * self.step_s
        v = ((6.0 * u2 - 6.0 * u) / step) * dr + ((3.0 * u2 - 4.0 * u + 1.0) / step) * m0
        v += ((3.0 * u2 - 2.0 * u) / step) * m1
        if order == 1:
            return Motion(p, v)
        acc = ((12.0 * u - 6.0) / step2) * dr + ((6.0 * u - 4.0) / step2) * m0 + ((6.0 * u - 2.0) / step2) * m1
        return Motion(p, v, acc)

    def positions_ecef(self, sat: IntArray, t_s: FloatArray) -> FloatArray:
        """Earth-fixed positions (km, (M, 3)) of satellites `sat` at `t_s` seconds from the start."""
        out: FloatArray = self.motion(sat, t_s).r.T
        return out

    def grid_weights(self, grid_t: FloatArray) -> tuple[IntArray, FloatArray]:
        """(grid interval, the four Hermite weights (4, G)) of each instant of a grid (seconds from the start)."""
        i = np.clip(np.floor(grid_t / self.step_s).astype(np.int64), 0, self.n - 1)
        u = grid_t / self.step_s - i
        u2, u3 = u * u, u * u * u
        return i, np.stack([2 * u3 - 3 * u2 + 1, u3 - 2 * u2 + u, -2 * u3 + 3 * u2, u3 - u2])

    def grid_elevation(
        self,
        frames: SiteFrame,
        site: int,
        sat: IntArray,
        sample: IntArray,
        grid_t: FloatArray,
        weights: tuple[IntArray, FloatArray] | None = None,
    ) -> FloatArray:
        """Elevation (deg) from one site of satellite `sat[k]` at `grid_t[sample[k]]` (seconds from the start).

        The Hermite weights depend on the instant only: computed once per grid (`grid_weights`, or given). Per
        entry there remain one gather of twelve values, the cubic and two dot products with the site's fixed
        vectors, by component."""
        i, h = self.grid_weights(grid_t) if weights is None else weights
        e, up = frames.ecef_km[site], frames.up[site]
        f = sat * (self.n + 1) + i[sample]
        sin_el = np.empty(sample.size)
        # In cache-sized pieces: (12, piece) Hermite data and a few (piece,) temporaries.
        for a in range(0, sample.size, GRID_PIECE):
            x = self._pairs[f[a : a + GRID_PIECE]].T.copy()
            h0, h1, h2, h3 = h[:, sample[a : a + GRID_PIECE]]
            d = [h0 * x[c] + h1 * x[3 + c] + h2 * x[6 + c] + h3 * x[9 + c] - e[c] for c in range(3)]
            norm = np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            sin_el[a : a + GRID_PIECE] = (d[0] * up[0] + d[1] * up[1] + d[2] * up[2]) / norm
        el: FloatArray = np.degrees(np.arcsin(np.clip(sin_el, -1.0, 1.0)))
        return el

    def look(self, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray) -> tuple[FloatArray, ...]:
        """(elevation_deg, azimuth_deg, range_km) of each (site, satellite, time)."""
        d = self.motion(sat, t_s).r - frames.ecef_km.T[:, site]
        rng = np.sqrt(_dot3(d, d))
        el = np.degrees(np.arcsin(np.clip(_dot3(d, frames.up.T[:, site]) / rng, -1.0, 1.0)))
        az = np.degrees(np.arctan2(_dot3(d, frames.east.T[:, site]), _dot3(d, frames.north.T[:, site])))
        return el, np.mod(az, 360.0), rng

    def margin_grid(
        self, frames: SiteFrame, site: IntArray, sat: IntArray, idx: IntArray
    ) -> tuple[FloatArray, FloatArray]:
        """(elevation_deg, margin_deg) at grid samples, without interpolation."""
        d = np.take(self.r_flat, sat * (self.n + 1) + idx, axis=0).T
        return _el_margin(frames, site, d - frames.ecef_km.T[:, site])

    def margin(self, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray) -> FloatArray:
        """Elevation above the site's mask at the satellite's azimuth (deg); NaN positions count as far below."""
        return _el_margin(frames, site, self.motion(sat, t_s).r - frames.ecef_km.T[:, site])[1]


def _mask_at(frames: SiteFrame, site: IntArray, d: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """(mask_deg, its slope in deg per deg of azimuth, east and north components of d) at the azimuth of d (3, M)."""
    east, north = _dot3(d, frames.east.T[:, site]), _dot3(d, frames.north.T[:, site])
    az = np.mod(np.degrees(np.arctan2(east, north)), 360.0)
    k = np.clip(np.floor(np.nan_to_num(az)).astype(np.int64), 0, 359)
    w = az - k
    m0, m1 = frames.mask_deg[site, k], frames.mask_deg[site, k + 1]
    return m0 * (1.0 - w) + m1 * w, m1 - m0, east, north


def _el_margin(frames: SiteFrame, site: IntArray, d: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(elevation_deg, margin_deg) of offsets d (satellite minus site, ECEF km, (3, M)); NaN ones count as far
    below."""
    sin_el = _dot3(d, frames.up.T[:, site]) / np.sqrt(_dot3(d, d))
    el = np.degrees(np.arcsin(np.clip(sin_el, -1.0, 1.0)))
    mask = _mask_at(frames, site, d)[0] if frames.any_azimuth_mask else frames.min_mask_deg[site]
    out = el - mask
    bad = ~np.isfinite(out)
    return np.where(bad, -90.0, el), np.where(bad, -180.0, out)
