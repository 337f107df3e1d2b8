"""Writing matplotlib figures headless: the Agg backend (no display needed) and atomic PNG files."""

from __future__ import annotations

import os
from pathlib import Path

from features.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (figures are only ever written to files here)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def save_png(fig, out: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` to `out` as a PNG under a temporary name, rename it into place, close the figure."""
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return Path(out)
