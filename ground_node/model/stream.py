"""A model streamed layer by layer from its manifest-named safetensors file (profiling before the assignment).

The skeleton is built on the meta device (no weight is allocated); only the embeddings and the final norm are
materialised. `run_layers` then runs a set of micro-batches through the decoder one layer at a time: it
materialises the layer (shared weights, router and every expert), pushes every micro-batch's hidden states
through it and frees it again. Peak memory: embeddings + one layer + the hidden states of the batches, whatever
the depth of the model.

The inputs of each layer (attention masks, rotary position embeddings, ...) are those the model's own forward
computes: they are recorded by running the skeleton's forward with every decoder layer passing its input through,
so no family's forward is re-implemented here.
"""

from __future__ import annotations

import copy
import ctypes
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.model.family import FamilyAdapter, HFMoEAdapter
from ground_node.model.tensorfile import TensorFile
from protos.wire import expert_name, shared_name

LayerHook = Callable[[int, nn.Module], Any]


@dataclass
class LayerCall:
    """What the model's forward passes to one decoder layer for one micro-batch (besides the hidden states)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def meta_skeleton(adapter: FamilyAdapter, config: Any, tensors: TensorFile) -> nn.Module:
    """The model with every weight on the meta device except the decoder's embeddings, final norm and rotary
    embedding (recomputed on the CPU: its buffers are derived from the config, not stored)."""
    if not isinstance(adapter, HFMoEAdapter):
        raise GroundError(f"family {adapter.name}: streamed profiling is not supported")
    config = copy.deepcopy(config)
    with torch.device("meta"):
        model: Any = adapter.model_cls()(config)
    model.eval()
    inner = model.model
    for name, child in list(inner.named_children()):
        if name == "layers":
            continue
        persistent = set(child.state_dict())
        if any(n not in persistent for n, _ in child.named_buffers()):
            child = type(child)(config=config)  # derived buffers (rotary frequencies): rebuild on the CPU
            setattr(inner, name, child)
        materialise(child, f"model.{name}.", adapter, tensors)
    result: nn.Module = model
    return result


def materialise(module: nn.Module, prefix: str, adapter: FamilyAdapter, tensors: TensorFile) -> None:
    """Allocate `module`'s weights on the CPU and read them from the file (`prefix`: its HF name prefix)."""
    if any(t.is_meta for t in module.parameters()) or any(t.is_meta for t in module.buffers()):
        module.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in module.state_dict(keep_vars=True).items():
            read_hf(tensors, adapter, prefix + name, value.detach())


def read_hf(tensors: TensorFile, adapter: FamilyAdapter, hf_name: str, out: torch.Tensor) -> None:
    """Read one HF tensor into `out`: a shared tensor by its manifest name, a fused expert tensor expert by expert."""
    split = adapter.split_hf_name(hf_name)
    if split is None:
        tensors.read(shared_name(hf_name), out=out)
        return
    layer, part = split
    for e in range(out.shape[0]):
        tensors.read(expert_name(layer, e, part), out=out[e])


def release(module: nn.Module) -> None:
    """Free a materialised module's weights (back to the meta device)."""
    module.to_empty(device="meta")


def trim_heap() -> None:
    """Give the heap's free pages back to the OS. glibc keeps freed memory below its trim threshold, and a pass
    that allocates and frees one layer after another while keeping small results (logits, hidden states) fragments
    the heap: without this the resident set creeps up layer by layer. A no-op where there is no glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers: Any = model.model.layers  # type: ignore[union-attr]
    assert isinstance(layers, nn.ModuleList)
    return layers


@contextmanager
def _passing_through(layers: nn.ModuleList, calls: list[LayerCall]) -> Iterator[None]:
    """Every decoder layer records its call and returns its input unchanged (no weights are needed)."""

    def recorder(*args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        calls.append(LayerCall(args[1:], kwargs))
        return hidden

    for layer in layers:
        layer.forward = recorder  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[LayerCall]]:
    """(embeddings, the call of each decoder layer) of one micro-batch, from the model's own forward."""
    layers = decoder_layers(model)
    calls: list[LayerCall] = []
    inner: Any = model.model  # type: ignore[union-attr]
    embeds = inner.embed_tokens(input_ids)
    with _passing_through(layers, calls):
        inner(inputs_embeds=embeds, use_cache=False)
    if len(calls) != len(layers):
        raise GroundError(f"the model's forward called {len(calls)} of its {len(layers)} decoder layers")
    return embeds, calls


@torch.no_grad()
def run_layers(
    model: nn.Module,
    adapter: FamilyAdapter,
    tensors: TensorFile,
    batches: Sequence[torch.Tensor],
    on_layer: LayerHook | None = None,
) -> list[torch.Tensor]:
    """Run micro-batches of token ids through the decoder layer by layer; returns the last hidden states.

    `on_layer(index, layer)` is called once a layer is materialised, before the batches go through it (to hook
    its router, say); what it returns (a hook handle or None) is removed after the layer."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[LayerCall]] = []
    for ids in batches:
        embeds, per_layer = layer_inputs(model, ids)
        hidden.append(embeds)
        calls.append(per_layer)
    for index, layer in enumerate(layers):
        materialise(layer, f"model.layers.{index}.", adapter, tensors)
        handle = on_layer(index, layer) if on_layer is not None else None
        try:
            for b, call in enumerate(calls):
                out = layer(hidden[b], *call[index].args, **call[index].kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
            release(layer)
            trim_heap()
    return hidden
