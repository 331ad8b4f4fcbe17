"""PNG plots of a run (ARCHITECTURE §8). Agg backend: no display needed."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _hours(moment: datetime, start: datetime) -> float:
    return (moment - start).total_seconds() / 3600.0


def contact_timeline(
    path: Path,
    start: datetime,
    windows: dict[str, list[tuple[datetime, datetime]]],
    commits: dict[str, list[datetime]],
) -> None:
    """One row per cluster: link-up windows as bars, committed uploads as markers."""
    clusters = sorted(windows)
    fig, ax = plt.subplots(figsize=(10, 1.0 + 0.6 * len(clusters)))
    for row, cluster in enumerate(clusters):
        bars = [(_hours(a, start), _hours(b, start) - _hours(a, start)) for a, b in windows[cluster]]
        ax.broken_barh(bars, (row - 0.3, 0.6), color="tab:blue", alpha=0.6)
        xs = [_hours(t, start) for t in commits.get(cluster, [])]
        ax.plot(xs, [row] * len(xs), "k|", markersize=14, label="upload committed" if row == 0 and xs else None)
    ax.set_yticks(range(len(clusters)), clusters)
    ax.set_xlabel("emulated time since start (h)")
    ax.set_title("Contact windows (bars) and committed uploads (ticks)")
    if any(commits.values()):
        ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_curve(path: Path, start: datetime, points: list[tuple[datetime, float]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([_hours(t, start) for t, _ in points], [a for _, a in points], "o-")
    ax.set_xlabel("emulated time since start (h)")
    ax.set_ylabel("exact-match accuracy (global test set)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bytes_per_cluster(path: Path, uplinked: dict[str, int]) -> None:
    clusters = sorted(uplinked)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(clusters, [uplinked[c] / 1e6 for c in clusters])
    ax.set_ylabel("bytes uplinked (MB)")
    ax.set_title("Uplink per cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def assignment_heatmap(path: Path, owners: list[list[int]], clusters: list[str]) -> None:
    """owners[layer][expert] = index into `clusters`, or -1 for an expert without an owner."""
    import numpy as np

    grid = np.array(owners, dtype=float)
    grid[grid < 0] = np.nan
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * grid.shape[1], 1.2 + 0.5 * grid.shape[0]))
    cmap = plt.get_cmap("tab10", max(len(clusters), 1))
    image = ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(clusters) - 0.5, aspect="auto")
    bar = fig.colorbar(image, ticks=range(len(clusters)))
    bar.ax.set_yticklabels(clusters)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Expert assignment (owner)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_by_strategy(
    path: Path, curves: dict[str, list[list[tuple[float, float]]]], title: str, target: float | None = None
) -> None:
    """Global accuracy against emulated hours: one colour per strategy, one line per seed, the target dashed.
    The y axis ends a little above the highest value, so that low accuracies (a hard task, early runs) stay legible."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (strategy, runs) in enumerate(curves.items()):
        for j, points in enumerate(runs):
            ax.plot(
                [h for h, _ in points],
                [a for _, a in points],
                "o-",
                color=f"C{i}",
                alpha=0.8,
                markersize=3,
                label=strategy if j == 0 else None,
            )
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    highest = max([a for runs in curves.values() for points in runs for _, a in points] + [target or 0.0])
    ax.set_xlabel("emulated time since start (h)")
    ax.set_ylabel("exact-match accuracy (global test set)")
    ax.set_ylim(0, min(1.0, max(0.05, highest * 1.15)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grouped_bars(path: Path, values: dict[str, dict[str, float]], ylabel: str, title: str) -> None:
    """values[series][group]: one bar group per `group` (e.g. cluster), one colour per series (strategy)."""
    series = list(values)
    groups = sorted({g for per in values.values() for g in per})
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(series), 1) * 0.6), 4))
    for i, name in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(groups))]
        ax.bar(xs, [values[name].get(g, 0.0) for g in groups], width, label=name, color=f"C{i}")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
