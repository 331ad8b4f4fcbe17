from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from ground_node.errors import GroundError
from ground_node.federation.outbox import Outbox
from protos.wire import sha256_hex


def _tensors(v: float) -> dict[str, np.ndarray]:
    return {
        "expert/0/1/down_proj.lora_A": np.full((2, 3), v, np.float32),
        "expert/0/1/down_proj.lora_B": np.full((3, 2), v, np.float32),
    }


def test_stage_reopen_ack_supersede(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.pending() is None
    first = box.stage(_tensors(1.0), assignment_version=2, step=5)
    assert first.content_hash == sha256_hex(first.read())
    assert load(first.read())["expert/0/1/down_proj.lora_B"].dtype == np.float32
    second = box.stage(_tensors(2.0), assignment_version=2, step=10)
    assert not first.path.exists()  # superseded before it was sent
    reopened = Outbox(tmp_path)
    pending = reopened.pending()
    assert pending is not None and pending.content_hash == second.content_hash and pending.step == 10
    reopened.mark_acked(second.content_hash, second.size)
    reopened.mark_acked(second.content_hash, second.size)  # idempotent
    again = Outbox(tmp_path)
    assert again.pending() is None and again.acked() == [second.content_hash]
    assert again.bytes_uplinked == second.size
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    same = again.stage(_tensors(2.0), 2, 10)  # same content: already acknowledged, nothing pending
    assert same.content_hash == second.content_hash and again.pending() is None


def test_bad_stage_and_corrupt_state(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(GroundError, match="empty"):
        box.stage({}, 1, 1)
    with pytest.raises(GroundError, match="not an expert"):
        box.stage({"shared/x": np.zeros(2, np.float32)}, 1, 1)
    (tmp_path / "state.json").write_text("{nope")
    with pytest.raises(GroundError, match="corrupt"):
        Outbox(tmp_path)
