"""MoE family adapters: build or load a model, map HF names to manifest names (DESIGN §5.1) and back,
and cut per-expert slices out of fused expert tensors and PEFT LoRA factors.

The `FamilyAdapter` interface is family-agnostic; `OlmoeAdapter` is the first implementation. Mixtral or
Qwen-MoE adapters plug in through `register_family`.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.settings import ModelSettings
from protos.wire import expert_name, parse_expert_name, shared_name

LORA_FACTORS = ("lora_A", "lora_B")


def lora_a_slice(weight_a: torch.Tensor, expert: int, rank: int) -> torch.Tensor:
    """Rows of expert e in a PEFT `lora_A.weight` of shape [E*r, in]."""
    return weight_a[expert * rank : (expert + 1) * rank]


def lora_b_slice(weight_b: torch.Tensor, expert: int, num_experts: int) -> torch.Tensor:
    """Columns of expert e in a PEFT `lora_B.weight` of shape [out, r*E] (reshaped by PEFT as [out, r, E])."""
    return weight_b[:, expert::num_experts]


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight delta of one expert: scaling * B_e @ A_e, shape [out, in]."""
    return scaling * (b @ a)


class FamilyAdapter(ABC):
    """What the ground role needs to know about one MoE family."""

    name: str
    expert_parts: tuple[str, ...]

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

    # ---- generic helpers built on the above --------------------------------------------------

    def lora_part_names(self) -> list[str]:
        return [f"{p}.{f}" for p in self.expert_parts for f in LORA_FACTORS]

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
        for hf_name, tensor in hf_state.items():
            split = self.split_hf_name(hf_name)
            if split is None:
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
        """{part: weight slice} of one expert (copies, float32)."""
        self.check_expert(model, layer, expert)
        return {p: self.fused_param(model, layer, p)[expert].detach().float().clone() for p in self.expert_parts}

    def insert_expert(self, model: nn.Module, layer: int, expert: int, parts: dict[str, torch.Tensor]) -> None:
        self.check_expert(model, layer, expert)
        with torch.no_grad():
            for part, value in parts.items():
                if part not in self.expert_parts:
                    raise GroundError(f"unknown expert part {part!r}")
                param = self.fused_param(model, layer, part)
                if tuple(value.shape) != tuple(param.shape[1:]):
                    raise GroundError(
                        f"expert/{layer}/{expert}/{part}: shape {list(value.shape)} != {list(param.shape[1:])}"
                    )
                param[expert].copy_(value.to(param.dtype))

    def lora_layers(self, model: nn.Module, layer: int) -> dict[str, nn.Module]:
        """{part: PEFT ParamWrapper} of a layer's experts (matched by the wrapped parameter's name)."""
        found: dict[str, nn.Module] = {}
        module: Any = self.experts_module(model, layer)
        while module is not None:
            pname = getattr(module, "parameter_name", None)
            if pname in self.expert_parts and hasattr(module, "lora_A"):
                found[pname] = module
            module = getattr(module, "base_layer", None)
        return found

    def lora_factor(self, wrapper: nn.Module, factor: str, adapter: str = "default") -> nn.Parameter:
        holder: Any = getattr(wrapper, factor)
        weight = holder[adapter].weight
        assert isinstance(weight, nn.Parameter)
        return weight

    def extract_lora(self, model: nn.Module, layer: int, expert: int, rank: int) -> dict[str, torch.Tensor]:
        """{"<part>.lora_A": [r, in], "<part>.lora_B": [out, r]} of one expert (copies, float32)."""
        self.check_expert(model, layer, expert)
        _, num_experts, _ = self.dims(model)
        out: dict[str, torch.Tensor] = {}
        wrappers = self.lora_layers(model, layer)
        if set(wrappers) != set(self.expert_parts):
            raise GroundError(f"layer {layer}: LoRA adapters found for {sorted(wrappers)}, need {self.expert_parts}")
        for part, wrapper in wrappers.items():
            a = self.lora_factor(wrapper, "lora_A")
            b = self.lora_factor(wrapper, "lora_B")
            out[f"{part}.lora_A"] = lora_a_slice(a, expert, rank).detach().float().clone()
            out[f"{part}.lora_B"] = lora_b_slice(b, expert, num_experts).detach().float().clone()
        return out

    def insert_lora(self, model: nn.Module, layer: int, expert: int, rank: int, parts: dict[str, torch.Tensor]) -> None:
        self.check_expert(model, layer, expert)
        _, num_experts, _ = self.dims(model)
        wrappers = self.lora_layers(model, layer)
        with torch.no_grad():
            for name, value in parts.items():
                part, _, factor = name.partition(".")
                if part not in wrappers or factor not in LORA_FACTORS:
                    raise GroundError(f"unknown LoRA part {name!r}")
                weight = self.lora_factor(wrappers[part], factor)
                if factor == "lora_A":
                    target = lora_a_slice(weight, expert, rank)
                else:
                    target = lora_b_slice(weight, expert, num_experts)
                if target.shape != value.shape:
                    raise GroundError(
                        f"expert/{layer}/{expert}/{name}: shape {list(value.shape)} != {list(target.shape)}"
                    )
                target.copy_(value.to(weight.dtype))

    def lora_part_shapes(self, model: nn.Module, rank: int) -> dict[str, list[int]]:
        """Shape of each per-expert LoRA part: A is [r, in], B is [out, r] with [out, in] the expert slice."""
        shapes: dict[str, list[int]] = {}
        for part in self.expert_parts:
            out_dim, in_dim = self.fused_param(model, 0, part).shape[1:]
            shapes[f"{part}.lora_A"] = [rank, int(in_dim)]
            shapes[f"{part}.lora_B"] = [int(out_dim), rank]
        return shapes


