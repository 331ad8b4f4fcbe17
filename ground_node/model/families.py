"""The transformers 5 MoE families (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS) on `HFMoEAdapter`, and the
registry `model.family` names them by (ARCHITECTURE §5.1)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ground_node.errors import GroundError
from ground_node.model.family import FamilyAdapter, HFMoEAdapter
from ground_node.settings import ModelSettings


class OlmoeAdapter(HFMoEAdapter):
    name = model_type = "olmoe"
    config_class, model_class = "OlmoeConfig", "OlmoeForCausalLM"


class MixtralAdapter(HFMoEAdapter):
    name = model_type = "mixtral"
    config_class, model_class = "MixtralConfig", "MixtralForCausalLM"
    experts_key = "num_local_experts"

    def norm_topk(self, model: nn.Module) -> bool:
        return True  # Mixtral always renormalises the top-k probabilities

    def config_kwargs(self, model: ModelSettings) -> dict[str, Any]:
        return {"router_jitter_noise": 0.0, "sliding_window": None}


class Qwen2MoeAdapter(HFMoEAdapter):
    """Qwen2-MoE: `mlp.shared_expert.*` and `mlp.shared_expert_gate` are shared (non-expert) weights."""

    name = model_type = "qwen2_moe"
    config_class, model_class = "Qwen2MoeConfig", "Qwen2MoeForCausalLM"

    def config_kwargs(self, model: ModelSettings) -> dict[str, Any]:
        return {
            "moe_intermediate_size": model.intermediate_size,
            "shared_expert_intermediate_size": model.intermediate_size,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": False,
        }

    def check_config(self, config: Mapping[str, Any], path: Path, model: ModelSettings, vocab_size: int) -> None:
        config = {**config, "intermediate_size": config.get("moe_intermediate_size")}
        super().check_config(config, path, model, vocab_size)
        if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step", 1)) != 1:
            raise GroundError(f"model.checkpoint: {path} has dense layers; every layer must be MoE")


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    name = model_type = "qwen3_moe"
    config_class, model_class = "Qwen3MoeConfig", "Qwen3MoeForCausalLM"

    def config_kwargs(self, model: ModelSettings) -> dict[str, Any]:
        return {
            "moe_intermediate_size": model.intermediate_size,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "head_dim": model.hidden_size // model.num_attention_heads,
        }


class GptOssAdapter(HFMoEAdapter):
    """GPT-OSS: experts stored transposed ([E, in, out]), gate/up interleaved in the last dim, with biases.

    Slices are per expert over the leading dim, so the interleaving is kept inside each slice. LoRA goes on the
    two weight tensors; the biases are expert parts (trained with `tune=full`, frozen with LoRA).
    """

    name = model_type = "gpt_oss"
    config_class, model_class = "GptOssConfig", "GptOssForCausalLM"
    expert_parts = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    lora_targets = ("gate_up_proj", "down_proj")
    router_attr = "router"
    scoring = "topk_softmax"
    experts_key = "num_local_experts"
    transposed = True

    def config_kwargs(self, model: ModelSettings) -> dict[str, Any]:
        return {
            "head_dim": model.hidden_size // model.num_attention_heads,
            "sliding_window": 128,
            "rope_parameters": {"rope_type": "default", "rope_theta": 150000.0},
        }


_FAMILIES: dict[str, FamilyAdapter] = {
    a.name: a for a in (OlmoeAdapter(), MixtralAdapter(), Qwen2MoeAdapter(), Qwen3MoeAdapter(), GptOssAdapter())
}


def register_family(adapter: FamilyAdapter) -> None:
    _FAMILIES[adapter.name] = adapter


def get_adapter(family: str) -> FamilyAdapter:
    try:
        return _FAMILIES[family]
    except KeyError:
        raise GroundError(f"model.family: unknown family {family!r} (known: {sorted(_FAMILIES)})") from None


def family_names() -> list[str]:
    return sorted(_FAMILIES)
