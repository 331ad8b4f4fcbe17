"""Bad input from a user: one line on stderr naming what is wrong, exit code 2, never a traceback.

`UserError` is the base of every such error (`emsfl.config.ConfigError`, `ground_node.errors.GroundError`, ...);
the `emsfl` entry point (emsfl/cli.py) prints it and exits 2. `OneLineParser` makes argparse's own errors
(unknown flag, bad value, missing argument) the same single line and exit code instead of a usage dump.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2  # bad input, as argparse and the shells use it


class UserError(ValueError):
    """Bad input (a flag, a file, a topology key); the message names it."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: message`) and exit 2, without argparse's usage dump
    (`--help` still shows it); its subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value
