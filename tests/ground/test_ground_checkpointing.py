"""`training.gradient_checkpointing`: the same loss and gradients as without, for LoRA and full tuning, on the
physical sub-model (`split=mask`) and the whole model (`split=frozen`)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
import torch

from emsfl.config import ConfigError
from ground_node.learning.synthetic import Example, encode_train
from ground_node.learning.tokenizer import CharTokenizer
from ground_node.learning.train import Trainer
from ground_node.model.families import get_adapter
from ground_node.records import Assignment
from ground_node.settings import ModelSettings, TrainingSettings, load_settings

HELD = Assignment(1, {0: (0, 2), 1: (1,)})
TINY = ModelSettings("olmoe", None, 2, 4, 2, 32, 48, 2)
BASE = TrainingSettings("lora", "mask", 4, 8.0, 0.01, 4, 10**6, 10**6, 8, grad_accum=2, device="cpu")


def _examples() -> list[Example]:
    letters = "abcdefgh"
    return [Example("copy", f"C:{letters[i:]}{letters[:i]}=", letters[i:] + letters[:i]) for i in range(8)]


def _trainer(training: TrainingSettings, model: torch.nn.Module) -> Trainer:
    return Trainer(copy.deepcopy(model), get_adapter("olmoe"), training, HELD, _examples(), seed=0)


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("tune", "split"), [("lora", "mask"), ("full", "mask"), ("lora", "frozen")])
def test_checkpointed_step_equals_plain_step(tune: str, split: str) -> None:
    model = get_adapter("olmoe").build(TINY, CharTokenizer().vocab_size, 32, seed=1)
    plain = _trainer(replace(BASE, tune=tune, split=split), model)
    ckpt = _trainer(replace(BASE, tune=tune, split=split, gradient_checkpointing=True), model)
    inner: Any = ckpt.model.get_base_model() if hasattr(ckpt.model, "get_base_model") else ckpt.model
    assert all(layer.gradient_checkpointing for layer in inner.model.layers)
    for _ in range(2):  # two steps: the second starts from updated weights and Adam moments
        loss_plain, loss_ckpt = plain.train_step(), ckpt.train_step()
        assert loss_ckpt == pytest.approx(loss_plain, rel=1e-5, abs=1e-6)
        g_plain, g_ckpt = _grads(plain), _grads(ckpt)
        assert g_plain and set(g_plain) == set(g_ckpt)
        for name, grad in g_plain.items():
            torch.testing.assert_close(g_ckpt[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    for name, value in plain.expert_state().items():
        torch.testing.assert_close(torch.from_numpy(ckpt.expert_state()[name]), torch.from_numpy(value))
    assert _saved_bytes(ckpt) < _saved_bytes(plain) / 2  # the layers' activations really were let go


def _saved_bytes(trainer: Trainer) -> int:
    """Bytes of the distinct storages a training forward keeps for the backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    trainer.model.train()
    ids, labels = encode_train(trainer.tok, _examples())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.model(input_ids=ids, labels=labels).loss.backward()
    return sum(saved.values())


def test_gradient_checkpointing_is_validated(topology: dict[str, Any]) -> None:
    assert load_settings(topology).training.gradient_checkpointing is False
    topology["training"]["gradient_checkpointing"] = True
    assert load_settings(topology).training.gradient_checkpointing is True
    topology["training"]["gradient_checkpointing"] = "yes"
    with pytest.raises(ConfigError, match=r"training\.gradient_checkpointing"):
        load_settings(topology)
