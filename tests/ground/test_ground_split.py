from __future__ import annotations

from typing import Any

import pytest
import torch

from emsfl.config import ConfigError
from ground_node.errors import GroundError
from ground_node.learning.synthetic import cluster_train, encode_train
from ground_node.learning.tokenizer import PAD, CharTokenizer
from ground_node.model.base import new_model
from ground_node.model.split import apply_split, remove_split
from ground_node.records import Assignment
from ground_node.settings import load_settings


def _routes(model: Any, adapter: Any, ids: torch.Tensor) -> list[Any]:
    seen: list[Any] = []
    hooks = [adapter.router(model, la).register_forward_hook(lambda m, i, o: seen.append(o)) for la in range(2)]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return [logits, *seen]


def test_masked_routing_never_selects_unheld_and_matches_full_where_held(topology: dict[str, Any]) -> None:
    settings = load_settings(topology)
    model, adapter = new_model(settings)
    ids, _ = encode_train(CharTokenizer(), cluster_train(settings, "c0")[:16])
    full_logits, *full_routes = _routes(model, adapter, ids)
    held = {0: (0, 2), 1: (1, 2, 3)}
    apply_split(model, adapter, Assignment(1, held), "mask")
    masked_logits, *masked_routes = _routes(model, adapter, ids)
    for layer, (_, _, idx) in enumerate(masked_routes):
        assert set(idx.unique().tolist()) <= set(held[layer])
    # layer 0 sees identical inputs: tokens whose full top-k is held are computed identically
    _, _full_w, full_idx = full_routes[0]
    _, _masked_w, masked_idx = masked_routes[0]
    all_held = torch.isin(full_idx, torch.tensor(held[0])).all(dim=-1)
    assert all_held.any()
    assert torch.equal(masked_idx[all_held].sort(-1).values, full_idx[all_held].sort(-1).values)
    # tokens whose top-k experts are held in every layer give the same output as the full model
    tok_all = all_held.clone()
    _, _, full_idx1 = full_routes[1]
    tok_all &= torch.isin(full_idx1, torch.tensor(held[1])).all(dim=-1)
    # a token's output depends on earlier tokens too: check whole sequences whose tokens are all fully held
    seq_ok = (tok_all.reshape(ids.shape) | (ids == PAD)).all(dim=1)
    remove_split(model, adapter)
    assert torch.allclose(_routes(model, adapter, ids)[0], full_logits)
    if seq_ok.any():
        assert torch.allclose(masked_logits[seq_ok], full_logits[seq_ok], atol=1e-5)
    else:  # at least: holding every expert reproduces the full model exactly
        apply_split(model, adapter, Assignment(1, {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}), "mask")
        assert torch.allclose(_routes(model, adapter, ids)[0], full_logits, atol=1e-5)


def test_all_held_equals_full_and_frozen_keeps_routing(topology: dict[str, Any]) -> None:
    settings = load_settings(topology)
    model, adapter = new_model(settings)
    ids, _ = encode_train(CharTokenizer(), cluster_train(settings, "c1")[:8])
    full = _routes(model, adapter, ids)[0]
    apply_split(model, adapter, Assignment(1, {0: (0, 1, 2, 3), 1: (0, 1, 2, 3)}), "mask")
    assert torch.allclose(_routes(model, adapter, ids)[0], full, atol=1e-5)
    apply_split(model, adapter, Assignment(1, {0: (0,), 1: ()}), "frozen")
    assert torch.equal(_routes(model, adapter, ids)[0], full)
    apply_split(model, adapter, Assignment(1, {0: (0,), 1: ()}), "mask")  # one expert, and none: still runs
    routes = _routes(model, adapter, ids)
    assert set(routes[1][2].unique().tolist()) == {0}
    assert torch.isfinite(routes[0]).all()


def test_assignment_naming_missing_experts_is_refused(topology: dict[str, Any]) -> None:
    model, adapter = new_model(load_settings(topology))
    with pytest.raises(GroundError, match="expert 7"):
        apply_split(model, adapter, Assignment(1, {0: (7,)}), "mask")
    with pytest.raises(GroundError, match="layer 5"):
        apply_split(model, adapter, Assignment(1, {5: (0,)}), "mask")
    bad = dict(topology, model=dict(topology["model"], top_k=9))
    with pytest.raises(ConfigError, match=r"model\.top_k"):
        load_settings(bad)
