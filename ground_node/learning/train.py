"""Local learning (ARCHITECTURE §4.4): the held experts only, as PEFT LoRA adapters or full slices; resumable.

Router and shared weights are frozen. Gradients of unheld experts' slices are zeroed by hooks (with AdamW and
no weight decay they never move), so the update carries exactly the held experts' state.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emsfl.durable import fsync_dir
from ground_node.errors import GroundError
from ground_node.learning.expert_lora import use_factored_lora
from ground_node.learning.synthetic import Example, encode_train
from ground_node.learning.tokenizer import CharTokenizer, Tokenizer
from ground_node.model.family import FamilyAdapter
from ground_node.model.split import apply_split, set_router_softmax
from ground_node.records import Assignment
from ground_node.settings import TrainingSettings, resolve_device
from protos.wire import expert_name

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def wrap_lora(
    model: nn.Module, adapter: FamilyAdapter, rank: int, alpha: float, seed: int, factored: bool = True
) -> nn.Module:
    """PEFT LoRA on the fused expert tensors (`target_parameters`); everything else frozen.

    `factored` (the default) computes the adapters from their factors (`expert_lora.py`); False keeps PEFT's
    forward, which folds them into a full copy of each expert tensor (the reference the tests compare with)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    num_layers, _, _ = adapter.dims(model)
    # layers of a sub-model that hold no expert have empty fused tensors: nothing to adapt there
    targets = [
        f"layers.{la}.mlp.experts.{p}"
        for la in range(num_layers)
        if adapter.local_count(model, la) > 0
        for p in adapter.lora_parts()
    ]
    if not targets:
        raise GroundError("the assignment holds no expert: nothing to train")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT accepts floats
        lora_dropout=0.0,
        target_modules=[],
        target_parameters=targets,
    )
    with warnings.catch_warnings():
        # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias: not ours to fix, only noise
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        wrapped: nn.Module = get_peft_model(model, config)
    if factored:
        use_factored_lora(wrapped, adapter)
    return wrapped


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute every decoder layer in backward (non-reentrant `torch.utils.checkpoint`), below any PEFT wrapper.

    Without it autograd keeps every layer's activations (and, where PEFT's own forward runs, GPT-OSS, the
    full-size W + dW copy of each fused expert tensor). Non-reentrant checkpointing works with parameters that
    take gradients inside the layer (LoRA factors, full expert slices) and needs no grad-requiring input; RNG
    state is replayed, so the step is the same."""
    unwrap: Any = getattr(model, "get_base_model", None)  # a PEFT model: the HF model inside
    base: Any = unwrap() if unwrap is not None else model
    kwargs = {"use_reentrant": False}
    enable = getattr(base, "activation_checkpointing_enable", None)  # recent transformers 5; older: the alias
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise GroundError("training.gradient_checkpointing: this model does not support checkpointing")


def peak_gpu_memory_mb() -> float | None:
    """`torch.cuda.max_memory_allocated` of this process in MiB; None when it never used CUDA (CPU training)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """The compute dtype for `training.dtype` on this device; float32 where the device lacks support."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise GroundError(f"training.dtype: unknown dtype {name!r} (known: {sorted(_DTYPES)})")
    if dtype == torch.float32:
        return dtype
    supported = torch.amp.is_autocast_available(device_type)
    if supported and device_type == "cuda" and dtype == torch.bfloat16:
        supported = torch.cuda.is_bf16_supported()
    if supported and device_type == "cpu" and dtype == torch.float16:
        supported = False  # CPU fp16 autocast is slow and unscaled: train in float32 there
    if not supported:
        log.warning("training.dtype=%s is not supported on %s; training in float32", name, device_type)
        return torch.float32
    return dtype


class Trainer:
    """Trains a cluster's held experts step by step on its local examples."""

    def __init__(
        self,
        model: nn.Module,
        adapter: FamilyAdapter,
        training: TrainingSettings,
        assignment: Assignment,
        examples: Sequence[Example],
        seed: int,
        tok: Tokenizer | None = None,
    ) -> None:
        if not examples:
            raise GroundError("no local training examples: the dataset is empty")
        self.device_type = resolve_device(training.device)  # before any work: `cuda` without one is a config error
        self.adapter = adapter
        self.training = training
        self.assignment = assignment
        self.examples = list(examples)
        self.seed = seed
        self.tok: Tokenizer = tok if tok is not None else CharTokenizer()
        self.step = 0
        self.last_loss = float("nan")
        num_layers, num_experts, _ = adapter.dims(model)
        assignment.validate(num_layers, num_experts)
        self.num_experts = num_experts
        for p in model.parameters():
            p.requires_grad_(False)
        if training.split == "mask":
            from ground_node.model.submodel import is_physical, split_model

            if is_physical(model, adapter):
                for layer in range(num_layers):
                    held = adapter.held_index(model, layer)
                    if held != sorted(assignment.held(layer)):
                        raise GroundError(
                            f"layer {layer}: the sub-model holds {held}, the assignment names "
                            f"{sorted(assignment.held(layer))}"
                        )
            else:
                split_model(model, adapter, assignment)  # drop the unheld experts
            set_router_softmax(model, adapter, training.router_softmax)
        else:
            apply_split(model, adapter, assignment, training.split)
        if training.tune == "lora":
            self.model = wrap_lora(model, adapter, training.lora_rank, training.lora_alpha, seed)
        else:
            self.model = model
        if training.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        # everything is built on the CPU (the split reads only held slices there); one move puts it on the device
        self.model.to(self.device_type)
        self._hooks: list[Any] = []
        self._setup_trainable(num_layers)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=0.0)
        self.compute_dtype = resolve_dtype(training.dtype, self.device_type)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none
        self.scaler = (
            torch.amp.GradScaler(self.device_type)
            if self.compute_dtype == torch.float16 and self.device_type == "cuda"
            else None
        )

    def _setup_trainable(self, num_layers: int) -> None:
        r = self.training.lora_rank
        for layer in range(num_layers):
            num_e = self.adapter.local_count(self.model, layer)
            held = torch.zeros(num_e, dtype=torch.bool, device=self.device_type)  # gradient masks live with grads
            held[[self.adapter.local_index(self.model, layer, e) for e in self.assignment.held(layer)]] = True
            if self.training.tune == "lora":
                for wrapper in self.adapter.lora_layers(self.model, layer).values():
                    a = self.adapter.lora_factor(wrapper, "lora_A")
                    b = self.adapter.lora_factor(wrapper, "lora_B")
                    a.requires_grad_(True)
                    b.requires_grad_(True)
                    mask_a = held.repeat_interleave(r).float()[:, None]  # rows e*r:(e+1)*r
                    mask_b = held.repeat(r).float()[None, :]  # columns e::E
                    self._hooks.append(
                        a.register_hook(  # type: ignore[no-untyped-call]
                            lambda g, m=mask_a: g * m
                        )
                    )
                    self._hooks.append(
                        b.register_hook(  # type: ignore[no-untyped-call]
                            lambda g, m=mask_b: g * m
                        )
                    )
            else:
                for part in self.adapter.expert_parts:
                    param = self.adapter.fused_param(self.model, layer, part)
                    param.requires_grad_(True)
                    mask = held.float().reshape(-1, *([1] * (param.dim() - 1)))
                    self._hooks.append(
                        param.register_hook(  # type: ignore[no-untyped-call]
                            lambda g, m=mask: g * m
                        )
                    )

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies on the CPU (a checkpoint must load on a machine without the training device)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if p.requires_grad}

    def _batch(self, step: int, micro: int = 0) -> list[Example]:
        rng = np.random.default_rng([self.seed, step] if micro == 0 else [self.seed, step, micro])
        idx = rng.integers(0, len(self.examples), size=self.training.batch_size)
        return [self.examples[i] for i in idx]

    def train_step(self) -> float:
        """One optimiser step on a seeded batch (the batch depends only on the seed and the step)."""
        self.model.train()
        accum = self.training.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(accum):
            batch = self._batch(self.step, micro)
            ids, labels = (t.to(self.device_type) for t in encode_train(self.tok, batch))
            if self.compute_dtype == torch.float32:
                loss = self.model(input_ids=ids, labels=labels).loss
            else:  # mixed precision: float32 master weights and optimizer state, low-precision compute
                with torch.autocast(device_type=self.device_type, dtype=self.compute_dtype):
                    loss = self.model(input_ids=ids, labels=labels).loss
            scaled = loss.float() / accum
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach().float())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        self.last_loss = total / accum
        return self.last_loss

    def expert_state(self) -> dict[str, np.ndarray]:
        """Every held expert's parts under manifest names, float32 (LoRA factors or full slices)."""
        out: dict[str, np.ndarray] = {}
        for layer, expert in self.assignment.pairs():
            if self.training.tune == "lora":
                parts = self.adapter.extract_lora(self.model, layer, expert, self.training.lora_rank)
            else:
                parts = self.adapter.extract_expert(self.model, layer, expert)
            for part, tensor in parts.items():
                out[expert_name(layer, expert, part)] = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
        return out

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, workdir: Path) -> Path:
        """Trainable state, optimizer state and step, written atomically."""
        path = Path(workdir) / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        state = {
            "step": self.step,
            "assignment": self.assignment.to_json(),
            "tune": self.training.tune,
            "split": self.training.split,
            "trainable": self.trainable_state(),
            "optimizer": self.optimizer.state_dict(),
        }
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return path

    def load_checkpoint(self, workdir: Path) -> bool:
        """Resume from `<workdir>/checkpoint.pt` if it matches this assignment and tuning; True if resumed."""
        path = Path(workdir) / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:
            log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
            return False
        if (
            state.get("assignment") != self.assignment.to_json()
            or state.get("tune") != self.training.tune
            or state.get("split", self.training.split) != self.training.split
        ):
            log.info("checkpoint %s is for another assignment; starting fresh", path)
            return False
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                if name not in params or params[name].shape != value.shape:
                    if "split" not in state:  # a checkpoint from before physical splitting: start fresh
                        log.info("checkpoint %s has another layout; starting fresh", path)
                        return False
                    raise GroundError(f"checkpoint {path}: parameter {name} does not fit the model")
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        return True


