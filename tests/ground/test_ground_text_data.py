"""Text data: CSV / JSONL / HF-on-disk loaders, label-skew partitioning, generative label prediction."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from emsfl.config import ConfigError
from emsfl.datadir import data_root
from ground_node.errors import GroundError
from ground_node.learning.data import partition, read_split, tokenizer_for, train_examples
from ground_node.learning.data import test_examples as held_out
from ground_node.learning.tokenizer import ByteTokenizer
from ground_node.settings import load_settings

BANKING = data_root() / "banking77"  # $EMSFL_DATA_DIR, else ../shared/data next to the repository
LABELS = ["card_arrival", "top_up", "refund", "pin"]


def _csv(path: Path, rows: int = 80) -> Path:
    lines = ["text,category"] + [f"question {i} about {LABELS[i % 4]} ünï,{LABELS[i % 4]}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _topology(topology: dict[str, Any], **data: Any) -> dict[str, Any]:
    topo = copy.deepcopy(topology)
    topo["data"] = {"task": "csv", "label_field": "category", "train_per_cluster": 50, **data}
    return topo


def test_csv_and_jsonl_loaders(topology: dict[str, Any], tmp_path: Path) -> None:
    _csv(tmp_path / "train.csv")
    _csv(tmp_path / "test.csv", 20)
    s = load_settings(_topology(topology, path=str(tmp_path)))
    rows = read_split(s.data, "train")
    assert len(rows) == 80 and rows[1].prompt == "question 1 about top_up ünï=" and rows[1].answer == "top_up"
    tok = tokenizer_for(s.data)
    assert isinstance(tok, ByteTokenizer) and tok.decode([*tok.encode("ünï"), 2, 9]) == "ünï"
    lines = [{"text": "hello there", "label": "greet"}, {"instruction": "Classify", "input": "bye", "output": "leave"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    js = load_settings(_topology(topology, task="jsonl", path=str(tmp_path / "d.jsonl"), label_field="label"))
    got = read_split(js.data, "train")
    assert [(e.prompt, e.answer) for e in got] == [("hello there=", "greet"), ("Classify\nbye=", "leave")]


def test_partition_dirichlet_and_explicit(topology: dict[str, Any], tmp_path: Path) -> None:
    _csv(tmp_path / "train.csv", 400)
    _csv(tmp_path / "test.csv", 40)
    skew = load_settings(_topology(topology, path=str(tmp_path), alpha=0.1, train_per_cluster=1000))
    rows = read_split(skew.data, "train")
    parts = partition([r.answer for r in rows], skew.clusters, skew.data, skew.seed)
    assert sorted(i for p in parts.values() for i in p) == list(range(400))  # disjoint and complete
    assert parts == partition([r.answer for r in rows], skew.clusters, skew.data, skew.seed)  # seeded
    iid = load_settings(_topology(topology, path=str(tmp_path)))
    iid_parts = partition([r.answer for r in rows], iid.clusters, iid.data, iid.seed)

    def top_share(p: dict[str, list[int]]) -> float:
        shares = []
        for idx in p.values():
            counts = [sum(rows[i].answer == lab for i in idx) for lab in LABELS]
            shares.append(max(counts) / max(1, sum(counts)))
        return sum(shares) / len(shares)

    assert top_share(parts) > top_share(iid_parts) + 0.2  # alpha=0.1 skews labels
    explicit = load_settings(
        _topology(
            topology, path=str(tmp_path), cluster_labels={"c0": ["pin"], "c1": ["refund", "top_up"], "c2": ["pin"]}
        )
    )
    assert {e.answer for e in train_examples(explicit, "c1")} == {"refund", "top_up"}
    assert {e.answer for e in held_out(explicit, "c0")} == {"pin"}
    bad = load_settings(_topology(topology, path=str(tmp_path), cluster_labels={"c0": ["nope"]}))
    with pytest.raises(GroundError, match="label 'nope'"):
        train_examples(bad, "c0")
    with pytest.raises(ConfigError, match=r"data\.alpha"):
        load_settings(_topology(topology, path=str(tmp_path), alpha=0))


def test_empty_malformed_and_missing_datasets(topology: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,category\n", encoding="utf-8")
    with pytest.raises(GroundError, match="empty"):
        train_examples(load_settings(_topology(topology, path=str(tmp_path))), "c0")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "train.csv").write_text("sentence,intent\na,b\n", encoding="utf-8")
    with pytest.raises(GroundError, match="no column 'text'"):
        train_examples(load_settings(_topology(topology, path=str(tmp_path / "x"))), "c0")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(GroundError, match=r"bad\.jsonl:2: not JSON"):
        train_examples(
            load_settings(_topology(topology, task="jsonl", label_field="label", path=str(tmp_path / "bad.jsonl"))),
            "c0",
        )
    with pytest.raises(GroundError, match="does not exist"):
        train_examples(load_settings(_topology(topology, path=str(tmp_path / "none"))), "c0")
    with pytest.raises(ConfigError, match=r"data\.path: required"):
        load_settings(_topology(topology, task="jsonl"))
    try:
        import datasets  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        with pytest.raises(GroundError, match="needs the `datasets` package"):
            train_examples(load_settings(_topology(topology, task="hf_disk", path=str(tmp_path))), "c0")


@pytest.mark.skipif(not (BANKING / "train.csv").exists(), reason=f"{BANKING} is absent (shared data set)")
def test_banking77_trains_and_evaluates_end_to_end(topology: dict[str, Any], tmp_path: Path) -> None:
    from ground_node.learning.evaluate import accuracy
    from ground_node.learning.train import Trainer
    from ground_node.model.base import ensure_base, load_base
    from ground_node.records import Assignment

    topo = copy.deepcopy(topology)
    topo["data"] = {"task": "banking77", "alpha": 0.5, "train_per_cluster": 300, "max_chars": 48, "test_examples": 24}
    topo["warmup"] = {"steps": 4, "lr": 0.003, "batch_size": 8}
    s = load_settings(topo)
    base_dir = ensure_base(topo, tmp_path / "cache")
    data = train_examples(s, "c0")
    assert len(data) == 300 and len({e.answer for e in data}) > 10
    base = load_base(base_dir)
    trainer = Trainer(
        base.model, base.adapter, s.training, Assignment(1, {0: (0, 1), 1: (2,)}), data, s.seed, tokenizer_for(s.data)
    )
    losses = [trainer.train_step() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    acc = accuracy(base_dir, trainer.expert_state(), topo, "c0")
    assert 0.0 <= acc <= 1.0


def test_constrained_decoding_answers_only_labels(topology: dict[str, Any], tmp_path: Path) -> None:
    """An untrained byte model spells non-labels when free; under the label trie every answer is a label."""
    from ground_node.learning.data import label_choices
    from ground_node.learning.evaluate import greedy_answers, label_trie
    from ground_node.model.base import new_model

    _csv(tmp_path / "train.csv")
    _csv(tmp_path / "test.csv", 20)
    s = load_settings(_topology(topology, path=str(tmp_path)))
    choices = label_choices(s)
    assert choices == sorted(LABELS)
    assert label_choices(load_settings(_topology(topology, path=str(tmp_path), decoding="free"))) is None
    with pytest.raises(ConfigError, match=r"data\.decoding"):
        load_settings(_topology(topology, path=str(tmp_path), decoding="beam"))
    tok = tokenizer_for(s.data)
    trie = label_trie(tok, ["pin", "pig"])
    assert list(trie) == tok.encode("p") and sorted(trie[tok.encode("p")[0]][tok.encode("i")[0]]) == sorted(
        tok.encode("ng")
    )
    torch.manual_seed(0)
    model, _ = new_model(s)
    tests = held_out(s, None)
    constrained = greedy_answers(model, tok, tests, 16, choices)
    assert set(constrained) <= set(LABELS)
    free = greedy_answers(model, tok, tests, 16)
    assert not set(free) <= set(LABELS)  # an untrained model does not spell labels by itself


def _sharp_model(topology: dict[str, Any], tmp_path: Path) -> tuple[Any, Any, torch.nn.Module]:
    """Settings, tokenizer and an untrained model whose random logits are sharpened (weights x 4), so that its
    constrained answers depend on the prompt."""
    from ground_node.model.base import new_model

    _csv(tmp_path / "train.csv")
    _csv(tmp_path / "test.csv", 20)
    s = load_settings(_topology(topology, path=str(tmp_path)))
    torch.manual_seed(1)
    model, _ = new_model(s)
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0)
    return s, tokenizer_for(s.data), model


def test_cached_greedy_decoding_equals_recomputing_the_prefix(topology: dict[str, Any], tmp_path: Path) -> None:
    """Decoding with the KV cache must answer exactly what recomputing the whole prefix each step answers
    (constrained to the labels, so that an untrained model's answers differ from example to example)."""
    from ground_node.learning.evaluate import greedy_answers, label_trie
    from ground_node.learning.synthetic import encode_prompts
    from ground_node.learning.tokenizer import EOS

    s, tok, model = _sharp_model(topology, tmp_path)
    tests = held_out(s, None)
    expected = []
    with torch.no_grad():
        for ex in tests:
            ids, node, gen = encode_prompts(tok, [ex]), label_trie(tok, LABELS), list[int]()
            while gen[-1:] != [EOS]:
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                nxt = max(node, key=lambda t: float(logits[t]))
                gen.append(nxt)
                node = node[nxt]
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            expected.append(tok.decode(gen))
    assert len(set(expected)) > 1
    assert greedy_answers(model, tok, tests, 16, LABELS) == expected


def test_teacher_forced_hits_equal_constrained_greedy_decoding(topology: dict[str, Any], tmp_path: Path) -> None:
    """`greedy_hits` (one teacher-forced forward) must say exactly which examples greedy decoding answers right.
    Gold answers are set to what greedy decoding says for half the examples, so both outcomes occur."""
    import dataclasses

    from ground_node.learning.evaluate import ExactMatch, exact_match, greedy_answers, greedy_hits

    s, tok, model = _sharp_model(topology, tmp_path)
    choices = LABELS
    tests = held_out(s, None)
    greedy = greedy_answers(model, tok, tests, 16, choices)
    gold = [
        dataclasses.replace(ex, answer=g) if i % 2 and g != "\x00" else ex
        for i, (ex, g) in enumerate(zip(tests, greedy, strict=True))
    ]
    expected = [g == ex.answer for g, ex in zip(greedy_answers(model, tok, gold, 16, choices), gold, strict=True)]
    assert any(expected) and not all(expected)
    assert greedy_hits(model, tok, gold, choices) == expected
    assert exact_match(model, gold, 16, tok, choices) == sum(expected) / len(expected)
    shared = ExactMatch(model, tok, 16, choices)  # overlapping sets: each example scored once, same figures
    assert [shared(gold[:5]), shared(gold), shared(gold[3:])] == [
        exact_match(model, part, 16, tok, choices) for part in (gold[:5], gold, gold[3:])
    ]
