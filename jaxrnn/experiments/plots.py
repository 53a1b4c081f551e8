"""Figures of the experiments: a bare Agg figure and its PNG (never pyplot, whose backend is global state).

Only the experiment modules import this one; ``import jaxrnn`` does not load
matplotlib (the experiments package is not imported by ``jaxrnn``).
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["panels", "write_png"]


def panels(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 4.0, title: str = ""):
    """A figure of ``nrows × ncols`` panels, each ``width × height`` inches: ``(fig, axes)`` (axes always 2-D)."""
    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig, axes


def write_png(fig, out: str, name: str) -> str:
    """Save ``fig`` as ``out/name.png`` (creating ``out``) and return the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.png")
    fig.savefig(path)
    return path
