"""Re-assignment on the ground (ARCHITECTURE §4.2): what changes hands when experts move between clusters.

- `fetch_gained` pulls the newest parts (LoRA factors or full weights, as the manifest's `expert_parts` say) of the
  experts a cluster gained, for those the satellite has a version of; the others start from the base. The pull is a
  `ResumablePull`: when the link cuts it, the next pass asks only for the chunks still missing.
- `carryover.py` moves what a cluster keeps from its old trainer to the rebuilt one (it needs torch; this module
  does not, so that the gateway imports none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emsfl.runtime.client import ResumablePull
from ground_node.errors import GroundError
from ground_node.records import Assignment
from protos.emsfl.v1 import federation_pb2 as pb
from protos.wire import expert_name, parse_expert_name

Expert = tuple[int, int]  # (layer, expert), global ids


@dataclass(frozen=True)
class Switch:
    """A new assignment, ready for the training thread, with the handed-over parts of the experts it gains."""

    assignment: Assignment
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def diff(old: Assignment | None, new: Assignment) -> tuple[list[Expert], list[Expert]]:
    """(gained, lost) experts going from `old` (None: nothing held) to `new`."""
    before = set(old.pairs()) if old is not None else set()
    after = set(new.pairs())
    return sorted(after - before), sorted(before - after)


def experts_of(names: Iterable[str]) -> set[Expert]:
    out = set()
    for name in names:
        parsed = parse_expert_name(name)
        if parsed is not None:
            out.add((parsed[0].layer, parsed[0].expert))
    return out


def only_experts(tensors: Mapping[str, np.ndarray], keep: set[Expert]) -> dict[str, np.ndarray]:
    return {n: a for n, a in tensors.items() if experts_of([n]) <= keep}


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names and float32 bytes, in name order: equal parts, equal digests."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def reassigned_event(old: Assignment, new: Assignment, handed: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Fields of the `reassigned` event: the versions, the gained and lost experts, and the handed-over experts
    with the digest of their parts (`handed`: those parts as they went into the model)."""
    gained, lost = diff(old, new)
    return {
        "old_version": old.version,
        "new_version": new.version,
        "gained": [list(x) for x in gained],
        "lost": [list(x) for x in lost],
        "handed_over": [list(x) for x in sorted(experts_of(handed))],
        "handed_over_sha256": tensors_digest(handed),
    }


# ---- fetching from the satellite ---------------------------------------------------------------


def versioned_experts(stub: Any, metadata: Any, timeout: float) -> set[Expert]:
    """Experts the satellite holds a committed version of (GetStatus)."""
    status = stub.GetStatus(pb.StatusRequest(), metadata=metadata, timeout=timeout)
    return {(int(x.layer), int(x.expert)) for x in status.experts}


def fetch_gained(
    stub: Any,
    metadata: Any,
    gained: list[Expert],
    parts: list[str],
    timeout: float,
    puller: ResumablePull,
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """The newest parts of the gained experts the satellite has a version of (the others start from the base).
    Raises when the pull is cut or incomplete; `puller` keeps what arrived, so the next call resumes."""
    if not gained:
        return {}
    versioned = versioned_experts(stub, metadata, timeout)
    names = [expert_name(la, e, p) for la, e in gained if (la, e) in versioned for p in parts]
    if not names:
        return {}
    tensors = puller.fetch(stub, metadata, names, timeout, on_bytes)
    if tensors is None:
        raise GroundError("hand-over pull: the stream ended before its last chunk")
    return tensors


# ---- carrying state over to the rebuilt trainer ------------------------------------------------
