"""The vectorised contact finder: every satellite and every site at once, sub-second AOS/LOS.

1. SGP4 (`SatrecArray`) on a coarse time grid for all satellites at once, rotated to Earth-fixed with GMST 1982
   as SGP4 defines (positions, and velocities in the rotating frame).
2. Prefilter: at each grid sample, a satellite is a candidate for a site only if its Earth central angle
   to the site is below the largest central angle at which it can be above the site's lowest mask, plus
   the angle it can travel in half a grid step. Any pass, however short, has a moment above the mask; the
   grid sample nearest to it is within half a step, so it passes the prefilter: no pass is missed. One
   float32 vector-matrix product of unit vectors per site tests every sample.
3. Between grid samples positions come from cubic Hermite interpolation of the Earth-fixed positions and
   velocities (sub-metre at a 60 s step for LEO); the cubic also gives velocity and acceleration, hence
   analytic rates of the elevation.
4. Each run of candidate samples is searched: a local maximum below the mask (or minimum above it) is
   refined, so a pass grazing the mask between two samples is found; every sign change of elevation minus
   mask is refined by safeguarded Newton steps from a cubic through the neighbouring samples, and the peak of
   each pass by safeguarded Newton steps on the rate of sin(elevation). All brackets of a group of sites at
   once, in cache-sized pieces; groups of sites on up to WORKERS threads.

Skyfield's per-pair `find_events` (`contacts.satellite_contacts`) stays the reference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray
from sgp4.api import SatrecArray
from skyfield.sgp4lib import theta_GMST1982

from orbit_service.contacts import Contact, check_interval, round_ms
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


def _margin_rate(
    eph: Ephemeris, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(margin_deg, its rate in deg/s, elevation_deg) at each (site, satellite, time); NaN positions: far below."""
    m = eph.motion(sat, t_s, 1)
    assert m.v is not None
    d = m.r - frames.ecef_km.T[:, site]
    up = frames.up.T[:, site]
    inv = 1.0 / np.sqrt(_dot3(d, d))
    sin_el = _dot3(d, up) * inv
    # d/dt (d.up / |d|) = (v.up - sin_el (d.v) / |d|) / |d|
    rate = (_dot3(m.v, up) - sin_el * _dot3(d, m.v) * inv) * inv
    el = np.degrees(np.arcsin(np.clip(sin_el, -1.0, 1.0)))
    el_rate = np.degrees(rate / np.sqrt(np.maximum(1.0 - sin_el * sin_el, 1e-30)))
    if frames.any_azimuth_mask:
        mask, slope, east, north = _mask_at(frames, site, d)
        # d az/dt = (north * d east/dt - east * d north/dt) / (east^2 + north^2), in deg/s
        east_v, north_v = _dot3(m.v, frames.east.T[:, site]), _dot3(m.v, frames.north.T[:, site])
        az_rate = np.degrees((north * east_v - east * north_v) / (east * east + north * north))
        margin, margin_rate = el - mask, el_rate - slope * az_rate
    else:
        margin, margin_rate = el - frames.min_mask_deg[site], el_rate
    bad = ~np.isfinite(margin)
    return np.where(bad, -180.0, margin), np.where(bad, np.nan, margin_rate), np.where(bad, -90.0, el)


