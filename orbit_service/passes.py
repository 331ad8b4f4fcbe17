"""Passes from the grid (`fast.py`): runs of candidate samples, their extrema, and every AOS, LOS and peak refined."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

from orbit_service.ephemeris import CHUNK_SAMPLES, Ephemeris, FloatArray, IntArray, SiteFrame, parallel_map
from orbit_service.solvers import _Brackets, _crossings, _cubic_roots, _golden, _peaks, _Prefilter, _Samples


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