# ---- OLMoE (transformers 5: fused 3-D experts, OlmoeTopKRouter) -----------------------------------

_OLMOE_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _masked_router_class() -> type[nn.Module]:
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    class MaskedOlmoeTopKRouter(OlmoeTopKRouter):  # type: ignore[misc]
        """OLMoE router whose unheld experts get logit -inf before top-k (split=mask): never selected."""

        held_mask: torch.Tensor

        def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
            logits = nn.functional.linear(hidden_states, self.weight)
            held = self.held_mask
            n_held = int(held.sum())
            if n_held == 0:  # nothing held here: route every token to the "no expert" index E (skipped)
                idx = torch.full((logits.shape[0], 1), self.num_experts, dtype=torch.long, device=logits.device)
                return logits, torch.zeros_like(idx, dtype=logits.dtype), idx
            masked = logits.masked_fill(~held, float("-inf"))
            _, top_index = torch.topk(masked, min(self.top_k, n_held), dim=-1)
            # Weights are the full model's router probabilities of the chosen (held) experts, so that a token
            # whose top-k experts are all held is computed exactly as in the full model, and a held expert is
            # trained under the same scale it gets in the merged global model.
            probs = nn.functional.softmax(logits, dtype=torch.float, dim=-1)
            top_value = probs.gather(-1, top_index)
            if self.norm_topk_prob:
                top_value = top_value / top_value.sum(dim=-1, keepdim=True)
            return masked, top_value.to(logits.dtype), top_index

    return MaskedOlmoeTopKRouter


class OlmoeAdapter(FamilyAdapter):
    name = "olmoe"
    expert_parts = ("gate_up_proj", "down_proj")

    def _config(self, model: ModelSettings, vocab_size: int, max_positions: int) -> Any:
        from transformers import OlmoeConfig

        return OlmoeConfig(
            vocab_size=vocab_size,
            hidden_size=model.hidden_size,
            intermediate_size=model.intermediate_size,
            num_hidden_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_attention_heads,
            num_experts=model.num_experts,
            num_experts_per_tok=model.top_k,
            max_position_embeddings=max_positions,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            output_router_logits=False,
        )

    def build(self, model: ModelSettings, vocab_size: int, max_positions: int, seed: int) -> nn.Module:
        from transformers import OlmoeForCausalLM

        torch.manual_seed(seed)
        net: nn.Module = OlmoeForCausalLM(self._config(model, vocab_size, max_positions))
        return net.eval()

    def load(self, path: Path, model: ModelSettings, vocab_size: int) -> nn.Module:
        from transformers import OlmoeForCausalLM

        config_file = Path(path) / "config.json"
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise GroundError(f"model.checkpoint: cannot read {config_file}: {exc}") from exc
        kind = config.get("model_type")
        if kind != self.name:
            raise GroundError(f"model.checkpoint: {path} holds a {kind!r} model, but model.family is {self.name!r}")
        expected = {
            "num_hidden_layers": ("num_layers", model.num_layers),
            "num_experts": ("num_experts", model.num_experts),
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
        net: nn.Module = OlmoeForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return net.eval()

    def _base(self, model: nn.Module) -> Any:
        inner: Any = model
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        return inner

    def dims(self, model: nn.Module) -> tuple[int, int, int]:
        config = self._base(model).config
        return int(config.num_hidden_layers), int(config.num_experts), int(config.num_experts_per_tok)

    def _layer(self, model: nn.Module, layer: int) -> Any:
        layers = self._base(model).model.layers
        if not 0 <= layer < len(layers):
            raise GroundError(f"layer {layer} does not exist (the model has {len(layers)} MoE layers)")
        return layers[layer]

    def router(self, model: nn.Module, layer: int) -> nn.Module:
        gate: nn.Module = self._layer(model, layer).mlp.gate
        return gate

    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        experts: nn.Module = self._layer(model, layer).mlp.experts
        return experts

    def mask_router(self, model: nn.Module, layer: int, held: list[int] | None) -> None:
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        router = self.router(model, layer)
        _, num_experts, _ = self.dims(model)
        if held is None:
            router.__class__ = OlmoeTopKRouter
            if "held_mask" in router._buffers:
                del router._buffers["held_mask"]
            return
        for e in held:
            self.check_expert(model, layer, e)
        weight: Any = router.weight
        mask = torch.zeros(num_experts, dtype=torch.bool, device=weight.device)
        mask[list(held)] = True
        router.register_buffer("held_mask", mask, persistent=False)
        router.__class__ = _MASKED_ROUTER()

    def split_hf_name(self, hf_name: str) -> tuple[int, str] | None:
        match = _OLMOE_EXPERT_RE.match(hf_name)
        if match is None:
            return None
        return int(match.group(1)), match.group(2)

    def hf_expert_name(self, layer: int, part: str) -> str:
        if part not in self.expert_parts:
            raise GroundError(f"unknown expert part {part!r} for family {self.name}")
        return f"model.layers.{layer}.mlp.experts.{part}"


_MASKED_CACHE: list[type[nn.Module]] = []


def _MASKED_ROUTER() -> type[nn.Module]:
    if not _MASKED_CACHE:
        _MASKED_CACHE.append(_masked_router_class())
    return _MASKED_CACHE[0]


_FAMILIES: dict[str, FamilyAdapter] = {"olmoe": OlmoeAdapter()}


def register_family(adapter: FamilyAdapter) -> None:
    _FAMILIES[adapter.name] = adapter


def get_adapter(family: str) -> FamilyAdapter:
    try:
        return _FAMILIES[family]
    except KeyError:
        raise GroundError(f"model.family: unknown family {family!r} (known: {sorted(_FAMILIES)})") from None