def _sin_el_rates(
    eph: Ephemeris, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """sin(elevation) and its first and second time derivatives (1/s, 1/s^2): smooth even through the zenith."""
    m = eph.motion(sat, t_s, 2)
    assert m.v is not None and m.a is not None
    d = m.r - frames.ecef_km.T[:, site]
    up = frames.up.T[:, site]
    # g = A / sqrt(B) with A = d.up, B = d.d
    a0, a1, a2 = _dot3(d, up), _dot3(m.v, up), _dot3(m.a, up)
    b0, b1, b2 = _dot3(d, d), 2.0 * _dot3(d, m.v), 2.0 * (_dot3(m.v, m.v) + _dot3(d, m.a))
    inv = 1.0 / np.sqrt(b0)
    inv3 = inv / b0
    g = a0 * inv
    g1 = a1 * inv - 0.5 * a0 * b1 * inv3
    g2 = a2 * inv - a1 * b1 * inv3 - 0.5 * a0 * b2 * inv3 + 0.75 * a0 * b1 * b1 * inv3 / b0
    return g, g1, g2


@dataclass(frozen=True)
class _Samples:
    """Grid samples that pass the prefilter, sorted by (site, satellite, grid index): elevation and margin (deg)."""

    site: IntArray
    sat: IntArray
    idx: IntArray
    el: FloatArray
    f: FloatArray


class _Prefilter:
    """The central-angle test of step 2, prepared once for every satellite and sample: per site, the candidates."""

    def __init__(self, eph: Ephemeris, frames: SiteFrame) -> None:
        self.eph, self.frames = eph, frames
        self.r = eph.r_flat
        radius = np.sqrt(_dot(self.r, self.r))
        # (3, N) float32: one vector-matrix product per site tests every sample (einsum: no BLAS threads to wake).
        unit = np.where(np.isfinite(radius)[:, None], self.r / radius[:, None], 0.0)
        self.unit_t = np.ascontiguousarray(unit.T, dtype=np.float32)
        v = eph.v_teme.reshape(-1, 3)
        speed = np.sqrt(_dot(v, v))
        half = eph.step_s / 2.0
        # The angle the sub-satellite point can move in half a step, and the farthest radius it can reach.
        self.travel = (speed / radius + EARTH_ROTATION_RAD_S) * half * 1.05
        self.r_far = radius + speed * half
        self.site_radius = np.sqrt(_dot(frames.ecef_km, frames.ecef_km))
        self.site_unit = (frames.ecef_km / self.site_radius[:, None]).astype(np.float32)
        # Sites share thresholds per lowest mask, rounded down to a degree.
        self.levels = np.floor(frames.min_mask_deg - GEODETIC_MARGIN_DEG)
        # Read-only from here on: groups of sites may be searched in parallel threads.
        self._thresholds = {low: self._threshold(low) for low in np.unique(self.levels).tolist()}

    def _threshold(self, low: float) -> FloatArray:
        """Per sample, the least cosine of the central angle at which a site of this mask level may see it."""
        e = math.radians(low)
        r_site = float(self.site_radius[self.levels == low].min())
        angle = np.arccos(np.clip(r_site * math.cos(e) / self.r_far, -1.0, 1.0)) - e + self.travel
        never = ~np.isfinite(angle) | (angle < 0)  # decayed satellites, or no reach above the mask
        # float32 like the dot products, with a margin far above float32 rounding so that no sample the float64 test
        # admits is lost.
        cos_angle = np.cos(np.clip(np.nan_to_num(angle), 0.0, math.pi)) - 1e-6
        out: FloatArray = np.where(never, 2.0, cos_angle).astype(np.float32)
        return out

    def samples(self, sites: range) -> _Samples:
        """Every grid sample of these sites that passes the test, with its elevation and margin."""
        cols_out, el_out, f_out = [], [], []
        for s_i in sites:
            dots = np.einsum("i,ij->j", self.site_unit[s_i], self.unit_t)
            cols = np.flatnonzero(dots >= self._thresholds[float(self.levels[s_i])])
            d = np.take(self.r, cols, axis=0).T - self.frames.ecef_km[s_i][:, None]
            el, f = _el_margin(self.frames, np.asarray(s_i), d)  # one site: its vectors broadcast
            cols_out.append(cols)
            el_out.append(el)
            f_out.append(f)
        sat, idx = np.divmod(np.concatenate(cols_out).astype(np.int64), self.eph.n + 1)
        site = np.repeat(np.arange(sites.start, sites.stop, dtype=np.int64), [c.size for c in cols_out])
        return _Samples(site, sat, idx, np.concatenate(el_out), np.concatenate(f_out))


def _golden(
    eph: Ephemeris,
    frames: SiteFrame,
    site: IntArray,
    sat: IntArray,
    lo: FloatArray,
    hi: FloatArray,
    sign: float,
    tol_s: float = 0.05,
) -> tuple[FloatArray, FloatArray]:
    """Vectorised golden-section search for the maximum of `sign * margin` on [lo, hi]; (instant, margin).

    Only for the few local extrema of the sampled margin that may hide a grazing pass or a dip."""

    def f_at(x: FloatArray) -> FloatArray:
        return sign * eph.margin(frames, site, sat, x)

    a, b = lo.copy(), hi.copy()
    c = b - GOLDEN * (b - a)
    d = a + GOLDEN * (b - a)
    fc, fd = f_at(c), f_at(d)
    while a.size and np.max(b - a) > tol_s:
        go_left = fc > fd  # the maximum lies in [a, d]
        b = np.where(go_left, d, b)
        a = np.where(go_left, a, c)
        c_new = np.where(go_left, b - GOLDEN * (b - a), d)
        d_new = np.where(go_left, c, a + GOLDEN * (b - a))
        f_new = f_at(np.where(go_left, c_new, d_new))
        fc, fd = np.where(go_left, f_new, fd), np.where(go_left, fc, f_new)
        c, d = c_new, d_new
    t = (a + b) / 2.0
    return t, eph.margin(frames, site, sat, t)


def _newton_step(
    x: FloatArray,
    value: FloatArray,
    rate: FloatArray,
    a: FloatArray,
    b: FloatArray,
    steps: FloatArray,
    tol: float,
) -> tuple[FloatArray, NDArray[np.bool_]]:
    """(next iterate, whether it is the Newton one) of a safeguarded Newton search for value = 0 in [a, b]
    (Numerical Recipes' rtsafe): bisection where the Newton step leaves the bracket (by more than tol: a root on
    an end of it is fine) or is not at most half the step before the last one (`steps`: (2, M), the last two step
    lengths, updated here)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        newton = x - value / rate
    ok = (newton > a - tol) & (newton < b + tol) & (np.abs(newton - x) <= 0.5 * steps[1])
    out: FloatArray = np.where(ok, np.clip(newton, a, b), 0.5 * (a + b))
    steps[1], steps[0] = steps[0], np.abs(out - x)
    return out, ok


def _by_piece(n: int, solve: Callable[[slice], tuple[FloatArray, FloatArray]]) -> tuple[FloatArray, FloatArray]:
    """Run a vectorised solver over cache-sized pieces of n entries (its temporaries stay in cache)."""
    x, y = np.empty(n), np.empty(n)
    for a in range(0, n, SOLVE_PIECE):
        sl = slice(a, min(n, a + SOLVE_PIECE))
        x[sl], y[sl] = solve(sl)
    return x, y


@dataclass(frozen=True)
class _Brackets:
    """Intervals [lo, hi] (s) whose ends have margins f_lo, f_hi of opposite signs, a first guess x0 of the root
    and the margin's curvature there (deg/s^2) from the samples around it (NaN where unknown)."""

    lo: FloatArray
    hi: FloatArray
    f_lo: FloatArray
    f_hi: FloatArray
    x0: FloatArray
    curv: FloatArray

    def piece(self, sl: slice) -> _Brackets:
        return _Brackets(self.lo[sl], self.hi[sl], self.f_lo[sl], self.f_hi[sl], self.x0[sl], self.curv[sl])


def _crossings(
    eph: Ephemeris,
    frames: SiteFrame,
    site: IntArray,
    sat: IntArray,
    br: _Brackets,
) -> tuple[FloatArray, FloatArray]:
    """(instant, elevation_deg) where margin = 0 in each bracket: safeguarded Newton on the analytic margin rate,
    all brackets at once, in cache-sized pieces."""

    def solve(sl: slice) -> tuple[FloatArray, FloatArray]:
        return _crossings_piece(eph, frames, site[sl], sat[sl], br.piece(sl))

    return _by_piece(site.size, solve)


def _crossings_piece(
    eph: Ephemeris, frames: SiteFrame, site: IntArray, sat: IntArray, br: _Brackets
) -> tuple[FloatArray, FloatArray]:
    a, b, x = br.lo.copy(), br.hi.copy(), br.x0.copy()
    below_at_a = br.f_lo < 0.0
    # Newton's error after a step s is about |curvature / (2 rate)| s^2: where the curvature is known from the
    # samples (with a tenfold margin), a step that leaves less than ROOT_TOL_S is the last one.
    curv = 10.0 * np.abs(br.curv)
    if frames.any_azimuth_mask:
        curv[:] = np.nan  # the mask's kinks: no curvature to trust, iterate to the tolerance
    steps = np.stack([br.hi - br.lo, br.hi - br.lo])  # the last two step lengths
    el = np.full(x.size, np.nan)
    todo = np.arange(x.size)
    for _ in range(MAX_NEWTON_STEPS):
        if todo.size == 0:
            break
        xt, at, bt = x[todo], a[todo], b[todo]
        f, rate, el[todo] = _margin_rate(eph, frames, site[todo], sat[todo], xt)
        # Keep the bracket: x replaces the end whose margin has its sign.
        to_a = (f < 0.0) == below_at_a[todo]
        at, bt = np.where(to_a, xt, at), np.where(to_a, bt, xt)
        st = steps[:, todo]
        nxt, newton = _newton_step(xt, f, rate, at, bt, st, ROOT_TOL_S)
        step = st[0]
        a[todo], b[todo], x[todo], steps[:, todo] = at, bt, nxt, st
        with np.errstate(invalid="ignore"):
            settled = newton & (curv[todo] * step * step <= 2.0 * ROOT_TOL_S * np.abs(rate))
        todo = todo[(step > ROOT_TOL_S) & (bt - at > ROOT_TOL_S) & ~settled]
    return x, el


def _cubic_roots(fm: FloatArray, f0: FloatArray, f1: FloatArray, f2: FloatArray) -> tuple[FloatArray, FloatArray]:
    """(root u in [0, 1], second derivative there) of the cubic through (-1, fm), (0, f0), (1, f1), (2, f2), where
    f0 and f1 differ in sign; a few Newton steps from the chord (NaN where they fail)."""
    a2 = 0.5 * (f1 + fm) - f0
    a3 = (f2 - f0 - 4.0 * a2 - (f1 - fm)) / 6.0
    a1 = 0.5 * (f1 - fm) - a3
    with np.errstate(invalid="ignore", divide="ignore"):
        u = f0 / (f0 - f1)
        for _ in range(4):
            u = u - (f0 + u * (a1 + u * (a2 + u * a3))) / (a1 + u * (2.0 * a2 + 3.0 * u * a3))
    u = np.where((u >= 0.0) & (u <= 1.0), u, np.nan)
    return u, 2.0 * a2 + 6.0 * a3 * u


def _peaks(
    eph: Ephemeris,
    frames: SiteFrame,
    site: IntArray,
    sat: IntArray,
    lo: FloatArray,
    hi: FloatArray,
    x0: FloatArray,
    sign: float = 1.0,
) -> tuple[FloatArray, FloatArray]:
    """(instant, elevation_deg) of the highest elevation in [lo, hi] (the lowest with sign = -1), starting from
    x0: safeguarded Newton on the rate of sin(elevation), which (unlike the elevation) stays smooth through the
    zenith."""

    def solve(sl: slice) -> tuple[FloatArray, FloatArray]:
        return _peaks_piece(eph, frames, site[sl], sat[sl], lo[sl], hi[sl], x0[sl], sign)

    return _by_piece(lo.size, solve)


def _peaks_piece(
    eph: Ephemeris,
    frames: SiteFrame,
    site: IntArray,
    sat: IntArray,
    lo: FloatArray,
    hi: FloatArray,
    x0: FloatArray,
    sign: float,
) -> tuple[FloatArray, FloatArray]:
    a, b = lo.copy(), hi.copy()
    x = np.clip(x0, lo, hi)
    steps = np.stack([hi - lo, hi - lo])  # the last two step lengths
    t_at = x.copy()
    g_at = np.full(lo.size, np.nan)
    todo = np.arange(lo.size)
    for _ in range(MAX_NEWTON_STEPS):
        if todo.size == 0:
            break
        xt, at, bt = x[todo], a[todo], b[todo]
        g, g1, g2 = (sign * v for v in _sin_el_rates(eph, frames, site[todo], sat[todo], xt))
        t_at[todo], g_at[todo] = xt, g
        # At an end of [lo, hi] and falling away from the interval: the maximum is that end (a pass cut by the window).
        at_end = ((xt <= lo[todo]) & (g1 <= 0.0)) | ((xt >= hi[todo]) & (g1 >= 0.0))
        rising = g1 > 0.0  # the maximum is later
        at, bt = np.where(rising, xt, at), np.where(rising, bt, xt)
        # A maximum needs g2 < 0: elsewhere (beyond an inflection) bisect.
        curv = np.where(g2 < 0.0, g2, np.nan)
        st = steps[:, todo]
        nxt, newton = _newton_step(xt, g1, curv, at, bt, st, PEAK_TOL_S)
        step = st[0]
        # Within PEAK_MODEL_S of the maximum the quadratic through (g, g1, g2) gives its value to ~1e-4 deg.
        model = newton & (step < PEAK_MODEL_S) & (sign * g < PEAK_MODEL_MAX_SIN)
        t_at[todo[model]], g_at[todo[model]] = nxt[model], (g - 0.5 * g1 * g1 / curv)[model]
        a[todo], b[todo], x[todo], steps[:, todo] = at, bt, nxt, st
        todo = todo[(step > PEAK_TOL_S) & (bt - at > PEAK_TOL_S) & ~model & ~at_end]
    el: FloatArray = np.degrees(np.arcsin(np.clip(np.nan_to_num(sign * g_at, nan=-1.0), -1.0, 1.0)))
    return t_at, el


@dataclass(frozen=True)
class Passes:
    """Arrays, one entry per pass: site and satellite indices, AOS/LOS in seconds from the start, peak (deg)."""

    site: IntArray
    sat: IntArray
    aos_s: FloatArray
    los_s: FloatArray
    peak_deg: FloatArray


def _parabola(fm: FloatArray, f0: FloatArray, fp: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Vertex (offset in steps, value) of the parabola through (-1, fm), (0, f0), (1, fp)."""
    curv = fm - 2.0 * f0 + fp
    safe = np.where(curv != 0, curv, -1e-12)
    off = np.clip((fm - fp) / (2.0 * safe), -1.0, 1.0)
    return off, f0 - (fm - fp) * off / 4.0


@dataclass(frozen=True)
class _Runs:
    """Runs of consecutive candidate samples of one (site, satellite): the samples, and per sample its run, whether
    it starts one, and its neighbours' margins (`BELOW` beyond the run's ends: they failed the prefilter)."""

    s: _Samples
    t: FloatArray  # seconds from the start
    seg: IntArray
    new_seg: NDArray[np.bool_]
    first: IntArray  # first and last sample of each run
    last: IntArray
    prev_f: FloatArray
    next_f: FloatArray


BELOW = -5.0  # the margin assumed just outside a run, for its local extrema


def _runs(eph: Ephemeris, s: _Samples) -> _Runs:
    n = s.site.size
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = (s.site[1:] != s.site[:-1]) | (s.sat[1:] != s.sat[:-1]) | (s.idx[1:] != s.idx[:-1] + 1)
    first = np.flatnonzero(new_seg)
    last = np.append(first[1:] - 1, n - 1) if n else first
    prev_f, next_f = np.full(n, BELOW), np.full(n, BELOW)
    if n:
        prev_f[1:] = np.where(new_seg[1:], BELOW, s.f[:-1])
        next_f[:-1] = np.where(new_seg[1:], BELOW, s.f[1:])
    return _Runs(s, s.idx * eph.step_s, np.cumsum(new_seg) - 1, new_seg, first, last, prev_f, next_f)


def _extrema(eph: Ephemeris, runs: _Runs) -> tuple[IntArray, IntArray]:
    """(maxima, minima): indices of interior samples that are local extrema of the margin, plateaus once."""
    f, prev, nxt = runs.s.f, runs.prev_f, runs.next_f
    interior = (runs.s.idx > 0) & (runs.s.idx < eph.n)
    is_max = ((f >= prev) & (f > nxt) | (f > prev) & (f >= nxt)) & interior
    is_min = ((f <= prev) & (f < nxt) | (f < prev) & (f <= nxt)) & interior
    return np.flatnonzero(is_max), np.flatnonzero(is_min)


def _refined_tops(eph: Ephemeris, frames: SiteFrame, runs: _Runs, top: IntArray) -> FloatArray:
    """The highest elevation near each local maximum sample above the mask (within a step either side)."""
    s, step, n = runs.s, eph.step_s, runs.s.site.size
    nxt = np.minimum(top + 1, n - 1)
    # The vertex of sin(elevation), smoother than the elevation near the zenith, is the first guess.
    sin_el = np.sin(np.radians(s.el[np.concatenate([top - 1, top, nxt])])).reshape(3, -1)
    sin_prev = np.where(runs.new_seg[top], -1.0, sin_el[0])
    sin_next = np.where((top == n - 1) | runs.new_seg[nxt], -1.0, sin_el[2])
    off, _ = _parabola(sin_prev, sin_el[1], sin_next)
    t = runs.t[top]
    lo, hi = np.maximum(t - step, 0.0), np.minimum(t + step, eph.duration_s)
    # At the grid's edges (a pass cut by the window) the search starts from the edge: often the maximum.
    edge = (s.idx[top] == 0) | (s.idx[top] == eph.n)
    x0 = np.where(edge, np.clip(t, lo, hi), t + off * step)
    t_peak, el_peak = _peaks(eph, frames, s.site[top], s.sat[top], lo, hi, x0)
    if frames.any_azimuth_mask:  # the highest instant may lie behind a higher part of the mask: not in the pass
        el_peak = np.where(eph.margin(frames, s.site[top], s.sat[top], t_peak) >= 0.0, el_peak, -90.0)
    out: FloatArray = np.maximum(el_peak, np.where(t <= eph.duration_s, s.el[top], -90.0))
    return out


def _tops(eph: Ephemeris, runs: _Runs, maxima: IntArray) -> IntArray:
    """Samples above the mask next to which the elevation peaks: the interior local maxima, and the grid's first
    (last) sample where the margin falls after (rises before) it, for passes under way at the window's edges."""
    s = runs.s
    is_top = ((s.idx == 0) & (s.f >= runs.next_f)) | ((s.idx == eph.n) & (s.f >= runs.prev_f))
    is_top[maxima] = True
    return np.flatnonzero(is_top & (s.f >= 0))


@dataclass(frozen=True)
class _Points:
    """Instants (s), margins and elevations (deg) and run numbers, sorted by (run, instant): the samples of every
    run between the grid samples just outside it (known below the mask; at the grid's edges a copy of the edge
    sample instead), and refined extrema."""

    t: FloatArray
    f: FloatArray
    el: FloatArray
    seg: IntArray


def _points(eph: Ephemeris, frames: SiteFrame, runs: _Runs, el_peak: FloatArray) -> _Points:
    """The samples (with `el_peak` as elevation: refined at maxima) and the outside samples of every run."""
    s, n, n_runs = runs.s, runs.s.site.size, runs.first.size
    pos = np.arange(n) + 2 * runs.seg + 1
    size = n + 2 * n_runs
    pt, pf, pe = np.empty(size), np.empty(size), np.empty(size)
    ps = np.empty(size, dtype=np.int64)
    pt[pos], pf[pos], pe[pos], ps[pos] = runs.t, s.f, el_peak, runs.seg
    for ends, delta in ((runs.first, -1), (runs.last, 1)):
        at = pos[ends] + delta
        out_idx = s.idx[ends] + delta
        edge = (out_idx < 0) | (out_idx > eph.n)
        inner = np.flatnonzero(~edge)
        el_o, f_o = eph.margin_grid(frames, s.site[ends[inner]], s.sat[ends[inner]], out_idx[inner])
        pt[at], pf[at], pe[at] = runs.t[ends], s.f[ends], el_peak[ends]
        pt[at[inner]], pf[at[inner]], pe[at[inner]] = out_idx[inner] * eph.step_s, f_o, el_o
        ps[at] = np.arange(n_runs)
    return _Points(pt, pf, pe, ps)


def _hidden(eph: Ephemeris, frames: SiteFrame, runs: _Runs, maxima: IntArray, minima: IntArray) -> _Points:
    """Refined local extrema that may hide a grazing pass (a maximum below the mask) or a dip below it (a minimum
    above it); unsorted. With a mask that depends on the azimuth, by golden section on the margin; otherwise the
    margin is the elevation less a constant: by Newton steps on sin(elevation)."""
    s, step = runs.s, eph.step_s
    parts = []
    for sel, sign in ((maxima[s.f[maxima] < 0], 1.0), (minima[s.f[minima] >= 0], -1.0)):
        off, vertex = _parabola(runs.prev_f[sel], s.f[sel], runs.next_f[sel])
        keep = vertex > -1.0 if sign > 0 else vertex < 1.0
        sel, t, off = sel[keep], runs.t[sel[keep]], off[keep]
        site, sat = s.site[sel], s.sat[sel]
        if frames.any_azimuth_mask:
            te, fe = _golden(eph, frames, site, sat, t - step, t + step, sign)
            el = eph.look(frames, site, sat, te)[0]
        else:
            te, el = _peaks(eph, frames, site, sat, t - step, t + step, t + off * step, sign)
            fe = el - frames.min_mask_deg[site]
        parts.append((te, fe, el, runs.seg[sel]))
    t, f, el, seg = (np.concatenate(col) for col in zip(*parts, strict=True))
    return _Points(t, f, el, seg)


def _insert(pts: _Points, extra: _Points, span: float) -> _Points:
    """`extra` inserted into `pts` in (run, instant) order (one pass over the arrays, no sort of them)."""
    if extra.t.size == 0:
        return pts
    key = extra.seg * span + extra.t
    order = np.argsort(key, kind="stable")
    where = np.searchsorted(pts.seg * span + pts.t, key[order], side="right")
    return _Points(
        np.insert(pts.t, where, extra.t[order]),
        np.insert(pts.f, where, extra.f[order]),
        np.insert(pts.el, where, extra.el[order]),
        np.insert(pts.seg, where, extra.seg[order]),
    )


def find_passes(eph: Ephemeris, frames: SiteFrame) -> Passes:
    """Every interval above the mask of every (site, satellite), in seconds from the start, clipped to the window.

    Sites go through in groups of about CHUNK_SAMPLES grid samples: every array of a group stays cache-sized."""
    prefilter = _Prefilter(eph, frames)
    n_sites = frames.ecef_km.shape[0]
    per_group = max(1, CHUNK_SAMPLES // max(1, prefilter.r.shape[0]))

    def group(a: int) -> Passes:
        return _group_passes(eph, frames, prefilter.samples(range(a, min(n_sites, a + per_group))))

    parts = parallel_map(group, range(0, n_sites, per_group))
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return Passes(empty, empty, np.zeros(0), np.zeros(0), np.zeros(0))
    return Passes(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Passes)))


