"""The vectorised contact finder: every satellite and every site at once, sub-second AOS/LOS.

1. SGP4 (`SatrecArray`) on a coarse time grid for all satellites at once (TEME positions and velocities).
2. Prefilter: at each grid sample, a satellite is a candidate for a site only if its Earth central angle
   to the site is below the largest central angle at which it can be above the site's lowest mask, plus
   the angle it can travel in half a grid step. Any pass, however short, has a moment above the mask; the
   grid sample nearest to it is within half a step, so it passes the prefilter: no pass is missed.
3. Between grid samples positions come from cubic Hermite interpolation of the SGP4 positions and
   velocities (sub-metre at a 60 s step for LEO), rotated to Earth-fixed with GMST 1982 as SGP4 defines.
4. Each run of candidate samples is searched: local extrema are refined by golden-section search (so a pass
   grazing the mask between two samples is found), then every sign change of elevation minus mask is
   refined by bisection to a millisecond.

Skyfield's per-pair `find_events` (`contacts.satellite_contacts`) stays the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sgp4.api import SatrecArray
from skyfield.sgp4lib import theta_GMST1982

from orbit_service.contacts import Contact, check_interval, round_ms
from orbit_service.sites import GroundSite
from orbit_service.timescale import timescale

FloatArray = NDArray[Any]
IntArray = NDArray[Any]

EARTH_ROTATION_RAD_S = 7.2921158553e-5
DEFAULT_STEP_S = 60.0
MIN_STEP_S = 5.0
GEODETIC_MARGIN_DEG = 0.5  # geodetic vs geocentric vertical (<= 0.19 deg) and an ellipsoid site radius
BISECT_TOL_S = 1e-3
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
BLOCK = 4  # grid samples per block of the two-level prefilter
GRID_PIECE = 16384  # entries per piece of `Ephemeris.grid_elevation`


def _unix(moment: datetime) -> float:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class SiteFrame:
    """A site's Earth-fixed position and local east/north/up axes, and its elevation mask sampled per degree."""

    ecef_km: FloatArray  # (S, 3)
    east: FloatArray
    north: FloatArray
    up: FloatArray
    mask_deg: FloatArray  # (S, 361): the effective minimum elevation at azimuth 0..360 deg
    min_mask_deg: FloatArray  # (S,)

    @property
    def any_azimuth_mask(self) -> bool:
        return bool(np.any(self.mask_deg.max(axis=1) != self.min_mask_deg))


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
    return SiteFrame(
        np.array(ecef).reshape(-1, 3),
        np.array(east).reshape(-1, 3),
        np.array(north).reshape(-1, 3),
        np.array(up).reshape(-1, 3),
        mask,
        mask.min(axis=1) if len(sites) else np.zeros(0),
    )


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
        theta, _ = theta_GMST1982(t.whole, t.ut1_fraction)
        self.theta: FloatArray = np.unwrap(np.asarray(theta, dtype=np.float64))
        c, s = np.cos(self.theta), np.sin(self.theta)
        x, y = r[..., 0], r[..., 1]
        self.r_ecef: FloatArray = np.stack([c * x + s * y, -s * x + c * y, r[..., 2]], axis=-1)

    def positions_ecef(self, sat: IntArray, t_s: FloatArray) -> FloatArray:
        """Earth-fixed positions (km) of satellites `sat` at `t_s` seconds from the start (arrays of one shape)."""
        i = np.clip(np.floor(t_s / self.step_s).astype(np.int64), 0, self.n - 1)
        u = (t_s - i * self.step_s) / self.step_s
        u2, u3 = u * u, u * u * u
        h00 = 2 * u3 - 3 * u2 + 1
        h10 = (u3 - 2 * u2 + u) * self.step_s
        h01 = -2 * u3 + 3 * u2
        h11 = (u3 - u2) * self.step_s
        p = (
            h00[:, None] * self.r_teme[sat, i]
            + h10[:, None] * self.v_teme[sat, i]
            + h01[:, None] * self.r_teme[sat, i + 1]
            + h11[:, None] * self.v_teme[sat, i + 1]
        )
        theta = self.theta[i] + u * (self.theta[i + 1] - self.theta[i])
        c, s = np.cos(theta), np.sin(theta)
        return np.stack([c * p[:, 0] + s * p[:, 1], -s * p[:, 0] + c * p[:, 1], p[:, 2]], axis=-1)

    def grid_elevation(
        self, frames: SiteFrame, site: int, sat: IntArray, sample: IntArray, grid_t: FloatArray
    ) -> FloatArray:
        """Elevation (deg) from one site of satellite `sat[k]` at `grid_t[sample[k]]` (seconds from the start).

        What depends on the instant only (Hermite weights, Earth rotation) is computed once per grid instant, and
        the site is turned into TEME there instead of every satellite position into ECEF: per entry there remain
        four gathers, the cubic and one dot product (the same geometry as `look`)."""
        i = np.clip(np.floor(grid_t / self.step_s).astype(np.int64), 0, self.n - 1)
        u = (grid_t - i * self.step_s) / self.step_s
        u2, u3 = u * u, u * u * u
        h = np.stack([2 * u3 - 3 * u2 + 1, (u3 - 2 * u2 + u) * self.step_s, -2 * u3 + 3 * u2, (u3 - u2) * self.step_s])
        theta = self.theta[i] + u * (self.theta[i + 1] - self.theta[i])
        c, s = np.cos(theta), np.sin(theta)
        e, up = frames.ecef_km[site], frames.up[site]
        # ECEF = Rz(theta) TEME, so TEME = Rz(theta)^T ECEF.
        site_teme = np.stack([c * e[0] - s * e[1], s * e[0] + c * e[1], np.full(c.size, e[2])], axis=1)
        up_teme = np.stack([c * up[0] - s * up[1], s * up[0] + c * up[1], np.full(c.size, up[2])], axis=1)
        r = self.r_teme.reshape(-1, 3)
        v = self.v_teme.reshape(-1, 3)
        f = sat * (self.n + 1) + i[sample]
        sin_el = np.empty(sample.size)
        # In cache-sized pieces: a dozen (piece, 3) temporaries per piece.
        for a in range(0, sample.size, GRID_PIECE):
            fa, sa = f[a : a + GRID_PIECE], sample[a : a + GRID_PIECE]
            ha = h[:, sa]
            d = ha[0][:, None] * r[fa]
            d += ha[1][:, None] * v[fa]
            fa = fa + 1
            d += ha[2][:, None] * r[fa]
            d += ha[3][:, None] * v[fa]
            d -= site_teme[sa]
            sin_el[a : a + GRID_PIECE] = np.einsum("ij,ij->i", d, up_teme[sa]) / np.sqrt(np.einsum("ij,ij->i", d, d))
        el: FloatArray = np.degrees(np.arcsin(np.clip(sin_el, -1.0, 1.0)))
        return el

    def local(self, sat: IntArray, i: IntArray) -> Local:
        """The Hermite cubic of each satellite over grid interval i, for repeated evaluation."""
        p0, p1 = self.r_teme[sat, i], self.r_teme[sat, i + 1]
        m0, m1 = self.v_teme[sat, i] * self.step_s, self.v_teme[sat, i + 1] * self.step_s
        coeffs = np.stack([p0, m0, -3 * p0 - 2 * m0 + 3 * p1 - m1, 2 * p0 + m0 - 2 * p1 + m1], axis=1)
        return Local(self, coeffs, self.theta[i], self.theta[i + 1] - self.theta[i], i * self.step_s)

    def look(self, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray) -> tuple[FloatArray, ...]:
        """(elevation_deg, azimuth_deg, range_km) of each (site, satellite, time)."""
        d = self.positions_ecef(sat, t_s) - frames.ecef_km[site]
        rng = np.sqrt(np.einsum("ij,ij->i", d, d))
        up = np.einsum("ij,ij->i", d, frames.up[site])
        el = np.degrees(np.arcsin(np.clip(up / rng, -1.0, 1.0)))
        az = np.degrees(
            np.arctan2(np.einsum("ij,ij->i", d, frames.east[site]), np.einsum("ij,ij->i", d, frames.north[site]))
        )
        return el, np.mod(az, 360.0), rng

    def margin_grid(
        self, frames: SiteFrame, site: IntArray, sat: IntArray, idx: IntArray
    ) -> tuple[FloatArray, FloatArray]:
        """(elevation_deg, margin_deg) at grid samples, without interpolation."""
        d = self.r_ecef[sat, idx] - frames.ecef_km[site]
        return self._el_margin(frames, site, d)

    def _el_margin(self, frames: SiteFrame, site: IntArray, d: FloatArray) -> tuple[FloatArray, FloatArray]:
        rng = np.sqrt(np.einsum("ij,ij->i", d, d))
        el = np.degrees(np.arcsin(np.clip(np.einsum("ij,ij->i", d, frames.up[site]) / rng, -1.0, 1.0)))
        if not frames.any_azimuth_mask:
            out = el - frames.min_mask_deg[site]
            bad = ~np.isfinite(out)
            return np.where(bad, -90.0, el), np.where(bad, -180.0, out)
        az = np.degrees(
            np.arctan2(np.einsum("ij,ij->i", d, frames.east[site]), np.einsum("ij,ij->i", d, frames.north[site]))
        )
        az = np.mod(az, 360.0)
        k = np.clip(np.floor(az).astype(np.int64), 0, 359)
        w = az - k
        mask = frames.mask_deg[site, k] * (1.0 - w) + frames.mask_deg[site, k + 1] * w
        out = el - mask
        bad = ~np.isfinite(out)
        return np.where(bad, -90.0, el), np.where(bad, -180.0, out)

    def margin(self, frames: SiteFrame, site: IntArray, sat: IntArray, t_s: FloatArray) -> FloatArray:
        """Elevation above the site's mask at the satellite's azimuth (deg); NaN positions count as far below."""
        d = self.positions_ecef(sat, t_s) - frames.ecef_km[site]
        return self._el_margin(frames, site, d)[1]


