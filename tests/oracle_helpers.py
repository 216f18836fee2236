"""The simulator's oracle scored through the evaluator: the reference of the ceiling tests."""

from __future__ import annotations

import pandas as pd

from pertbench.metrics import Evaluator
from pertbench.metrics.calibration import normalized_scores


def oracle_normalised_scores(truth, oracle, half, metrics) -> pd.Series:
    """The oracle's normalised score per metric against no_change and the ceiling, its own
    noise extrapolated away: it is n/N of a perfect model's, so 2 s(N) - s(N/2) with
    ``half`` the oracle's first N/2 cells per group."""
    options = {"metrics": metrics, "model_name": "oracle", "n_bootstrap": 0}
    calib = (
        Evaluator(truth, oracle, baselines=["no_change"], ceiling=True, **options)
        .run()
        .calibration.set_index("metric")
    )
    halved = Evaluator(truth, half, **options).run().summary.set_index("metric")["value"]
    limit = 2.0 * calib["oracle"] - halved[calib.index]
    return normalized_scores(limit, calib["no_change"], calib["ceiling"])
