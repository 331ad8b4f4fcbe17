"""Exact-match accuracy of base + uploaded expert parts (docs/INTERFACES.md `accuracy`)."""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from ground_node.errors import GroundError
from ground_node.learning.data import label_choices, max_new_tokens, test_examples, tokenizer_for
from ground_node.learning.synthetic import Example, encode_prompts
from ground_node.learning.tokenizer import CharTokenizer, Tokenizer
from ground_node.model.base import BASE_TENSORS, Base, load_base
from ground_node.model.family import FamilyAdapter
from ground_node.model.split import apply_split, remove_split, set_router_softmax
from ground_node.records import Assignment
from ground_node.settings import Settings, load_settings, resolve_device
from protos.wire import parse_expert_name

Key = TypeVar("Key")


def apply_tensors(
    model: nn.Module,
    adapter: FamilyAdapter,
    manifest: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    base_tensors: Mapping[str, np.ndarray] | None = None,
) -> int:
    """Apply uploaded tensors to the base model in place; returns how many expert parts changed it.

    Full expert parts replace their slice; LoRA parts add (alpha / r) * B_e @ A_e to the expert's slice;
    shared tensors that differ from the base are loaded; tensors equal to the base are ignored.
    """
    scaling_alpha = float(manifest.get("lora_alpha", 16.0))
    lora: dict[tuple[int, int, str], dict[str, np.ndarray]] = defaultdict(dict)
    applied = 0
    shared: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if base_tensors is not None and name in base_tensors and np.array_equal(base_tensors[name], value):
            continue
        parsed = parse_expert_name(name)
        if parsed is None:
            if not name.startswith("shared/"):
                raise GroundError(f"{name}: not a manifest name")
            shared[name[len("shared/") :]] = torch.from_numpy(np.array(value, dtype=np.float32))
            continue
        key, part = parsed
        if part in adapter.expert_parts:
            adapter.insert_expert(model, key.layer, key.expert, {part: torch.from_numpy(np.array(value, np.float32))})
            applied += 1
            continue
        base_part, _, factor = part.partition(".")
        if base_part not in adapter.expert_parts or factor not in ("lora_A", "lora_B"):
            raise GroundError(f"{name}: unknown expert part {part!r}")
        lora[(key.layer, key.expert, base_part)][factor] = np.array(value, dtype=np.float32)  # writable for torch
    if shared:
        missing = set(shared) - set(dict(model.named_parameters()))
        if missing:
            raise GroundError(f"unknown shared tensors: {sorted(missing)[:3]}")
        model.load_state_dict(shared, strict=False)
    for (layer, expert, part), factors in sorted(lora.items()):
        if set(factors) != {"lora_A", "lora_B"}:
            raise GroundError(f"expert/{layer}/{expert}/{part}: LoRA needs both lora_A and lora_B")
        a = torch.from_numpy(factors["lora_A"])
        b = torch.from_numpy(factors["lora_B"])
        rank = a.shape[0]
        if b.shape[1] != rank:
            raise GroundError(f"expert/{layer}/{expert}/{part}: lora_A rank {rank} != lora_B rank {b.shape[1]}")
        adapter.check_expert(model, layer, expert)
        param = adapter.fused_param(model, layer, part)
        delta = adapter.lora_delta(a, b, scaling_alpha / rank)
        if tuple(delta.shape) != tuple(param.shape[1:]):
            raise GroundError(f"expert/{layer}/{expert}/{part}: LoRA shape does not match the expert slice")
        with torch.no_grad():
            param[adapter.local_index(model, layer, expert)] += delta.to(param.device, param.dtype)
        applied += 1
    return applied


Trie = dict[int, "Trie"]


def label_trie(tok: Tokenizer, choices: Sequence[str]) -> Trie:
    """Token trie of the label strings, each ending in EOS: the only continuations constrained decoding allows."""
    root: Trie = {}
    for label in choices:
        node = root
        for tid in [*tok.encode(label), tok.eos_id]:
            node = node.setdefault(tid, {})
    return root


def _allowed_mask(nodes: Sequence[Trie | None], vocab: int) -> torch.Tensor:
    """Rows whose label is complete (None) allow everything; their later tokens are never read."""
    mask = torch.zeros(len(nodes), vocab, dtype=torch.bool)
    for row, node in enumerate(nodes):
        if node is None:
            mask[row] = True
        else:
            mask[row, list(node)] = True
    return mask


