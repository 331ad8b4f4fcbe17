"""Logging set-up shared by the commands: quiet by default, `emsfl -v` for more.

Long-running services (`ground run`, `satellite run`, `orbit run`, `lab ...`) log at INFO, which is their
running commentary; one-shot commands (`ground export`, `ground eval`, `orbit plan`, ...) show only warnings
unless asked, so that a library's INFO chatter (the ONNX exporter prints ~150 lines) does not bury the result.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Set by `emsfl -v`/`-vv` and inherited by the processes a command starts (the lab's roles).
VERBOSE_ENV = "EMSFL_VERBOSE"


def verbosity() -> int:
    try:
        return max(0, int(os.environ.get(VERBOSE_ENV, "0")))
    except ValueError:
        return 0


def level_for(service: bool) -> int:
    """INFO for services, WARNING for one-shot commands; -v raises both by one step, -vv to DEBUG."""
    steps = [logging.WARNING, logging.INFO, logging.DEBUG]
    return steps[min(2, verbosity() + (1 if service else 0))]


# Libraries whose warnings are noise for a user of a one-shot command (the ONNX exporter warns that torchvision,
# which the project does not use, is absent); shown again with -v.
NOISY = ("torch.onnx",)


def setup(fmt: str, *, service: bool) -> None:
    """Configure the root logger on stderr (once; a second call keeps the first set-up's handlers)."""
    logging.basicConfig(level=level_for(service), format=fmt, stream=sys.stderr)
    if not service and verbosity() == 0:
        for name in NOISY:  # where torch is imported already
            logging.getLogger(name).setLevel(logging.ERROR)
        # where it is imported later: torch's own log set-up reads this at import and would reset the level
        os.environ.setdefault("TORCH_LOGS", ",".join(f"-{name.removeprefix('torch.')}" for name in NOISY))
        # libraries' notices to their own callers (torch's pytree deprecations during ONNX export), not to a user
        warnings.simplefilter("ignore", FutureWarning)
