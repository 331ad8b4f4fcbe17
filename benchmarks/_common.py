"""What every benchmark does with its figures: one JSON file under benchmarks/results, echoed to stdout.

Imported as `_common` by the scripts, which run as `python benchmarks/bench_*.py` (their folder is on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(path: Path, result: dict[str, Any], indent: int = 2, shown: dict[str, Any] | None = None) -> None:
    """Write `result` as JSON to `path` (folders made) and print it, or `shown` (a shorter view) instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n", encoding="utf-8")
    print(json.dumps(result if shown is None else shown, indent=indent))
