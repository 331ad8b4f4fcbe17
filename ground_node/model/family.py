"""MoE family adapters: build or load a model, map HF names to manifest names (ARCHITECTURE §5.1) and back,
and cut per-expert slices out of fused expert tensors and PEFT LoRA factors.

The `FamilyAdapter` interface is family-agnostic; `HFMoEAdapter` implements it for transformers 5 MoE classes
with fused 3-D expert tensors: OLMoE, Mixtral, Qwen2-MoE (its shared expert is a shared weight), Qwen3-MoE and
GPT-OSS (transposed, gate/up interleaved, with biases); those five and the registry are in `families.py`, the
routing restricted to held experts in `routing.py`. More families plug in through `families.register_family`.

Expert ids are always global (as in the manifest). A physically split sub-model (`ground_node.model.submodel`) holds
only some experts per layer; its routers carry `held_index` (local -> global), and every slice accessor here maps
global ids to local positions through `local_index`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.model.routing import HeldRouterMixin, held_router_class
from ground_node.settings import ModelSettings
from protos.wire import expert_name, parse_expert_name, shared_name

LORA_FACTORS = ("lora_A", "lora_B")


def lora_a_slice(weight_a: torch.Tensor, expert: int, rank: int) -> torch.Tensor:
    """Rows of expert e in a PEFT `lora_A.weight` of shape [E*r, in]."""
    return weight_a[expert * rank : (expert + 1) * rank]


def lora_b_slice(weight_b: torch.Tensor, expert: int, num_experts: int) -> torch.Tensor:
    """Columns of expert e in a PEFT `lora_B.weight` of shape [out, r*E] (reshaped by PEFT as [out, r, E])."""
    return weight_b[:, expert::num_experts]


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU copy (one copy, also from a GPU): what goes on the wire or into the outbox."""
    return tensor.detach().to("cpu", torch.float32, copy=True)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight delta of one expert: scaling * B_e @ A_e, shape [out, in]."""
    return scaling * (b @ a)


class FamilyAdapter(ABC):
    """What the ground role needs to know about one MoE family."""

    name: str
    expert_parts: tuple[str, ...]
    lora_targets: tuple[str, ...] = ()  # expert parts that get LoRA factors (default: every expert part)
    transposed = False  # fused expert weights stored [E, in, out] (GPT-OSS) instead of [E, out, in]

    @abstractmethod
    def build(self, model: ModelSettings, vocab_size: int, max_positions: int, seed: int) -> nn.Module:
        """A randomly initialised model of the configured size."""

    @abstractmethod
    def load(self, path: Path, model: ModelSettings, vocab_size: int) -> nn.Module:
        """A checkpoint from a local directory, checked against the configured family and size."""

    @abstractmethod
    def dims(self, model: nn.Module) -> tuple[int, int, int]:
        """(num MoE layers, experts per layer, top_k)."""

    @abstractmethod
    def router(self, model: nn.Module, layer: int) -> nn.Module:
        """The router module of a layer (its forward output's first item is the router logits)."""

    @abstractmethod
    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The (possibly PEFT-wrapped) experts module of a layer."""

    @abstractmethod
    def mask_router(self, model: nn.Module, layer: int, held: list[int] | None) -> None:
        """Restrict routing of a layer to `held` experts (None: all experts routable again)."""

    @abstractmethod
    def split_hf_name(self, hf_name: str) -> tuple[int, str] | None:
        """(layer, part) of a fused expert parameter name, else None (a shared tensor)."""

    @abstractmethod
    def hf_expert_name(self, layer: int, part: str) -> str:
        """The HF parameter name of a fused expert tensor."""

    def softmax_choice_matters(self, model: nn.Module) -> bool:
        """Whether `training.router_softmax` (held | all) changes a restricted router's weights."""
        return True

    # ---- generic helpers built on the above --------------------------------------------------

    def lora_parts(self) -> tuple[str, ...]:
        return self.lora_targets or self.expert_parts

    def lora_part_names(self) -> list[str]:
        return [f"{p}.{f}" for p in self.lora_parts() for f in LORA_FACTORS]

    def held_index(self, model: nn.Module, layer: int) -> list[int] | None:
        """Global expert ids of a physically split layer (local order), None when the layer holds every expert."""
        router: Any = self.router(model, layer)
        index = getattr(router, "held_index", None)
        if index is None or not getattr(router, "physical", False):
            return None
        return [int(i) for i in index.tolist()]

    def local_index(self, model: nn.Module, layer: int, expert: int) -> int:
        """Position of global expert `expert` in the layer's fused tensors (GroundError if not held there)."""
        self.check_expert(model, layer, expert)
        held = self.held_index(model, layer)
        if held is None:
            return expert
        if expert not in held:
            raise GroundError(f"expert {expert} of layer {layer} is not in this sub-model (it holds {held})")
        return held.index(expert)

    def local_count(self, model: nn.Module, layer: int) -> int:
        held = self.held_index(model, layer)
        return self.dims(model)[1] if held is None else len(held)

    def fused_param(self, model: nn.Module, layer: int, part: str) -> nn.Parameter:
        """The fused [E, ...] expert parameter, found below any PEFT wrappers."""
        module: Any = self.experts_module(model, layer)
        while True:
            param = module._parameters.get(part)
            if isinstance(param, nn.Parameter):
                return param
            parametrizations = getattr(module, "parametrizations", None)
            if parametrizations is not None and part in parametrizations:
                original = parametrizations[part].original
                assert isinstance(original, nn.Parameter)
                return original
            if not hasattr(module, "base_layer"):
                raise GroundError(f"layer {layer}: no expert parameter {part!r}")
            module = module.base_layer

    def to_manifest(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF state dict -> manifest-named tensors (fused expert tensors split per expert), float32."""
        out: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        for hf_name, tensor in hf_state.items():
            split = self.split_hf_name(hf_name)
            if split is None:
                tied = (tensor.data_ptr(), tuple(tensor.shape))
                if tied in seen:  # a tied weight (lm_head = embed_tokens): stored once, under its first name
                    continue
                seen.add(tied)
                out[shared_name(hf_name)] = tensor.detach().float().contiguous()
                continue
            layer, part = split
            for e in range(tensor.shape[0]):
                out[expert_name(layer, e, part)] = tensor[e].detach().float().contiguous()
        return out

    def from_manifest(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Manifest-named tensors -> HF state dict (experts fused back in expert order)."""
        hf: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            parsed = parse_expert_name(name)
            if parsed is not None:
                key, part = parsed
                if part not in self.expert_parts:
                    raise GroundError(f"{name}: unknown expert part {part!r} for family {self.name}")
                experts.setdefault((key.layer, part), {})[key.expert] = tensor
            elif name.startswith("shared/"):
                hf[name[len("shared/") :]] = tensor
            else:
                raise GroundError(f"{name}: not a manifest name")
        for (layer, part), slices in experts.items():
            if sorted(slices) != list(range(len(slices))):
                raise GroundError(f"layer {layer} part {part}: experts {sorted(slices)} are not 0..E-1")
            hf[self.hf_expert_name(layer, part)] = torch.stack([slices[e] for e in range(len(slices))])
        return hf

    def check_expert(self, model: nn.Module, layer: int, expert: int) -> None:
        num_layers, num_experts, _ = self.dims(model)
        if not 0 <= layer < num_layers:
            raise GroundError(f"layer {layer} does not exist (the model has {num_layers} MoE layers)")
        if not 0 <= expert < num_experts:
            raise GroundError(f"expert {expert} of layer {layer} does not exist (the model has {num_experts} experts)")

    def extract_expert(self, model: nn.Module, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """{part: weight slice} of one expert (copies, float32, on the CPU whatever device the model is on)."""
        i = self.local_index(model, layer, expert)
        return {p: _cpu_copy(self.fused_param(model, layer, p)[i]) for p in self.expert_parts}

    def insert_expert(self, model: nn.Module, layer: int, expert: int, parts: dict[str, torch.Tensor]) -> None:
        i = self.local_index(model, layer, expert)
        with torch.no_grad():
            for part, value in parts.items():
                if part not in self.expert_parts:
                    raise GroundError(f"unknown expert part {part!r}")
                param = self.fused_param(model, layer, part)
                if tuple(value.shape) != tuple(param.shape[1:]):
                    raise GroundError(
                        f"expert/{layer}/{expert}/{part}: shape {list(value.shape)} != {list(param.shape[1:])}"
                    )
                param[i].copy_(value.to(param.dtype))

    def lora_layers(self, model: nn.Module, layer: int) -> dict[str, nn.Module]:
        """{part: PEFT ParamWrapper} of a layer's experts (matched by the wrapped parameter's name)."""
        found: dict[str, nn.Module] = {}
        module: Any = self.experts_module(model, layer)
        while module is not None:
            pname = getattr(module, "parameter_name", None)
            if pname in self.lora_parts() and hasattr(module, "lora_A"):
                found[pname] = module
            module = getattr(module, "base_layer", None)
        return found

    def lora_factor(self, wrapper: nn.Module, factor: str, adapter: str = "default") -> nn.Parameter:
        holder: Any = getattr(wrapper, factor)
        weight = holder[adapter].weight
        assert isinstance(weight, nn.Parameter)
        return weight

    def extract_lora(self, model: nn.Module, layer: int, expert: int, rank: int) -> dict[str, torch.Tensor]:
        """{"<part>.lora_A": [r, in], "<part>.lora_B": [out, r]} of one expert (copies, float32, on the CPU)."""
        i = self.local_index(model, layer, expert)
        num_local = self.local_count(model, layer)
        out: dict[str, torch.Tensor] = {}
        wrappers = self.lora_layers(model, layer)
        if set(wrappers) != set(self.lora_parts()):
            raise GroundError(f"layer {layer}: LoRA adapters found for {sorted(wrappers)}, need {self.lora_parts()}")
        for part, wrapper in wrappers.items():
            a = self.lora_factor(wrapper, "lora_A")
            b = self.lora_factor(wrapper, "lora_B")
            out[f"{part}.lora_A"] = _cpu_copy(lora_a_slice(a, i, rank))
            out[f"{part}.lora_B"] = _cpu_copy(lora_b_slice(b, i, num_local))
        return out

    def insert_lora(self, model: nn.Module, layer: int, expert: int, rank: int, parts: dict[str, torch.Tensor]) -> None:
        i = self.local_index(model, layer, expert)
        num_local = self.local_count(model, layer)
        wrappers = self.lora_layers(model, layer)
        with torch.no_grad():
            for name, value in parts.items():
                part, _, factor = name.partition(".")
                if part not in wrappers or factor not in LORA_FACTORS:
                    raise GroundError(f"unknown LoRA part {name!r}")
                weight = self.lora_factor(wrappers[part], factor)
                target = lora_a_slice(weight, i, rank) if factor == "lora_A" else lora_b_slice(weight, i, num_local)
                if target.shape != value.shape:
                    raise GroundError(
                        f"expert/{layer}/{expert}/{name}: shape {list(value.shape)} != {list(target.shape)}"
                    )
                target.copy_(value.to(weight.dtype))

    def lora_delta(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        """One expert's LoRA delta in the layout of its fused slice (transposed for [E, in, out] storage)."""
        delta = lora_delta(a, b, scaling)
        return delta.T if self.transposed else delta

    def lora_part_shapes(self, model: nn.Module, rank: int) -> dict[str, list[int]]:
        """Shape of each per-expert LoRA part: A is [r, in], B is [out, r] with [out, in] the expert slice."""
        shapes: dict[str, list[int]] = {}
        for part in self.lora_parts():
            out_dim, in_dim = self.fused_param(model, 0, part).shape[1:]
            if self.transposed:
                out_dim, in_dim = in_dim, out_dim
            shapes[f"{part}.lora_A"] = [rank, int(in_dim)]
            shapes[f"{part}.lora_B"] = [int(out_dim), rank]
        return shapes


# ---- transformers 5 MoE families ----------------------------------------------------------------


class HFMoEAdapter(FamilyAdapter):
    """A transformers 5 MoE causal LM: `model.layers[i].<mlp>.<router>` and `.<mlp>.experts` (fused 3-D)."""

    name = ""
    model_type = ""
    config_class = ""
    model_class = ""
    expert_parts: tuple[str, ...] = ("gate_up_proj", "down_proj")
    router_attr = "gate"
    scoring = "softmax"
    experts_key = "num_experts"  # the config key of experts per layer

    def __init__(self) -> None:
        parts = "|".join(re.escape(p) for p in self.expert_parts)
        self._expert_re = re.compile(rf"^model\.layers\.(\d+)\.mlp\.experts\.({parts})$")

    # -- construction ---------------------------------------------------------------------------

    def config_kwargs(self, model: ModelSettings) -> dict[str, Any]:
        """Family-specific config keys (beyond the common ones)."""
        return {}

    def make_config(self, model: ModelSettings, vocab_size: int, max_positions: int) -> Any:
        import transformers

        cls = getattr(transformers, self.config_class)
        kwargs: dict[str, Any] = {
            "vocab_size": vocab_size,
            "hidden_size": model.hidden_size,
            "intermediate_size": model.intermediate_size,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_attention_heads,
            self.experts_key: model.num_experts,
            "num_experts_per_tok": model.top_k,
            "max_position_embeddings": max_positions,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "output_router_logits": False,
        }
        kwargs.update(self.config_kwargs(model))
        return cls(**kwargs)

    def model_cls(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def build(self, model: ModelSettings, vocab_size: int, max_positions: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net: nn.Module = self.model_cls()(self.make_config(model, vocab_size, max_positions))
        return net.eval()

    def check_config(self, config: Mapping[str, Any], path: Path, model: ModelSettings, vocab_size: int) -> None:
        kind = config.get("model_type")
        if kind != self.model_type:
            raise GroundError(f"model.checkpoint: {path} holds a {kind!r} model, but model.family is {self.name!r}")
        expected = {
            "num_hidden_layers": ("num_layers", model.num_layers),
            self.experts_key: ("num_experts", model.num_experts),
            "num_experts_per_tok": ("top_k", model.top_k),
            "hidden_size": ("hidden_size", model.hidden_size),
            "intermediate_size": ("intermediate_size", model.intermediate_size),
        }
        for key, (field_name, want) in expected.items():
            if config.get(key) != want:
                raise GroundError(
                    f"model.{field_name}: the checkpoint at {path} has {key}={config.get(key)}, "
                    f"the topology says {want}"
                )
        if int(config.get("vocab_size", 0)) < vocab_size:
            raise GroundError(f"model.checkpoint: vocab_size {config.get('vocab_size')} < tokenizer's {vocab_size}")

    def load(self, path: Path, model: ModelSettings, vocab_size: int) -> nn.Module:
        config_file = Path(path) / "config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GroundError(f"model.checkpoint: cannot read {config_file}: {exc}") from exc
        self.check_config(config, Path(path), model, vocab_size)
        net: nn.Module = self.model_cls().from_pretrained(str(path), dtype=torch.float32)
        return net.eval()

    # -- structure ------------------------------------------------------------------------------

    def _base(self, model: nn.Module) -> Any:
        inner: Any = model
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        return inner

    def dims(self, model: nn.Module) -> tuple[int, int, int]:
        config = self._base(model).config
        return int(config.num_hidden_layers), int(getattr(config, self.experts_key)), int(config.num_experts_per_tok)

    def _layer(self, model: nn.Module, layer: int) -> Any:
        layers = self._base(model).model.layers
        if not 0 <= layer < len(layers):
            raise GroundError(f"layer {layer} does not exist (the model has {len(layers)} MoE layers)")
        return layers[layer]

    def router(self, model: nn.Module, layer: int) -> nn.Module:
        gate: nn.Module = getattr(self._layer(model, layer).mlp, self.router_attr)
        return gate

    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        experts: nn.Module = self._layer(model, layer).mlp.experts
        return experts

    def norm_topk(self, model: nn.Module) -> bool:
        return bool(getattr(self._base(model).config, "norm_topk_prob", False))

    def softmax_choice_matters(self, model: nn.Module) -> bool:
        # renormalised top-k weights, or a softmax over the top-k logits only: the denominator cancels
        return self.scoring == "softmax" and not self.norm_topk(model)

    def original_router_class(self, router: nn.Module) -> type:
        cls = type(router)
        if issubclass(cls, HeldRouterMixin):
            return next(b for b in cls.__mro__[1:] if not issubclass(b, HeldRouterMixin) and b is not HeldRouterMixin)
        return cls

    def mask_router(self, model: nn.Module, layer: int, held: list[int] | None) -> None:
        router: Any = self.router(model, layer)
        if getattr(router, "physical", False):
            raise GroundError(f"layer {layer}: a physically split sub-model cannot change its held experts")
        _num_layers, num_experts, top_k = self.dims(model)
        if held is None:
            router.__class__ = self.original_router_class(router)
            for buf in ("held_mask", "held_index", "to_local"):
                router._buffers.pop(buf, None)
            return
        for e in held:
            self.check_expert(model, layer, e)
        device = router.weight.device
        mask = torch.zeros(num_experts, dtype=torch.bool, device=device)
        mask[list(held)] = True
        router.register_buffer("held_mask", mask, persistent=False)
        router.register_buffer("held_index", torch.arange(num_experts, device=device), persistent=False)
        router.register_buffer("to_local", torch.arange(num_experts, device=device), persistent=False)
        router.physical = False
        router.scoring = self.scoring
        router.norm_topk = self.norm_topk(model)
        router.k_route = top_k
        router.n_held = len(set(held))
        router.__class__ = held_router_class(self.original_router_class(router))

    def split_hf_name(self, hf_name: str) -> tuple[int, str] | None:
        match = self._expert_re.match(hf_name)
        if match is None:
            return None
        return int(match.group(1)), match.group(2)

    def hf_expert_name(self, layer: int, part: str) -> str:
        if part not in self.expert_parts:
            raise GroundError(f"unknown expert part {part!r} for family {self.name}")
        return f"model.layers.{layer}.mlp.experts.{part}"
