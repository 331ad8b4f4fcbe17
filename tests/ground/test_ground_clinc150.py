"""CLINC150 by domain on an upcycled tiny Llama with its own BPE tokenizer and chat prompts; masked routing.

The tiny dense Llama (random weights, made here) is converted with `model.convert` on first use, exactly as the
CLINC150 topology converts the real SmolLM2 base."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from emsfl.config import ConfigError
from ground_node.errors import GroundError
from ground_node.model.routing import route_held
from ground_node.settings import load_settings
from tests.ground.tiny_hf import make_dense_llama, write_text

CLINC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "clinc150"
needs_clinc = pytest.mark.skipif(not (CLINC / "domains.json").exists(), reason=f"{CLINC} is absent")


def _topology(dense: Path, checkpoint: Path, text: Path) -> dict[str, Any]:
    return {
        "name": "tiny-clinc150",
        "seed": 0,
        "clusters": [
            {"id": "c0", "capacity_experts": 2, "domains": ["banking", "credit_cards"]},
            {"id": "c1", "capacity_experts": 2, "domains": ["travel"]},
        ],
        "model": {
            "family": "mixtral",
            "checkpoint": str(checkpoint),
            "convert": {"source": str(dense), "router_init": "kmeans", "text_path": str(text), "kmeans_tokens": 256},
            "num_layers": 2,
            "num_experts": 4,
            "top_k": 2,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_attention_heads": 4,
        },
        "data": {
            "task": "clinc150",
            "path": str(CLINC),
            "tokenizer": "checkpoint",
            "prompt": "chat",
            "instruction": "Name the intent of the query.",
            "train_per_cluster": 48,
            "test_examples": 24,
        },
        "warmup": {"steps": 0},
        "training": {"tune": "lora", "split": "mask", "lora_rank": 4, "lora_alpha": 8, "batch_size": 8,
                     "profile_examples": 32},
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("clinc")
    dense = make_dense_llama(root / "dense")
    return _topology(dense, root / "moe", write_text(root / "general.txt"))


@needs_clinc
def test_clusters_by_domain_get_exactly_their_domains_intents(tiny: dict[str, Any]) -> None:
    from ground_node.learning.data import test_examples, train_examples
    from ground_node.model.base import ensure_converted

    s = load_settings(tiny)
    ensure_converted(s)  # the tokenizer is the checkpoint's
    domains = json.loads((CLINC / "domains.json").read_text())
    for cluster, names in (("c0", ["banking", "credit_cards"]), ("c1", ["travel"])):
        want = {lab for d in names for lab in domains[d]}
        assert {ex.answer for ex in train_examples(s, cluster)} <= want
        assert {ex.answer for ex in test_examples(s, cluster)} <= want
        assert len(train_examples(s, cluster)) == 48
    ex = train_examples(s, "c0")[0]
    assert not ex.prompt.endswith("=")  # chat: the query itself is the user turn


@needs_clinc
def test_upcycled_base_trains_and_answers_only_intents(tiny: dict[str, Any], tmp_path: Path) -> None:
    from ground_node.learning.data import label_choices, max_new_tokens, test_examples, tokenizer_for, train_examples
    from ground_node.learning.evaluate import greedy_answers
    from ground_node.learning.train import Trainer
    from ground_node.model.base import ensure_base, load_base
    from ground_node.records import Assignment

    base_dir = ensure_base(copy.deepcopy(tiny), tmp_path / "cache")
    assert (base_dir / "tokenizer.json").exists()  # the base directory carries the checkpoint's tokenizer
    s = load_settings(tiny)
    tok = tokenizer_for(s.data)
    ids = tok.encode_prompt("what is my balance")
    assert ids[0] == 1 and ids[-1] != tok.eos_id  # <|im_start|> ... assistant header, the reply not yet begun
    base = load_base(base_dir)
    assert type(base.model).__name__ == "MixtralForCausalLM"
    assignment = Assignment.from_pairs(0, [(0, [0, 2]), (1, [1, 3])])
    trainer = Trainer(base.model, base.adapter, s.training, assignment, train_examples(s, "c0"), 0, tok=tok)
    losses = [trainer.train_step() for _ in range(3)]
    assert all(loss == loss and loss > 0 for loss in losses)  # finite (not NaN), positive
    examples = test_examples(s, "c0")
    choices = label_choices(s)
    assert choices is not None
    answers = greedy_answers(trainer.model, tok, examples, max_new_tokens(s), choices)
    assert set(answers) <= set(choices)  # constrained decoding spells only intents


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"clusters": [{"id": "c0", "domains": ["banking"]}, {"id": "c1", "domains": ["banking"]}]}, "given to both"),
        ({"clusters": [{"id": "c0", "domains": []}]}, r"clusters\[0\].domains"),
        ({"data": {"task": "clinc150", "prompt": "chat"}}, "data.prompt"),
        ({"data": {"task": "clinc150", "tokenizer": "checkpoint"}, "model": {}}, "data.tokenizer"),
        ({"model": {"family": "olmoe", "checkpoint": "x", "convert": {"source": "smollm2"}}}, "model.family: mixtral"),
        ({"model": {"family": "mixtral", "checkpoint": "x", "convert": {"experts": 8}}}, "model.convert"),
        ({"training": {"router_softmax": "some"}}, "training.router_softmax"),
    ],
)
def test_bad_settings_name_the_field(patch: dict[str, Any], match: str) -> None:
    topology: dict[str, Any] = {"clusters": [{"id": "c0"}], "model": {}, "data": {"task": "clinc150"}, **patch}
    with pytest.raises(ConfigError, match=match):
        load_settings(topology)


@needs_clinc
def test_unknown_domain_is_named(tiny: dict[str, Any]) -> None:
    from ground_node.learning.data import train_examples

    topology = copy.deepcopy(tiny)
    topology["clusters"][1]["domains"] = ["astrology"]
    topology["data"].update(tokenizer="byte", prompt="plain")
    with pytest.raises(GroundError, match="astrology"):
        train_examples(load_settings(topology), "c1")


def test_masked_softmax_renormalises_over_held_experts() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 6)
    held = torch.tensor([True, False, True, True, False, False])
    _, w_held, idx_held = route_held(logits, held, 2, "softmax", norm_topk=False, softmax_over="held")
    _, w_all, idx_all = route_held(logits, held, 2, "softmax", norm_topk=False, softmax_over="all")
    assert torch.equal(idx_held, idx_all) and bool(held[idx_held].all())
    full = torch.softmax(logits, dim=-1)
    assert torch.allclose(w_all, full.gather(-1, idx_all))  # today's: the full model's probabilities
    masked = torch.softmax(logits.masked_fill(~held, float("-inf")), dim=-1)
    assert torch.allclose(w_held, masked.gather(-1, idx_held))  # ARCHITECTURE §4.3: a softmax over the held experts
    assert bool((w_held > w_all).all())
    # where the top-k weights are renormalised (Mixtral), both give the same weights
    _, n_held, _ = route_held(logits, held, 2, "softmax", norm_topk=True, softmax_over="held")
    _, n_all, _ = route_held(logits, held, 2, "softmax", norm_topk=True, softmax_over="all")
    assert torch.allclose(n_held, n_all)


def test_trainer_applies_the_configured_router_softmax(topology: dict[str, Any], base_dir: Path) -> None:
    from ground_node.learning.data import train_examples
    from ground_node.learning.train import Trainer
    from ground_node.model.base import load_base
    from ground_node.model.routing import HeldRouterMixin
    from ground_node.records import Assignment

    for mode in ("held", "all"):
        topology["training"]["router_softmax"] = mode
        s = load_settings(topology)
        base = load_base(base_dir)
        assignment = Assignment.from_pairs(0, [(0, [0, 1]), (1, [2, 3])])
        trainer = Trainer(base.model, base.adapter, s.training, assignment, train_examples(s, "c0"), 0)
        routers = [base.adapter.router(trainer.model, la) for la in range(2)]
        assert all(isinstance(r, HeldRouterMixin) and r.softmax_over == mode for r in routers)


def test_committed_topology_gives_every_domain_to_one_cluster() -> None:
    from emsfl.config import load_topology

    root = Path(__file__).resolve().parents[2]
    s = load_settings(load_topology(str(root / "testbed" / "topologies" / "clinc150.yaml")))
    given = [d for names in (s.data.cluster_domains or {}).values() for d in names]
    assert len(given) == len(set(given)) == 10
    assert s.model.family == "mixtral" and s.model.convert == {"source": "smollm2", "router_init": "kmeans"}
    assert s.data.prompt == "query" and s.training.router_softmax == "held"
    gpu = load_settings(load_topology(str(root / "testbed" / "topologies" / "gpu-clinc150.yaml")))
    assert gpu.data.prompt == "chat"
    bank = load_settings(load_topology(str(root / "testbed" / "topologies" / "banking77-smollm2.yaml")))
    assert bank.model == s.model and bank.data.task == "banking77" and bank.data.alpha == 0.3  # same base, label skew


def test_query_prompt_wraps_the_text(tmp_path: Path) -> None:
    """`data.prompt: query` asks "Query: <text>\nIntent:" (a pretrained base's natural continuation point)."""
    from ground_node.learning.data import PROMPTS

    assert PROMPTS["query"].format("book a flight") == "Query: book a flight\nIntent:"
    assert PROMPTS["plain"].format("x") == "x=" and PROMPTS["chat"].format("x") == "x"


@needs_clinc
def test_merge_gap_on_the_upcycled_base_says_mixtral_routes_alike_under_both_softmaxes(
    tiny: dict[str, Any], tmp_path: Path
) -> None:
    from testbed.mergegap import merge_gap

    report = merge_gap(copy.deepcopy(tiny), tmp_path / "cache", steps=2)
    assert report["family"] == "mixtral" and report["router_softmax"] == "held"
    assert report["other_router_softmax"]["same_as_configured"] is True
    for row in report["clusters"].values():
        assert 0.0 <= row["all_top_k_held_share"] <= row["routing_coverage"] + 1e-9
        assert 0.0 <= row["merged_accuracy"] <= 1.0
