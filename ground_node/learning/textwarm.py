"""Warm-up on general text (`warmup.text_path`): the base is pre-trained as a byte-level language model.

A text task (e.g. Banking77) is then learnt only by the federation: the base never sees the task's data.
`warmup.text_path` is a `.txt` file or a directory of them (e.g. `../shared/data/warmup_text`); a relative path
is tried against the working directory first, then against the repository root.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emsfl.datadir import DATA_DIR_ENV, candidates
from ground_node.errors import GroundError
from ground_node.learning.synthetic import Example

REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(text: str, what: str) -> Path:
    """An existing path: under $EMSFL_DATA_DIR for `../shared/data/...` when set, as given (absolute, or relative to
    the working directory), else relative to the repository root (emsfl/datadir.py)."""
    tried = candidates(text)
    for path in tried:
        if path.exists():
            return path
    raise GroundError(
        f"{what}: {text} does not exist (tried {', '.join(str(p) for p in tried)}); the shared data sets live in"
        f" ../shared/data next to the repository, or under ${DATA_DIR_ENV} (see the README's Data sets)"
    )


def text_files(text_path: str) -> list[Path]:
    root = resolve_path(text_path, "warmup.text_path")
    files = sorted(p for p in root.rglob("*.txt") if "README" not in p.name) if root.is_dir() else [root]
    if not files:
        raise GroundError(f"warmup.text_path: no .txt files under {root}")
    return files


def text_windows(text_path: str, count: int, window_bytes: int, seed: int) -> list[Example]:
    """`count` seeded windows of about `window_bytes` UTF-8 bytes; each is a whole-sequence LM example."""
    corpus = "\n".join(f.read_text(encoding="utf-8", errors="ignore") for f in text_files(text_path))
    corpus = " ".join(corpus.split())  # collapse layout whitespace
    if len(corpus) < window_bytes * 2:
        raise GroundError(f"warmup.text_path: {text_path} holds too little text ({len(corpus)} characters)")
    rng = np.random.default_rng([seed, 81])
    starts = rng.integers(0, len(corpus) - window_bytes, size=count)
    out = []
    for s in starts:
        piece = corpus[int(s) : int(s) + window_bytes].encode("utf-8")[:window_bytes].decode("utf-8", "ignore")
        out.append(Example("text", "", piece))  # empty prompt: the loss covers every byte
    return out
