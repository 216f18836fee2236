"""Figures as PNG bytes: a laid-out figure is drawn once, at its own size."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from pertbench.pl.png import figure_png


def _figure(layout):
    fig = Figure(figsize=(3, 2), layout=layout)
    ax = fig.subplots()
    ax.plot(np.arange(10), np.arange(10) ** 2, label="square")
    ax.set_title("a title")
    ax.legend()
    return fig


def test_a_laid_out_figure_keeps_its_size_and_others_are_cropped():
    laid_out = Image.open(io.BytesIO(figure_png(_figure("constrained"), dpi=100)))
    assert laid_out.size == (300, 200)  # saved as drawn: figsize x dpi
    cropped = Image.open(io.BytesIO(figure_png(_figure(None), dpi=100)))
    assert cropped.size != (300, 200)  # bbox_inches="tight" trims (or extends) the margins