@dataclass(frozen=True)
class Local:
    """Hermite cubics p(u) = c0 + c1 u + c2 u^2 + c3 u^3 over one grid interval per entry (TEME, km)."""

    eph: Ephemeris
    coeffs: FloatArray  # (M, 4, 3)
    theta0: FloatArray
    dtheta: FloatArray
    t0: FloatArray

    def margin(self, frames: SiteFrame, site: IntArray, rows: IntArray, t_s: FloatArray) -> FloatArray:
        c = self.coeffs[rows]
        u = ((t_s - self.t0[rows]) / self.eph.step_s)[:, None]
        p = c[:, 0] + u * (c[:, 1] + u * (c[:, 2] + u * c[:, 3]))
        theta = self.theta0[rows] + u[:, 0] * self.dtheta[rows]
        cs, sn = np.cos(theta), np.sin(theta)
        d = np.stack([cs * p[:, 0] + sn * p[:, 1], -sn * p[:, 0] + cs * p[:, 1], p[:, 2]], axis=-1)
        return self.eph._el_margin(frames, site, d - frames.ecef_km[site])[1]


def _candidates(eph: Ephemeris, frames: SiteFrame) -> tuple[IntArray, IntArray, IntArray]:
    """(site, satellite, grid index) of every sample that passes the central-angle prefilter, sorted."""
    n_sat, n_t = eph.r_ecef.shape[0], eph.n + 1
    r = eph.r_ecef.reshape(-1, 3)
    radius = np.sqrt(np.einsum("ij,ij->i", r, r))
    unit = r / radius[:, None]
    speed = np.sqrt(np.einsum("ij,ij->i", eph.v_teme.reshape(-1, 3), eph.v_teme.reshape(-1, 3)))
    half = eph.step_s / 2.0
    # The angle the sub-satellite point can move in half a step, and the farthest radius it can reach.
    travel = (speed / radius + EARTH_ROTATION_RAD_S) * half * 1.05
    r_far = radius + speed * half
    site_radius = np.sqrt(np.einsum("ij,ij->i", frames.ecef_km, frames.ecef_km))
    site_unit = frames.ecef_km / site_radius[:, None]
    # Two levels: blocks of BLOCK samples first (a block's middle direction and the angle its samples stray
    # from it), then the samples of the blocks that may reach a site.
    n_blocks = -(-n_t // BLOCK)
    pad = n_blocks * BLOCK - n_t
    unit3 = np.where(np.isfinite(unit), unit, 0.0).reshape(n_sat, n_t, 3)
    unit_b = np.concatenate([unit3, np.repeat(unit3[:, -1:], pad, axis=1)], axis=1).reshape(n_sat, n_blocks, BLOCK, 3)
    mid = unit_b[:, :, BLOCK // 2, :]
    spread = np.arccos(np.clip(np.einsum("kbsj,kbj->kbs", unit_b, mid).min(axis=2), -1.0, 1.0))
    mid_flat = mid.reshape(-1, 3).astype(np.float32)
    unit_blocks = unit_b.reshape(n_sat * n_blocks, BLOCK, 3).astype(np.float32)
    sites_out, sats_out, idx_out = [], [], []
    # Group sites by the lowest mask, rounded down to a degree, to share thresholds.
    levels = np.floor(frames.min_mask_deg - GEODETIC_MARGIN_DEG)
    for low in np.unique(levels):
        members = np.flatnonzero(levels == low)
        e = math.radians(low)
        r_site = float(site_radius[members].min())
        lam = np.arccos(np.clip(r_site * math.cos(e) / r_far, -1.0, 1.0)) - e
        angle = lam + travel
        angle = np.where(np.isfinite(angle), angle, -1.0)  # decayed satellites: never candidates
        thr = np.cos(np.clip(angle, 0.0, math.pi))
        thr = np.where(angle < 0, 2.0, thr)
        angle3 = np.concatenate(
            [angle.reshape(n_sat, n_t), np.repeat(angle.reshape(n_sat, n_t)[:, -1:], pad, axis=1)], axis=1
        )
        # Per-sample thresholds in block layout (padding samples never pass); float32 like the dot products, with a
        # margin far above float32 rounding so that no sample the float64 test admits is lost.
        thr3 = np.concatenate([thr.reshape(n_sat, n_t), np.full((n_sat, pad), 2.0)], axis=1)
        thr_blocks = (thr3.reshape(n_sat * n_blocks, BLOCK) - 1e-6).astype(np.float32)
        block_angle = angle3.reshape(n_sat, n_blocks, BLOCK).max(axis=2) + spread + 1e-6
        block_thr = (
            np.where(block_angle < 0, 2.0, np.cos(np.clip(block_angle, 0.0, math.pi))).reshape(-1).astype(np.float32)
        )
        chunk = max(1, int(3e7 // max(1, mid_flat.shape[0])))
        for j in range(0, len(members), chunk):
            group = members[j : j + chunk]
            g_unit = site_unit[group].astype(np.float32)
            hit = (g_unit @ mid_flat.T) >= block_thr[None, :]
            rows, blocks = np.nonzero(hit)
            # The samples of each block that pass: one contiguous (BLOCK, 3) gather per block.
            ub, gu = unit_blocks[blocks], g_unit[rows]
            dots = ub[:, :, 0] * gu[:, 0:1] + ub[:, :, 1] * gu[:, 1:2] + ub[:, :, 2] * gu[:, 2:3]
            m, b = np.nonzero(dots >= thr_blocks[blocks])
            blk = blocks[m]
            sites_out.append(group[rows[m]])
            sats_out.append(blk // n_blocks)
            idx_out.append((blk % n_blocks) * BLOCK + b)
    if not sites_out:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    site = np.concatenate(sites_out).astype(np.int64)
    sat = np.concatenate(sats_out).astype(np.int64)
    idx = np.concatenate(idx_out).astype(np.int64)
    # Each chunk comes out sorted by (site, satellite, sample) (row-major nonzero); chunks of one mask level follow
    # each other in site order, so only several levels need a (stable, by site) merge.
    if len(sites_out) > 1 and np.any(site[1:] < site[:-1]):
        order = np.argsort(site, kind="stable")
        site, sat, idx = site[order], sat[order], idx[order]
    return site, sat, idx


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
    """Vectorised golden-section search for the maximum of `sign * margin` on [lo, hi]; (instant, margin)."""
    # Hermite cubics of the (at most two) grid intervals the bracket spans, built once.
    i_lo = np.clip(np.floor(lo / eph.step_s + 1e-9).astype(np.int64), 0, eph.n - 1)
    i_hi = np.minimum(i_lo + 1, eph.n - 1)
    left, right = eph.local(sat, i_lo), eph.local(sat, i_hi)
    split = (i_lo + 1) * eph.step_s
    rows = np.arange(lo.size)

    def f_at(sel: IntArray, x: FloatArray) -> FloatArray:
        out = np.empty(sel.size)
        r = x >= split[sel]
        if np.any(~r):
            out[~r] = left.margin(frames, site[sel[~r]], rows[sel[~r]], x[~r])
        if np.any(r):
            out[r] = right.margin(frames, site[sel[r]], rows[sel[r]], x[r])
        return out

    a, b = lo.copy(), hi.copy()
    c = b - GOLDEN * (b - a)
    d = a + GOLDEN * (b - a)
    fc = sign * f_at(rows, c)
    fd = sign * f_at(rows, d)
    while a.size and np.max(b - a) > tol_s:
        go_left = fc > fd  # the maximum lies in [a, d]
        b = np.where(go_left, d, b)
        a = np.where(go_left, a, c)
        c_new = np.where(go_left, b - GOLDEN * (b - a), d)
        d_new = np.where(go_left, c, a + GOLDEN * (b - a))
        f_new = sign * f_at(rows, np.where(go_left, c_new, d_new))
        fc, fd = np.where(go_left, f_new, fd), np.where(go_left, fc, f_new)
        c, d = c_new, d_new
    t = (a + b) / 2.0
    return t, eph.margin(frames, site, sat, t)


def _crossings(
    eph: Ephemeris,
    frames: SiteFrame,
    site: IntArray,
    sat: IntArray,
    lo: FloatArray,
    hi: FloatArray,
    f_lo: FloatArray,
    f_hi: FloatArray,
    rising: NDArray[np.bool_],
) -> FloatArray:
    """The instant margin = 0 in each bracket [lo, hi] (Illinois regula falsi, to BISECT_TOL_S).

    The instant returned is on the above side: AOS is never early by more than the tolerance, LOS never late.
    """
    a, b, fa, fb = lo.copy(), hi.copy(), f_lo.copy(), f_hi.copy()
    interval = np.clip(np.floor(lo / eph.step_s + 1e-9).astype(np.int64), 0, eph.n - 1)
    local = eph.local(sat, interval)
    side = np.zeros(a.size, dtype=np.int8)  # which end was kept last time (Illinois halving)
    todo = np.flatnonzero(b - a > BISECT_TOL_S)
    for _ in range(60):
        if todo.size == 0:
            break
        ta, tb, ga, gb = a[todo], b[todo], fa[todo], fb[todo]
        denom = gb - ga
        x = np.where(denom != 0, ta - ga * (tb - ta) / np.where(denom != 0, denom, 1.0), (ta + tb) / 2.0)
        # Keep x strictly inside, at least a tolerance from the ends, so the bracket always shrinks.
        eps = np.minimum(BISECT_TOL_S / 2.0, (tb - ta) / 4.0)
        x = np.clip(x, ta + eps, tb - eps)
        fx = local.margin(frames, site[todo], todo, x)
        same_as_a = (fx >= 0.0) == (ga >= 0.0)
        st = side[todo]
        # x replaces a (same sign as a): halve fb if b was kept twice in a row, and vice versa.
        new_a = np.where(same_as_a, x, ta)
        new_b = np.where(same_as_a, tb, x)
        new_fa = np.where(same_as_a, fx, np.where(st == -1, ga / 2.0, ga))
        new_fb = np.where(same_as_a, np.where(st == 1, gb / 2.0, gb), fx)
        side[todo] = np.where(same_as_a, 1, -1)
        a[todo], b[todo], fa[todo], fb[todo] = new_a, new_b, new_fa, new_fb
        todo = todo[(new_b - new_a) > BISECT_TOL_S]
    return np.where(rising, b, a)


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


def find_passes(eph: Ephemeris, frames: SiteFrame) -> Passes:
    """Every interval above the mask of every (site, satellite), in seconds from the start, clipped to the window."""
    site, sat, idx = _candidates(eph, frames)
    n = site.size
    t = idx * eph.step_s
    el_s, f = eph.margin_grid(frames, site, sat, idx)
    new_seg = np.ones(n, dtype=bool)
    new_seg[1:] = (site[1:] != site[:-1]) | (sat[1:] != sat[:-1]) | (idx[1:] != idx[:-1] + 1)
    seg = np.cumsum(new_seg) - 1
    # Neighbour values; outside a run (inside the grid) a sample failed the prefilter, so it is below the mask.
    below = -5.0
    prev_f = np.full(n, below)
    next_f = np.full(n, below)
    if n:
        prev_f[1:] = np.where(new_seg[1:], below, f[:-1])
        next_f[:-1] = np.where(new_seg[1:], below, f[1:])
    at_start, at_end = idx == 0, idx == eph.n
    interior = ~at_start & ~at_end
    _off, vertex = _parabola(prev_f, f, next_f)
    # A local maximum below the mask may hide a grazing pass; a minimum above it, a dip below the mask.
    is_max = ((f >= prev_f) & (f > next_f) | (f > prev_f) & (f >= next_f)) & interior
    is_min = ((f <= prev_f) & (f < next_f) | (f < prev_f) & (f <= next_f)) & interior
    hidden_hump = np.flatnonzero(is_max & (f < 0) & (vertex > -1.0))
    hidden_dip = np.flatnonzero(is_min & (f >= 0) & (vertex < 1.0))
    pts_t: list[FloatArray] = [t]
    pts_f: list[FloatArray] = [f]
    pts_seg: list[IntArray] = [seg]
    for sel, sign in ((hidden_hump, 1.0), (hidden_dip, -1.0)):
        if sel.size:
            te, fe = _golden(eph, frames, site[sel], sat[sel], t[sel] - eph.step_s, t[sel] + eph.step_s, sign)
            pts_t.append(te)
            pts_f.append(fe)
            pts_seg.append(seg[sel])
    # Virtual points just outside each run (known below the mask), unless the run touches the grid edge.
    first = np.flatnonzero(new_seg)
    last = np.append(first[1:] - 1, n - 1) if n else first
    for ends, delta, edge in ((first, -1.0, at_start), (last, 1.0, at_end)):
        keep = ends[~edge[ends]]
        pts_t.append(t[keep] + delta * eph.step_s)
        pts_f.append(np.full(keep.size, below))
        pts_seg.append(seg[keep])
    pt, pf, ps = np.concatenate(pts_t), np.concatenate(pts_f), np.concatenate(pts_seg)
    order = np.argsort(ps * (2.0 * (eph.n + 2) * eph.step_s) + pt, kind="stable")
    pt, pf, ps = pt[order], pf[order], ps[order]
    seg_site, seg_sat = site[first], sat[first]
    above = pf >= 0.0
    same = ps[1:] == ps[:-1]
    rise = np.flatnonzero(same & ~above[:-1] & above[1:])
    fall = np.flatnonzero(same & above[:-1] & ~above[1:])
    br = np.concatenate([rise, fall])
    b_seg = ps[br]
    rising = np.concatenate([np.ones(rise.size, dtype=bool), np.zeros(fall.size, dtype=bool)])
    # Virtual points carry a made-up value: give the root finder the true margin there.
    lo_t, hi_t, lo_f, hi_f = pt[br], pt[br + 1], pf[br].copy(), pf[br + 1].copy()
    for vals, times in ((lo_f, lo_t), (hi_f, hi_t)):
        fix = np.flatnonzero(vals == below)
        if fix.size:
            vals[fix] = eph.margin(frames, seg_site[b_seg[fix]], seg_sat[b_seg[fix]], times[fix])
    roots = _crossings(eph, frames, seg_site[b_seg], seg_sat[b_seg], lo_t, hi_t, lo_f, hi_f, rising)
    # Edges: a run whose first point is above starts at the window start; whose last is above, at the grid end.
    seg_first_pt = np.flatnonzero(np.append(True, ~same)) if pt.size else np.zeros(0, dtype=np.int64)
    seg_last_pt = np.append(seg_first_pt[1:] - 1, pt.size - 1) if pt.size else seg_first_pt
    start_up = seg_first_pt[above[seg_first_pt]]
    end_up = seg_last_pt[above[seg_last_pt]]
    ev_t = np.concatenate([roots, pt[start_up], pt[end_up]])
    ev_seg = np.concatenate([b_seg, ps[start_up], ps[end_up]])
    ev_up = np.concatenate([rising, np.ones(start_up.size, dtype=bool), np.zeros(end_up.size, dtype=bool)])
    order = np.lexsort((~ev_up, ev_t, ev_seg))
    ev_t, ev_seg, ev_up = ev_t[order], ev_seg[order], ev_up[order]
    # Events alternate up, down within a run: pair each up with the down that follows it.
    pair = np.flatnonzero(ev_up[:-1] & ~ev_up[1:] & (ev_seg[:-1] == ev_seg[1:]))
    aos, los, pseg = ev_t[pair], np.minimum(ev_t[pair + 1], eph.duration_s), ev_seg[pair]
    keep = (los > aos) & (aos < eph.duration_s)
    aos, los, pseg = aos[keep], los[keep], pseg[keep]
    # Peak: the highest sample, parabola vertex or refined extremum inside the pass, or its ends.
    span = 2.0 * (eph.n + 2) * eph.step_s
    # The peak between samples, refined by golden section around each maximum sample above the mask.
    vertex_el = el_s.copy()
    vertex_t = t.copy()
    top = np.flatnonzero(is_max & (f >= 0))
    if top.size:
        te, fe = _golden(
            eph,
            frames,
            site[top],
            sat[top],
            np.maximum(t[top] - eph.step_s, 0.0),
            np.minimum(t[top] + eph.step_s, eph.n * eph.step_s),
            1.0,
            tol_s=0.1,
        )
        vertex_t[top] = te
        vertex_el[top] = eph.look(frames, site[top], sat[top], te)[0]
    cand_t = np.concatenate([t, vertex_t[is_max]])
    cand_el = np.concatenate([el_s, vertex_el[is_max]])
    cand_seg = np.concatenate([seg, seg[is_max]])
    peak = np.full(aos.size, -90.0)
    if aos.size and cand_t.size:
        key_pass = pseg * span + aos
        key_cand = cand_seg * span + cand_t
        k = np.searchsorted(key_pass, key_cand, side="right") - 1
        ok = (k >= 0) & (pseg[np.maximum(k, 0)] == cand_seg) & (cand_t <= los[np.maximum(k, 0)])
        np.maximum.at(peak, k[ok], cand_el[ok])
    ends_el, _, _ = eph.look(frames, np.tile(seg_site[pseg], 2), np.tile(seg_sat[pseg], 2), np.concatenate([aos, los]))
    peak = np.maximum(peak, np.max(ends_el.reshape(2, -1), axis=0)) if aos.size else peak
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
