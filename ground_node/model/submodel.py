"""Physical sub-models (ARCHITECTURE §4.3, `split=mask`): only the shared weights plus the cluster's experts.

A split layer's fused expert tensors hold only its held experts (local order = ascending global id); its router
holds only their rows as its parameter, with `held_index` (local -> global) and `to_local` (global -> local)
buffers so that routing and every manifest name stay in global expert ids. Where the family's routing weights
need the full softmax denominator (OLMoE, Qwen-MoE without top-k renormalisation) the other experts' router rows
stay as a frozen, non-persistent buffer (E x hidden floats: negligible), so a token whose top-k experts are all
held is computed exactly as in the full model.

`split_model` cuts an existing model in place; `load_split` builds the sub-model directly from a manifest-named
safetensors file (`base.safetensors`) reading only the shared tensors and the held experts' slices, so the full
model is never in memory.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.model.family import FamilyAdapter, HFMoEAdapter
from ground_node.model.routing import held_router_class
from ground_node.model.tensorfile import TensorFile
from ground_node.records import Assignment
from protos.wire import expert_name, shared_name


class NoExpertsMixin:
    """Experts module of a layer that holds no expert: contributes nothing (no expert is ever routed to)."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


_EMPTY_CLASSES: dict[type, type] = {}


def _set_experts_count(experts: Any, count: int) -> None:
    experts.num_experts = count
    cls = type(experts)
    if count == 0 and not issubclass(cls, NoExpertsMixin):
        if cls not in _EMPTY_CLASSES:
            _EMPTY_CLASSES[cls] = type(f"Empty{cls.__name__}", (NoExpertsMixin, cls), {})
        experts.__class__ = _EMPTY_CLASSES[cls]


def _install_router(
    adapter: FamilyAdapter, model: nn.Module, layer: int, held: list[int], full_weight: torch.Tensor, full_bias: Any
) -> None:
    if not isinstance(adapter, HFMoEAdapter):
        raise GroundError(f"family {adapter.name}: physical split is not supported")
    _num_layers, num_experts, top_k = adapter.dims(model)
    router: Any = adapter.router(model, layer)
    base_cls = adapter.original_router_class(router)
    held_t = torch.tensor(held, dtype=torch.long)
    rest = [e for e in range(num_experts) if e not in held]
    rest_t = torch.tensor(rest, dtype=torch.long)
    dtype = full_weight.dtype
    router._parameters["weight"] = nn.Parameter(full_weight[held_t].clone(), requires_grad=False)
    if full_bias is not None:
        router._parameters["bias"] = nn.Parameter(full_bias[held_t].clone(), requires_grad=False)
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[held_t] = True
    to_local = torch.full((num_experts,), len(held), dtype=torch.long)
    to_local[held_t] = torch.arange(len(held))
    router.register_buffer("held_mask", mask, persistent=False)
    router.register_buffer("held_index", held_t, persistent=False)
    router.register_buffer("to_local", to_local, persistent=False)
    router.scoring = adapter.scoring
    router.norm_topk = adapter.norm_topk(model)
    router.k_route = top_k
    router.n_held = len(held)
    router.physical = True
    needs_rest = adapter.scoring == "softmax" and not router.norm_topk and rest
    for buf in ("rest_weight", "rest_bias", "rest_index"):
        router._buffers.pop(buf, None)
    if needs_rest:
        router.register_buffer("rest_weight", full_weight[rest_t].clone().to(dtype), persistent=False)
        router.register_buffer("rest_index", rest_t, persistent=False)
        if full_bias is not None:
            router.register_buffer("rest_bias", full_bias[rest_t].clone(), persistent=False)
    router.num_experts = len(held)
    router.__class__ = held_router_class(base_cls)


def split_model(model: nn.Module, adapter: FamilyAdapter, assignment: Assignment) -> nn.Module:
    """Drop every unheld expert in place (before any PEFT wrapping); returns the model."""
    num_layers, num_experts, _ = adapter.dims(model)
    assignment.validate(num_layers, num_experts)
    for layer in range(num_layers):
        if adapter.held_index(model, layer) is not None:
            raise GroundError("the model is already a physical sub-model")
        held = sorted(assignment.held(layer))
        held_t = torch.tensor(held, dtype=torch.long)
        experts: Any = adapter.experts_module(model, layer)
        for name, param in list(experts._parameters.items()):
            if param is None:
                continue
            experts._parameters[name] = nn.Parameter(param.detach()[held_t].clone(), requires_grad=False)
        _set_experts_count(experts, len(held))
        router: Any = adapter.router(model, layer)
        adapter.mask_router(model, layer, None)
        weight = router.weight.detach()
        bias = router._parameters.get("bias")
        _install_router(adapter, model, layer, held, weight, None if bias is None else bias.detach())
    return model


def is_physical(model: nn.Module, adapter: FamilyAdapter) -> bool:
    return adapter.held_index(model, 0) is not None


def coverage_held(model: nn.Module, adapter: FamilyAdapter) -> dict[int, list[int]]:
    """Global ids held per layer by a model (all experts for an unsplit model)."""
    num_layers, num_experts, _ = adapter.dims(model)
    out = {}
    for layer in range(num_layers):
        held = adapter.held_index(model, layer)
        out[layer] = list(range(num_experts)) if held is None else held
    return out


