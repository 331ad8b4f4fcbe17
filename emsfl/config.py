"""Reading the topology file (ARCHITECTURE §6): YAML in, clear errors out.

Each role validates its own section; these helpers make every error name the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from emsfl.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A bad configuration value; the message names the field."""


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of the `what` file (topology, plan, TLE, ...) at `path`; ConfigError naming it otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file {path}: not UTF-8 text") from None


def load_topology(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    text = read_text_file(path, "topology")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML{_yaml_where(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the topology must be a YAML mapping")
    return data


def _yaml_where(exc: yaml.YAMLError) -> str:
    """`, line L column C: problem` on one line (PyYAML's own message spans several, with a caret)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f" at line {mark.line + 1} column {mark.column + 1}: {problem}" if mark is not None else f": {problem}"


def section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: missing or not a mapping")
    return value


def field(mapping: Mapping[str, Any], key: str, kind: type[T], where: str, default: Any = ...) -> T:
    """`mapping[key]` checked against `kind`; `where` is the dotted path used in errors."""
    if key not in mapping or mapping[key] is None:
        if default is ...:
            raise ConfigError(f"{where}.{key}: required")
        return default  # type: ignore[no-any-return]
    value = mapping[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
    return value


def positive(value: float, where: str) -> float:
    if not value > 0:
        raise ConfigError(f"{where}: must be > 0, got {value!r}")
    return value


def cluster_ids(config: Mapping[str, Any]) -> list[str]:
    clusters = config.get("clusters")
    if not isinstance(clusters, list) or not clusters:
        raise ConfigError("clusters: a non-empty list is required")
    ids = []
    for i, cluster in enumerate(clusters):
        if not isinstance(cluster, dict):
            raise ConfigError(f"clusters[{i}]: not a mapping")
        ids.append(field(cluster, "id", str, f"clusters[{i}]"))
    if len(set(ids)) != len(ids):
        raise ConfigError(f"clusters: duplicate ids in {ids}")
    return ids


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)
