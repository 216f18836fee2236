"""The hyperparameter objective: PerturBench's rmse_average + 0.1 * rmse_rank_average."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from pertbench.errors import ConfigError

#: PerturBench's objective (lower is better), computed on the validation split.
DEFAULT_OBJECTIVE = {"rmse_average": 1.0, "rmse_rank_average": 0.1}


def hpo_objective(summary, weights: Mapping[str, float] | None = None) -> float:
    """Weighted sum of summary values (lower is better with the default weights).

    Parameters
    ----------
    summary
        An :class:`~pertbench.metrics.EvaluationResult`, its ``summary`` table, or a
        mapping metric -> value.
    weights
        metric -> weight; default ``{"rmse_average": 1.0, "rmse_rank_average": 0.1}``.
        Give a negative weight to a higher-is-better metric (e.g. cosine_logfc).

    Raises
    ------
    ConfigError
        A weighted metric is missing or undefined (NaN) in the summary.
    """
    weights = dict(DEFAULT_OBJECTIVE if weights is None else weights)
    if hasattr(summary, "summary"):
        summary = summary.summary
    if isinstance(summary, pd.DataFrame):
        values = dict(zip(summary["metric"], summary["value"], strict=True))
    else:
        values = dict(summary)
    total = 0.0
    for metric, weight in weights.items():
        value = values.get(metric)
        if value is None or not np.isfinite(value):
            raise ConfigError(
                f"objective metric '{metric}' is missing or undefined; evaluate it "
                "(e.g. metrics='default') or change the objective weights"
            )
        total += float(weight) * float(value)
    return total