def cache_keyword(model: nn.Module) -> str:
    """The KV cache's name in `forward` and its output: `cache` from transformers 5.24 (which deprecates
    `past_key_values`), `past_key_values` before (where an unknown `cache=` is silently ignored: wrong logits)."""
    unwrap: Any = getattr(model, "get_base_model", None)  # a PEFT model: the HF model inside
    inner: Any = unwrap() if unwrap is not None else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_answers(
    model: nn.Module, tok: Tokenizer, examples: Sequence[Example], max_new: int, choices: Sequence[str] | None = None
) -> list[str]:
    """Greedy decoding, batched over prompts of equal length (no padding, so no position or mask issues).

    With `choices`, every step is restricted to tokens that continue some label (a trie), so the answer is always
    one of them: the model still generates the label token by token, it just cannot spell a non-label.
    """
    trie = label_trie(tok, choices) if choices else None
    eos = tok.eos_id
    cache_kw = cache_keyword(model)
    device = next(model.parameters()).device  # prompts go where the model is (training.device)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[len(tok.encode_prompt(ex.prompt))].append(i)  # token count, as the tokenizer starts the prompt
    answers = [""] * len(examples)
    model.eval()
    for idxs in groups.values():
        for start in range(0, len(idxs), 256):
            chunk = idxs[start : start + 256]
            ids = encode_prompts(tok, [examples[i] for i in chunk]).to(device)
            nodes: list[Trie | None] = [trie] * len(chunk)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            out: list[torch.Tensor] = []
            past: Any = None  # the KV cache: each step feeds only the new token (no padding, so positions follow)
            for _ in range(max_new):
                step = model(input_ids=ids, use_cache=True, **{cache_kw: past})
                past, logits = step.get(cache_kw), step.logits[:, -1]
                if trie is not None:
                    allowed = _allowed_mask(nodes, logits.shape[-1]).to(device)
                    logits = logits.masked_fill(~allowed, float("-inf"))
                nxt = logits.argmax(dim=-1)
                out.append(nxt)
                if trie is not None:
                    nodes = [None if n is None or t == eos else n[t] for n, t in zip(nodes, nxt.tolist(), strict=True)]
                done |= nxt == eos
                if bool(done.all()):
                    break
                ids = nxt[:, None]
            gen = torch.stack(out, dim=1).tolist()
            for row, i in enumerate(chunk):
                answers[i] = tok.decode(gen[row]) if eos in gen[row] else "\x00"  # no EOS: never an exact match
    return answers


EVAL_BATCH = 32  # teacher-forced rows per forward: logits are rows x width x vocab floats (49,152 for SmolLM2)


@torch.no_grad()
def greedy_hits(
    model: nn.Module, tok: Tokenizer, examples: Sequence[Example], choices: Sequence[str] | None = None
) -> list[bool]:
    """Whether greedy decoding (constrained to `choices` if given) would answer each example exactly, in one
    teacher-forced forward per batch instead of a decoding loop.

    Greedy decoding emits the gold answer iff, at every answer position given the gold prefix, the (allowed) argmax
    is the gold token; so this is the same metric as `greedy_answers(...) == answer`, up to float rounding between
    a cached and an uncached forward. Ties go to the lowest token id, as `argmax` does. Without `choices` a
    non-canonical spelling of the answer (other tokens, same text) counts as a miss here but as a hit when decoded.
    """
    trie = label_trie(tok, choices) if choices else None
    device = next(model.parameters()).device
    rows = [(tok.encode_prompt(ex.prompt), [*tok.encode(ex.answer), tok.eos_id]) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    hits = [False] * len(rows)
    model.eval()
    for start in range(0, len(order), EVAL_BATCH):
        chunk = order[start : start + EVAL_BATCH]
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):  # right padding: causal attention never lets a real token see it
            seq = rows[i][0] + rows[i][1]
            ids[row, : len(seq)] = torch.tensor(seq)
        logits = model(input_ids=ids.to(device)).logits.float().cpu()
        for row, i in enumerate(chunk):
            prompt, answer = rows[i]
            steps = logits[row, len(prompt) - 1 : len(prompt) - 1 + len(answer)]
            hits[i] = _forced_hit(steps, answer, trie)
    return hits


