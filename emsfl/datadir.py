"""Where the shared data sets live: never a path of one machine.

A topology names its data relative to the repository root (`../shared/data/banking77`) or absolutely; where a
default is needed (Banking77 without `data.path`, tests that use a shared data set) it is under the data root:
`$EMSFL_DATA_DIR` if set, else `../shared/data` relative to the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "EMSFL_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = "../shared/data"  # relative to the repository root


def data_root() -> Path:
    """The data root: `$EMSFL_DATA_DIR`, else `../shared/data` next to the repository."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return (REPO_ROOT / DEFAULT_DATA_DIR).resolve()


def default_data_path(name: str) -> str:
    """The default path of a shared data set, as a topology would spell it (relative to the repository root
    unless `$EMSFL_DATA_DIR` is set), so that a base's cache key does not depend on where the checkout lives."""
    env = os.environ.get(DATA_DIR_ENV)
    return str(Path(env).expanduser() / name) if env else f"{DEFAULT_DATA_DIR}/{name}"


def repo_relative(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it (what results record), else as given."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def candidates(text: str) -> list[Path]:
    """Where a topology's data path may be, in order: a `../shared/data/...` path under `$EMSFL_DATA_DIR` when it is
    set; the path as given (absolute, or relative to the working directory); relative to the repository root."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return [path]
    out = []
    prefix = DEFAULT_DATA_DIR + "/"
    if os.environ.get(DATA_DIR_ENV) and text.startswith(prefix):
        out.append(data_root() / text[len(prefix) :])
    return [*out, path, REPO_ROOT / path]