def _group_passes(eph: Ephemeris, frames: SiteFrame, samples: _Samples) -> Passes:
    """The passes of the sites of one group, from their candidate samples."""
    runs = _runs(eph, samples)
    maxima, minima = _extrema(eph, runs)
    top = _tops(eph, runs, maxima)
    # The elevation each sample brings to its pass's peak: refined at the tops; none from beyond the window.
    el_peak = np.where(runs.t <= eph.duration_s, runs.s.el, -90.0)
    el_peak[top] = _refined_tops(eph, frames, runs, top)
    span = 2.0 * (eph.n + 2) * eph.step_s  # run keys: run * span + instant, sorted like the points
    pts = _insert(_points(eph, frames, runs, el_peak), _hidden(eph, frames, runs, maxima, minima), span)
    seg_site, seg_sat = runs.s.site[runs.first], runs.s.sat[runs.first]
    return _passes(eph, frames, pts, seg_site, seg_sat)


def _brackets(eph: Ephemeris, pts: _Points, br: IntArray) -> _Brackets:
    """The brackets between points br and br + 1; where the points br - 1 .. br + 2 are grid samples of one run,
    the first guess and curvature come from the cubic through their margins, elsewhere from the chord."""
    pt, pf, step, n = pts.t, pts.f, eph.step_s, pts.t.size
    lo, hi, f_lo, f_hi = pt[br], pt[br + 1], pf[br], pf[br + 1]
    before, after = np.maximum(br - 1, 0), np.minimum(br + 2, n - 1)
    uniform = (
        (br >= 1)
        & (br + 2 < n)
        & (pts.seg[before] == pts.seg[br])
        & (pts.seg[after] == pts.seg[br])
        & (hi - lo == step)
        & (lo - pt[before] == step)
        & (pt[after] - hi == step)
    )
    u, curv_u = _cubic_roots(pf[before], f_lo, f_hi, pf[after])
    with np.errstate(invalid="ignore", divide="ignore"):
        chord = np.where(f_hi != f_lo, lo - f_lo * (hi - lo) / (f_hi - f_lo), 0.5 * (lo + hi))
    cubic = uniform & np.isfinite(u)
    x0 = np.where(cubic, lo + np.nan_to_num(u) * step, np.clip(chord, lo, hi))
    return _Brackets(lo, hi, f_lo, f_hi, x0, np.where(cubic, curv_u / (step * step), np.nan))


