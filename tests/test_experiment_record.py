"""An experiment's record (testbed/record.py) holds what `--resume` needs and nothing of a run's bulk; resuming from
it end to end: tests/integration/test_experiment_quick.py::test_resume_reuses_every_finished_run."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.record import save_record

RECORD = [
    "10Mbps-emsfl-seed0/summary.json",
    "centralised-seed0.json",
    "comparison.json",
    "comparison.md",
    "contact_plan.json",
    "topologies/10Mbps-emsfl-seed0.yaml",
]
BULK = [
    "10Mbps-emsfl-seed0/orbit/plan.json",  # its fingerprint is in comparison.json, the plan in contact_plan.json
    "10Mbps-emsfl-seed0/satellite/state.db",
    "10Mbps-emsfl-seed0/ground/c0/outbox/blobs/ab.safetensors",
    "10Mbps-fedavg-seed0.incomplete-1700000000/summary.json",  # set aside by --resume: never reused
    "accuracy_vs_time.png",
]


def test_the_record_holds_what_resume_needs_and_no_bulk(tmp_path: Path) -> None:
    exp_dir = tmp_path / "runs" / "exp"
    for rel in RECORD + BULK:
        (exp_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (exp_dir / rel).write_text(rel, encoding="utf-8")
    dest = tmp_path / "record"
    (dest / "gone-seed9").mkdir(parents=True)
    (dest / "gone-seed9" / "summary.json").write_text("{}", encoding="utf-8")  # an older record's run: removed
    (dest / "NOTES.md").write_text("kept", encoding="utf-8")  # not the record's: left alone

    assert [str(p) for p in save_record(exp_dir, dest)] == RECORD
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted([*RECORD, "NOTES.md"])
    assert all((dest / rel).read_text(encoding="utf-8") == rel for rel in RECORD)


def test_an_empty_experiment_has_no_record_and_nothing_is_written(tmp_path: Path) -> None:
    (tmp_path / "exp").mkdir()
    with pytest.raises(FileNotFoundError, match="no experiment record"):
        save_record(tmp_path / "exp", tmp_path / "record")
    assert not (tmp_path / "record").exists()