def _shrunk_config(adapter: HFMoEAdapter, config: Any, keep: int) -> Any:
    small = copy.deepcopy(config)
    setattr(small, adapter.experts_key, max(keep, 1))
    small.num_experts_per_tok = min(int(config.num_experts_per_tok), max(keep, 1))
    return small


def load_split(
    adapter: FamilyAdapter,
    config: Any,
    tensors_file: Path,
    assignment: Assignment | None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The sub-model of `assignment` (None: the whole model) built from a manifest-named safetensors file.

    Only the shared tensors and the held experts' slices are read, each straight into the tensor that keeps it
    (`TensorFile`: no memory map, so nothing else of the file becomes resident). The model is first constructed
    with as few experts per layer as are kept, so its random initialisation never allocates the unheld experts.
    """
    if not isinstance(adapter, HFMoEAdapter):
        raise GroundError(f"family {adapter.name}: physical split is not supported")
    num_layers = int(config.num_hidden_layers)
    num_experts = int(getattr(config, adapter.experts_key))
    if assignment is not None:
        assignment.validate(num_layers, num_experts)
    held = {
        la: (list(range(num_experts)) if assignment is None else sorted(assignment.held(la)))
        for la in range(num_layers)
    }
    keep = max(len(h) for h in held.values())
    torch.manual_seed(0)
    model: Any = adapter.model_cls()(_shrunk_config(adapter, config, keep))
    model.config = config
    model.model.config = config
    with TensorFile(tensors_file) as f:
        for layer in range(num_layers):
            _load_layer_experts(adapter, model, f, layer, held[layer], dtype)
            weight, bias = _read_router(adapter, model, f, layer, dtype)
            router: Any = adapter.router(model, layer)
            if assignment is None:
                router._parameters["weight"] = nn.Parameter(weight, requires_grad=False)
                if bias is not None:
                    router._parameters["bias"] = nn.Parameter(bias, requires_grad=False)
                router.num_experts = num_experts
            else:
                _install_router(adapter, model, layer, held[layer], weight, bias)
        _load_shared(adapter, model, f, num_layers)
    model.eval()
    result: nn.Module = model
    return result


def _load_layer_experts(
    adapter: HFMoEAdapter, model: nn.Module, f: TensorFile, layer: int, held: list[int], dtype: torch.dtype
) -> None:
    """Replace a layer's fused expert tensors by the held experts' slices (local order = `held`)."""
    experts: Any = adapter.experts_module(model, layer)
    for part in adapter.expert_parts:
        shape = tuple(experts._parameters[part].shape[1:])
        value = torch.empty((len(held), *shape), dtype=dtype)
        for i, e in enumerate(held):
            name = expert_name(layer, e, part)
            if name not in f:
                raise GroundError(f"{f.path}: no tensor {name}")
            if f.shape(name) != shape:
                raise GroundError(
                    f"{f.path}: expert part {part} has shape {list(f.shape(name))}, "
                    f"the configuration expects {list(shape)}"
                )
            f.read(name, out=value[i])
        experts._parameters[part] = nn.Parameter(value, requires_grad=False)
    _set_experts_count(experts, len(held))


def _read_router(
    adapter: HFMoEAdapter, model: nn.Module, f: TensorFile, layer: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full router weight (and bias) of a layer."""
    prefix = _router_prefix(adapter, model, layer)
    weight = f.read(shared_name(f"{prefix}.weight")).to(dtype)
    bias_name = shared_name(f"{prefix}.bias")
    return weight, (f.read(bias_name).to(dtype) if bias_name in f else None)


def _load_shared(adapter: HFMoEAdapter, model: nn.Module, f: TensorFile, num_layers: int) -> None:
    """Every other (shared) parameter, read in place."""
    skip = {f"{_router_prefix(adapter, model, la)}.{p}" for la in range(num_layers) for p in ("weight", "bias")}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if adapter.split_hf_name(name) is not None or name in skip:
                continue
            key = shared_name(name)
            if key not in f:
                raise GroundError(f"{f.path}: no tensor {key}")
            if f.shape(key) != tuple(param.shape):
                raise GroundError(
                    f"{f.path}: {key} has shape {list(f.shape(key))}, the model expects {list(param.shape)}"
                )
            f.read(key, out=param.detach())


def _router_prefix(adapter: HFMoEAdapter, model: nn.Module, layer: int) -> str:
    return f"model.layers.{layer}.mlp.{adapter.router_attr}"


def load_base_split(base_dir: Path, assignment: Assignment | None) -> tuple[nn.Module, FamilyAdapter]:
    """A base directory's sub-model for `assignment` (None: whole model) read from its `base.safetensors`."""
    from transformers import AutoConfig

    from ground_node.model.base import BASE_TENSORS, read_manifest
    from ground_node.model.families import get_adapter

    manifest = read_manifest(base_dir)
    adapter = get_adapter(str(manifest.get("family")))
    config = AutoConfig.from_pretrained(str(base_dir))
    return load_split(adapter, config, Path(base_dir) / BASE_TENSORS, assignment), adapter
