"""Figures of a run and of an experiment (ARCHITECTURE §8), ready for a paper: each is written as PDF (vector) and
as a 300 dpi PNG next to it, with the literature's method names and the Okabe–Ito palette (testbed/style.py).
Agg backend: no display needed. Every function returns its (closed) Figure, so a test can read what was drawn.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from testbed.style import (
    FIGURE_FORMATS,
    METHOD_COLOURS,
    PNG_DPI,
    UNASSIGNED,
    cluster_colour,
    method_colour,
    method_name,
)

CENTRAL_LABEL = "Centralised (reference)"


def save(fig: Figure, path: Path) -> list[Path]:
    """`path` with each suffix of FIGURE_FORMATS (PDF, PNG at 300 dpi); the figure is closed afterwards."""
    written = []
    for fmt in FIGURE_FORMATS:
        out = Path(path).with_suffix(f".{fmt}")
        fig.savefig(out, dpi=PNG_DPI if fmt == "png" else None)
        written.append(out)
    plt.close(fig)
    return written


def _hours(moment: datetime, start: datetime) -> float:
    return (moment - start).total_seconds() / 3600.0


def contact_timeline(
    path: Path,
    start: datetime,
    windows: dict[str, list[tuple[datetime, datetime]]],
    commits: dict[str, list[datetime]],
) -> Figure:
    """One row per cluster (in its colour): link-up windows as bars, committed uploads as markers."""
    clusters = sorted(windows)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.6 * len(clusters)))
    for row, cluster in enumerate(clusters):
        bars = [(_hours(a, start), _hours(b, start) - _hours(a, start)) for a, b in windows[cluster]]
        ax.broken_barh(bars, (row - 0.3, 0.6), color=cluster_colour(row), alpha=0.8)
        xs = [_hours(t, start) for t in commits.get(cluster, [])]
        ax.plot(xs, [row] * len(xs), "k|", markersize=14, label="upload committed" if row == 0 and xs else None)
    ax.set_yticks(range(len(clusters)), clusters)
    ax.set_xlabel("emulated time since start (h)")
    ax.set_title("Contact windows (bars) and committed uploads (ticks)")
    if any(commits.values()):
        ax.legend(loc="upper right")
    fig.tight_layout()
    save(fig, path)
    return fig


def accuracy_curve(path: Path, start: datetime, points: list[tuple[datetime, float]], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([_hours(t, start) for t, _ in points], [a for _, a in points], "o-", color="black")
    ax.set_xlabel("emulated time since start (h)")
    ax.set_ylabel("exact-match accuracy (global test set)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    save(fig, path)
    return fig


def bytes_per_cluster(path: Path, uplinked: dict[str, int]) -> Figure:
    clusters = sorted(uplinked)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(clusters, [uplinked[c] / 1e6 for c in clusters], color=[cluster_colour(i) for i in range(len(clusters))])
    ax.set_ylabel("bytes uplinked (MB)")
    ax.set_title("Uplink per cluster")
    fig.tight_layout()
    save(fig, path)
    return fig


def assignment_heatmap(path: Path, owners: list[list[int]], clusters: list[str]) -> Figure:
    """owners[layer][expert] = index into `clusters`, or -1 for an expert without an owner (grey)."""
    import numpy as np

    grid = np.array(owners, dtype=float)
    grid[grid < 0] = np.nan
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * grid.shape[1], 1.2 + 0.5 * grid.shape[0]))
    cmap = ListedColormap([cluster_colour(i) for i in range(max(len(clusters), 1))]).with_extremes(bad=UNASSIGNED)
    image = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=max(len(clusters), 1) - 0.5, aspect="auto")
    bar = fig.colorbar(image, ticks=range(len(clusters)))
    bar.ax.set_yticklabels(clusters)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Expert assignment (owner)")
    fig.tight_layout()
    save(fig, path)
    return fig


def mean_band(
    runs: Sequence[Sequence[tuple[float, float]]], points: int = 60
) -> tuple[list[float], list[float], list[float]]:
    """Seeds' curves (x, y) on a common x grid (linear interpolation over the range all of them cover):
    the grid, the mean and the sample standard deviation (0 for one seed)."""
    import numpy as np

    curves = [sorted(run) for run in runs if run]
    if not curves:
        return [], [], []
    lo = max(c[0][0] for c in curves)
    hi = min(c[-1][0] for c in curves)
    grid = [float(x) for x in np.linspace(lo, hi, points)] if hi > lo else [lo]
    ys = [np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves]
    mean = [float(statistics.fmean(col)) for col in zip(*ys, strict=True)]
    std = [float(statistics.stdev(col)) if len(col) > 1 else 0.0 for col in zip(*ys, strict=True)]
    return grid, mean, std


def accuracy_by_strategy(
    path: Path,
    curves: dict[str, list[list[tuple[float, float]]]],
    title: str,
    target: float | None = None,
    central: tuple[float, float] | None = None,
) -> Figure:
    """Global accuracy against emulated hours: per strategy the mean over seeds with a ± 1 std band (with two or
    more seeds), the target dashed and the centralised reference (mean ± std of its final accuracy) dotted.
    The y axis ends a little above the highest value, so that low accuracies (a hard task) stay legible."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    highest = target or 0.0
    for i, (strategy, runs) in enumerate(curves.items()):
        colour = method_colour(strategy, i)
        xs, mean, std = mean_band(runs)
        spread = f"mean ± 1 std, n={len(runs)}" if len(runs) > 1 else "n=1"
        ax.plot(xs, mean, "-", color=colour, linewidth=1.8, label=f"{method_name(strategy)} ({spread})", gid=strategy)
        if len(runs) > 1:
            low = [m - s for m, s in zip(mean, std, strict=True)]
            high = [m + s for m, s in zip(mean, std, strict=True)]
            band = ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
            band.set_gid(f"band:{strategy}")
            highest = max([highest, *high])
        highest = max([highest, *mean])
    if central is not None:
        c_mean, c_std = central
        black = METHOD_COLOURS["centralised"]
        ax.axhline(c_mean, color=black, linestyle=":", linewidth=1.5, label=CENTRAL_LABEL, gid="central")
        if c_std > 0:
            ax.axhspan(c_mean - c_std, c_mean + c_std, color=black, alpha=0.08, linewidth=0)
        highest = max(highest, c_mean + c_std)
    if target is not None:
        ax.axhline(target, color="0.4", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel("emulated time since start (h)")
    ax.set_ylabel("exact-match accuracy (global test set)")
    ax.set_ylim(0, min(1.0, max(0.05, highest * 1.15)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    fig.tight_layout()
    save(fig, path)
    return fig


def grouped_bars(
    path: Path,
    values: dict[str, dict[str, float]],
    ylabel: str,
    title: str,
    errors: dict[str, dict[str, float]] | None = None,
) -> Figure:
    """values[series][group]: one bar group per `group` (a cluster), one colour per series (a strategy); `errors`
    (same keys): the spread over seeds, drawn as ± error bars."""
    series = list(values)
    groups = sorted({g for per in values.values() for g in per})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(series), 1) * 0.6), 4))
    for i, name in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(groups))]
        err = [errors[name].get(g, 0.0) for g in groups] if errors and name in errors else None
        ax.bar(
            xs,
            [values[name].get(g, 0.0) for g in groups],
            width,
            yerr=err,
            capsize=3 if err else 0,
            label=method_name(name),
            color=method_colour(name, i),
        )
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    save(fig, path)
    return fig
