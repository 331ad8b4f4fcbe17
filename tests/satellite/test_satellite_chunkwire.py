"""The zero-copy Chunk reader of the PushChunks path agrees with the generated protobuf parser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.emsfl.v1 import federation_pb2 as pb
from satellite_node.server import WireError, decode_chunk

HEX = st.text(alphabet="0123456789abcdef", max_size=64)
U32 = st.integers(min_value=0, max_value=2**32 - 1)


def _same(buf: bytes) -> None:
    want = pb.Chunk.FromString(buf)
    got = decode_chunk(buf)
    assert (got.content_hash, got.index, got.total_chunks, got.total_size, got.sha256) == (
        want.content_hash,
        want.index,
        want.total_chunks,
        want.total_size,
        want.sha256,
    )
    assert bytes(got.data) == want.data


@settings(max_examples=300, deadline=None)
@given(
    content_hash=HEX,
    index=U32,
    total=U32,
    size=st.integers(min_value=0, max_value=2**64 - 1),
    data=st.binary(max_size=3000),
    sha=st.text(max_size=70),
)
def test_agrees_with_protobuf_on_valid_messages(
    content_hash: str, index: int, total: int, size: int, data: bytes, sha: str
) -> None:
    message = pb.Chunk(
        content_hash=content_hash, index=index, total_chunks=total, total_size=size, data=data, sha256=sha
    )
    buf = message.SerializeToString()
    _same(buf)
    # unknown fields (an UpdateOffer's numbers 7 and 8 are unknown to Chunk) and repeated fields (last wins)
    _same(buf + pb.UpdateOffer(local_step=7, base_version=9).SerializeToString())
    _same(buf + pb.Chunk(index=index ^ 1, data=data[:5]).SerializeToString())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_alike_or_are_refused(buf: bytes) -> None:
    try:
        want = pb.Chunk.FromString(buf)
    except Exception:
        want = None
    try:
        got = decode_chunk(buf)
    except WireError:
        got = None
    if got is not None:
        assert want is not None, "decode_chunk accepted what protobuf refuses"
        _same(buf)
    elif want is not None:
        # the only accepted difference: groups (wire types 3 and 4), which no Chunk writer produces
        assert any(b & 7 in (3, 4) for b in buf)


def test_data_is_a_view_not_a_copy() -> None:
    buf = pb.Chunk(index=1, data=b"x" * 1000).SerializeToString()
    got = decode_chunk(buf)
    assert isinstance(got.data, memoryview) and got.data.obj is buf


@pytest.mark.parametrize(
    "buf",
    [
        b"\x2a\x05abc",  # data longer than the message
        b"\x10" + b"\xff" * 11,  # a varint of more than 10 bytes
        b"\x00\x01",  # field number 0
        b"\x0a\x02\xff\xfe",  # content_hash not UTF-8
        b"\x0f",  # wire type 7
    ],
)
def test_malformed_messages_are_refused(buf: bytes) -> None:
    with pytest.raises(WireError):
        decode_chunk(buf)
    with pytest.raises(Exception):  # noqa: B017 - the generated parser refuses them too
        pb.Chunk.FromString(buf)
