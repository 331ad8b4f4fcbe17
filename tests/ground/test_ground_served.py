"""Served accuracy (issue #13): the model each board holds at the end of a run (testbed/served.py)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ground_node.federation.outbox import Outbox
from ground_node.learning.data import test_examples as held_out
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.evaluate import BaseScorer, served_model
from ground_node.learning.synthetic import encode_train
from ground_node.learning.train import Trainer
from ground_node.model.base import load_base
from ground_node.records import Assignment
from ground_node.settings import load_settings
from testbed import served

HELD = Assignment(1, {0: (0, 1), 1: (2,)})


def _trained(topology: dict[str, Any], base_dir: Path) -> tuple[Trainer, Any]:
    s = load_settings(topology)
    tok = tokenizer_for(s.data)
    trainer = Trainer(
        load_base(base_dir).model, load_base(base_dir).adapter, s.training, HELD, train_examples(s, "c0"), s.seed, tok
    )
    for _ in range(5):
        trainer.train_step()
    return trainer, s


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits


def test_emsfl_board_serves_its_experts_routed_as_trained(topology: dict[str, Any], base_dir: Path) -> None:
    """Base + the cluster's uploaded experts, masked to them, answers exactly as the trained sub-model does;
    the same experts routed to every expert (the merged global view) do not."""
    trainer, s = _trained(topology, base_dir)
    ids, _ = encode_train(tokenizer_for(s.data), held_out(s, "c0")[:8])
    as_trained = _logits(trainer.model, ids)
    state = trainer.expert_state()
    board = _logits(served_model(base_dir, state, s, HELD), ids)
    assert torch.allclose(board, as_trained, atol=1e-4), float((board - as_trained).abs().max())
    unmasked = _logits(served_model(base_dir, state, s, None), ids)
    assert float((unmasked - as_trained).abs().max()) > 1e-3


def test_served_model_picks_the_newest_staged_update_or_the_loaded_global(tmp_path: Path, base_dir: Path) -> None:
    workdir, state_dir = tmp_path / "c0", tmp_path / "satellite"
    assert served.served_model("emsfl", workdir, state_dir)[2] == {
        "model": "base",
        "reason": "no update staged",
    }
    outbox = Outbox(workdir / "outbox")
    old = {"expert/0/1/gate_up_proj.lora_A": np.zeros((2, 3), np.float32)}
    new = {f"expert/{la}/{e}/down_proj.lora_B": np.full((3, 2), la + e, np.float32) for la, e in ((0, 1), (1, 3))}
    outbox.stage(old, 1, 5)
    outbox.stage(new, 1, 10)
    tensors, held, what = served.served_model("emsfl", workdir, state_dir)
    assert tensors is not None and set(tensors) == set(new) and what["model"].startswith("own experts")
    assert held is not None and held.pairs() == [(0, 1), (1, 3)]
    # a baseline board that never loaded a global model serves the base
    assert served.served_model("fedavg", workdir, state_dir)[:2] == (None, None)
    events = [{"event": "model_loaded", "version": v} for v in (2, 5, 3)]
    (workdir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    assert served.loaded_global_version(workdir) == 5


def test_centralised_reference_scores_the_merged_model(topology: dict[str, Any], base_dir: Path) -> None:
    """The reference trains every expert on the pooled data, then scores the adapters merged into the weights."""
    from ground_node.learning.central import centralised

    report = centralised(topology, base_dir, steps=3)
    assert report["steps"] == 3 and report["examples"] == 3 * 200 and report["test_examples"] > 0
    assert 0.0 <= report["accuracy_final"] <= 1.0 and set(report["per_cluster_accuracy"]) == {"c0", "c1", "c2"}
    assert report["loss_last"] is not None and report["step_time_s"] > 0
    assert 0 < report["train_peak_rss_mb"] <= report["peak_rss_mb"]


def test_centralised_frees_the_trained_model_before_building_the_merged_one(
    topology: dict[str, Any], base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the merged model was built beside the trained one and its optimiser (16.1 GB at the peak on the
    SmolLM2 base against 7.6 GB with the trained one freed)."""
    from ground_node.learning import central

    def trainers() -> int:
        gc.collect()
        return sum(type(o) is Trainer for o in gc.get_objects())  # type(): no attribute lookups on foreign objects

    before, at_build = trainers(), []
    build = central.model_with_tensors

    def watched(*args: Any) -> Any:
        at_build.append(trainers())
        return build(*args)

    monkeypatch.setattr(central, "model_with_tensors", watched)
    central.centralised(topology, base_dir, steps=1)
    assert at_build == [before]


def test_one_scorer_applies_set_after_set_as_fresh_loads_do(topology: dict[str, Any], base_dir: Path) -> None:
    """`BaseScorer` loads the base once and undoes each set: with a set applied the model answers exactly as a
    freshly loaded one with it (`served_model`, the old evaluation path); after, it is the base bit for bit
    (weights and routers)."""
    trainer, s = _trained(topology, base_dir)
    state = trainer.expert_state()
    fresh = load_base(base_dir)
    full = fresh.adapter.extract_expert(fresh.model, 1, 3)
    global_like = {
        **state,
        "expert/1/3/down_proj": full["down_proj"].numpy() + 0.5,  # a full expert part replaces its slice
        "shared/lm_head.weight": dict(fresh.model.named_parameters())["lm_head.weight"].detach().numpy() * 1.5,
    }
    scorer = BaseScorer(base_dir, topology)
    base_weights = {n: t.clone() for n, t in scorer.base.model.state_dict().items()}
    router_types = [type(scorer.base.adapter.router(scorer.base.model, la)) for la in range(2)]
    ids, _ = encode_train(tokenizer_for(s.data), held_out(s, "c0")[:8])
    for tensors, held in [(state, HELD), (global_like, None), (None, None), (state, None)]:
        with scorer.applied(tensors, held) as model:
            assert torch.equal(_logits(model, ids), _logits(served_model(base_dir, tensors, s, held), ids))
        after = scorer.base.model.state_dict()
        assert all(torch.equal(after[n], w) for n, w in base_weights.items())
        assert [type(scorer.base.adapter.router(scorer.base.model, la)) for la in range(2)] == router_types
    assert not torch.equal(_logits(served_model(base_dir, global_like, s, None), ids), _logits(fresh.model, ids))
