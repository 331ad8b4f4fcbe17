"""`training.device`: resolution and validation, and an explicit `cpu` end to end (train, stage, resume, evaluate,
the centralised reference). The CUDA path itself cannot run here (CPU-only torch): see benchmarks/bench_gpu_profile.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from emsfl.config import ConfigError, load_topology
from ground_node.cli import main
from ground_node.learning.central import centralised
from ground_node.learning.synthetic import cluster_train
from ground_node.learning.train import Trainer, peak_gpu_memory_mb
from ground_node.model.base import load_base
from ground_node.records import Assignment
from ground_node.settings import load_settings, resolve_device


def _cuda(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def test_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"training\.device: 'cuda' is set but torch sees no CUDA device"):
        resolve_device("cuda")
    _cuda(monkeypatch, True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda" and resolve_device("cpu") == "cpu"


def test_device_is_validated(topology: dict[str, Any]) -> None:
    assert load_settings(topology).training.device == "auto"
    topology["training"]["device"] = "tpu"
    with pytest.raises(ConfigError, match=r"training\.device"):
        load_settings(topology)
    topology["training"]["device"] = "cuda"  # valid in the file: only the trainer needs the device
    assert load_settings(topology).training.device == "cuda"


def test_cuda_without_a_device_stops_the_trainer(
    topology: dict[str, Any], base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cuda(monkeypatch, False)
    topology["training"]["device"] = "cuda"
    s = load_settings(topology)
    base = load_base(base_dir)
    with pytest.raises(ConfigError, match=r"training\.device"):
        Trainer(base.model, base.adapter, s.training, Assignment(1, {0: (0,)}), cluster_train(s, "c0"), s.seed)


def test_cuda_without_a_device_exits_2(
    topology: dict[str, Any], base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _cuda(monkeypatch, False)
    topology["training"]["device"] = "cuda"
    topo = tmp_path / "t.yaml"
    topo.write_text(yaml.safe_dump(topology))
    args = ["train", "--topology", str(topo), "--base", str(base_dir), "--cluster", "c0", "--workdir", str(tmp_path)]
    assert main([*args, "--steps", "1", "--experts", "0:1;1:2"]) == 2
    assert "training.device" in capsys.readouterr().err


def test_explicit_cpu_end_to_end(topology: dict[str, Any], base_dir: Path, tmp_path: Path, capsys: Any) -> None:
    topology["training"].update(device="cpu", gradient_checkpointing=True)
    topo = tmp_path / "t.yaml"
    topo.write_text(yaml.safe_dump(topology))
    work = tmp_path / "w"
    args = ["train", "--topology", str(topo), "--base", str(base_dir), "--cluster", "c0", "--workdir", str(work)]
    assert main([*args, "--steps", "2", "--experts", "0:1,3;1:2"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["training_device"] == "cpu" and rep["peak_gpu_memory_mb"] is None
    assert main([*args, "--steps", "3", "--experts", "0:1,3;1:2"]) == 0  # resumes from its checkpoint
    rep = json.loads(capsys.readouterr().out)
    assert rep["resumed"] and rep["steps"] == 3
    ev = ["eval", "--topology", str(topo), "--base", str(base_dir), "--cluster", "c0", "--tensors", rep["staged"]]
    assert main(ev) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1.0
    central = centralised(topology, base_dir, steps=1)
    assert central["training_device"] == "cpu" and central["peak_gpu_memory_mb"] is None
    assert central["step_time_s"] is not None and 0.0 <= central["accuracy_final"] <= 1.0
    assert peak_gpu_memory_mb() is None  # nothing here touched CUDA


REPO = Path(__file__).resolve().parents[2]
GPU_BENCH = REPO / "benchmarks" / "bench_gpu_profile.py"


def _gpu_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu_profile", GPU_BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_topology_is_valid() -> None:
    s = load_settings(load_topology(REPO / "testbed" / "topologies" / "gpu-olmoe.yaml"))
    assert (s.model.num_experts, s.model.top_k) == (64, 8) and 512 <= s.model.hidden_size <= 1024
    assert s.training.device == "cuda" and s.training.dtype == "bfloat16"
    assert sum(s.capacities.values()) >= s.model.num_experts  # every expert has an owner


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark would really run")
def test_gpu_benchmark_skips_without_cuda() -> None:
    bench = _gpu_bench()
    existed = bench.RESULT.exists()
    proc = subprocess.run([sys.executable, str(GPU_BENCH)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "skipped" in proc.stdout and "no CUDA device" in proc.stdout
    assert bench.RESULT.exists() == existed  # nothing written


def test_gpu_benchmark_code_runs_on_cpu(topology: dict[str, Any], tmp_path: Path) -> None:
    """The benchmark's measurement on a tiny topology and the CPU: its code path, not its figures."""
    topo = tmp_path / "t.yaml"
    topo.write_text(yaml.safe_dump(topology))
    bench = _gpu_bench()
    split = bench.measure("split", topo, steps=1, warm=1, device="cpu")
    full = bench.measure("full", topo, steps=1, warm=0, device="cpu")
    assert split["experts_held_per_layer"] == 2 and full["experts_held_per_layer"] == 4
    assert split["trainable_params"] < full["trainable_params"] and split["params"] < full["params"]
    assert split["max_memory_allocated_MB"] is None and split["device_name"] is None  # no GPU figure is made up
