"""Genetic-interaction metrics of a benchmark cell: for every cell whose evaluated split holds
combinations, :func:`pertbench.metrics.interactions.evaluate_interactions` scores them and
the cell gets ``interactions_per_combination.csv``, ``interactions_summary.csv`` and one
row per (GI metric, subgroup) in its ``metrics.csv`` (names like ``gi_rmse[interacting]``),
so the results table, ``summary.csv`` and the report carry them like any metric.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def has_combinations(adata: Any, split: pd.Series, keys: Any, *, on: str) -> bool:
    """Whether the ``on`` split holds cells of a combination."""
    labels = adata.obs[keys.perturbation_key].astype(str)[(split == on).to_numpy()]
    return any(keys.is_combination(label) for label in pd.unique(labels))


def interaction_metric_rows(
    adata: Any,
    pred: Any,
    split: pd.Series,
    *,
    keys: Any,
    job: Any,
    directory: Path,
    columns: list[str],
) -> pd.DataFrame | None:
    """Score the cell's combinations, write their tables, return tidy metric rows (or None)."""
    from pertbench.metrics.interactions import evaluate_interactions

    if not has_combinations(adata, split, keys, on=job.on):
        return None
    result = evaluate_interactions(
        adata, pred, split=split, keys=keys, on=job.on, seed=job.seed, skip_missing=True
    )
    result.write(directory)
    named = result.named()
    rows = pd.DataFrame(
        {
            "metric": named["name"],
            "value": named["value"].to_numpy(dtype=float),
            "ci_low": named["ci_low"].to_numpy(dtype=float),
            "ci_high": named["ci_high"].to_numpy(dtype=float),
            "normalized": math.nan,
            "n_groups": named["n_combinations"].to_numpy(dtype=np.int64),
            "split": job.on,
        }
    )
    for key, value in job.labels().items():
        rows[key] = value
    return rows[columns]