def _forced_hit(steps: torch.Tensor, answer: Sequence[int], trie: Trie | None) -> bool:
    if trie is None:
        return bool((steps.argmax(dim=-1) == torch.tensor(answer)).all())
    node = trie
    for logits, gold in zip(steps, answer, strict=True):
        allowed = sorted(node)  # argmax over the allowed ids picks the lowest id on ties, as the masked argmax does
        if allowed[int(logits[allowed].argmax())] != gold:
            return False
        node = node[gold]
    return True


def exact_match(
    model: nn.Module,
    examples: Sequence[Example],
    max_new: int,
    tok: Tokenizer | None = None,
    choices: Sequence[str] | None = None,
) -> float:
    """Exact-match accuracy of greedy decoding: teacher-forced under `choices` (`greedy_hits`, the same metric in
    one forward), decoded token by token without them (where a non-canonical spelling may still match)."""
    return ExactMatch(model, tok if tok is not None else CharTokenizer(), max_new, choices)(examples)


class ExactMatch:
    """`exact_match` of one model over several test sets that overlap (the global sample and the clusters' mixes),
    scoring each distinct example once."""

    def __init__(self, model: nn.Module, tok: Tokenizer, max_new: int, choices: Sequence[str] | None) -> None:
        self.model, self.tok, self.max_new, self.choices = model, tok, max_new, choices
        self._hits: dict[tuple[str, str], bool] = {}

    def __call__(self, examples: Sequence[Example]) -> float:
        if not examples:
            raise GroundError("cannot evaluate an empty test set")
        todo = list(
            {(ex.prompt, ex.answer): ex for ex in examples if (ex.prompt, ex.answer) not in self._hits}.values()
        )
        if todo:
            if self.choices:
                hits = greedy_hits(self.model, self.tok, todo, self.choices)
                hits = [h and len(self.tok.encode(ex.answer)) < self.max_new for h, ex in zip(hits, todo, strict=True)]
            else:
                answers = greedy_answers(self.model, self.tok, todo, self.max_new)
                hits = [a == ex.answer for a, ex in zip(answers, todo, strict=True)]
            self._hits.update({(ex.prompt, ex.answer): h for ex, h in zip(todo, hits, strict=True)})
        return float(np.mean([self._hits[(ex.prompt, ex.answer)] for ex in examples]))


def per_domain(model: nn.Module, examples: Sequence[Example], max_new: int) -> dict[str, float]:
    tok = CharTokenizer()
    answers = greedy_answers(model, tok, examples, max_new)
    hits: dict[str, list[bool]] = defaultdict(list)
    for a, ex in zip(answers, examples, strict=True):
        hits[ex.domain].append(a == ex.answer)
    return {d: float(np.mean(v)) for d, v in sorted(hits.items())}


def model_with_tensors(base_dir: Path, tensors: Mapping[str, np.ndarray] | None) -> Base:
    base = load_base(base_dir)
    if tensors:
        with safe_open(str(Path(base_dir) / BASE_TENSORS), framework="numpy") as f:  # only the names `tensors` has
            base_tensors = {name: f.get_tensor(name) for name in set(f.keys()) & set(tensors)}
        apply_tensors(base.model, base.adapter, base.manifest, tensors, base_tensors)
    return base


def served_model(
    base_dir: Path, tensors: dict[str, np.ndarray] | None, settings: Settings, held: Assignment | None
) -> nn.Module:
    """The model a board holds: base + `tensors`, routed only to the `held` experts under `training.split: mask`
    (EMS-FL's sub-model, routed as it trained), or to every expert (`held` None: a pulled global model)."""
    base = model_with_tensors(Path(base_dir), tensors)
    if held is not None and settings.training.split == "mask":
        apply_split(base.model, base.adapter, held, "mask")
        set_router_softmax(base.model, base.adapter, settings.training.router_softmax)
    return base.model.to(resolve_device(settings.training.device))


def served_accuracy(
    base_dir: Path,
    tensors: dict[str, np.ndarray] | None,
    topology: dict[str, Any],
    cluster: str,
    held: Assignment | None,
) -> float:
    """What a board of `cluster` answers on its cluster's test mix with the model it holds (`served_model`)."""
    scorer = BaseScorer(base_dir, topology)
    return scorer.score(tensors, {cluster: scorer.test_set(cluster)}, held)[cluster]


