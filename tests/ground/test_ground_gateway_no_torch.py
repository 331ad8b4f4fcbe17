"""The gateway (a LAN aggregator on a small board) and the federation room import no torch (ARCHITECTURE §2)."""

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
        "import ground_node.gateway, ground_node.uplink, ground_node.outbox, ground_node.priority\n"
        "import ground_node.handover, ground_node.records\n"
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
