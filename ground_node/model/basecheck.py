"""Does a base directory fit the topology? Checked wherever a command is given both (`--base` and `--topology`).

A base built for another topology fails late and obscurely (an `IndexError` deep in transformers when the
vocabulary is smaller than the tokenizer's); this names the mismatch before anything is loaded or written.
Reads only `manifest.json` and `config.json` (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ground_node.errors import GroundError
from ground_node.learning.tokenizer import ByteTokenizer, CharTokenizer
from ground_node.settings import Settings

_REBUILD = "build one for this topology with `emsfl ground warmup --topology ... --out DIR`"


def _read(path: Path, flag: str) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GroundError(f"{flag}: {path.parent} is not a base directory (no {path.name})") from None
    except (OSError, ValueError) as exc:
        raise GroundError(f"{flag}: {path} is not readable JSON: {exc}") from None
    if not isinstance(body, dict):
        raise GroundError(f"{flag}: {path} is not a JSON object")
    return body


def tokenizer_vocab(settings: Settings) -> int:
    from ground_node.learning.data import is_text

    return (ByteTokenizer() if is_text(settings.data) else CharTokenizer()).vocab_size


def check_base(base_dir: Path, settings: Settings, flag: str = "--base") -> dict[str, Any]:
    """The base's manifest, after checking family, layers, experts, top-k, width and vocabulary against
    the topology; GroundError names the flag, the base's value and the topology key otherwise."""
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise GroundError(f"{flag}: {base_dir}: no such directory")
    manifest = _read(base_dir / "manifest.json", flag)
    config = _read(base_dir / "config.json", flag)
    m = settings.model
    pairs = (
        ("family", manifest.get("family"), m.family),
        ("num_layers", manifest.get("num_layers"), m.num_layers),
        ("num_experts", manifest.get("num_experts"), m.num_experts),
        ("top_k", manifest.get("top_k"), m.top_k),
        ("hidden_size", config.get("hidden_size"), m.hidden_size),
    )
    for key, have, want in pairs:
        if have != want:
            raise GroundError(
                f"{flag}: {base_dir} has {key}={have!r} but the topology's model.{key} is {want!r}; {_REBUILD}"
            )
    need = tokenizer_vocab(settings)
    have_vocab = manifest.get("vocab_size", config.get("vocab_size"))
    # a checkpoint may carry a larger vocabulary than the tokenizer uses; a warmed-up base has exactly its size
    fits = isinstance(have_vocab, int) and (have_vocab >= need if m.checkpoint else have_vocab == need)
    if not fits:
        raise GroundError(
            f"{flag}: {base_dir} has vocab_size={have_vocab!r} (built for data.task {manifest.get('task')!r}) but"
            f" the topology's data.task {settings.data.task!r} needs {need}; {_REBUILD}"
        )
    return manifest
