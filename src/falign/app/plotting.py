"""Matplotlib, loaded on demand (the ``experiments`` extra), and the one way falign writes a figure."""

from __future__ import annotations

from pathlib import Path

from falign.errors import FalignError


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise FalignError("plotting needs matplotlib: pip install 'falign[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns ``path``."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
