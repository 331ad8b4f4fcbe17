"""Which satellite serves a cluster when several are visible, and when the serving one changes (handovers).

Policies (topology `link.selection`):
- `highest-elevation` (default): always the highest satellite; a handover when another climbs above it
  (found on a `step_s` grid, the instant interpolated linearly on the elevation difference) or when it sets.
- `longest-remaining`: at the window start and whenever the serving satellite sets, the visible one that
  stays up longest; kept until it sets.
- `sticky`: at the window start and whenever the serving satellite sets, the highest visible one; kept until
  it sets.
A window is a union of overlapping contacts, so whenever the serving satellite sets inside a window another
one is visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from numpy.typing import NDArray

from emsfl.config import ConfigError
from orbit_service.contacts import Contact, Handover, Window, round_ms

POLICIES = ("highest-elevation", "longest-remaining", "sticky")
DEFAULT_POLICY = "highest-elevation"
DEFAULT_STEP_S = 10.0
NODE_S = 60.0  # spacing of the nodes that bound each pass's elevation between them (highest-elevation)
PEAK_SLACK_DEG = 0.5  # added to a contact's peak as an upper bound (reference peaks come from a time search)

# (satellite ids, index into them per query, seconds from the plan start) -> (elevation_deg, range_km) per query
LookFn = Callable[
    [Sequence[str], NDArray[np.int64], NDArray[np.float64]], tuple[NDArray[np.float64], NDArray[np.float64]]
]


# (satellite ids, contact index per query, sample index per query, the sample instants in seconds from the plan
# start) -> elevation_deg per query: elevations on a selection grid, shared per sample
GridLookFn = Callable[[Sequence[str], NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]], NDArray[np.float64]]


def check_policy(policy: str, where: str = "link.selection") -> str:
    if policy not in POLICIES:
        raise ConfigError(f"{where}: expected one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


@dataclass(frozen=True)
class ContactArrays:
    """One site's contacts as columns, sorted by (aos, los, satellite): seconds from the origin, satellite ids,
    peak elevations, and the AOS/LOS instants as datetimes (or a function giving the instant of `t` seconds)."""

    aos_s: NDArray[np.float64]
    los_s: NDArray[np.float64]
    satellite: Sequence[str]
    peak_deg: NDArray[np.float64]
    instant: Callable[[int, bool], datetime]  # (contact index, at_los) -> AOS or LOS as a datetime


@dataclass
class _Group:
    lo: int  # contacts lo..hi-1 of the site's ContactArrays
    hi: int
    start: float
    end: float


def _seconds(moment: datetime, origin: datetime) -> float:
    return (moment - origin).total_seconds()


def _groups(arrays: ContactArrays) -> list[_Group]:
    """Runs of overlapping (or touching) contacts: a contact joins the run while its AOS <= the run's latest LOS."""
    n = arrays.aos_s.size
    if n == 0:
        return []
    run_end = np.maximum.accumulate(arrays.los_s)
    new = np.ones(n, dtype=bool)
    new[1:] = arrays.aos_s[1:] > run_end[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    return [
        _Group(int(a), int(b), float(arrays.aos_s[a]), float(run_end[b - 1]))
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]


def _serving_highest(
    group: _Group, arrays: ContactArrays, grid_look: GridLookFn, step_s: float
) -> list[tuple[float, str]]:
    """(instant, satellite) of the serving satellite's changes, the first at the window start."""
    lo, hi = group.lo, group.hi
    aos, los = arrays.aos_s[lo:hi], arrays.los_s[lo:hi]
    names = list(arrays.satellite[lo:hi])
    grid = group.start + np.arange(0.0, group.end - group.start, step_s)
    if grid.size == 0:
        grid = np.array([group.start])
    # Contact c is visible at samples first[c] .. last[c] - 1.
    first = np.searchsorted(grid, aos, side="left")
    last = np.searchsorted(grid, los, side="left")  # exclusive: at LOS the satellite is gone
    if not np.any(last > first):
        return [(group.start, names[0])]
    # Entries sorted by (contact, sample): their keys are sorted for the look-ups of `el_at`.
    contact, sample = _contenders(grid_look, names, grid, first, last, arrays.peak_deg[lo:hi], step_s)
    el = grid_look(names, contact, sample, grid)
    best_sample, best_contact = _highest(contact, sample, el)
    n_grid = grid.size
    sorted_keys, sorted_el = contact * n_grid + sample, el

    def el_at(c: NDArray[np.int64], smp: NDArray[np.int64]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        visible = (first[c] <= smp) & (smp < last[c])
        k = c * n_grid + smp
        pos = np.clip(np.searchsorted(sorted_keys, k), 0, sorted_keys.size - 1)
        known = sorted_keys[pos] == k
        out = np.where(visible & known, sorted_el[pos], np.nan)
        missing = np.flatnonzero(visible & ~known)  # visible but never a contender: not evaluated yet
        if missing.size:
            out[missing] = grid_look(names, c[missing], smp[missing], grid)
        return out, visible

    return _changes(group, grid, best_sample, best_contact, el_at, aos, los, names)


def _highest(
    contact: NDArray[np.int64], sample: NDArray[np.int64], el: NDArray[np.float64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(samples, the contact highest at each): entries sorted by (contact, sample); ties go to the earlier contact
    (contacts are sorted by AOS, LOS, satellite)."""
    order = np.argsort(sample, kind="stable")  # by sample, then contact
    sample, contact, el = sample[order], contact[order], np.nan_to_num(el[order], nan=-np.inf)
    starts = np.flatnonzero(np.append(True, sample[1:] != sample[:-1]))
    group = np.cumsum(np.append(True, sample[1:] != sample[:-1])) - 1
    top = np.maximum.reduceat(el, starts)
    at = np.minimum.reduceat(np.where(el == top[group], np.arange(el.size), el.size), starts)
    return sample[starts], contact[at]


def _contenders(
    grid_look: GridLookFn,
    names: Sequence[str],
    grid: NDArray[np.float64],
    first: NDArray[np.int64],
    last: NDArray[np.int64],
    peak_deg: NDArray[np.float64],
    step_s: float,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(contact, sample) of every visible entry that may be the highest at its sample.

    A pass's elevation rises to one maximum and falls. From its elevations at nodes every NODE_S: between two
    nodes away from the highest node it lies between their values; next to the highest node it is at least the
    lower one and at most the pass's peak. The best lower bound over an interval between nodes (from contacts
    visible throughout it) bounds the highest elevation at each of its samples: a contact whose upper bound is
    below it can be neither the highest nor tie with it. (A contact whose nodes do not rise then fall keeps every
    entry.)"""
    n_grid, every = grid.size, max(2, round(NODE_S / step_s))
    visible = last > first
    # Nodes j_first .. j_last of each contact, node j at sample j * every (the last sample at most).
    j_first = np.where(visible, first // every, 0)
    n_nodes = np.where(visible, (last - 1) // every + 2 - j_first, 0)
    node_start = np.cumsum(n_nodes) - n_nodes
    node_contact = np.repeat(np.arange(first.size), n_nodes)
    node_j = np.arange(node_contact.size) - np.repeat(node_start, n_nodes) + np.repeat(j_first, n_nodes)
    node_el = grid_look(names, node_contact, np.minimum(node_j * every, n_grid - 1), grid)
    highest, unimodal = _unimodal(node_el, node_contact, node_start, n_nodes)
    # Intervals between consecutive nodes k, k + 1 of a contact, and the samples of each the contact is visible at.
    k = np.flatnonzero(node_contact[1:] == node_contact[:-1])
    c, j = node_contact[k], node_j[k]
    s0, s1 = np.maximum(j * every, first[c]), np.minimum((j + 1) * every, last[c])
    whole = (s0 == j * every) & (s1 == np.minimum((j + 1) * every, n_grid))
    left, right = node_el[k], node_el[k + 1]
    lower = np.where(unimodal[c], np.fmin(left, right), np.nan)  # no maximum inside: no dip below the nodes
    monotone = unimodal[c] & ((k + 1 < highest[c]) | (k > highest[c]))
    upper = np.where(monotone, np.fmax(left, right), peak_deg[c] + PEAK_SLACK_DEG)
    best_lower = np.full((n_grid - 1) // every + 1, -np.inf)
    useful = whole & np.isfinite(lower)
    np.maximum.at(best_lower, j[useful], lower[useful])
    keep = np.flatnonzero(~(upper < best_lower[j]) & (s1 > s0))  # NaN bounds keep the interval
    return _entries(c[keep], s0[keep], s1[keep])


def _entries(
    contact: NDArray[np.int64], start: NDArray[np.int64], stop: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """(contact, sample) for samples start .. stop - 1 of each given contact."""
    counts = stop - start
    offset = np.repeat(start - (np.cumsum(counts) - counts), counts)
    return np.repeat(contact, counts), np.arange(int(counts.sum())) + offset


def _unimodal(
    values: NDArray[np.float64], owner: NDArray[np.int64], start: NDArray[np.int64], count: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
    """Per run of values (run c: values[start[c] : start[c] + count[c]], counts >= 2 or 0): the index of its first
    maximum, and whether the run strictly rises to it and strictly falls after it."""
    n = start.size
    idx = np.arange(values.size)
    safe = np.nan_to_num(values, nan=-np.inf)
    runs = np.flatnonzero(count > 0)
    top = np.full(n, -np.inf)
    top[runs] = np.maximum.reduceat(safe, start[runs])
    highest = np.zeros(n, dtype=np.int64)
    highest[runs] = np.minimum.reduceat(np.where(safe == top[owner], idx, values.size), start[runs])
    # Every step inside a run must go up before the maximum and down after it.
    rising = idx[:-1] < highest[owner[:-1]]
    ok = (owner[1:] != owner[:-1]) | np.where(rising, values[1:] > values[:-1], values[1:] < values[:-1])
    bad = np.zeros(n, dtype=bool)
    bad[owner[:-1][~ok]] = True
    return highest, ~bad & (count > 0) & np.isfinite(top)


ElAt = Callable[[NDArray[np.int64], NDArray[np.int64]], tuple[NDArray[np.float64], NDArray[np.bool_]]]


def _changes(
    group: _Group,
    grid: NDArray[np.float64],
    best_sample: NDArray[np.int64],
    best_contact: NDArray[np.int64],
    el_at: ElAt,
    aos: NDArray[np.float64],
    los: NDArray[np.float64],
    names: list[str],
) -> list[tuple[float, str]]:
    """The serving satellite's changes from the highest contact per sample, each instant interpolated linearly on
    the elevation difference (or the LOS of the one that set)."""
    out: list[tuple[float, str]] = [(group.start, names[int(best_contact[0])])]
    sat_of = np.array(names, dtype=object)
    change = np.flatnonzero(sat_of[best_contact[1:]] != sat_of[best_contact[:-1]]) + 1
    if change.size == 0:
        return out
    old, new = best_contact[change - 1], best_contact[change]
    s_prev, s_cur = best_sample[change - 1], best_sample[change]
    t_prev, t_cur = grid[s_prev], grid[s_cur]
    e_old_prev, ok1 = el_at(old, s_prev)
    e_new_prev, ok2 = el_at(new, s_prev)
    e_old_cur, _ = el_at(old, s_cur)
    e_new_cur, _ = el_at(new, s_cur)
    d_prev = e_old_prev - e_new_prev
    d_cur = np.nan_to_num(e_old_cur, nan=0.0) - e_new_cur
    with np.errstate(invalid="ignore", divide="ignore"):
        interp = t_prev + (t_cur - t_prev) * d_prev / (d_prev - d_cur)
    at = np.where(
        los[old] <= t_cur,  # the serving satellite set in between
        los[old],
        np.where(ok1 & ok2 & np.isfinite(interp), interp, np.maximum(aos[new], t_prev)),
    )
    at = np.minimum(np.maximum(at, t_prev), t_cur)
    out.extend((float(a), str(sat_of[k])) for a, k in zip(at.tolist(), new.tolist(), strict=True))
    return out


def _serving_on_loss(group: _Group, arrays: ContactArrays, look: LookFn, policy: str) -> list[tuple[float, str]]:
    names = list(arrays.satellite[group.lo : group.hi])
    aos = arrays.aos_s[group.lo : group.hi].tolist()
    los = arrays.los_s[group.lo : group.hi].tolist()
    n = len(names)
    out: list[tuple[float, str]] = []
    t = group.start
    while t < group.end:
        visible = [i for i in range(n) if aos[i] <= t < los[i]]
        if not visible:  # touching contacts: the next one starts exactly here
            visible = [i for i in range(n) if aos[i] <= t <= los[i] and los[i] > t] or [
                min(range(n), key=lambda i: aos[i] if aos[i] >= t else float("inf"))
            ]
        if policy == "longest-remaining":
            pick = max(visible, key=lambda i: (los[i], names[i]))
        else:
            el, _ = look([names[i] for i in visible], np.arange(len(visible)), np.full(len(visible), t))
            pick = visible[max(range(len(visible)), key=lambda k: (float(el[k]), names[visible[k]]))]
        if not out or out[-1][1] != names[pick]:
            out.append((t, names[pick]))
        if los[pick] <= t:
            break
        t = los[pick]
    return out


def contact_arrays(contacts: Sequence[Contact], origin: datetime) -> ContactArrays:
    """Columns of `contacts`, sorted by (aos, los, satellite)."""
    ordered = sorted(contacts, key=lambda c: (c.aos, c.los, c.satellite))

    def instant(i: int, at_los: bool) -> datetime:
        return ordered[i].los if at_los else ordered[i].aos

    return ContactArrays(
        np.array([_seconds(c.aos, origin) for c in ordered], dtype=np.float64),
        np.array([_seconds(c.los, origin) for c in ordered], dtype=np.float64),
        [c.satellite for c in ordered],
        np.array([c.peak_elevation_deg for c in ordered], dtype=np.float64),
        instant,
    )


def _points_look(look: LookFn) -> GridLookFn:
    def grid_look(
        sats: Sequence[str], which: NDArray[np.int64], sample: NDArray[np.int64], grid: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        return look(sats, which, grid[sample])[0]

    return grid_look


def select_windows(
    contacts: Sequence[Contact] | ContactArrays,
    origin: datetime,
    look: LookFn,
    policy: str = DEFAULT_POLICY,
    step_s: float = DEFAULT_STEP_S,
    grid_look: GridLookFn | None = None,
) -> list[Window]:
    """Merged link-up windows of one site, each with its serving satellite, handovers and geometry.

    `grid_look` (optional) gives elevations on the selection grid faster than `look` at the grid instants."""
    check_policy(policy)
    arrays = contacts if isinstance(contacts, ContactArrays) else contact_arrays(contacts, origin)
    on_grid = grid_look if grid_look is not None else _points_look(look)
    windows: list[Window] = []
    pending: list[tuple[int, float, str]] = []  # (window index, instant, satellite) needing geometry
    serving_lists: list[list[tuple[float, str]]] = []
    groups = _groups(arrays)
    for g in groups:
        if policy == "highest-elevation":
            serving = _serving_highest(g, arrays, on_grid, step_s)
        else:
            serving = _serving_on_loss(g, arrays, look, policy)
        # Round to the wire's millisecond; drop changes that collapse onto the previous instant.
        rounded: list[tuple[float, str]] = []
        for at, sat in serving:
            at = round(at, 3)
            if rounded and at <= rounded[-1][0]:
                rounded[-1] = (rounded[-1][0], sat) if len(rounded) == 1 else rounded[-1]
                continue
            if rounded and rounded[-1][1] == sat:
                continue
            rounded.append((at, sat))
        serving_lists.append(rounded)
        pending.extend((len(serving_lists) - 1, at, sat) for at, sat in rounded)
    if pending:
        el, rng = look([p[2] for p in pending], np.arange(len(pending)), np.array([p[1] for p in pending]))
    else:
        el = rng = np.zeros(0)
    el_r = np.round(np.asarray(el, dtype=np.float64), 3).tolist()
    rng_r = np.round(np.asarray(rng, dtype=np.float64), 3).tolist()
    moments = _moments(origin, [p[1] for p in pending])
    k = 0
    for g, serving in zip(groups, serving_lists, strict=True):
        start = arrays.instant(g.lo, False)
        e0, r0 = el_r[k], rng_r[k]
        handovers = tuple(
            Handover(moments[k + j], sat, el_r[k + j], rng_r[k + j]) for j, (_, sat) in enumerate(serving[1:], start=1)
        )
        k += len(serving)
        last = g.lo + int(np.argmax(arrays.los_s[g.lo : g.hi]))
        windows.append(
            Window(
                start=start,
                end=arrays.instant(last, True),
                satellite=serving[0][1],
                peak_elevation_deg=float(arrays.peak_deg[g.lo : g.hi].max()),
                elevation_deg=e0,
                range_km=r0,
                handovers=handovers,
            )
        )
    return windows


def _moments(origin: datetime, seconds: Sequence[float]) -> list[datetime]:
    """origin + each offset (whole milliseconds already), rounded to the millisecond: integer arithmetic when the
    origin is on a millisecond, as plans' origins are."""
    if origin.microsecond % 1000:
        return [round_ms(origin + timedelta(seconds=s)) for s in seconds]
    base = round_ms(origin)
    ms = np.rint(np.asarray(seconds, dtype=np.float64) * 1000.0).astype(np.int64).tolist()
    return [base + timedelta(milliseconds=m) for m in ms]