def _passes(eph: Ephemeris, frames: SiteFrame, pts: _Points, seg_site: IntArray, seg_sat: IntArray) -> Passes:
    """The passes between the sign changes of the margin along the points (refined), and of the runs above the
    mask at the grid's first or last sample; the peak is the highest point inside, AOS or LOS."""
    pt, pf, ps = pts.t, pts.f, pts.seg
    above = pf >= 0.0
    same = ps[1:] == ps[:-1]
    br = np.flatnonzero(same & (above[:-1] != above[1:]))
    b_seg = ps[br]
    roots, root_el = _crossings(eph, frames, seg_site[b_seg], seg_sat[b_seg], _brackets(eph, pts, br))
    rising = above[br + 1]
    # Edges: a run whose first point is above starts at the window start; whose last is above, at the grid end.
    seg_first_pt = np.flatnonzero(np.append(True, ~same)) if pt.size else np.zeros(0, dtype=np.int64)
    seg_last_pt = np.append(seg_first_pt[1:] - 1, pt.size - 1) if pt.size else seg_first_pt
    start_up = seg_first_pt[above[seg_first_pt]]
    end_up = seg_last_pt[above[seg_last_pt]]
    # Events in point order (a crossing lies between its two points), up before down at one point; each with the
    # point next to it inside the pass.
    ev_key = np.concatenate([2 * br + 1, 2 * start_up, 2 * end_up])
    ev_t = np.concatenate([roots, pt[start_up], pt[end_up]])
    ev_el = np.concatenate([root_el, np.full(start_up.size + end_up.size, np.nan)])
    ev_seg = np.concatenate([b_seg, ps[start_up], ps[end_up]])
    ev_up = np.concatenate([rising, np.ones(start_up.size, dtype=bool), np.zeros(end_up.size, dtype=bool)])
    ev_pt = np.concatenate([br + rising, start_up, end_up])
    order = np.lexsort((~ev_up, ev_key))
    ev_t, ev_el, ev_seg, ev_up, ev_pt = ev_t[order], ev_el[order], ev_seg[order], ev_up[order], ev_pt[order]
    # Events alternate up, down within a run: pair each up with the down that follows it.
    pair = np.flatnonzero(ev_up[:-1] & ~ev_up[1:] & (ev_seg[:-1] == ev_seg[1:]))
    aos, los, pseg = ev_t[pair], ev_t[pair + 1], ev_seg[pair]
    aos_el, los_el = ev_el[pair], np.where(los > eph.duration_s, np.nan, ev_el[pair + 1])
    los = np.minimum(los, eph.duration_s)
    keep = (los > aos) & (aos < eph.duration_s)
    pair = pair[keep]
    aos, los, aos_el, los_el, pseg = aos[keep], los[keep], aos_el[keep], los_el[keep], pseg[keep]
    # The elevation at the window's edges (few): from the ephemeris.
    ends_t, ends_el = np.concatenate([aos, los]), np.concatenate([aos_el, los_el])
    fix = np.flatnonzero(np.isnan(ends_el))
    if fix.size:
        which = np.tile(pseg, 2)[fix]
        ends_el[fix] = eph.look(frames, seg_site[which], seg_sat[which], ends_t[fix])[0]
    peak = np.maximum(ends_el[: aos.size], ends_el[aos.size :])
    if aos.size:
        # The points inside pass k are ev_pt[pair[k]] .. ev_pt[pair[k] + 1], in order and disjoint.
        bounds = np.stack([ev_pt[pair], ev_pt[pair + 1] + 1], axis=1).reshape(-1)
        inside = np.maximum.reduceat(np.append(pts.el, -90.0), bounds)[::2]
        peak = np.maximum(peak, inside)
    return Passes(seg_site[pseg], seg_sat[pseg], aos, los, peak)


