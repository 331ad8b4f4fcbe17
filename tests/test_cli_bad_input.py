"""Bad input to every `emsfl` command, as a user types it: each invocation runs as its own process and must exit 2
with exactly one line on stderr naming the flag, file or key, no traceback, and no file created or changed
in the state and run directories. A reader that closes stdout early ends the command quietly.

Real processes, a real base directory (`emsfl ground warmup`) and a real satellite state directory; nothing
is mocked. Each process pays Python's start-up (and numpy/yaml imports), so the cases run on a few threads,
each in its own copy of the inputs, so that a case's side effects cannot hide behind another's.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # generous: a loaded 2-core machine starts Python slowly

TINY = {
    "name": "tiny",
    "seed": 3,
    "clusters": [{"id": "c0", "capacity_experts": 2}, {"id": "c1", "capacity_experts": 2}],
    "model": tiny_model(),
    "data": {"task": "synthetic", "train_per_cluster": 50, "test_per_domain": 4},
    "warmup": {"steps": 2, "lr": 0.003, "batch_size": 8},
    "training": {"lora_rank": 4, "lora_alpha": 8, "batch_size": 4, "profile_examples": 8},
}

# (case id, argv after `emsfl`, text the one stderr line must contain). Placeholders: {T} the tiny topology,
# {B} its base, {S} a satellite state directory, {W} a run/work directory, {I} a directory of other inputs.
CASES: list[tuple[str, list[str], str]] = [
    ("unknown-command", ["orbitt"], "'orbitt'"),
    ("ground-unknown-flag", ["ground", "eval", "--topology", "{T}", "--base", "{B}", "--bogus"], "--bogus"),
    ("ground-missing-flag", ["ground", "eval", "--topology", "{T}"], "--base"),
    ("ground-topology-missing", ["ground", "eval", "--topology", "{I}/nope.yaml", "--base", "{B}"], "nope.yaml"),
    ("ground-topology-not-yaml", ["ground", "eval", "--topology", "{I}/broken.yaml", "--base", "{B}"], "broken.yaml"),
    (
        "ground-topology-bad-key",
        ["ground", "profile", "--topology", "{I}/badkey.yaml", "--base", "{B}", "--cluster", "c0"],
        "training.tune",
    ),
    (
        "ground-eval-corrupt-tensors",
        ["ground", "eval", "--topology", "{T}", "--base", "{B}", "--tensors", "{I}/corrupt.safetensors"],
        "--tensors",
    ),
    (
        "ground-eval-missing-tensors",
        ["ground", "eval", "--topology", "{T}", "--base", "{B}", "--tensors", "{I}/none.safetensors"],
        "none.safetensors",
    ),
    (
        "ground-eval-base-other-model",
        ["ground", "eval", "--topology", str(ROOT / "testbed/topologies/banking77.yaml"), "--base", "{B}"],
        "model.num_experts",
    ),
    ("ground-eval-base-other-vocab", ["ground", "eval", "--topology", "{I}/text.yaml", "--base", "{B}"], "vocab_size"),
    ("ground-eval-base-missing", ["ground", "eval", "--topology", "{T}", "--base", "{I}/nobase"], "--base"),
    (
        "ground-eval-unknown-cluster",
        ["ground", "eval", "--topology", "{T}", "--base", "{B}", "--cluster", "c9"],
        "--cluster",
    ),
    (
        "ground-train-negative-steps",
        [
            "ground",
            "train",
            "--topology",
            "{T}",
            "--base",
            "{B}",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/train",
            "--steps",
            "-3",
        ],
        "--steps",
    ),
    (
        "ground-train-zero-steps",
        [
            "ground",
            "train",
            "--topology",
            "{T}",
            "--base",
            "{B}",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/train",
            "--steps",
            "0",
        ],
        "--steps",
    ),
    (
        "ground-train-experts-over-capacity",
        [
            "ground",
            "train",
            "--topology",
            "{T}",
            "--base",
            "{B}",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/train",
            "--experts",
            "0:0,1,2",
        ],
        "capacity_experts",
    ),
    (
        "ground-train-experts-unknown",
        [
            "ground",
            "train",
            "--topology",
            "{T}",
            "--base",
            "{B}",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/train",
            "--experts",
            "0:9",
        ],
        "--experts",
    ),
    (
        "ground-train-experts-garbled",
        [
            "ground",
            "train",
            "--topology",
            "{T}",
            "--base",
            "{B}",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/train",
            "--experts",
            "a:b",
        ],
        "--experts",
    ),
    (
        "ground-export-corrupt-tensors",
        ["ground", "export", "--base", "{B}", "--tensors", "{I}/corrupt.safetensors", "--out", "{W}/m.onnx"],
        "--tensors",
    ),
    (
        "ground-warmup-bad-key",
        ["ground", "warmup", "--topology", "{I}/badkey.yaml", "--out", "{W}/base"],
        "training.tune",
    ),
    (
        "ground-run-bad-broker",
        [
            "ground",
            "run",
            "--topology",
            "{T}",
            "--broker",
            "nohost",
            "--satellite",
            "127.0.0.1:1",
            "--cluster",
            "c0",
            "--workdir",
            "{W}/run",
            "--base",
            "{B}",
        ],
        "--broker",
    ),
    (
        "satellite-run-base-other-model",
        [
            "satellite",
            "run",
            "--topology",
            str(ROOT / "testbed/topologies/local.yaml"),
            "--broker",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:50999",
            "--state",
            "{S}",
            "--base",
            "{B}",
        ],
        "model.num_experts",
    ),
    (
        "satellite-run-bad-listen",
        [
            "satellite",
            "run",
            "--topology",
            "{T}",
            "--broker",
            "127.0.0.1:1",
            "--listen",
            "everywhere",
            "--state",
            "{S}",
            "--base",
            "{B}",
        ],
        "--listen",
    ),
    ("satellite-status-missing-state", ["satellite", "status", "--state", "{W}/nostate"], "--state"),
    ("satellite-unknown-flag", ["satellite", "status", "--state", "{S}", "--yaml"], "--yaml"),
    (
        "orbit-plan-negative-hours",
        ["orbit", "plan", "--walker", "53:550:3/4/1", "--sites", "{I}/sites.csv", "--hours", "-1"],
        "--hours",
    ),
    ("orbit-plan-bad-walker", ["orbit", "plan", "--walker", "53:550", "--sites", "{I}/sites.csv"], "--walker"),
    ("orbit-plan-missing-sites", ["orbit", "plan", "--walker", "53:550:3/4/1", "--sites", "{I}/none.csv"], "none.csv"),
    ("orbit-override-bad-broker", ["orbit", "override", "--broker", "nohost", "pause"], "--broker"),
    ("lab-up-negative-duration", ["lab", "up", "--duration-s", "-1", "--runs-dir", "{W}/runs"], "--duration-s"),
    (
        "lab-experiment-unknown-strategy",
        ["lab", "experiment", "--strategies", "emsfl,fedprox", "--runs-dir", "{W}/runs", "--cache-dir", "{W}/cache"],
        "--strategies",
    ),
    (
        "lab-experiment-target-fraction",
        ["lab", "experiment", "--target-fraction", "1.5", "--runs-dir", "{W}/runs", "--cache-dir", "{W}/cache"],
        "--target-fraction",
    ),
    ("lab-merge-gap-zero-steps", ["lab", "merge-gap", "--steps", "0", "--out", "{W}/gap.json"], "--steps"),
    ("pki-show-missing-dir", ["pki", "show", "--dir", "{W}/doesnotexist"], "--dir"),
    ("pki-issue-bad-role", ["pki", "issue", "--dir", "{W}/pki", "--name", "a", "--role", "admin"], "--role"),
    ("pki-init-ca-negative-days", ["pki", "init-ca", "--dir", "{W}/pki", "--days", "-1"], "--days"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and directory under `root`: size and content hash (directories: -1, '')."""
    out: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = (-1, "")
        else:
            out[rel] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _emsfl(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EMSFL_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "emsfl", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory with the tiny topology, its base, a satellite state and the malformed inputs."""
    from satellite_node.store import Store

    root = tmp_path_factory.mktemp("inputs")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY), encoding="utf-8")
    built = _emsfl(["ground", "warmup", "--topology", str(root / "tiny.yaml"), "--out", str(root / "base")], root)
    assert built.returncode == 0, built.stderr
    text = copy.deepcopy(TINY)
    text["data"] = {"task": "banking77", "path": "../shared/data/banking77"}  # read only by training: never here
    (root / "text.yaml").write_text(yaml.safe_dump(text), encoding="utf-8")
    bad = copy.deepcopy(TINY)
    bad["training"]["tune"] = "prefix"
    (root / "badkey.yaml").write_text(yaml.safe_dump(bad), encoding="utf-8")
    (root / "broken.yaml").write_text("clusters: [c0\nmodel: {", encoding="utf-8")
    (root / "corrupt.safetensors").write_bytes(b"\x07\x00")  # "header too small"
    (root / "sites.csv").write_text("name,lat_deg,lon_deg,alt_m,min_elevation_deg\nlisbon,38.7,-9.1,50,10\n")
    with Store(root / "state") as store:
        store.set_meta("strategy", "emsfl")
        store.set_meta("clusters", ["c0", "c1"])
    yield root


def _run_case(inputs: Path, scratch: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run one case in its own copy of the inputs; returns the process and whether the tree stayed unchanged."""
    shutil.copytree(inputs, scratch / "in")
    (scratch / "work").mkdir()
    places = {
        "{T}": str(scratch / "in" / "tiny.yaml"),
        "{B}": str(scratch / "in" / "base"),
        "{S}": str(scratch / "in" / "state"),
        "{W}": str(scratch / "work"),
        "{I}": str(scratch / "in"),
    }
    resolved = []
    for arg in argv:
        for key, value in places.items():
            arg = arg.replace(key, value)
        resolved.append(arg)
    before = _snapshot(scratch)
    proc = _emsfl(resolved, cwd=scratch / "work")
    return proc, _snapshot(scratch) == before


def test_every_bad_invocation_is_one_line_exit_2_and_changes_nothing(inputs: Path, tmp_path: Path) -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_case, inputs, tmp_path / name, argv) for name, argv, _ in CASES}
        results = {name: f.result() for name, f in futures.items()}
    failures = []
    for name, _, expected in CASES:
        proc, unchanged = results[name]
        lines = proc.stderr.splitlines()
        problems = []
        if proc.returncode != 2:
            problems.append(f"exit {proc.returncode}")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
        if "Traceback" in proc.stderr:
            problems.append("traceback")
        if expected not in proc.stderr:
            problems.append(f"{expected!r} not named")
        if not unchanged:
            problems.append("files created or changed")
        if problems:
            failures.append(f"{name}: {', '.join(problems)}; stderr: {proc.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)


def test_a_reader_that_closes_early_ends_the_command_quietly(inputs: Path) -> None:
    """`emsfl satellite status ... | head`: no BrokenPipeError traceback when the reader is gone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "emsfl", "satellite", "status", "--state", str(inputs / "state")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first write
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=TIMEOUT_S) == 1
    assert err == ""