def accuracy(
    base_dir: Path, tensors: dict[str, np.ndarray] | None, topology: dict[str, Any], cluster: str | None
) -> float:
    """Exact-match accuracy of base + `tensors` on the global test set (`cluster=None`) or a cluster's test mix."""
    scorer = BaseScorer(base_dir, topology)
    return scorer.score(tensors, {cluster: scorer.test_set(cluster)})[cluster]


class BaseScorer:
    """Exact match of base + several tensor sets, each on several test sets, with the base loaded once.

    Each set is applied in place, scored and undone: the expert slices and shared parameters it changes are copied
    first and written back after, bit for bit (a run's evaluation loaded the base once per figure before, 16 times,
    `benchmarks/bench_evaluation.py`). The set is applied on the CPU and the model moved whole to `training.device`,
    as a board's model is built.
    """

    def __init__(self, base_dir: Path, topology: dict[str, Any]) -> None:
        self.settings = load_settings(topology)
        self.base = load_base(Path(base_dir))
        self.tok = tokenizer_for(self.settings.data)
        self.max_new = max_new_tokens(self.settings)
        self.choices = label_choices(self.settings)

    def test_set(self, cluster: str | None) -> list[Example]:
        """The global test set (`cluster=None`) or a cluster's test mix."""
        return test_examples(self.settings, cluster)

    def score(
        self,
        tensors: Mapping[str, np.ndarray] | None,
        test_sets: Mapping[Key, Sequence[Example]],
        held: Assignment | None = None,
    ) -> dict[Key, float]:
        """{key: accuracy} of base + `tensors` (`applied`), each distinct example scored once."""
        with self.applied(tensors, held) as model:
            score = ExactMatch(model, self.tok, self.max_new, self.choices)
            return {key: score(examples) for key, examples in test_sets.items()}

    @contextmanager
    def applied(self, tensors: Mapping[str, np.ndarray] | None, held: Assignment | None = None) -> Iterator[nn.Module]:
        """The base + `tensors`, routed only to `held` under `training.split: mask` (a board's sub-model, as
        `served_model` builds it), on `training.device`; the base again, bit for bit, on leaving."""
        model, adapter = self.base.model, self.base.adapter
        changed = self._changed(tensors or {})
        saved = self._snapshot(changed)
        masked = held is not None and self.settings.training.split == "mask"
        try:
            apply_tensors(model, adapter, self.base.manifest, changed)
            if masked:
                assert held is not None
                apply_split(model, adapter, held, "mask")
                set_router_softmax(model, adapter, self.settings.training.router_softmax)
            yield model.to(resolve_device(self.settings.training.device))
        finally:
            model.to("cpu")
            if masked:
                remove_split(model, adapter)
            self._restore(saved)

    def _changed(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors that differ from the base (read from the base file only where the names meet)."""
        with safe_open(str(self.base.path / BASE_TENSORS), framework="numpy") as f:
            same = {name for name in set(f.keys()) & set(tensors) if np.array_equal(f.get_tensor(name), tensors[name])}
        return {name: value for name, value in tensors.items() if name not in same}

    def _snapshot(self, tensors: Mapping[str, np.ndarray]) -> list[tuple[str, int | None, torch.Tensor]]:
        """(parameter name, expert index or None for the whole parameter, copy) of what `apply_tensors` writes;
        names it will refuse are left to it."""
        model, adapter = self.base.model, self.base.adapter
        names = {id(p): n for n, p in model.named_parameters()}
        params = dict(model.named_parameters())
        saved: dict[tuple[str, int | None], torch.Tensor] = {}
        for name in tensors:
            parsed = parse_expert_name(name)
            if parsed is None:
                hf = name.removeprefix("shared/")
                if hf in params and (hf, None) not in saved:
                    saved[(hf, None)] = params[hf].detach().clone()
                continue
            key, part = parsed
            base_part = part.partition(".")[0]
            if base_part not in adapter.expert_parts:
                continue
            param = adapter.fused_param(model, key.layer, base_part)
            index = adapter.local_index(model, key.layer, key.expert)
            if (names[id(param)], index) not in saved:
                saved[(names[id(param)], index)] = param[index].detach().clone()
        return [(n, i, copy) for (n, i), copy in saved.items()]

    def _restore(self, saved: list[tuple[str, int | None, torch.Tensor]]) -> None:
        params = dict(self.base.model.named_parameters())
        with torch.no_grad():
            for name, index, copy in saved:
                (params[name] if index is None else params[name][index]).copy_(copy)