def checkpoint_assignment(workdir: Path) -> Assignment | None:
    """The assignment a checkpoint was saved under (None: no readable checkpoint); memory-mapped, so cheap."""
    path = Path(workdir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        return Assignment.from_json(state["assignment"])
    except Exception as exc:
        log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None


def load_expert_state(trainer: Trainer, tensors: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """Set held experts' parts (LoRA factors or full slices) from manifest-named tensors; returns the experts set.

    Tensors of experts the trainer does not hold are ignored; the optimizer state is kept as it is."""
    from protos.wire import parse_expert_name

    by_expert: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    held = set(trainer.assignment.pairs())
    for name, value in tensors.items():
        parsed = parse_expert_name(name)
        if parsed is None:
            continue
        key, part = parsed
        layer, expert = key.layer, key.expert
        if (layer, expert) in held:
            by_expert.setdefault((layer, expert), {})[part] = torch.from_numpy(np.array(value, dtype=np.float32))
    for (layer, expert), parts in sorted(by_expert.items()):
        if trainer.training.tune == "lora":
            trainer.adapter.insert_lora(trainer.model, layer, expert, trainer.training.lora_rank, parts)
        else:
            trainer.adapter.insert_expert(trainer.model, layer, expert, parts)
    return sorted(by_expert)


def optimizer_digest(state_dict: dict[str, Any]) -> str:
    """SHA-256 over an optimizer's `state_dict()` (step counts and moments, in parameter order), as saved in a
    checkpoint: equal states, equal digests."""
    import hashlib

    h = hashlib.sha256()
    state = state_dict["state"]
    for key in sorted(state):
        h.update(str(key).encode())
        for name in sorted(state[key]):
            value = state[key][name]
            h.update(name.encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().contiguous().float().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()
