"""Tokenizers: a tiny character-level one (synthetic task), a byte-level one (text tasks on the tiny base), and a
checkpoint's own HF tokenizer (`data.tokenizer: checkpoint`, e.g. the converted SmolLM2 base). No downloads.

Every tokenizer has `pad_id`, `bos_id`, `eos_id`, `vocab_size`, `encode`, `decode` and `encode_prompt` (the ids a
prompt starts generation from: BOS + text, or the chat template's user turn and assistant header).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, BOS, EOS = 0, 1, 2
ALPHABET = "abcdefghijklmnopqrstuvwxyzACRS0123456789:=+"


class CharTokenizer:
    """Ids 0..2 are PAD, BOS, EOS; every character of `ALPHABET` follows."""

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS

    def __init__(self, alphabet: str = ALPHABET) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError("tokenizer alphabet has duplicate characters")
        self.alphabet = alphabet
        self._ids = {ch: i + 3 for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return 3 + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the tokenizer alphabet") from exc

    def decode(self, ids: Sequence[int]) -> str:
        """Characters up to the first EOS; PAD and BOS are skipped."""
        out = []
        for i in ids:
            if i == EOS:
                break
            if i >= 3:
                out.append(self.alphabet[i - 3])
        return "".join(out)

    def encode_prompt(self, text: str) -> list[int]:
        return [BOS, *self.encode(text)]


class ByteTokenizer:
    """Byte-level tokenizer for free text (UTF-8, no downloads): ids 0..2 are PAD, BOS, EOS; byte b is b + 3."""

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS

    @property
    def vocab_size(self) -> int:
        return 3 + 256

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes up to the first EOS (PAD and BOS skipped), decoded leniently."""
        out = bytearray()
        for i in ids:
            if i == EOS:
                break
            if 3 <= i < 259:
                out.append(i - 3)
        return out.decode("utf-8", errors="replace")

    def encode_prompt(self, text: str) -> list[int]:
        return [BOS, *self.encode(text)]


class HFTokenizer:
    """A checkpoint directory's tokenizer (`tokenizer.json`), read with transformers' AutoTokenizer.

    `chat=True`: a prompt is the user turn of the tokenizer's chat template (after a system turn holding
    `instruction`) followed by the assistant header; the answer is the assistant's reply ending in EOS (for
    SmolLM2, `<|im_end|>`), exactly as the template writes a finished reply. PAD is the tokenizer's pad token
    unless that is EOS (then the unknown token, or 0): a padded position must never look like an answer's EOS.
    """

    def __init__(self, path: str, chat: bool = False, instruction: str = "") -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)
        self.chat = chat
        self.instruction = instruction
        if self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer at {path} has no EOS token")
        if chat and not getattr(self._tok, "chat_template", None):
            raise ValueError(f"data.prompt: chat, but the tokenizer at {path} has no chat template")
        self.eos_id = int(self._tok.eos_token_id)
        bos = self._tok.bos_token_id
        self.bos_id = int(bos) if bos is not None else self.eos_id
        pad = self._tok.pad_token_id
        if pad is None or int(pad) == self.eos_id:
            pad = self._tok.unk_token_id if self._tok.unk_token_id not in (None, self.eos_id) else 0
        self.pad_id = int(pad)

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=False)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Tokens up to the first EOS, without special tokens."""
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def save_pretrained(self, out: Path) -> None:
        self._tok.save_pretrained(str(out))

    def encode_prompt(self, text: str) -> list[int]:
        if not self.chat:
            return [self.bos_id, *self.encode(text)]
        messages = [{"role": "system", "content": self.instruction}] if self.instruction else []
        messages.append({"role": "user", "content": text})
        rendered = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.encode(str(rendered))  # the rendered special tokens are parsed as such


Tokenizer = CharTokenizer | ByteTokenizer | HFTokenizer
