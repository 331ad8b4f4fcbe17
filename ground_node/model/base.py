"""The base model directory (docs/INTERFACES.md): a short central warm-up of the tiny model, or a checkpoint.

Files: `config.json` + `model.safetensors` (HF `save_pretrained`), `base.safetensors` (manifest names, float32),
`manifest.json`. Written to a temporary sibling and renamed, so a reader never sees half a directory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_bytes
from torch import nn

from emsfl.durable import fsync_dir
from ground_node.errors import GroundError
from ground_node.learning.data import max_positions, tokenizer_for, warmup_pool
from ground_node.learning.synthetic import encode_train
from ground_node.learning.tokenizer import HFTokenizer
from ground_node.model.families import get_adapter
from ground_node.model.family import FamilyAdapter
from ground_node.settings import Settings, cache_key, load_settings, resolve_device
from protos.wire import sha256_hex

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BASE_TENSORS = "base.safetensors"


@dataclass
class Base:
    model: nn.Module
    adapter: FamilyAdapter
    manifest: dict[str, Any]
    path: Path


def ensure_converted(settings: Settings, progress: bool = False) -> Path:
    """`model.checkpoint`, built by upcycling (`model.convert`) unless it holds the same conversion already."""
    from ground_node.model.convert import convert
    from ground_node.model.convert_options import ConvertOptions

    m = settings.model
    assert m.checkpoint is not None and m.convert is not None
    opts = ConvertOptions(num_experts=m.num_experts, top_k=m.top_k, **m.convert)
    convert(opts, Path(m.checkpoint), progress)
    return Path(m.checkpoint)


def new_model(settings: Settings, progress: bool = False) -> tuple[nn.Module, FamilyAdapter]:
    """The configured model before warm-up: a checkpoint if `model.checkpoint` is set, else random (seeded)."""
    adapter = get_adapter(settings.model.family)
    if settings.model.checkpoint and settings.model.convert is not None:
        ensure_converted(settings, progress)
    tok = tokenizer_for(settings.data)
    if settings.model.checkpoint:
        return adapter.load(Path(settings.model.checkpoint), settings.model, tok.vocab_size), adapter
    return adapter.build(settings.model, tok.vocab_size, max_positions(settings), settings.seed), adapter


def warm_up(model: nn.Module, settings: Settings, progress: bool = False) -> list[float]:
    """Train the whole model centrally on a balanced mixture for `warmup.steps` steps; returns the losses."""
    w = settings.warmup
    if w.steps == 0:
        return []
    tok = tokenizer_for(settings.data)
    if w.text_path:  # general text, not the task: the federation alone learns the task
        from ground_node.learning.textwarm import text_windows

        pool = text_windows(w.text_path, min(w.steps * w.batch_size, 50_000), w.text_window, settings.seed)
    else:
        pool = warmup_pool(settings, min(w.steps * w.batch_size, 50_000))
    torch.manual_seed(settings.seed)
    # on `training.device` (a large GPU topology could not warm up on a CPU in reasonable time); a CUDA-warmed base
    # differs from a CPU-warmed one in the last bits, but every role of a run reads the same base directory
    device = resolve_device(settings.training.device)
    model.to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    rng = np.random.default_rng([settings.seed, 7])
    losses = []
    model.train()
    bar = _bar(w.steps, "warm-up", progress)
    for _ in range(w.steps):
        idx = rng.integers(0, len(pool), size=w.batch_size)
        ids, labels = (t.to(device) for t in encode_train(tok, [pool[i] for i in idx]))
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    model.to("cpu")  # the base directory is written from the CPU
    model.eval()
    return losses


def _bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def manifest_for(model: nn.Module, adapter: FamilyAdapter, settings: Settings, base_hash: str) -> dict[str, Any]:
    num_layers, num_experts, top_k = adapter.dims(model)
    t = settings.training
    if t.tune == "lora":
        shapes = adapter.lora_part_shapes(model, t.lora_rank)
        parts = [{"name": n, "dtype": "F32", "shape": shapes[n]} for n in adapter.lora_part_names()]
    else:
        parts = [
            {"name": p, "dtype": "F32", "shape": [int(s) for s in adapter.fused_param(model, 0, p).shape[1:]]}
            for p in adapter.expert_parts
        ]
    return {
        "family": adapter.name,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "tune": t.tune,
        "lora_rank": t.lora_rank,
        "lora_alpha": t.lora_alpha,
        "base_hash": base_hash,
        "expert_parts": parts,
    }


def write_base(model: nn.Module, adapter: FamilyAdapter, settings: Settings, out: Path, extra: dict[str, Any]) -> None:
    """Write the base directory files into `out` (which must exist)."""
    net: Any = model
    net.save_pretrained(str(out), safe_serialization=True)
    tensors = adapter.to_manifest(dict(model.state_dict()))
    blob = save_bytes(tensors)
    (out / BASE_TENSORS).write_bytes(blob)
    manifest = manifest_for(model, adapter, settings, sha256_hex(blob))
    manifest.update(extra)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")


def build_base(topology: Mapping[str, Any], out: Path, progress: bool = False) -> Path:
    """Build the base directory at `out` atomically; an existing complete one with the same key is kept."""
    settings = load_settings(topology)
    key = cache_key(settings)
    out = Path(out)
    if (out / MANIFEST).exists():
        existing = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        if existing.get("cache_key") == key:
            return out
        raise GroundError(f"{out} already holds a base built from another configuration; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        start = time.monotonic()
        model, adapter = new_model(settings, progress)
        losses: list[float] = []
        if not settings.model.checkpoint:
            losses = warm_up(model, settings, progress)
        extra = {
            "cache_key": key,
            "warmup_seconds": round(time.monotonic() - start, 3),
            "warmup_final_loss": losses[-1] if losses else None,
            "vocab_size": tokenizer_for(settings.data).vocab_size,
            "task": settings.data.task,
        }
        write_base(model, adapter, settings, tmp, extra)
        tok = tokenizer_for(settings.data)
        if isinstance(tok, HFTokenizer):  # the base directory is complete: AutoTokenizer loads it too
            tok.save_pretrained(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.rename(tmp, out)
        except OSError:
            if (out / MANIFEST).exists():  # another process won the race with the same key
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_base(topology: dict[str, Any], cache_dir: Path) -> Path:
    """The base directory under `cache_dir`, keyed by the model, data, warmup, training sections and seed."""
    settings = load_settings(topology)
    out = Path(cache_dir) / f"base-{cache_key(settings)}"
    if (out / MANIFEST).exists():
        return out
    return build_base(topology, out)


def read_manifest(base_dir: Path) -> dict[str, Any]:
    path = Path(base_dir) / MANIFEST
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GroundError(f"--base: {path} is not a readable manifest: {exc}") from exc
    return manifest


def load_base(base_dir: Path) -> Base:
    """The base model (eval mode, float32) with its family adapter and manifest."""
    manifest = read_manifest(base_dir)
    adapter = get_adapter(str(manifest.get("family")))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    return Base(model=model, adapter=adapter, manifest=manifest, path=Path(base_dir))
