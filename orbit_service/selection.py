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

# (satellite ids, index into them per query, seconds from the plan start) -> (elevation_deg, range_km) per query
LookFn = Callable[
    [Sequence[str], NDArray[np.int64], NDArray[np.float64]], tuple[NDArray[np.float64], NDArray[np.float64]]
]


def check_policy(policy: str, where: str = "link.selection") -> str:
    if policy not in POLICIES:
        raise ConfigError(f"{where}: expected one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


@dataclass
class _Group:
    contacts: list[Contact]
    start: float
    end: float


def _seconds(moment: datetime, origin: datetime) -> float:
    return (moment - origin).total_seconds()


def _groups(contacts: Sequence[Contact], origin: datetime) -> list[_Group]:
    ordered = sorted(contacts, key=lambda c: (c.aos, c.los, c.satellite))
    groups: list[_Group] = []
    for c in ordered:
        aos, los = _seconds(c.aos, origin), _seconds(c.los, origin)
        if groups and aos <= groups[-1].end:
            groups[-1].contacts.append(c)
            groups[-1].end = max(groups[-1].end, los)
        else:
            groups.append(_Group([c], aos, los))
    return groups


def _serving_highest(group: _Group, origin: datetime, look: LookFn, step_s: float) -> list[tuple[float, str]]:
    """(instant, satellite) of the serving satellite's changes, the first at the window start."""
    cs = group.contacts
    aos = np.array([_seconds(c.aos, origin) for c in cs])
    los = np.array([_seconds(c.los, origin) for c in cs])
    grid = group.start + np.arange(0.0, group.end - group.start, step_s)
    if grid.size == 0:
        grid = np.array([group.start])
    # Sparse (contact, sample) entries for every sample at which the contact is visible.
    first = np.searchsorted(grid, aos, side="left")
    last = np.searchsorted(grid, los, side="left")  # exclusive: at LOS the satellite is gone
    counts = np.maximum(last - first, 0)
    if counts.sum() == 0:
        return [(group.start, cs[0].satellite)]
    contact = np.repeat(np.arange(len(cs)), counts)
    sample = np.arange(contact.size) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(first, counts)
    names = [c.satellite for c in cs]
    el, _ = look(names, contact, grid[sample])
    order = np.lexsort((contact, -el, sample))
    contact, sample, el = contact[order], sample[order], el[order]
    head = np.ones(sample.size, dtype=bool)
    head[1:] = sample[1:] != sample[:-1]
    best_sample, best_contact = sample[head], contact[head]
    n_grid = grid.size
    keys = contact * n_grid + sample
    key_order = np.argsort(keys)
    sorted_keys, sorted_el = keys[key_order], el[key_order]

    def el_at(c: NDArray[np.int64], smp: NDArray[np.int64]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        k = c * n_grid + smp
        pos = np.clip(np.searchsorted(sorted_keys, k), 0, max(0, sorted_keys.size - 1))
        found = sorted_keys[pos] == k
        return np.where(found, sorted_el[pos], np.nan), found

    out: list[tuple[float, str]] = [(group.start, cs[int(best_contact[0])].satellite)]
    sat_of = np.array([c.satellite for c in cs], dtype=object)
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
    out.extend((float(a), str(sat_of[n])) for a, n in zip(at, new, strict=True))
    return out


def _serving_on_loss(group: _Group, origin: datetime, look: LookFn, policy: str) -> list[tuple[float, str]]:
    cs = group.contacts
    aos = [_seconds(c.aos, origin) for c in cs]
    los = [_seconds(c.los, origin) for c in cs]
    out: list[tuple[float, str]] = []
    t = group.start
    while t < group.end:
        visible = [i for i in range(len(cs)) if aos[i] <= t < los[i]]
        if not visible:  # touching contacts: the next one starts exactly here
            visible = [i for i in range(len(cs)) if aos[i] <= t <= los[i] and los[i] > t] or [
                min(range(len(cs)), key=lambda i: aos[i] if aos[i] >= t else float("inf"))
            ]
        if policy == "longest-remaining":
            pick = max(visible, key=lambda i: (los[i], cs[i].satellite))
        else:
            el, _ = look([cs[i].satellite for i in visible], np.arange(len(visible)), np.full(len(visible), t))
            pick = visible[max(range(len(visible)), key=lambda k: (float(el[k]), cs[visible[k]].satellite))]
        if not out or out[-1][1] != cs[pick].satellite:
            out.append((t, cs[pick].satellite))
        if los[pick] <= t:
            break
        t = los[pick]
    return out


def select_windows(
    contacts: Sequence[Contact],
    origin: datetime,
    look: LookFn,
    policy: str = DEFAULT_POLICY,
    step_s: float = DEFAULT_STEP_S,
) -> list[Window]:
    """Merged link-up windows of one site, each with its serving satellite, handovers and geometry."""
    check_policy(policy)
    windows: list[Window] = []
    pending: list[tuple[int, float, str]] = []  # (window index, instant, satellite) needing geometry
    serving_lists: list[list[tuple[float, str]]] = []
    groups = _groups(contacts, origin)
    for g in groups:
        if policy == "highest-elevation":
            serving = _serving_highest(g, origin, look, step_s)
        else:
            serving = _serving_on_loss(g, origin, look, policy)
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
    geometry = {(w, at): (float(e), float(r)) for (w, at, _), e, r in zip(pending, el, rng, strict=True)}
    for w, (g, serving) in enumerate(zip(groups, serving_lists, strict=True)):
        start = g.contacts[0].aos
        first_at, first_sat = serving[0]
        e0, r0 = geometry[(w, first_at)]
        handovers = tuple(
            Handover(
                at=round_ms(origin + timedelta(seconds=at)),
                satellite=sat,
                elevation_deg=round(geometry[(w, at)][0], 3),
                range_km=round(geometry[(w, at)][1], 3),
            )
            for at, sat in serving[1:]
        )
        windows.append(
            Window(
                start=start,
                end=max(c.los for c in g.contacts),
                satellite=first_sat,
                peak_elevation_deg=max(c.peak_elevation_deg for c in g.contacts),
                elevation_deg=round(e0, 3),
                range_km=round(r0, 3),
                handovers=handovers,
            )
        )
    return windows
