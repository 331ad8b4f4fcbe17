"""A zero-copy reader of the `emsfl.v1.Chunk` wire format for the PushChunks hot path.

The generated parser copies a chunk's data twice (into the message, then into a new `bytes` on `.data`); at about
1 GB/s per copy that is a large share of the satellite's CPU during a big upload. This reader returns the data as
a `memoryview` into the received message instead. It follows the protobuf encoding rules the generated parser
follows for this message: fields in any order, the last occurrence of a field wins, a known field with another wire
type and unknown fields are skipped, `uint32` values are truncated to 32 bits, strings must be UTF-8. Groups
(deprecated wire types 3 and 4), which no client of this proto can produce, are refused like any malformed message
(gRPC answers INTERNAL, as for a message the generated parser rejects). tests/satellite/test_satellite_chunkwire.py
checks it against the generated parser.
"""

from __future__ import annotations

from satellite_node.uploads import ChunkIn

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_FIELD = (1 << 29) - 1
# field number -> (wire type, kind) of emsfl.v1.Chunk
_FIELDS = {1: (2, "str"), 2: (0, "u32"), 3: (0, "u32"), 4: (0, "u64"), 5: (2, "bytes"), 6: (2, "str")}


class WireError(ValueError):
    """The bytes are not a well-formed Chunk message."""


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; at most 10 bytes, as protobuf allows."""
    value = 0
    for i in range(10):
        if pos >= len(buf):
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return value, pos
    raise WireError("varint longer than 10 bytes")


def _skip(buf: bytes, pos: int, wire_type: int) -> int:
    """Position after a field value of `wire_type` (for unknown fields)."""
    if wire_type == 0:
        return _varint(buf, pos)[1]
    if wire_type == 1:
        end = pos + 8
    elif wire_type == 5:
        end = pos + 4
    elif wire_type == 2:
        length, pos = _varint(buf, pos)
        end = pos + length
    else:
        raise WireError(f"wire type {wire_type} not supported")
    if end > len(buf):
        raise WireError("truncated field")
    return end


def decode_chunk(buf: bytes) -> ChunkIn:
    """A `ChunkIn` from a serialised `emsfl.v1.Chunk`; its `data` is a view into `buf` (no copy)."""
    ints: dict[int, int] = {}
    spans: dict[int, memoryview] = {}
    view = memoryview(buf)
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if not 0 < number <= _MAX_FIELD or key > _U32:
            raise WireError(f"bad field number {number}")
        known = _FIELDS.get(number)
        if known is None or known[0] != wire_type:
            pos = _skip(buf, pos, wire_type)
            continue
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            ints[number] = value & (_U32 if known[1] == "u32" else _U64)
            continue
        length, pos = _varint(buf, pos)
        if pos + length > end:
            raise WireError("truncated field")
        spans[number] = view[pos : pos + length]
        pos += length
    return ChunkIn(
        content_hash=_text(spans.get(1)),
        index=ints.get(2, 0),
        data=spans.get(5, view[0:0]),
        sha256=_text(spans.get(6)),
        total_chunks=ints.get(3, 0),
        total_size=ints.get(4, 0),
    )


def _text(value: memoryview | None) -> str:
    if value is None:
        return ""
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("string field is not UTF-8") from exc
