"""ONNX export of the global model (base + uploaded tensors, LoRA merged) or a cluster's tuned sub-model.

Experts run with `experts_implementation="batched_mm"` (export-friendly, no data-dependent loops) and the graph
is exported with `torch.onnx.export(..., dynamo=True)` with dynamic batch and sequence axes. `check_onnx` runs it
with onnxruntime (TensorRT / CUDA providers when present, else CPU) and returns the largest absolute logit
difference against torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.learning.evaluate import model_with_tensors
from ground_node.records import Assignment
from protos.wire import parse_expert_name


class LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=input_ids, use_cache=False).logits
        return logits


def held_from_tensors(tensors: Mapping[str, Any], version: int = 0) -> Assignment:
    layers: dict[int, set[int]] = {}
    for name in tensors:
        parsed = parse_expert_name(name)
        if parsed is not None:
            layers.setdefault(parsed[0].layer, set()).add(parsed[0].expert)
    if not layers:
        raise GroundError("--submodel: the tensors name no expert, so there is no sub-model to export")
    return Assignment(version, {la: tuple(sorted(ex)) for la, ex in layers.items()})


def export_model(
    base_dir: Path, tensors: Mapping[str, np.ndarray] | None, out: Path, submodel: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """Write `out` (ONNX); returns the torch module it was exported from and a summary."""
    from ground_node.model.submodel import split_model

    base = model_with_tensors(Path(base_dir), dict(tensors) if tensors else None)
    model = base.model
    held = None
    if submodel:
        if not tensors:
            raise GroundError("--submodel needs --tensors (the cluster's tuned experts)")
        held = held_from_tensors(tensors)
        split_model(model, base.adapter, held)
    net: Any = model
    net.set_experts_implementation("batched_mm")
    wrapper = LogitsOnly(model).eval()
    example = torch.full((2, 8), 3, dtype=torch.long)
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=4096)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (example,),
            str(out),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
            external_data=False,
            verbose=False,
        )
    summary = {"onnx": str(out), "submodel": held.to_json()["layers"] if held is not None else None}
    return wrapper, summary


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def check_onnx(path: Path, torch_model: nn.Module, input_ids: torch.Tensor) -> float:
    """Largest absolute logit difference torch vs onnxruntime on `input_ids`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=providers())
    got = session.run(None, {"input_ids": input_ids.numpy().astype(np.int64)})[0]
    with torch.no_grad():
        ref = torch_model(input_ids).numpy()
    return float(np.abs(got - ref).max())
