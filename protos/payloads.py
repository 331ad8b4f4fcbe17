"""Encode, decode and validate the MQTT payloads of ARCHITECTURE §5.3 against `protos/mqtt/*.schema.json`.

Publishers call `encode`, subscribers call `decode`; both raise `PayloadError` naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker

from emsfl.runtime.timefmt import parse_iso

SCHEMA_DIR = Path(__file__).resolve().parent / "mqtt"
KINDS = ("clock", "link", "contacts", "status", "cmd", "cmd_reply", "satellites")


class PayloadError(ValueError):
    """A message that does not match its schema."""


# Our own date-time check: jsonschema's needs an optional package, and this is the parser every reader uses.
_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if isinstance(value, str):
        parse_iso(value)
    return True


@cache
def _validator(kind: str) -> Draft202012Validator:
    if kind not in KINDS:
        raise PayloadError(f"unknown payload kind {kind!r}; expected one of {', '.join(KINDS)}")
    schema = json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=_FORMATS)


def validate(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Return the payload as a dict if it matches the `kind` schema, else raise PayloadError."""
    expected = f"emsfl.v1.{kind}"
    if kind in KINDS and payload.get("schema") != expected:
        raise PayloadError(f"invalid {kind} payload at schema: expected {expected!r}, got {payload.get('schema')!r}")
    errors = sorted(_validator(kind).iter_errors(payload), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise PayloadError(f"invalid {kind} payload at {where}: {first.message}")
    return dict(payload)


def encode(kind: str, payload: Mapping[str, Any]) -> bytes:
    """Validate and serialise a payload to compact UTF-8 JSON."""
    return json.dumps(validate(kind, payload), separators=(",", ":"), sort_keys=True).encode("utf-8")


def decode(kind: str, data: bytes | bytearray | str) -> dict[str, Any]:
    """Parse and validate a received payload."""
    try:
        payload = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{kind} payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise PayloadError(f"{kind} payload must be a JSON object, got {type(payload).__name__}")
    return validate(kind, payload)
