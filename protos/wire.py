"""Wire helpers shared by every role: manifest names (ARCHITECTURE §5.1) and content-addressed chunks (§5.2).

No torch here: the satellite node sees tensors as numpy arrays in safetensors blobs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from protos.emsfl.v1 import federation_pb2 as pb

CHUNK_SIZE = 1 << 20  # about 1 MiB per chunk, each with its own SHA-256
CLUSTER_METADATA_KEY = "emsfl-cluster"  # identity on plaintext loopback labs; mTLS replaces it

_EXPERT_RE = re.compile(r"^expert/(\d+)/(\d+)/([A-Za-z0-9_.]+)$")
_SHARED_RE = re.compile(r"^shared/([A-Za-z0-9_.]+)$")


@dataclass(frozen=True)
class ExpertKey:
    layer: int
    expert: int


def shared_name(hf_name: str) -> str:
    return f"shared/{hf_name}"


def expert_name(layer: int, expert: int, part: str) -> str:
    return f"expert/{layer}/{expert}/{part}"


def parse_expert_name(name: str) -> tuple[ExpertKey, str] | None:
    """(key, part) of an `expert/<layer>/<expert>/<part>` name, else None."""
    match = _EXPERT_RE.match(name)
    if match is None:
        return None
    return ExpertKey(int(match.group(1)), int(match.group(2))), match.group(3)


def is_valid_name(name: str) -> bool:
    return _EXPERT_RE.match(name) is not None or _SHARED_RE.match(name) is not None


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def split_chunks(blob: bytes, chunk_size: int = CHUNK_SIZE) -> list[memoryview]:
    """Views of consecutive chunks; an empty blob has no chunks."""
    view = memoryview(blob)
    return [view[i : i + chunk_size] for i in range(0, len(blob), chunk_size)]


def chunk_hashes(blob: bytes, chunk_size: int = CHUNK_SIZE) -> list[str]:
    return [sha256_hex(c) for c in split_chunks(blob, chunk_size)]


def chunk_messages(
    blob: bytes,
    indices: Iterable[int],
    chunk_size: int = CHUNK_SIZE,
    hashes: Sequence[str] | None = None,
    content_hash: str | None = None,
) -> Iterator[pb.Chunk]:
    """The `emsfl.v1.Chunk` messages of `blob` at `indices`, made as they are consumed (hashes computed unless
    given)."""
    chunks = split_chunks(blob, chunk_size)
    content_hash = content_hash or sha256_hex(blob)
    for i in indices:
        data = bytes(chunks[i])
        yield pb.Chunk(
            content_hash=content_hash,
            index=i,
            total_chunks=len(chunks),
            total_size=len(blob),
            data=data,
            sha256=hashes[i] if hashes is not None else sha256_hex(data),
        )
