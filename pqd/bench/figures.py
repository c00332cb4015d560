"""Figures of the benchmark reports: a grid of panels drawn off-screen and saved as a PNG."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the off-screen backend (no display on a CI machine or a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def panels(path: str | Path, rows: int, cols: int, figsize: tuple[float, float], dpi: int = 100) -> Iterator[Any]:
    """A ``rows`` x ``cols`` array of axes (always 2-D); the figure is laid out and written to ``path`` when the
    block ends without an error, and closed either way."""
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
