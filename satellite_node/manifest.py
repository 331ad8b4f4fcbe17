"""The base directory as the satellite sees it: `manifest.json` and `base.safetensors` (docs/INTERFACES.md)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from emsfl.errors import UserError
from protos.emsfl.v1 import federation_pb2

MANIFEST_FILE = "manifest.json"
BASE_FILE = "base.safetensors"

# safetensors dtype strings numpy can hold (BF16 has no numpy dtype, so it cannot cross this node).
DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The safetensors name of a numpy dtype, or its numpy name when it has none."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    return str(dtype)


class ManifestError(UserError):
    """A base directory that cannot be served; the message names the file and field."""


@dataclass(frozen=True)
class PartSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    tune: str
    base_hash: str
    expert_parts: tuple[PartSpec, ...]
    lora_rank: int | None = None
    lora_alpha: float | None = None

    def part(self, name: str) -> PartSpec | None:
        for spec in self.expert_parts:
            if spec.name == name:
                return spec
        return None

    def to_proto(self) -> federation_pb2.ModelManifest:
        return federation_pb2.ModelManifest(
            family=self.family,
            num_layers=self.num_layers,
            num_experts=self.num_experts,
            top_k=self.top_k,
            tune=self.tune,
            expert_parts=[
                federation_pb2.TensorSpec(name=p.name, dtype=p.dtype, shape=list(p.shape)) for p in self.expert_parts
            ],
            base_hash=self.base_hash,
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _int(data: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}.{key}: expected a non-empty string, got {value!r}")
    return value


def parse_manifest(data: Any, where: str = MANIFEST_FILE) -> Manifest:
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object")
    parts_raw = data.get("expert_parts")
    if not isinstance(parts_raw, list) or not parts_raw:
        raise ManifestError(f"{where}.expert_parts: expected a non-empty list")
    parts: list[PartSpec] = []
    for i, raw in enumerate(parts_raw):
        at = f"{where}.expert_parts[{i}]"
        if not isinstance(raw, dict):
            raise ManifestError(f"{at}: expected an object")
        dtype = _str(raw, "dtype", at)
        if dtype not in DTYPES:
            raise ManifestError(f"{at}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        shape = raw.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ManifestError(f"{at}.shape: expected a list of non-negative integers, got {shape!r}")
        parts.append(PartSpec(_str(raw, "name", at), dtype, tuple(shape)))
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ManifestError(f"{where}.expert_parts: duplicate part names in {names}")
    rank = data.get("lora_rank")
    alpha = data.get("lora_alpha")
    return Manifest(
        family=_str(data, "family", where),
        num_layers=_int(data, "num_layers", where),
        num_experts=_int(data, "num_experts", where),
        top_k=_int(data, "top_k", where),
        tune=_str(data, "tune", where),
        base_hash=_str(data, "base_hash", where),
        expert_parts=tuple(parts),
        lora_rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        lora_alpha=float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None,
    )


def load_manifest(base_dir: str | Path, verify_hash: bool = True) -> Manifest:
    """Read `manifest.json`; with `verify_hash`, check that `base.safetensors` hashes to `base_hash`."""
    base_dir = Path(base_dir)
    path = base_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not JSON: {exc}") from exc
    manifest = parse_manifest(data, str(path))
    if verify_hash:
        base = base_dir / BASE_FILE
        if not base.is_file():
            raise ManifestError(f"{base}: missing")
        actual = file_sha256(base)
        if actual != manifest.base_hash:
            raise ManifestError(f"{path}.base_hash: {manifest.base_hash} does not match {base} ({actual})")
    return manifest


def load_base_tensors(base_dir: str | Path) -> dict[str, np.ndarray]:
    """Every base tensor under its manifest name."""
    path = Path(base_dir) / BASE_FILE
    try:
        tensors: dict[str, np.ndarray] = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot load: {exc}") from exc
    return tensors
