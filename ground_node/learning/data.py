"""Local data of a cluster: the built-in synthetic task, or text classification as generative label prediction.

Text tasks (`data.task`): `csv` (header with `data.text_field` and `data.label_field` columns), `jsonl` (one
object per line: text/label fields, or instruction data `instruction` [+ `input`] -> `output`), `banking77`
(`<path>/train.csv` and `<path>/test.csv`, header `text,category`), `clinc150` (the same files, plus `domains.json`
for clusters by domain: `clusters[].domains`) and `hf_disk` (a `datasets.save_to_disk`
directory, read with `load_from_disk`; needs the `datasets` package). Each example becomes `prompt = text + "="`
(or, with `data.prompt: chat`, the text as the user turn of the tokenizer's chat template) and `answer = label`;
the model must generate the label string, scored by exact match.

Partitioning across clusters: by domain (`clusters[].domains`), explicit label sets (`data.cluster_labels`),
Dirichlet label skew (`data.alpha`: per label, shares over clusters drawn from Dir(alpha)), or IID (neither).
Seeded and deterministic.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ground_node.errors import GroundError
from ground_node.learning.synthetic import (
    Example,
    cluster_test,
    cluster_train,
    global_test,
    max_answer_len,
    max_seq_len,
    warmup_examples,
)
from ground_node.learning.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer, Tokenizer
from ground_node.settings import DataSettings, Settings


def is_text(data: DataSettings) -> bool:
    return data.task != "synthetic"


_TOKENIZERS: dict[tuple[str, bool, str], HFTokenizer] = {}


def tokenizer_for(data: DataSettings) -> Tokenizer:
    """The task's tokenizer: characters (synthetic), bytes (text), or the checkpoint's (`data.tokenizer`)."""
    if not is_text(data):
        return CharTokenizer()
    if data.tokenizer_path is None:
        return ByteTokenizer()
    from ground_node.learning.textwarm import resolve_path

    path = resolve_path(data.tokenizer_path, "data.tokenizer (model.checkpoint)")
    key = (str(path), data.prompt == "chat", data.instruction)
    if key not in _TOKENIZERS:
        if not (path / "tokenizer.json").exists():
            raise GroundError(f"data.tokenizer: {path} has no tokenizer.json (model.checkpoint must hold one)")
        try:
            _TOKENIZERS[key] = HFTokenizer(str(path), chat=key[1], instruction=data.instruction)
        except ValueError as exc:
            raise GroundError(f"data.tokenizer: {exc}") from exc
    return _TOKENIZERS[key]


def _example(text: str, label: str, data: DataSettings, where: str) -> Example:
    text, label = str(text).strip(), str(label).strip()
    if not text or not label:
        raise GroundError(f"{where}: empty text or label")
    raw = text.encode("utf-8")[: data.max_chars].decode("utf-8", errors="ignore")
    return Example(label, PROMPTS[data.prompt].format(raw), label)


PROMPTS = {"plain": "{}=", "query": "Query: {}\nIntent:", "chat": "{}"}  # chat: the text is the user turn


def read_csv(path: Path, data: DataSettings) -> list[Example]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            for need in (data.text_field, data.label_field):
                if need not in fields:
                    raise GroundError(f"{path}: no column {need!r} (columns: {fields})")
            rows = [
                _example(r[data.text_field] or "", r[data.label_field] or "", data, f"{path}:{i + 2}")
                for i, r in enumerate(reader)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GroundError(f"data.path: cannot read {path}: {exc}") from exc
    if not rows:
        raise GroundError(f"{path}: the dataset is empty")
    return rows


def read_jsonl(path: Path, data: DataSettings) -> list[Example]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise GroundError(f"data.path: cannot read {path}: {exc}") from exc
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise GroundError(f"{where}: not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise GroundError(f"{where}: expected a JSON object")
        if data.text_field in obj and data.label_field in obj:
            rows.append(_example(obj[data.text_field], obj[data.label_field], data, where))
        elif "instruction" in obj and "output" in obj:
            prompt = obj["instruction"] + (f"\n{obj['input']}" if obj.get("input") else "")
            rows.append(_example(prompt, obj["output"], data, where))
        else:
            raise GroundError(f"{where}: needs {data.text_field!r}/{data.label_field!r} or instruction/output")
    if not rows:
        raise GroundError(f"{path}: the dataset is empty")
    return rows


def read_hf_disk(path: Path, data: DataSettings, split: str) -> list[Example]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise GroundError("data.task=hf_disk needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if hasattr(ds, "keys"):
        if split not in ds:
            raise GroundError(f"{path}: no split {split!r} (splits: {list(ds.keys())})")
        ds = ds[split]
    features: Any = getattr(ds, "features", {})
    label_feature: Any = features.get(data.label_field)
    rows = []
    for i, rec in enumerate(ds):
        label = rec[data.label_field]
        if hasattr(label_feature, "int2str") and isinstance(label, int):
            label = label_feature.int2str(label)
        rows.append(_example(rec[data.text_field], label, data, f"{path}[{i}]"))
    if not rows:
        raise GroundError(f"{path}: the dataset is empty")
    return rows


def _file(data: DataSettings, split: str) -> Path:
    from ground_node.learning.textwarm import resolve_path

    path = resolve_path(data.path or "", "data.path")
    if data.task in ("banking77", "clinc150") or (path.is_dir() and data.task in ("csv", "jsonl")):
        path = path / f"{split}.{'jsonl' if data.task == 'jsonl' else 'csv'}"
    elif split == "test":
        if data.test_path is None:
            raise GroundError(f"data.test_path: required for data.task={data.task!r} when data.path is a file")
        path = Path(data.test_path)
    if not path.exists():
        raise GroundError(f"data.path: {path} does not exist")
    return path


_CACHE: dict[tuple[str, str, str], list[Example]] = {}


def read_split(data: DataSettings, split: str) -> list[Example]:
    """Every example of a split (`train` or `test`) of a text task."""
    key = (
        json.dumps([data.task, data.path, data.test_path, data.text_field, data.label_field]),
        split,
        f"{data.max_chars}/{data.prompt}",
    )
    if key not in _CACHE:
        if data.task == "hf_disk":
            _CACHE[key] = read_hf_disk(Path(data.path or ""), data, split)
        elif data.task == "jsonl":
            _CACHE[key] = read_jsonl(_file(data, split), data)
        else:
            _CACHE[key] = read_csv(_file(data, split), data)
    return _CACHE[key]


def domain_labels(data: DataSettings) -> dict[str, list[str]]:
    """`<data.path>/domains.json`: {domain: [label, ...]} (CLINC150 ships one)."""
    from ground_node.learning.textwarm import resolve_path

    path = resolve_path(data.path or "", "data.path") / "domains.json"
    try:
        domains = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GroundError(f"clusters[].domains: cannot read {path}: {exc}") from exc
    if not isinstance(domains, dict) or not all(isinstance(v, list) for v in domains.values()):
        raise GroundError(f"{path}: expected {{domain: [label, ...]}}")
    return {str(k): [str(x) for x in v] for k, v in domains.items()}


def labels_of_domains(data: DataSettings) -> dict[str, tuple[str, ...]]:
    """Each cluster's labels: every label of its domains (`clusters[].domains`)."""
    domains = domain_labels(data)
    out: dict[str, tuple[str, ...]] = {}
    for cluster, names in (data.cluster_domains or {}).items():
        unknown = [d for d in names if d not in domains]
        if unknown:
            raise GroundError(
                f"clusters[].domains: cluster {cluster!r} names unknown domains {unknown} (known: {sorted(domains)})"
            )
        out[cluster] = tuple(lab for d in names for lab in domains[d])
    return out


