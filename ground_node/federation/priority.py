"""Uplink priority (ARCHITECTURE §3 step 6): when a contact cannot carry the whole newest update, its experts
go up in priority order, the largest change since their last acknowledged state first, as separate smaller
updates (the satellite accepts any subset of a cluster's experts under `emsfl`); the rest follows at the next pass.

`<outbox>/acked_experts.safetensors` keeps the last acknowledged parts of every expert, so that after a partial
upload only the experts still different from what the satellite holds are sent, and priorities are measured
against what the satellite has.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import load_file, save

from emsfl.durable import atomic_write_bytes
from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import parse_iso
from ground_node.federation.outbox import Outbox, StagedUpdate
from protos.wire import parse_expert_name

log = logging.getLogger(__name__)

ACKED = "acked_experts.safetensors"
HEADER_ALLOWANCE = 4096  # safetensors header bytes per update (names, shapes)
MARGIN = 0.9  # share of the computed budget an upload may plan for


def contact_budget_bytes(link: LinkState, cluster: str) -> float | None:
    """Bytes the rest of the current contact can carry: (until - now) x rate_bps / 8; None when unknown."""
    payload = link.link(cluster)
    now = link.emulated_now()
    if not payload or now is None or payload.get("state") != "up":
        return None
    until, rate = payload.get("until"), payload.get("rate_bps")
    if not until or not rate:
        return None
    until_t: datetime = parse_iso(until)
    seconds = (until_t - now).total_seconds()
    return float(max(0.0, seconds) * float(rate) / 8.0 * MARGIN)


def load_acked(outbox: Outbox) -> dict[str, np.ndarray]:
    path = Path(outbox.dir) / ACKED
    if not path.exists():
        return {}
    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # a torn file only costs priority precision
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}


def record_acked(outbox: Outbox, blob: bytes) -> None:
    """Merge an acknowledged update's tensors into the acked store."""
    acked = load_acked(outbox)
    acked.update(st_load(blob))
    atomic_write_bytes(Path(outbox.dir) / ACKED, save({n: np.ascontiguousarray(acked[n]) for n in sorted(acked)}))


def rebase_acked(outbox: Outbox, held: set[tuple[int, int]], handed_over: Mapping[str, np.ndarray]) -> None:
    """After a re-assignment: forget the experts no longer held (another cluster updates them now) and take the
    handed-over parts as what the satellite holds of the gained ones. Call it from the uplink's thread (the one
    that records acknowledgements), so the two never race."""
    handed = set(_experts(handed_over))
    kept = {
        n: a
        for n, a in load_acked(outbox).items()
        if (parsed := parse_expert_name(n)) is not None
        and (key := (parsed[0].layer, parsed[0].expert)) in held
        and key not in handed
    }
    merged = {**kept, **handed_over}
    atomic_write_bytes(Path(outbox.dir) / ACKED, save({n: np.ascontiguousarray(merged[n]) for n in sorted(merged)}))


def _experts(tensors: Mapping[str, np.ndarray]) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for name in sorted(tensors):
        parsed = parse_expert_name(name)
        if parsed is not None:
            out.setdefault((parsed[0].layer, parsed[0].expert), []).append(name)
    return out


def change(tensors: Mapping[str, np.ndarray], acked: Mapping[str, np.ndarray], names: list[str]) -> float:
    """L2 norm of an expert's change since its last acknowledged state (its whole norm if never acknowledged)."""
    total = 0.0
    for n in names:
        new = tensors[n].astype(np.float64)
        old = acked.get(n)
        diff = new if old is None or old.shape != new.shape else new - old.astype(np.float64)
        total += float(np.sum(diff * diff))
    return float(total**0.5)


def plan_upload(outbox: Outbox, update: StagedUpdate, budget: float | None) -> StagedUpdate | None:
    """What to send of `update` now: itself, a priority-ordered part of its experts (staged as the in-flight
    update), or None when the satellite already holds every expert of it (then it is marked acknowledged)."""
    newest = outbox.newest()
    if newest is None or newest.content_hash != update.content_hash:
        return update  # an in-flight part: resume it as it is
    acked = load_acked(outbox)
    if not acked and (budget is None or update.size <= budget):
        return update  # nothing sent in parts so far and it fits: the whole update, as staged
    tensors = dict(st_load(update.read()))
    experts = _experts(tensors)
    remaining = {
        k: names
        for k, names in experts.items()
        if any(n not in acked or not np.array_equal(acked[n], tensors[n]) for n in names)
    }
    if not remaining:
        outbox.mark_acked(update.content_hash, 0)  # every expert of it is on the satellite already
        return None
    if len(remaining) == len(experts) and (budget is None or update.size <= budget):
        return update
    size = {k: sum(tensors[n].nbytes for n in names) for k, names in remaining.items()}
    order = sorted(remaining, key=lambda k: (-change(tensors, acked, remaining[k]), k))
    chosen: list[tuple[int, int]] = []
    used = HEADER_ALLOWANCE
    for k in order:
        if chosen and budget is not None and used + size[k] > budget:
            break
        chosen.append(k)
        used += size[k]
    part = {n: tensors[n] for k in chosen for n in remaining[k]}
    log.info(
        "contact budget %s B: sending %d of %d remaining experts first (largest change first)",
        None if budget is None else int(budget),
        len(chosen),
        len(remaining),
    )
    return outbox.stage_part(part, update.assignment_version, update.step)
