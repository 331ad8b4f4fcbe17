"""Checks an update must pass before anything is acknowledged (ARCHITECTURE §5.2).

Transport-free: a refusal is a `Refusal` carrying a plain `RefusalCode` (named like the gRPC status that
`server.py` answers with) and a message naming the tensor and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from protos.wire import ExpertKey, parse_expert_name
from satellite_node.manifest import DTYPES, Manifest, dtype_name

MAX_HEADER_BYTES = 100 << 20


class RefusalCode(str, Enum):
    """Why a call is refused (ARCHITECTURE §5.2). The names are the gRPC status codes `server.py` maps them to,
    so that events and clients read the same word; the core itself knows nothing of gRPC."""

    UNAVAILABLE = "UNAVAILABLE"  # not now: link down, no clock yet
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # bad input: do not retry the same bytes
    PERMISSION_DENIED = "PERMISSION_DENIED"  # not yours
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # out of order: stale version, closed round, offer first
    ABORTED = "ABORTED"  # a newer stream or offer took over
    UNAUTHENTICATED = "UNAUTHENTICATED"  # no identity


class Refusal(Exception):
    """A refused call; changes no state."""

    def __init__(self, code: RefusalCode, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.kind = kind  # a short, bounded reason for metrics labels ("" : the code names it)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> Refusal:
    return Refusal(RefusalCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]


def check_specs(manifest: Manifest, specs: Iterable[Spec]) -> tuple[ExpertKey, ...]:
    """Names, ranges, parts, shapes, dtypes and completeness; returns the experts the update carries."""
    parts_of: dict[ExpertKey, set[str]] = {}
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise invalid(f"tensor {spec.name!r}: listed twice")
        seen.add(spec.name)
        parsed = parse_expert_name(spec.name)
        if parsed is None:
            raise invalid(
                f"tensor {spec.name!r}: not an expert/<layer>/<expert>/<part> name (only experts are trained)"
            )
        key, part = parsed
        if not 0 <= key.layer < manifest.num_layers:
            raise invalid(f"tensor {spec.name!r}: layer {key.layer} out of range 0..{manifest.num_layers - 1}")
        if not 0 <= key.expert < manifest.num_experts:
            raise invalid(f"tensor {spec.name!r}: expert {key.expert} out of range 0..{manifest.num_experts - 1}")
        want = manifest.part(part)
        if want is None:
            known = ", ".join(p.name for p in manifest.expert_parts)
            raise invalid(f"tensor {spec.name!r}: unknown part {part!r} (manifest parts: {known})")
        if spec.dtype != want.dtype:
            raise invalid(f"tensor {spec.name!r}: dtype {spec.dtype} but the manifest says {want.dtype}")
        if tuple(spec.shape) != want.shape:
            raise invalid(f"tensor {spec.name!r}: shape {list(spec.shape)} but the manifest says {list(want.shape)}")
        parts_of.setdefault(key, set()).add(part)
    if not parts_of:
        raise invalid("the update carries no tensors")
    required = {p.name for p in manifest.expert_parts}
    for key, parts in sorted(parts_of.items(), key=lambda kv: (kv[0].layer, kv[0].expert)):
        missing = sorted(required - parts)
        if missing:
            raise invalid(f"expert/{key.layer}/{key.expert}: parts missing: {', '.join(missing)}")
    return tuple(sorted(parts_of, key=lambda k: (k.layer, k.expert)))


def check_ownership(
    experts: Iterable[ExpertKey],
    cluster: str,
    owners: Mapping[tuple[int, int], str] | None,
    offered_version: int,
    current_version: int,
    requires_ownership: bool = True,
) -> None:
    """The offer must name the current assignment version and every expert must belong to `cluster`."""
    if not requires_ownership:
        return
    if owners is None or current_version <= 0:
        raise Refusal(RefusalCode.FAILED_PRECONDITION, "no assignment has been solved yet")
    if offered_version != current_version:
        raise Refusal(
            RefusalCode.FAILED_PRECONDITION,
            f"update made under assignment version {offered_version}, current version is {current_version}",
        )
    for key in experts:
        owner = owners.get((key.layer, key.expert))
        if owner != cluster:
            held = f"owned by {owner!r}" if owner else "owned by no cluster"
            raise Refusal(
                RefusalCode.PERMISSION_DENIED,
                f"expert/{key.layer}/{key.expert}: {held} under assignment version {current_version},"
                f" not by {cluster!r}",
            )


# Elements per block of the finiteness check: a small reused mask instead of one as large as the tensor (a 4 GiB
# update would otherwise allocate 1 GiB of booleans), and each block is checked while it is in cache.
FINITE_BLOCK = 1 << 20


def all_finite(array: np.ndarray) -> bool:
    flat = array.reshape(-1)
    mask = np.empty(min(flat.size, FINITE_BLOCK), dtype=np.bool_)
    for start in range(0, flat.size, FINITE_BLOCK):
        part = flat[start : start + FINITE_BLOCK]
        out = mask[: part.size]
        np.isfinite(part, out=out)
        if not out.all():
            return False
    return True


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    for name in sorted(tensors):
        array = tensors[name]
        if array.dtype.kind in "fc" and not all_finite(array):
            bad = "NaN" if np.isnan(array).any() else "Inf"
            raise invalid(f"tensor {name!r}: contains {bad}")


def specs_of(tensors: Mapping[str, np.ndarray]) -> list[Spec]:
    return [Spec(name, dtype_name(a.dtype), tuple(int(d) for d in a.shape)) for name, a in tensors.items()]


def validate_update(
    manifest: Manifest,
    tensors: Mapping[str, np.ndarray],
    cluster: str,
    owners: Mapping[tuple[int, int], str] | None,
    offered_version: int,
    current_version: int,
    requires_ownership: bool = True,
) -> tuple[ExpertKey, ...]:
    """Every check of a decoded update; returns its experts or raises `Refusal`."""
    experts = check_specs(manifest, specs_of(tensors))
    check_finite(tensors)
    check_ownership(experts, cluster, owners, offered_version, current_version, requires_ownership)
    return experts


def parse_safetensors(buf: bytes | memoryview, where: str = "blob") -> dict[str, np.ndarray]:
    """Read-only numpy views of the tensors of a safetensors blob, without copying; strict about the layout.

    Refuses (INVALID_ARGUMENT) a header that is not JSON, unknown dtypes, negative dims, offsets that do not
    match the shape, overlap, leave gaps or run past the end.
    """
    view = memoryview(buf).cast("B")
    if len(view) < 8:
        raise invalid(f"{where}: not a safetensors blob (shorter than its header length)")
    n = int.from_bytes(view[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(view):
        raise invalid(f"{where}: not a safetensors blob (header length {n})")
    try:
        header: Any = json.loads(bytes(view[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"{where}: not a safetensors blob (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise invalid(f"{where}: not a safetensors blob (header is not an object)")
    data = view[8 + n :]
    spans: list[tuple[int, int, str]] = []
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise invalid(f"{where}: tensor {name!r}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise invalid(f"{where}: tensor {name!r}: dtype {dtype!r} not supported")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise invalid(f"{where}: tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise invalid(f"{where}: tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        np_dtype = DTYPES[dtype].newbyteorder("<")
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if not 0 <= begin <= end <= len(data) or end - begin != count * np_dtype.itemsize:
            raise invalid(f"{where}: tensor {name!r}: data_offsets {offsets} do not fit its shape or the blob")
        spans.append((begin, end, name))
        out[name] = np.frombuffer(data[begin:end], dtype=np_dtype, count=count).reshape(shape)
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise invalid(f"{where}: tensor {name!r}: data overlaps another tensor or leaves a gap")
        position = end
    if position != len(data):
        raise invalid(f"{where}: {len(data) - position} trailing bytes after the last tensor")
    return out
