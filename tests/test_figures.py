"""The experiment's figures and comparison.md, built from a small synthetic comparison (no lab run): what is drawn
(bands over seeds, the centralised line, names, colours) is read back from the matplotlib artists, not pixels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from PIL import Image

from testbed import comparemd, plots
from testbed.compare import claims, compare
from testbed.experiment import _plot
from testbed.style import CLUSTER_COLOURS, METHOD_COLOURS, OKABE_ITO

ROOT = Path(__file__).resolve().parents[1]
START = "2026-03-20T06:00:00Z"
CLUSTERS = ("c0", "c1", "c2")


def _summary(strategy: str, seed: int, slope: float) -> dict[str, Any]:
    """A run summary as testbed/outputs.py writes it, with a made-up accuracy curve: at hour h,
    min(0.5, slope * h) + 0.01 * seed (every strategy ends at 0.5, the steeper sooner)."""
    curve = [
        {"t": f"2026-03-20T{6 + h:02d}:00:00Z", "accuracy": round(min(0.5, slope * h) + 0.01 * seed, 4)}
        for h in range(0, 13)
    ]
    per_cluster = {
        c: {
            "accuracy": 0.1 * (i + 1) + 0.01 * seed,
            "served_accuracy": 0.2 * (i + 1) + 0.01 * seed,
            "bytes": 1e6 * (i + 1),
            "peak_rss_mb": 400.0 + seed,
            "idle_seconds": 60.0 * i,
            "training_steps": 100,
            "train_seconds": 30.0,
            "bytes_downlinked": 0,
        }
        for i, c in enumerate(CLUSTERS)
    }
    return {
        "run_id": f"10Mbps-{strategy}-seed{seed}",
        "config": {"seed": seed},
        "emulated_start": START,
        "accuracy_curve": curve,
        "accuracy_final": curve[-1]["accuracy"],
        "per_cluster": per_cluster,
        "bytes_uplinked": 3e6,
        "uploads_committed": 3,
        "uploads_outside_contact": 0,
    }


SLOPES = {"emsfl": 0.1, "fedavg": 0.05, "fedasync": 0.07}


def _runs(seeds: int) -> dict[str, list[dict[str, Any]]]:
    return {s: [_summary(s, seed, slope) for seed in range(seeds)] for s, slope in SLOPES.items()}


def _legend(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_accuracy_figure_has_a_band_per_strategy_and_the_centralised_line(tmp_path: Path) -> None:
    runs = _runs(seeds=3)
    central = {"final_accuracy": {"mean": 0.6, "std": 0.05, "values": [0.55, 0.6, 0.65], "missing": 0}}
    figures = _plot(tmp_path, runs, "", 0.4, "10Mbps", central)
    for name in (
        "accuracy_vs_time",
        "per_cluster_accuracy",
        "served_accuracy",
        "uplink_bytes",
        "peak_memory",
        "idle_waiting",
    ):
        assert (tmp_path / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
        dpi = Image.open(tmp_path / f"{name}.png").info["dpi"]
        assert round(dpi[0]) == 300 and round(dpi[1]) == 300
    ax = figures["accuracy_vs_time"].axes[0]
    bands = {c.get_gid(): c for c in ax.collections if isinstance(c, PolyCollection)}
    assert set(bands) == {"band:emsfl", "band:fedavg", "band:fedasync"}
    for strategy, slope in SLOPES.items():
        # at 4 h (before any curve flattens) the seeds' accuracies are 4*slope + 0, 0.01, 0.02
        ys = np.array([4 * slope + 0.01 * seed for seed in range(3)])
        line = next(line for line in ax.get_lines() if line.get_gid() == strategy)
        assert np.interp(4.0, line.get_xdata(), line.get_ydata()) == pytest.approx(ys.mean(), abs=1e-6)
        # the band is mean ± 1 sample std at every x: here the seeds differ by 0.01 everywhere, so its height is 0.02
        verts = bands[f"band:{strategy}"].get_paths()[0].vertices
        heights = {}
        for x, y in verts:
            low, high = heights.get(round(x, 6), (y, y))
            heights[round(x, 6)] = (min(low, y), max(high, y))
        assert len(heights) >= 50
        assert {round(high - low, 6) for low, high in heights.values()} == {round(2 * ys.std(ddof=1), 6)}
        assert to_hex(line.get_color()) == METHOD_COLOURS[strategy].lower()
        assert to_hex(bands[f"band:{strategy}"].get_facecolor()[0][:3]) == METHOD_COLOURS[strategy].lower()
    central_line = next(line for line in ax.get_lines() if line.get_gid() == "central")
    assert set(central_line.get_ydata()) == {0.6}
    legend = _legend(ax)
    for label in ("EMS-FL", "FedAvg", "FedAsync", "Centralised (reference)"):
        assert any(text.startswith(label) for text in legend), (label, legend)
    assert not any(text.startswith(("emsfl", "fedavg")) for text in legend)
    bars = figures["per_cluster_accuracy"].axes[0]
    assert _legend(bars) == ["EMS-FL", "FedAvg", "FedAsync"]
    served = figures["served_accuracy"].axes[0]  # per cluster, the mean over seeds 0-2 of 0.2 (i + 1) + 0.01 seed
    assert sorted({round(p.get_height(), 4) for p in served.patches}) == [0.21, 0.41, 0.61]


def test_one_seed_draws_no_band_and_says_n_1(tmp_path: Path) -> None:
    figures = _plot(tmp_path, _runs(seeds=1), "", 0.4, "10Mbps", None)
    ax = figures["accuracy_vs_time"].axes[0]
    assert not [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert all("n=1" in text for text in _legend(ax) if not text.startswith("target"))


def test_clusters_keep_distinct_okabe_ito_colours(tmp_path: Path) -> None:
    fig = plots.assignment_heatmap(tmp_path / "heat.png", [[0, 1, 2, -1], [2, 1, 0, 3]], ["c0", "c1", "c2", "c3"])
    cmap = fig.axes[0].images[0].get_cmap()
    colours = [to_hex(cmap(i)) for i in range(4)]
    assert colours == [c.lower() for c in CLUSTER_COLOURS[:4]] and len(set(colours)) == 4
    assert set(CLUSTER_COLOURS) | set(METHOD_COLOURS.values()) <= set(OKABE_ITO.values())
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)
    assert (tmp_path / "heat.pdf").exists() and (tmp_path / "heat.png").exists()


def _result(seeds: int) -> dict[str, Any]:
    comparison = compare(_runs(seeds))
    comparison["claims_vs_fedavg"] = claims(comparison, len(CLUSTERS))
    return {
        "experiment_id": "synthetic",
        "task": "synthetic",
        "topology": "testbed/topologies/local.yaml",
        "seeds": list(range(seeds)),
        "rates_bps": [1e7],
        "link_rate_bps": 1e7,
        "duration_wall_s_per_run": 45.0,
        "contact_plan": {"mode": "replay", "how": "every run replays the first's plan", "identical_across_runs": True},
        "target_rule": comparison["target_rule"],
        "by_rate": {"10Mbps": comparison},
        "wall_seconds": 100.0,
    }


def test_comparison_md_is_plain_language() -> None:
    one = comparemd.render(_result(seeds=1))
    assert "1 seed (0)" in one and "One seed" in one
    assert "±" not in one  # one seed: values, no spread
    three = comparemd.render(_result(seeds=3))
    assert "3 seeds (0, 1, 2)" in three and "± " in three
    for text in (one, three):
        assert "n/a" not in text and "True" not in text and "False" not in text and "not below" not in text
        assert "| EMS-FL |" in text and "| FedAvg |" in text and "| emsfl |" not in text
    # EMS-FL reaches 95 % of 0.5 after 5 h, FedAvg after 10 h: the claim is answered yes, with the figure
    assert "- EMS-FL reached the target at least 2× sooner than FedAvg: yes (EMS-FL reached it 2.0× sooner)." in three
    assert "- EMS-FL's final accuracy is at least FedAvg's: yes (both 0.510)." in three


def test_committed_comparison_md_files_are_regenerated_from_their_json() -> None:
    committed = sorted((ROOT / "benchmarks/results/experiments").glob("*.comparison.json"))
    assert committed
    for path in committed:
        expected = comparemd.render(json.loads(path.read_text(encoding="utf-8")))
        md = path.with_name(path.name.removesuffix(".json") + ".md")
        assert md.read_text(encoding="utf-8") == expected, f"{md}: run python -m testbed.comparemd {path}"
