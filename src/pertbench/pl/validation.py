"""The metric validation heatmap: metrics (rows) x failure modes (columns)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Panels of the heatmap, left to right (families drawn together share a panel).
PANELS = (("fit",), ("rank",), ("de", "distribution", "gi"))
#: Colour scale limit (interval half-widths).
LIMIT = 100.0
FAMILY_TITLES = {
    "fit": "fit",
    "rank": "rank",
    "de": "DE",
    "distribution": "distribution",
    "gi": "genetic interaction",
}


def failure_heatmap(
    detection: pd.DataFrame,
    *,
    failures: Sequence[str] | None = None,
    panels: Sequence[Sequence[str]] = PANELS,
    title: str | None = None,
    cell_inches: float = 0.19,
):
    """Which metric detects which failure, and how it ranks them.

    Parameters
    ----------
    detection
        :attr:`pertbench.metrics.validation.ValidationStudy.detection` (columns ``metric``,
        ``family``, ``failure``, ``intervals``, ``detected``, ``rank``).
    failures
        Columns, in order (default: as they appear).
    panels
        Families drawn in each panel.
    title
        Figure title.
    cell_inches
        Height of one row.

    Returns
    -------
    Figure
        Colour: how much worse than the perfect prediction the failure scores, in
        half-widths of the perfect score's 95% interval (red: worse, blue: better; beyond 1
        the metric detects it; symmetric log scale, clipped at 100). Number: the failure's
        rank for that metric (1 = most penalised), printed where the metric detects it; a
        dot where it does not.
    """
    from matplotlib.figure import Figure

    from pertbench.metrics.validation import FAILURE_LABELS

    failures = list(failures or pd.unique(detection["failure"]))
    present = [tuple(f for f in panel if f in set(detection["family"])) for panel in panels]
    present = [p for p in present if p]
    blocks = []
    for families in present:
        rows = detection[detection["family"].isin(families)]
        metrics = list(pd.unique(rows["metric"]))
        blocks.append((families, metrics, rows.set_index(["metric", "failure"])))
    n_rows = max(len(m) for _, m, _ in blocks)
    width = 1.9 + 0.32 * len(failures)
    fig = Figure(figsize=(width * len(blocks), cell_inches * n_rows + 1.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(blocks)))
    from matplotlib.colors import SymLogNorm

    norm = SymLogNorm(linthresh=1.0, vmin=-LIMIT, vmax=LIMIT, base=10)
    image = None
    for ax, (families, metrics, table) in zip(axes, blocks, strict=True):
        values = np.full((n_rows, len(failures)), np.nan)
        for i, metric in enumerate(metrics):
            for j, failure in enumerate(failures):
                if (metric, failure) not in table.index:
                    continue
                row = table.loc[(metric, failure)]
                values[i, j] = row["intervals"]
                detected = row["detected"]
                if isinstance(detected, (bool, np.bool_)):
                    text = f"{int(row['rank'])}" if detected else "·"
                    dark = abs(float(row["intervals"])) > 20  # white on the darkest cells
                    colour = "white" if dark else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5, color=colour)
        image = ax.imshow(np.clip(values, -LIMIT, LIMIT), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_yticks(range(len(metrics)))
        ax.set_yticklabels(metrics, fontsize=6.5)
        ax.set_ylim(n_rows - 0.5, -0.5)
        ax.set_xticks(range(len(failures)))
        ax.set_xticklabels(
            [FAILURE_LABELS.get(f, f) for f in failures], rotation=50, ha="right", fontsize=7
        )
        ax.set_title(" + ".join(FAMILY_TITLES.get(f, f) for f in families), fontsize=9)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.5, aspect=30)
        bar.set_label("worse than perfect, in interval half-widths (> 1: detected)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(
        title
        or "Which metric detects which failure (number: rank, 1 = most penalised; · = not detected)",
        fontsize=9,
    )
    return fig
