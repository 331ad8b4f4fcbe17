"""Root and peak solvers of the vectorised contact finder (`fast.py`): elevation-above-mask margins and their rates,
the prefilter of candidate samples, safeguarded Newton and golden-section steps on whole arrays of brackets."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from orbit_service.ephemeris import (
    EARTH_ROTATION_RAD_S,
    GEODETIC_MARGIN_DEG,
    GOLDEN,
    MAX_NEWTON_STEPS,
    PEAK_MODEL_MAX_SIN,
    PEAK_MODEL_S,
    PEAK_TOL_S,
    ROOT_TOL_S,
    SOLVE_PIECE,
    Ephemeris,
    FloatArray,
    IntArray,
    SiteFrame,
    _dot,
    _dot3,
    _el_margin,
    _mask_at,
)


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
