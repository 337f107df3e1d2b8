"""Means with interval bars, one panel per metric: the figure of `vilbert study`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks.figures.matplotlib_files import pyplot, save_png


@dataclass
class IntervalPanel:
    """One metric: (label, mean, interval half-width or None) per point, and an optional chance level."""

    title: str
    points: list[tuple[str, float, float | None]]
    chance: float | None = None


def interval_figure(panels: list[IntervalPanel], out: str | os.PathLike, title: str = "", columns: int = 2) -> Path:
    """A grid of panels, each point its mean with a bar of ± the half-width (none where there is no interval);
    chance as a dashed line. Written atomically as a PNG."""
    plt = pyplot()
    rows = -(-len(panels) // columns)
    labels = max((len(p.points) for p in panels), default=1)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 0.9 + 0.32 * labels * rows + 0.6 * rows),
                             squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        positions = list(range(len(panel.points)))[::-1]  # the first point on top
        means = [mean for _, mean, _ in panel.points]
        errors = [half or 0.0 for _, _, half in panel.points]
        axis.errorbar(means, positions, xerr=errors, fmt="o", color="tab:blue", ecolor="tab:gray", capsize=3)
        if panel.chance is not None:
            axis.axvline(panel.chance, color="tab:red", linestyle="--", linewidth=1, label="chance")
            axis.legend(loc="lower right", fontsize=7)
        axis.set_yticks(positions, [label for label, _, _ in panel.points], fontsize=8)
        axis.set_title(panel.title, fontsize=10)
        axis.set_xlabel("%", fontsize=8)
        axis.grid(axis="x", alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_png(fig, out, dpi=110)
