"""The gateway (a LAN aggregator on a small board) and every module of the federation and cluster rooms import no
torch at module level (ARCHITECTURE §2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gateway_help_and_federation_modules_import_no_torch() -> None:
    code = (
        "import sys, contextlib, io\n"
        "from emsfl.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['ground', 'gateway', '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, exc.code\n"
        "assert '--listen' in out.getvalue()\n"
        "import importlib, pkgutil, ground_node.cluster, ground_node.federation, ground_node.records\n"
        "rooms = (ground_node.cluster, ground_node.federation)\n"
        "names = [f'{r.__name__}.{m.name}' for r in rooms for m in pkgutil.iter_modules(r.__path__)]\n"
        "assert len(names) >= 8, names\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
