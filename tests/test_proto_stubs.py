"""The committed gRPC stubs must be exactly what the .proto generates (Flower-style drift check)."""

from __future__ import annotations

from pathlib import Path

import pytest

from protos.generate import ROOT, generate, stub_names

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) generates the stubs")


def test_committed_stubs_match_proto(tmp_path: Path) -> None:
    generate(tmp_path)
    stale = [
        name
        for name in stub_names()
        if (ROOT / name).read_text(encoding="utf-8") != (tmp_path / name).read_text(encoding="utf-8")
    ]
    assert not stale, f"stubs differ from the .proto: {stale}; run `make protos` and commit the result"


def test_drift_is_detected(tmp_path: Path) -> None:
    """The check itself must fail on a stub edited by hand."""
    generate(tmp_path)
    edited = tmp_path / stub_names()[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "# edited\n", encoding="utf-8")
    assert edited.read_text(encoding="utf-8") != (ROOT / stub_names()[0]).read_text(encoding="utf-8")


def test_stub_exposes_every_rpc() -> None:
    from protos.emsfl.v1 import federation_pb2

    service = federation_pb2.DESCRIPTOR.services_by_name["Federation"]
    assert {m.name for m in service.methods} == {
        "Join",
        "ReportAffinity",
        "GetAssignment",
        "PullTensors",
        "OfferUpdate",
        "PushChunks",
        "PushChunksWindowed",
        "GetStatus",
        "RequestReassignment",
    }
