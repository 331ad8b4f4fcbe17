"""Profiling streamed layer by layer from base.safetensors equals profiling the model in memory; plain reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file
from test_ground_families import FAMILIES, _model  # the tiny models of every family (pytest puts this dir on the path)
from torch import nn

from ground_node.errors import GroundError
from ground_node.learning.data import tokenizer_for, train_examples
from ground_node.learning.profile import profile_affinity, profile_base, router_probs, stream_router_probs
from ground_node.learning.synthetic import Example
from ground_node.learning.tokenizer import CharTokenizer
from ground_node.model.base import load_base
from ground_node.model.stream import decoder_layers, meta_skeleton, run_layers
from ground_node.model.tensorfile import TensorFile
from ground_node.settings import load_settings

EXAMPLES = [Example("copy", f"C:{'abcdefg'[: i % 7 + 1]}=", "ab" * (i % 3 + 1)) for i in range(40)]


def _manifest_file(model: nn.Module, adapter: Any, path: Path) -> Path:
    save_file(adapter.to_manifest(dict(model.state_dict())), str(path))
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_router_probs_equal_full_model(family: str, tmp_path: Path) -> None:
    model, adapter = _model(family)
    path = _manifest_file(model, adapter, tmp_path / "base.safetensors")
    tok = CharTokenizer()
    full = router_probs(model, adapter, EXAMPLES, tok, batch_size=16)
    streamed = stream_router_probs(adapter, model.config, path, EXAMPLES, tok, batch_size=16)
    assert len(streamed) == len(full) == 2
    for a, b in zip(full, streamed, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_one_layer_in_memory_at_a_time(family: str, tmp_path: Path) -> None:
    model, adapter = _model(family)
    path = _manifest_file(model, adapter, tmp_path / "base.safetensors")
    seen: list[int] = []
    with TensorFile(path) as f:
        skeleton = meta_skeleton(adapter, model.config, f)
        layers = decoder_layers(skeleton)
        assert all(p.is_meta for p in layers.parameters())
        assert skeleton.lm_head.weight.is_meta  # type: ignore[union-attr]  # never needed for profiling

        def check(index: int, layer: nn.Module) -> None:
            seen.append(index)
            for other, module in enumerate(layers):
                assert all(p.is_meta != (other == index) for p in module.parameters())

        ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(0))
        out = run_layers(skeleton, adapter, f, [ids], on_layer=check)
    assert seen == [0, 1] and all(p.is_meta for p in layers.parameters())
    with torch.no_grad():
        ref = model.model(input_ids=ids, use_cache=False).last_hidden_state  # type: ignore[operator]
        assert torch.allclose(skeleton.model.norm(out[0]), ref, atol=1e-5)  # type: ignore[operator]


def test_profile_base_equals_profile_of_loaded_model(topology: dict[str, Any], base_dir: Path) -> None:
    s = load_settings(topology)
    tok = tokenizer_for(s.data)
    data = train_examples(s, "c1")
    base = load_base(base_dir)
    affinity, probs = profile_affinity(base.model, base.adapter, data, tok, 32)
    streamed = profile_base(base_dir, data, tok, 32)
    assert streamed.top_k == 2 and streamed.affinity.num_tokens == affinity.num_tokens
    assert np.allclose(streamed.affinity.gate, affinity.gate, atol=1e-5)
    assert np.array_equal(streamed.affinity.freq, affinity.freq)
    for a, b in zip(probs, streamed.probs, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_tensor_file_reads_like_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.integers(0, 9, (4,)).astype(np.int64),
        "c": np.zeros((0, 2), np.float32),
        "d": rng.standard_normal((2, 2)).astype(np.float16),
    }
    np_save_file(arrays, str(tmp_path / "t.safetensors"))
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == ["a", "b", "c", "d"] and "a" in f and "z" not in f
        for name, want in arrays.items():
            assert np.array_equal(f.read(name).numpy(), want)
        into = torch.empty((2, 3, 5))
        f.read("a", out=into[1])  # into a slice of a bigger tensor
        assert np.array_equal(into[1].numpy(), arrays["a"])
        cast = torch.empty((2, 2), dtype=torch.float32)
        f.read("d", out=cast)  # another dtype: read, then cast
        assert np.array_equal(cast.numpy(), arrays["d"].astype(np.float32))
        with pytest.raises(GroundError, match="shape"):
            f.read("a", out=torch.empty((5, 3)))
        with pytest.raises(GroundError, match="no tensor z"):
            f.read("z")
    blob = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-8])
    with TensorFile(tmp_path / "cut.safetensors") as f, pytest.raises(GroundError, match="truncated"):
        f.read(sorted(arrays, key=lambda n: f._info(n)["data_offsets"][1])[-1])
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(GroundError, match="not a safetensors file"):
        TensorFile(tmp_path / "junk.safetensors")
