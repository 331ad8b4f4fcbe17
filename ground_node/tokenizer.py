"""A tiny character-level tokenizer for the built-in synthetic task (no downloads)."""

from __future__ import annotations

from collections.abc import Sequence

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


Tokenizer = CharTokenizer | ByteTokenizer
