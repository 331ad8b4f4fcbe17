"""The satellite state as plain data: the global model at an emulated time, and the status that GetStatus and
`emsfl satellite status` show."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import numpy as np

from emsfl.runtime.linkstate import LinkState
from emsfl.runtime.timefmt import to_iso
from satellite_node.store import Store
from satellite_node.strategy import STRATEGIES, Strategy, make_strategy
from satellite_node.validate import (
    parse_safetensors,
)


def global_state(store: Store, base: Mapping[str, np.ndarray], at_unix: float | None = None) -> dict[str, np.ndarray]:
    """Base tensors plus, for every expert, the parts of its newest version (committed at or before `at_unix`)."""
    tensors = dict(base)
    blobs: dict[str, dict[str, np.ndarray]] = {}
    for key, row in sorted(store.newest_versions(at_unix).items(), key=lambda kv: (kv[0].layer, kv[0].expert)):
        if row.source_hash not in blobs:
            blobs[row.source_hash] = parse_safetensors(store.map_blob(row.source_hash))
        prefix = f"expert/{key.layer}/{key.expert}/"
        tensors.update({n: a for n, a in blobs[row.source_hash].items() if n.startswith(prefix)})
    return tensors


def status_dict(
    store: Store,
    strategy: Strategy | None,
    clusters: Iterable[str],
    links: LinkState | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """Clusters, assignment and expert versions as plain data (GetStatus and `emsfl satellite status`); `strategy`
    None: a state directory whose strategy this version does not know."""
    joined = store.clusters()
    reported = store.affinities()
    version = store.assignment_version()
    table = store.owners(version) or {}
    stats = store.commit_stats()
    names = list(dict.fromkeys([*clusters, *joined]))
    now = at if at is not None or links is None else links.emulated_now()
    out_clusters = []
    for c in names:
        owned = sum(1 for owner in table.values() if owner == c)
        uploads, nbytes = stats.get(c, (0, 0))
        out_clusters.append(
            {
                "cluster_id": c,
                "link_up": bool(links.is_up(c)) if links is not None else None,
                "joined": c in joined,
                "affinity_reported": c in reported,
                "experts_owned": owned,
                "uploads_committed": uploads,
                "bytes_received": nbytes,
                "capacity_experts": joined[c].capacity if c in joined else None,
                "num_examples": joined[c].num_examples if c in joined else None,
            }
        )
    assignment: dict[str, list[list[Any]]] = {}
    for (layer, expert), owner in sorted(table.items()):
        per_layer = assignment.setdefault(owner, [])
        while len(per_layer) <= layer:
            per_layer.append([len(per_layer), []])
        per_layer[layer][1].append(expert)
    experts = [
        {"layer": k.layer, "expert": k.expert, "version": r.version, "owner": r.owner, "committed_at": r.t}
        for k, r in sorted(store.newest_versions().items(), key=lambda kv: (kv[0].layer, kv[0].expert))
    ]
    aggregated = store.global_version()
    global_version = aggregated if strategy is None else strategy.global_version(store.commit_count(), aggregated)
    has_rounds = strategy is not None and strategy.has_rounds
    round_uploaded = [r.cluster for r in store.round_uploads(global_version)] if has_rounds else []
    history = [
        {"version": a.version, "committed_at": a.t, "reason": a.reason, "requested_by": a.requested_by}
        for a in store.assignment_history()
    ]
    return {
        "strategy": "?" if strategy is None else strategy.name,
        "global_version": global_version,
        "round_uploaded": round_uploaded,
        "assignment_history": history,
        "assignment_version": version,
        "assignment": assignment,
        "clusters": out_clusters,
        "experts": experts,
        "emulated_now": None if now is None else to_iso(now),
    }


def stored_status(store: Store) -> dict[str, Any]:
    """`status_dict` of a state directory read on its own (`emsfl satellite status`, the dashboard), with the
    strategy and clusters the node recorded there."""
    name = store.get_meta("strategy")
    strategy = make_strategy(name) if name in STRATEGIES else None
    return status_dict(store, strategy, store.get_meta("clusters", []))
