"""A tiny dense Llama with random weights and a tiny byte-level BPE tokenizer, made in the test (no downloads).

The tokenizer's special tokens sit where SmolLM2's do (0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`) and it
carries SmolLM2's chat template, so the tests exercise the same prompt path as the real base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "what is my balance", "transfer money to my savings account", "book a flight to paris",
    "set a timer for ten minutes", "how do i cook pasta", "what is the weather like today",
    "the quick brown fox jumps over the lazy dog", "play some music", "tell me a joke",
]  # fmt: skip


def make_tokenizer(out: Path, vocab_size: int = 320) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[0], unk_token=SPECIALS[0]
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def make_dense_llama(out: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random tiny LlamaForCausalLM with tied embeddings and its tokenizer, saved as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


def write_text(path: Path, words: int = 3000) -> Path:
    """General text for the k-means router (the corpus repeated)."""
    text = " ".join((" ".join(CORPUS) + " ") for _ in range(words // 40 + 1))
    path.write_text(text, encoding="utf-8")
    return path
