"""Figures as PNG bytes: the one place where a report or study renders a figure."""

from __future__ import annotations

import io
from typing import Any

#: Resolution of every PNG written by pertbench (report figures, validation heatmap).
DPI = 110


def figure_png(fig: Any, *, dpi: int = DPI) -> bytes:
    """Render a matplotlib figure as PNG bytes, drawn once.

    A figure with a layout engine (pertbench's figures use ``layout="constrained"``)
    already fits its contents to its canvas, so it is saved as it is: cropping it with
    ``bbox_inches="tight"`` would draw it a second time (once to measure, once to render)
    for a few pixels of margin. A figure without one (pyplot's ``tight_layout`` runs once
    and leaves none) is cropped to its contents.
    """
    buffer = io.BytesIO()
    crop = {} if fig.get_layout_engine() is not None else {"bbox_inches": "tight"}
    fig.savefig(buffer, format="png", dpi=dpi, **crop)
    return buffer.getvalue()
