"""The topology sections the ground role honours (`model`, `data`, `warmup`, `training`), validated.

Every error names the field (`emsfl.config.ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from dataclasses import field as dataclass_field
from typing import Any

from emsfl.config import ConfigError, cluster_ids, field, positive, section
from emsfl.datadir import default_data_path

KNOWN_DOMAINS = ("copy", "reverse", "sort", "add")
TEXT_TASKS = ("csv", "jsonl", "banking77", "clinc150", "hf_disk")
# the shared data sets a task reads by default: under $EMSFL_DATA_DIR, else ../shared/data (emsfl/datadir.py)
SHARED_DATA_TASKS = ("banking77", "clinc150")


@dataclass(frozen=True)
class ModelSettings:
    family: str
    checkpoint: str | None
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    # `model.convert`: build `model.checkpoint` on first use with `emsfl ground convert` (source, router_init,
    # text_path, kmeans_tokens, seed; experts and top-k are model.num_experts and model.top_k)
    convert: dict[str, Any] | None = None


CONVERT_KEYS = ("source", "router_init", "text_path", "kmeans_tokens", "seed")


@dataclass(frozen=True)
class DataSettings:
    task: str
    domains: tuple[str, ...]
    train_per_cluster: int
    test_per_domain: int
    dominant_share: float
    min_len: int
    max_len: int
    # text tasks (`csv`, `jsonl`, `banking77`, `hf_disk`): generative label prediction, prompt -> label string
    path: str | None = None
    test_path: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    alpha: float | None = None  # Dirichlet label skew across clusters (None: explicit label sets or IID)
    cluster_labels: dict[str, tuple[str, ...]] | None = None  # explicit label sets per cluster id
    max_chars: int = 96  # prompt text is truncated to this many bytes
    test_examples: int = 400  # size of the (seeded) global test sample
    decoding: str = "constrained"  # constrained: greedy over the label set's trie; free: unconstrained greedy
    # `data.tokenizer: checkpoint`: the HF tokenizer of `model.checkpoint` (its path here); None: byte-level
    tokenizer_path: str | None = None
    # plain: text + "=" after BOS; query: "Query: <text>\nIntent:" after BOS (short, for pretrained bases); chat: the
    # tokenizer's chat template (user turn; about 20 more tokens per example, so a slower step on a real base)
    prompt: str = "plain"
    instruction: str = ""  # chat: the system turn before the query
    # clusters by domain (`clusters[].domains`): each cluster gets every label of its domains (`domains.json`)
    cluster_domains: dict[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class WarmupSettings:
    steps: int
    lr: float
    batch_size: int
    text_path: str | None = None  # warm up as a language model on this text (file or directory of .txt)
    text_window: int = 96  # bytes per warm-up text window


@dataclass(frozen=True)
class TrainingSettings:
    tune: str
    split: str
    lora_rank: int
    lora_alpha: float
    lr: float
    batch_size: int
    stage_every_steps: int
    checkpoint_every_steps: int
    profile_examples: int
    grad_accum: int = 1  # micro-batches of `batch_size` per optimiser step
    dtype: str = "float32"  # compute dtype of training: float32 | bfloat16 | float16 (mixed precision, autocast)
    uploads_per_contact: int = 1  # committed uploads per contact; 0: upload every staged state while the link is up
    # chunks sent ahead of the satellite's answers (PushChunksWindowed): a hard cut resends at most this many; raise
    # it where rate x round-trip time approaches a chunk (1 MiB), e.g. 50 Mbit/s at 30 ms RTT (long-RTT field links)
    send_window_chunks: int = 1
    # recompute each decoder layer in backward instead of keeping its activations (and LoRA's W + dW): less
    # memory for small boards, about one more forward per step
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto (cuda where available, else cpu) | cpu | cuda
    # split=mask: `held` masks the unheld experts' logits before the softmax (ARCHITECTURE §4.3); `all` takes the held
    # experts' probabilities from the softmax over every expert (the full model's; the behaviour before)
    router_softmax: str = "held"


@dataclass(frozen=True)
class Settings:
    seed: int
    clusters: tuple[str, ...]
    capacities: dict[str, int]
    model: ModelSettings
    data: DataSettings
    warmup: WarmupSettings
    training: TrainingSettings
    # `clusters[i].max_training_steps`: a cluster stops training there (its final state still goes up); absent:
    # no limit. Experiments set it so that every strategy trains as many steps as FedAvg's run of the same seed.
    step_budgets: dict[str, int] = dataclass_field(default_factory=dict)

    def cluster_index(self, cluster: str) -> int:
        if cluster not in self.clusters:
            raise ConfigError(f"clusters: no cluster with id {cluster!r} (known: {list(self.clusters)})")
        return self.clusters.index(cluster)


def _pos_int(mapping: Mapping[str, Any], key: str, where: str, default: Any = ...) -> int:
    value = field(mapping, key, int, where, default)
    positive(value, f"{where}.{key}")
    return value


def _model(topology: Mapping[str, Any]) -> ModelSettings:
    m = section(topology, "model")
    w = "model"
    family = field(m, "family", str, w, "olmoe")
    settings = ModelSettings(
        family=family,
        checkpoint=field(m, "checkpoint", str, w, None),
        num_layers=_pos_int(m, "num_layers", w, 2),
        num_experts=_pos_int(m, "num_experts", w, 8),
        top_k=_pos_int(m, "top_k", w, 2),
        hidden_size=_pos_int(m, "hidden_size", w, 64),
        intermediate_size=_pos_int(m, "intermediate_size", w, 96),
        num_attention_heads=_pos_int(m, "num_attention_heads", w, 4),
        convert=_convert(m),
    )
    if settings.top_k > settings.num_experts:
        raise ConfigError(f"model.top_k: {settings.top_k} exceeds model.num_experts={settings.num_experts}")
    if settings.hidden_size % settings.num_attention_heads:
        raise ConfigError("model.num_attention_heads: must divide model.hidden_size")
    return settings


def _convert(m: Mapping[str, Any]) -> dict[str, Any] | None:
    convert = field(m, "convert", dict, "model", None)
    if convert is None:
        return None
    unknown = sorted(set(convert) - set(CONVERT_KEYS))
    if unknown:
        raise ConfigError(f"model.convert: unknown keys {unknown} (known: {list(CONVERT_KEYS)})")
    if not m.get("checkpoint"):
        raise ConfigError("model.convert: needs model.checkpoint (the directory the conversion is written to)")
    if m.get("family", "olmoe") != "mixtral":
        raise ConfigError("model.convert: upcycling writes a Mixtral model; set model.family: mixtral")
    return dict(convert)


def _data(topology: Mapping[str, Any]) -> DataSettings:
    d = section(topology, "data")
    w = "data"
    task = field(d, "task", str, w, "synthetic")
    if task in TEXT_TASKS:
        return _text_data(d, task, topology)
    if task != "synthetic":
        raise ConfigError(f"data.task: expected 'synthetic' or one of {list(TEXT_TASKS)}, got {task!r}")
    domains = field(d, "domains", list, w, list(KNOWN_DOMAINS))
    if not domains:
        raise ConfigError("data.domains: at least one domain is required")
    for dom in domains:
        if dom not in KNOWN_DOMAINS:
            raise ConfigError(f"data.domains: unknown domain {dom!r} (known: {list(KNOWN_DOMAINS)})")
    if len(set(domains)) != len(domains):
        raise ConfigError(f"data.domains: duplicates in {domains}")
    share = field(d, "dominant_share", float, w, 0.7)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"data.dominant_share: must be in [0, 1], got {share}")
    min_len = _pos_int(d, "min_len", w, 3)
    max_len = _pos_int(d, "max_len", w, 6)
    if max_len < min_len or max_len > 12:
        raise ConfigError(f"data.max_len: must be in [data.min_len, 12], got {max_len}")
    return DataSettings(
        task=task,
        domains=tuple(domains),
        train_per_cluster=_pos_int(d, "train_per_cluster", w, 4000),
        test_per_domain=_pos_int(d, "test_per_domain", w, 100),
        dominant_share=share,
        min_len=min_len,
        max_len=max_len,
    )


def _text_data(d: Mapping[str, Any], task: str, topology: Mapping[str, Any]) -> DataSettings:
    w = "data"
    default_path = default_data_path(task) if task in SHARED_DATA_TASKS else None
    path = field(d, "path", str, w, default_path)
    if not path:
        raise ConfigError(f"data.path: required for data.task={task!r}")
    alpha = field(d, "alpha", float, w, None)
    if alpha is not None and alpha <= 0:
        raise ConfigError(f"data.alpha: must be > 0, got {alpha}")
    labels = field(d, "cluster_labels", dict, w, None)
    cluster_labels = None
    if labels is not None:
        if not all(isinstance(v, list) and v for v in labels.values()):
            raise ConfigError("data.cluster_labels: expected {cluster id: [label, ...]} with non-empty lists")
        cluster_labels = {str(k): tuple(str(x) for x in v) for k, v in labels.items()}
    decoding = _one_of(d, "decoding", w, ("constrained", "free"))
    tokenizer_path = None
    if _one_of(d, "tokenizer", w, ("byte", "checkpoint")) == "checkpoint":
        tokenizer_path = (topology.get("model") or {}).get("checkpoint")
        if not tokenizer_path:
            raise ConfigError("data.tokenizer: 'checkpoint' needs model.checkpoint (a directory with tokenizer.json)")
    prompt = _one_of(d, "prompt", w, ("plain", "query", "chat"))
    if prompt == "chat" and tokenizer_path is None:
        raise ConfigError("data.prompt: 'chat' needs data.tokenizer: checkpoint (a tokenizer with a chat template)")
    cluster_domains = _cluster_domains(topology)
    if cluster_domains is not None and (labels is not None or alpha is not None):
        raise ConfigError("clusters[].domains: give clusters by domain, or data.cluster_labels, or data.alpha; not two")
    return DataSettings(
        task=task,
        domains=(),
        train_per_cluster=_pos_int(d, "train_per_cluster", w, 4000),
        test_per_domain=_pos_int(d, "test_per_domain", w, 100),
        dominant_share=0.0,
        min_len=1,
        max_len=1,
        path=path,
        test_path=field(d, "test_path", str, w, None),
        text_field=field(d, "text_field", str, w, "text"),
        label_field=field(d, "label_field", str, w, "category" if task in ("banking77", "clinc150") else "label"),
        alpha=alpha,
        cluster_labels=cluster_labels,
        max_chars=_pos_int(d, "max_chars", w, 96),
        test_examples=_pos_int(d, "test_examples", w, 400),
        decoding=decoding,
        tokenizer_path=tokenizer_path,
        prompt=prompt,
        instruction=field(d, "instruction", str, w, ""),
        cluster_domains=cluster_domains,
    )


def _cluster_domains(topology: Mapping[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """`clusters[i].domains` (lists of domain names) by cluster id; None when no cluster names domains."""
    out: dict[str, tuple[str, ...]] = {}
    for i, cluster in enumerate(topology.get("clusters") or []):
        domains = cluster.get("domains") if isinstance(cluster, Mapping) else None
        if domains is None:
            continue
        if not isinstance(domains, list) or not domains or not all(isinstance(x, str) for x in domains):
            raise ConfigError(f"clusters[{i}].domains: expected a non-empty list of domain names")
        out[str(cluster.get("id"))] = tuple(domains)
    if not out:
        return None
    seen: dict[str, str] = {}
    for cid, domains in out.items():
        for dom in domains:
            if dom in seen:
                raise ConfigError(f"clusters[].domains: domain {dom!r} is given to both {seen[dom]!r} and {cid!r}")
            seen[dom] = cid
    return out


def _warmup(topology: Mapping[str, Any]) -> WarmupSettings:
    s = topology.get("warmup") or {}
    w = "warmup"
    steps = field(s, "steps", int, w, 400)
    if steps < 0:
        raise ConfigError(f"warmup.steps: must be >= 0, got {steps}")
    return WarmupSettings(
        steps=steps,
        lr=positive(field(s, "lr", float, w, 0.003), "warmup.lr"),
        batch_size=_pos_int(s, "batch_size", w, 32),
        text_path=field(s, "text_path", str, w, None),
        text_window=_pos_int(s, "text_window", w, 96),
    )


def _training(topology: Mapping[str, Any]) -> TrainingSettings:
    s = topology.get("training") or {}
    w = "training"
    return TrainingSettings(
        tune=_one_of(s, "tune", w, ("lora", "full")),
        split=_one_of(s, "split", w, ("mask", "frozen")),
        lora_rank=_pos_int(s, "lora_rank", w, 8),
        lora_alpha=positive(field(s, "lora_alpha", float, w, 16.0), "training.lora_alpha"),
        lr=positive(field(s, "lr", float, w, 0.002), "training.lr"),
        batch_size=_pos_int(s, "batch_size", w, 32),
        stage_every_steps=_pos_int(s, "stage_every_steps", w, 25),
        checkpoint_every_steps=_pos_int(s, "checkpoint_every_steps", w, 50),
        profile_examples=_pos_int(s, "profile_examples", w, 256),
        grad_accum=_pos_int(s, "grad_accum", w, 1),
        dtype=_one_of(s, "dtype", w, TRAINING_DTYPES),
        uploads_per_contact=_non_negative_int(s, "uploads_per_contact", w, 1),
        send_window_chunks=_pos_int(s, "send_window_chunks", w, 1),
        gradient_checkpointing=field(s, "gradient_checkpointing", bool, w, False),
        device=_one_of(s, "device", w, TRAINING_DEVICES),
        router_softmax=_one_of(s, "router_softmax", w, ("held", "all")),
    )


def _non_negative_int(mapping: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = field(mapping, key, int, where, default)
    if value < 0:
        raise ConfigError(f"{where}.{key}: must be >= 0, got {value}")
    return value


TRAINING_DTYPES = ("float32", "bfloat16", "float16")
TRAINING_DEVICES = ("auto", "cpu", "cuda")


def _one_of(mapping: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    """A string setting that must be one of `choices`; absent, the first choice."""
    value = field(mapping, key, str, where, choices[0])
    if value not in choices:
        raise ConfigError(f"{where}.{key}: expected one of {list(choices)}, got {value!r}")
    return value


def resolve_device(name: str) -> str:
    """The torch device type for `training.device`: `auto` is cuda where torch sees a CUDA device, else cpu.

    `cuda` without a CUDA device is a configuration error (naming the key), not a silent fall back to the CPU."""
    import torch

    if name not in TRAINING_DEVICES:
        raise ConfigError(f"training.device: expected one of {list(TRAINING_DEVICES)}, got {name!r}")
    available = torch.cuda.is_available()
    if name == "cuda" and not available:
        raise ConfigError("training.device: 'cuda' is set but torch sees no CUDA device (a CPU-only torch build?)")
    if name == "auto":
        return "cuda" if available else "cpu"
    return name


def load_settings(topology: Mapping[str, Any]) -> Settings:
    """Validate the sections the ground role reads; raises ConfigError naming the field."""
    ids = cluster_ids(topology)
    capacities: dict[str, int] = {}
    step_budgets: dict[str, int] = {}
    for i, cluster in enumerate(topology["clusters"]):
        capacities[ids[i]] = _pos_int(cluster, "capacity_experts", f"clusters[{i}]", 1)
        if cluster.get("max_training_steps") is not None:
            step_budgets[ids[i]] = _non_negative_int(cluster, "max_training_steps", f"clusters[{i}]", 0)
    seed = field(topology, "seed", int, "topology", 0)
    data = _data(topology)
    if data.cluster_labels is not None:
        unknown = set(data.cluster_labels) - set(ids)
        if unknown:
            raise ConfigError(f"data.cluster_labels: unknown cluster ids {sorted(unknown)}")
    return Settings(
        seed=seed,
        clusters=tuple(ids),
        capacities=capacities,
        model=_model(topology),
        data=data,
        warmup=_warmup(topology),
        training=_training(topology),
        step_budgets=step_budgets,
    )


_TEXT_ONLY = ("path", "test_path", "text_field", "label_field", "alpha", "cluster_labels", "max_chars", "test_examples")
# later optional fields: left out at their defaults, so existing bases keep their keys
_DATA_DEFAULTS: dict[str, Any] = {"tokenizer_path": None, "prompt": "plain", "instruction": "", "cluster_domains": None}


def _data_key(data: DataSettings) -> dict[str, Any]:
    body = asdict(data)
    body.pop("decoding")  # evaluation only: no effect on the base
    if data.task == "synthetic":  # keys of text tasks do not change a synthetic base's key
        for key in _TEXT_ONLY:
            body.pop(key, None)
    return {k: v for k, v in body.items() if not (k in _DATA_DEFAULTS and v == _DATA_DEFAULTS[k])}


_WARMUP_DEFAULTS = {("text_path", None), ("text_window", 96)}


def cache_key(settings: Settings) -> str:
    """Hash of what determines the base model: model, data, warmup, training and the seed."""
    body = {
        "seed": settings.seed,
        "model": {k: v for k, v in asdict(settings.model).items() if not (k == "convert" and v is None)},
        "data": _data_key(settings.data),
        # fields at their defaults are left out, so adding an optional field keeps existing bases' keys
        "warmup": {k: v for k, v in asdict(settings.warmup).items() if (k, v) not in _WARMUP_DEFAULTS},
        # only what the base's manifest records: runs that differ in learning rate, batch or pacing share a base
        "training": {k: getattr(settings.training, k) for k in ("tune", "lora_rank", "lora_alpha")},
    }
    text = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