class ContactTable:
    """Every contact of a plan as columns, sorted by (site, AOS, LOS, satellite id); `Contact` objects are built
    per site only when asked for (`site_contacts`)."""

    def __init__(
        self,
        keys: Sequence[str],
        sites: Mapping[str, GroundSite],
        eph: Ephemeris,
        found: Passes,
        start: datetime,
        end: datetime,
    ) -> None:
        self.keys = list(keys)
        self.site_names = [sites[k].name for k in self.keys]
        self.sat_names = eph.names
        self.start = start
        end_ms = round((end - start).total_seconds() * 1000.0)
        aos = np.round(found.aos_s * 1000.0).astype(np.int64)
        los = np.minimum(np.round(found.los_s * 1000.0).astype(np.int64), end_ms)
        peak = np.round(found.peak_deg, 3)
        keep = los > aos
        site, sat, aos, los, peak = found.site[keep], found.sat[keep], aos[keep], los[keep], peak[keep]
        rank = np.empty(len(self.sat_names), dtype=np.int64)
        rank[np.argsort(np.array(self.sat_names, dtype=object), kind="stable")] = np.arange(len(self.sat_names))
        self.sat_rank: IntArray = rank  # of each satellite's name among the names
        order = np.lexsort((rank[sat], los, aos, site))
        self.site: IntArray = site[order]
        self.sat: IntArray = sat[order]
        self.aos_ms: IntArray = aos[order]
        self.los_ms: IntArray = los[order]
        self.peak_deg: FloatArray = peak[order]
        self.bounds = np.searchsorted(self.site, np.arange(len(self.keys) + 1), side="left")

    def __len__(self) -> int:
        return int(self.site.size)

    def rows(self, s_i: int) -> slice:
        return slice(int(self.bounds[s_i]), int(self.bounds[s_i + 1]))

    def site_contacts(self, s_i: int) -> list[Contact]:
        rows = self.rows(s_i)
        name, start, ms = self.site_names[s_i], self.start, timedelta(milliseconds=1)
        sats = self.sat_names
        return [
            Contact(name, sats[k], start + a * ms, start + b * ms, p)
            for k, a, b, p in zip(
                self.sat[rows].tolist(),
                self.aos_ms[rows].tolist(),
                self.los_ms[rows].tolist(),
                self.peak_deg[rows].tolist(),
                strict=True,
            )
        ]


def fast_contact_table(
    sites: Mapping[str, GroundSite],
    satellites: Sequence[Any],
    start: datetime,
    end: datetime,
    step_s: float | None = None,
) -> tuple[ContactTable, Ephemeris, SiteFrame]:
    """Every contact of every site as columns (see `fast_contacts`)."""
    start, end = round_ms(start), round_ms(end)
    keys = list(sites)
    eph = Ephemeris(satellites, start, end, step_s)
    frames = site_frames([sites[k] for k in keys])
    return ContactTable(keys, sites, eph, find_passes(eph, frames), start, end), eph, frames


def fast_contacts(
    sites: Mapping[str, GroundSite],
    satellites: Sequence[Any],
    start: datetime,
    end: datetime,
    step_s: float | None = None,
) -> tuple[dict[str, list[Contact]], Ephemeris, SiteFrame]:
    """Contacts per site key, earliest AOS first, as `contacts.site_contacts` would find them."""
    table, eph, frames = fast_contact_table(sites, satellites, start, end, step_s)
    return {k: table.site_contacts(s_i) for s_i, k in enumerate(table.keys)}, eph, frames
