"""CLI: bad config gives one line naming the field and exit 2; `status` reads a state directory; no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from satellite_node.cli import main
from satellite_node.manifest import load_manifest
from satellite_node.node import NodeConfig, SatelliteNode
from satellite_node.store import Store
from satellite_node.testing import write_tiny_base
from tests.helpers import FixedLink

REPO = Path(__file__).resolve().parents[2]
GOOD = "strategy: emsfl\nclusters:\n  - {id: c0, capacity_experts: 2}\n  - {id: c1, capacity_experts: 2}\n"


def _run(tmp_path: Path, topology: str, base: Path | None = None, flags: dict[str, str] | None = None) -> int:
    topo = tmp_path / "t.yaml"
    topo.write_text(topology, encoding="utf-8")
    args = {"--topology": str(topo), "--broker": "127.0.0.1:1", "--listen": "127.0.0.1:50999"}
    args |= {"--state": str(tmp_path / "state"), "--base": str(base or write_tiny_base(tmp_path / "base"))}
    args |= flags or {}
    return main(["run", *[x for kv in args.items() for x in kv], "--insecure"])


@pytest.mark.parametrize(
    ("topology", "flags", "field"),
    [
        (GOOD + "satellite: {affinity: bogus}\n", {}, "satellite.affinity"),
        ("strategy: fedprox\n" + GOOD.split("\n", 1)[1], {}, "strategy"),
        ("clusters: []\n", {}, "clusters"),
        ("clusters:\n  - {id: c0, capacity_experts: -1}\n", {}, "clusters[0].capacity_experts"),
        (GOOD, {"--broker": "nohost"}, "--broker"),
        (GOOD, {"--listen": "127.0.0.1:99999"}, "--listen"),
        (
            "strategy: fedavg\n" + GOOD.split("\n", 1)[1] + "satellite: {fedavg: {quorum: 1}}\n",
            {},
            "satellite.fedavg.quorum",
        ),
        (
            "strategy: fedavg\n" + GOOD.split("\n", 1)[1] + "satellite: {fedavg: {quorum: 0, round_deadline_s: 5}}\n",
            {},
            "satellite.fedavg.quorum",
        ),
        (
            "strategy: fedasync\n" + GOOD.split("\n", 1)[1] + "satellite: {fedasync: {alpha: 2}}\n",
            {},
            "satellite.fedasync.alpha",
        ),
        (
            "strategy: fedasync\n" + GOOD.split("\n", 1)[1] + "satellite: {fedasync: {beta: 2}}\n",
            {},
            "satellite.fedasync.beta",
        ),
        (GOOD + "satellite: {keep_versions: 0}\n", {}, "satellite.keep_versions"),
        (GOOD + "satellite: {pace: sometimes}\n", {}, "satellite.pace"),
        (GOOD, {"--metrics-port": "70000"}, "--metrics-port"),
    ],
)
def test_bad_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], topology: str, flags: dict[str, str], field: str
) -> None:
    assert _run(tmp_path, topology, flags=flags) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and field in err


def test_strategy_options_read() -> None:
    from satellite_node.cli import read_config

    topo = {
        "strategy": "fedavg",
        "clusters": [{"id": "c0"}],
        "satellite": {"fedavg": {"quorum": 1, "round_deadline_s": 60}},
    }
    config = read_config(topo)
    assert config.strategy_options == {"quorum": 1, "round_deadline_s": 60} and config.keep_versions is None
    assert read_config({**topo, "strategy": "fedasync", "satellite": {}}).strategy_options == {"alpha": 0.5, "b": 0.5}


def test_bad_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_tiny_base(tmp_path / "base")
    (base / "base.safetensors").write_bytes(b"tampered")
    assert _run(tmp_path, GOOD, base=base) == 2
    assert "base_hash" in capsys.readouterr().err
    assert main(["run", "--topology", "x"]) == 2


def test_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_tiny_base(tmp_path / "base")
    with Store(tmp_path / "state") as store:
        store.set_meta("strategy", "emsfl")
        store.set_meta("clusters", ["c0", "c1"])
        node = SatelliteNode(store, load_manifest(base), str(base), NodeConfig({"c0": 2, "c1": 2}), FixedLink())
        node.join("c0", "d", 2, 1)
        node.join("c1", "d", 2, 1)
        node.report_affinity("c0", 1, 2, 4, np.linspace(0, 1, 8), [])
        node.report_affinity("c1", 1, 2, 4, np.linspace(1, 0, 8), [])
    assert main(["status", "--state", str(tmp_path / "state"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["assignment_version"] == 1 and status["strategy"] == "emsfl"
    assert sorted(c["experts_owned"] for c in status["clusters"]) == [4, 4]
    assert main(["status", "--state", str(tmp_path / "state")]) == 0
    assert "assignment version 1" in capsys.readouterr().out
    assert main(["status", "--state", str(tmp_path / "nothing")]) == 2


def test_no_torch_import() -> None:
    code = (
        "import sys, satellite_node.server, satellite_node.cli, satellite_node.export\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
