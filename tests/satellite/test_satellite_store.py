"""Durable store and export: resumable partial uploads, idempotent commits, the model at past emulated times."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from emsfl.durable import atomic_write_bytes
from protos.wire import ExpertKey, chunk_hashes, sha256_hex, split_chunks
from satellite_node import export
from satellite_node.manifest import load_base_tensors
from satellite_node.store import Store, UploadRow
from satellite_node.strategy import NewVersion
from satellite_node.testing import encode, expert_update, write_tiny_base

T0 = datetime(2026, 3, 20, 6, 0, tzinfo=timezone.utc)


def test_atomic_write_leaves_no_tmp(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a", b"one")
    atomic_write_bytes(tmp_path / "a", b"two")
    assert (tmp_path / "a").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_partial_upload_survives_reopen(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 5
    row = UploadRow(sha256_hex(blob), "c0", len(blob), 300, tuple(chunk_hashes(blob, 300)), (), 1, 0)
    with Store(tmp_path) as store:
        store.put_upload(row, 0.0)
        for i, chunk in enumerate(split_chunks(blob, 300)):
            if i % 2 == 0:
                store.put_chunk(row.content_hash, i, bytes(chunk))
    (tmp_path / "partial" / "stray").mkdir()  # a folder of no upload (crash leftover) is swept
    with Store(tmp_path) as store:
        assert store.get_upload(row.content_hash) == row
        assert store.received_chunks(row.content_hash) == {0, 2, 4}
        for i, chunk in enumerate(split_chunks(blob, 300)):
            if i % 2 == 1:
                store.put_chunk(row.content_hash, i, bytes(chunk))
        assert store.assemble(row) == blob
    assert not (tmp_path / "partial" / "stray").exists()


def test_commit_twice_is_noop_and_versions_kept(tmp_path: Path) -> None:
    base = write_tiny_base(tmp_path / "base")
    key = ExpertKey(0, 1)
    blobs = [encode(expert_update(base, [(0, 1)], seed=s)) for s in (1, 2)]
    with Store(tmp_path / "state") as store:
        for i, blob in enumerate(blobs):
            h = store.put_blob(blob)
            t = T0 + timedelta(minutes=10 * (i + 1))
            v = NewVersion(key, store.current_version(key) + 1, "c0", h)
            assert store.record_commit(h, "c0", len(blob), [v], t.isoformat(), t.timestamp(), 0.0)
            assert not store.record_commit(h, "c0", len(blob), [v], t.isoformat(), t.timestamp(), 0.0)
        assert store.current_version(key) == 2
        assert len(store.commits()) == 2
    # the lab reads the state after the process stopped
    commits = export.commits(tmp_path / "state")
    assert [c["experts"] for c in commits] == [[[0, 1, 1]], [[0, 1, 2]]]
    base_tensors = load_base_tensors(base)
    name = "expert/0/1/down_proj.lora_A"
    assert name not in export.global_tensors(tmp_path / "state", base, at=T0)
    first = export.global_tensors(tmp_path / "state", base, at=T0 + timedelta(minutes=15))
    np.testing.assert_array_equal(first[name], expert_update(base, [(0, 1)], seed=1)[name])
    newest = export.global_tensors(tmp_path / "state", base)
    np.testing.assert_array_equal(newest[name], expert_update(base, [(0, 1)], seed=2)[name])
    for n, a in base_tensors.items():  # base tensors are always present, unchanged under LoRA tuning
        np.testing.assert_array_equal(newest[n], a)


def test_a_failed_write_back_ahead_keeps_the_chunks_off_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux reports a writeback error to one fsync of a descriptor only: the early write-back must not swallow it
    blob = bytes(range(256)) * 4
    row = UploadRow(sha256_hex(blob), "c0", len(blob), 256, tuple(chunk_hashes(blob, 256)), (), 1, 0)
    with Store(tmp_path) as store:
        store.put_upload(row, 0.0)
        writer = store.chunk_writer(row)
        writer.write(0, blob[:256])

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        with monkeypatch.context() as mp:
            mp.setattr(os, "fdatasync", failing)
            writer.sync_ahead()
        with pytest.raises(OSError):
            writer.flush()
        writer.close()
        assert store.received_chunks(row.content_hash) == set()