def partition(labels: list[str], clusters: tuple[str, ...], data: DataSettings, seed: int) -> dict[str, list[int]]:
    """Indices of examples per cluster: explicit label sets, Dirichlet label skew, or IID round robin."""
    rng = np.random.default_rng([seed, 77])
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    out: dict[str, list[int]] = {c: [] for c in clusters}
    cluster_labels = data.cluster_labels
    if data.cluster_domains is not None:
        cluster_labels = labels_of_domains(data)
    if cluster_labels is not None:
        for c in clusters:
            for lab in cluster_labels.get(c, ()):
                if lab not in by_label:
                    raise GroundError(f"data.cluster_labels: label {lab!r} of cluster {c!r} is not in the dataset")
                out[c].extend(by_label[lab])
        return out
    order = sorted(by_label)
    for lab in order:
        idx = np.array(by_label[lab])
        rng.shuffle(idx)
        if data.alpha is None:
            shares = np.full(len(clusters), 1.0 / len(clusters))
        else:
            shares = rng.dirichlet(np.full(len(clusters), data.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for c, part in zip(clusters, np.split(idx, cuts), strict=True):
            out[c].extend(int(i) for i in part)
    return out


def text_cluster_train(settings: Settings, cluster: str) -> list[Example]:
    settings.cluster_index(cluster)
    rows = read_split(settings.data, "train")
    parts = partition([r.answer for r in rows], settings.clusters, settings.data, settings.seed)
    idx = parts[cluster]
    rng = np.random.default_rng([settings.seed, 78, settings.cluster_index(cluster)])
    idx = [idx[i] for i in rng.permutation(len(idx))][: settings.data.train_per_cluster]
    if not idx:
        raise GroundError(f"data: cluster {cluster!r} gets no training examples (check data.alpha/cluster_labels)")
    return [rows[i] for i in idx]


def text_test(settings: Settings, cluster: str | None) -> list[Example]:
    rows = read_split(settings.data, "test")
    if cluster is not None:
        labels = {ex.answer for ex in text_cluster_train(settings, cluster)}
        rows = [r for r in rows if r.answer in labels]
    rng = np.random.default_rng([settings.seed, 79])
    order = rng.permutation(len(rows))[: settings.data.test_examples]
    return [rows[i] for i in sorted(order)]


# ---- dispatch (synthetic or text) ------------------------------------------------------------------


def train_examples(settings: Settings, cluster: str) -> list[Example]:
    return text_cluster_train(settings, cluster) if is_text(settings.data) else cluster_train(settings, cluster)


def test_examples(settings: Settings, cluster: str | None) -> list[Example]:
    if is_text(settings.data):
        return text_test(settings, cluster)
    return global_test(settings) if cluster is None else cluster_test(settings, cluster)


def warmup_pool(settings: Settings, count: int) -> list[Example]:
    """The central warm-up mixture: for text tasks, a seeded sample of every cluster's training data."""
    if not is_text(settings.data):
        return warmup_examples(settings, count)
    rows = read_split(settings.data, "train")
    rng = np.random.default_rng([settings.seed, 80])
    return [rows[i] for i in rng.permutation(len(rows))[:count]]


def label_choices(settings: Settings) -> list[str] | None:
    """The labels constrained decoding may answer (text tasks with `data.decoding: constrained`), else None."""
    if not is_text(settings.data) or settings.data.decoding != "constrained":
        return None
    return sorted({r.answer for r in read_split(settings.data, "train")})


def max_new_tokens(settings: Settings) -> int:
    if not is_text(settings.data):
        return max_answer_len(settings.data) + 1
    labels = {r.answer for r in read_split(settings.data, "train")}
    tok = tokenizer_for(settings.data)
    return max(len(tok.encode(lab)) for lab in labels) + 1


def max_positions(settings: Settings) -> int:
    if not is_text(settings.data):
        return max(32, max_seq_len(settings.data))
    return settings.data.max_chars + 2 + max_new_tokens(settings) + 2
