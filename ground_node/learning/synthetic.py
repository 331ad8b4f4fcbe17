"""A built-in, seeded, synthetic multi-domain text task with exact-match answers.

Domains (prompt -> answer): copy `C:abcd=` -> `abcd`, reverse `R:abcd=` -> `dcba`, sort `S:dbca=` -> `abcd`,
add `A:12+34=` -> `46`. Cluster i is dominated by domain i mod D (`data.dominant_share`); the rest of its examples
are spread evenly over the other domains. Its test mix has the same domain shares.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emsfl.config import ConfigError
from ground_node.settings import DataSettings, Settings

PREFIX = {"copy": "C", "reverse": "R", "sort": "S", "add": "A"}
LETTERS = "abcdefghijklmnop"


@dataclass(frozen=True)
class Example:
    domain: str
    prompt: str  # ends with "="
    answer: str


def _rng(seed: int, *purpose: object) -> random.Random:
    text = "/".join(str(p) for p in (seed, *purpose))
    return random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big"))


def make_example(domain: str, rng: random.Random, data: DataSettings) -> Example:
    if domain == "add":
        hi = 10 ** min(data.max_len // 2, 3)
        a, b = rng.randrange(hi), rng.randrange(hi)
        return Example(domain, f"A:{a}+{b}=", str(a + b))
    n = rng.randint(data.min_len, data.max_len)
    s = "".join(rng.choice(LETTERS) for _ in range(n))
    if domain == "copy":
        answer = s
    elif domain == "reverse":
        answer = s[::-1]
    elif domain == "sort":
        answer = "".join(sorted(s))
    else:
        raise ConfigError(f"data.domains: unknown domain {domain!r}")
    return Example(domain, f"{PREFIX[domain]}:{s}=", answer)


def domain_shares(settings: Settings, cluster: str) -> dict[str, float]:
    """The domain mix of a cluster: its dominant domain gets `dominant_share`, the others split the rest."""
    domains = settings.data.domains
    idx = settings.cluster_index(cluster)
    dominant = domains[idx % len(domains)]
    if len(domains) == 1:
        return {dominant: 1.0}
    rest = (1.0 - settings.data.dominant_share) / (len(domains) - 1)
    return {d: settings.data.dominant_share if d == dominant else rest for d in domains}


def _counts(shares: dict[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding of `shares * total`, so the counts sum to `total`."""
    raw = {d: s * total for d, s in shares.items()}
    counts = {d: int(v) for d, v in raw.items()}
    left = total - sum(counts.values())
    for d in sorted(raw, key=lambda k: (-(raw[k] - counts[k]), k))[:left]:
        counts[d] += 1
    return counts


def _sample(settings: Settings, counts: dict[str, int], *purpose: object) -> list[Example]:
    rng = _rng(settings.seed, *purpose)
    out = [make_example(d, rng, settings.data) for d in settings.data.domains for _ in range(counts.get(d, 0))]
    rng.shuffle(out)
    return out


def cluster_train(settings: Settings, cluster: str) -> list[Example]:
    """The cluster's local training examples (non-IID, deterministic for the seed)."""
    counts = _counts(domain_shares(settings, cluster), settings.data.train_per_cluster)
    examples = _sample(settings, counts, "train", cluster)
    if not examples:
        raise ConfigError(f"data.train_per_cluster: cluster {cluster!r} has no training examples")
    return examples


def global_test(settings: Settings) -> list[Example]:
    """The balanced global test set: `data.test_per_domain` examples of every domain."""
    return _sample(settings, dict.fromkeys(settings.data.domains, settings.data.test_per_domain), "test")


def cluster_test(settings: Settings, cluster: str) -> list[Example]:
    """A cluster's test mix: as many examples as the global test set, in the cluster's domain shares."""
    total = settings.data.test_per_domain * len(settings.data.domains)
    return _sample(settings, _counts(domain_shares(settings, cluster), total), "test", cluster)


def warmup_examples(settings: Settings, count: int) -> list[Example]:
    """A balanced mixture for the central warm-up (disjoint stream from clusters' data)."""
    per = -(-count // len(settings.data.domains))
    return _sample(settings, dict.fromkeys(settings.data.domains, per), "warmup")


def encode_train(tok: Any, examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), right-padded; the loss covers only answer tokens and the closing EOS."""
    if not examples:
        raise ValueError("cannot encode an empty batch")
    rows, labels = [], []
    for ex in examples:
        prompt = tok.encode_prompt(ex.prompt)
        answer = [*tok.encode(ex.answer), tok.eos_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, la) in enumerate(zip(rows, labels, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(la)] = torch.tensor(la)
    return ids, lab


def encode_prompts(tok: Any, examples: Sequence[Example]) -> torch.Tensor:
    """Prompts of equal length (callers group by length), as the tokenizer starts them (BOS, or a chat turn)."""
    rows = [tok.encode_prompt(ex.prompt) for ex in examples]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("encode_prompts needs prompts of one length")
    return torch.tensor(rows, dtype=torch.long)


def max_answer_len(data: DataSettings) -> int:
    return max(data.max_len, min(data.max_len // 2, 3) + 1)


def max_seq_len(data: DataSettings) -> int:
    return 1 + 3 + 2 * data.max_len + 2 + max_answer_len(data) + 1
