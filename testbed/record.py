"""An experiment's record: the few small files `emsfl lab experiment --resume` needs to reuse its finished runs.

A run directory holds gigabytes (outboxes, the satellite's state, every board's model); the comparison needs only
each run's `summary.json`, the topology it ran with, the contact plan the runs replay (once: each run's copy is
identified by its fingerprint in `comparison.json`) and the centralised reports. A
record holds exactly those, so it can be committed and carried to another machine: copy it to
`<runs-dir>/<experiment-id>` and resume there with more seeds; the finished runs are reused, not rerun.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RECORD_GLOBS = (
    "comparison.json",
    "comparison.md",
    "contact_plan.json",
    "centralised-seed*.json",
    "topologies/*.yaml",
    "*/summary.json",
)


def record_files(exp_dir: Path) -> list[Path]:
    """The record's files of `exp_dir`, relative to it; runs set aside as `.incomplete-*` are left out."""
    found = {p.relative_to(exp_dir) for pattern in RECORD_GLOBS for p in exp_dir.glob(pattern) if p.is_file()}
    return sorted(p for p in found if ".incomplete-" not in p.parts[0])


def save_record(exp_dir: Path, dest: Path) -> list[Path]:
    """Copy the record of `exp_dir` into `dest`; returns its files. A file of an older record in `dest` that this one
    lacks is removed (a run that no longer exists); nothing else in `dest` is touched."""
    files = record_files(exp_dir)
    if not files:
        raise FileNotFoundError(f"{exp_dir}: no experiment record (no comparison.json, no run summary)")
    for rel in record_files(dest) if dest.is_dir() else []:
        if rel not in files:
            (dest / rel).unlink()
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exp_dir / rel, dest / rel)
    return files
