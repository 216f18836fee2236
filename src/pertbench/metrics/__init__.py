"""Evaluation suite: aggregations, fit, rank, distribution and DE metrics, calibration.

The entry point is :class:`Evaluator` (or :func:`evaluate`); every metric is a spec of the
registry (:mod:`pertbench.metrics.catalog`: :func:`catalogue`, :func:`register_metric`,
:func:`register_profile`, plug-ins through the ``pertbench.metrics`` entry points). The
building blocks are importable on their own: :func:`pertbench.metrics.de.wilcoxon_scores`,
:func:`pertbench.metrics.distribution.edistance` / ``mmd`` / ``mean_var_kde``,
:func:`pertbench.metrics.rank.rank_scores`, :mod:`pertbench.metrics.fit` and
:func:`pertbench.metrics.tutorial.tutorial_metrics`.
"""

from pertbench.metrics.calibration import summarize_seeds
from pertbench.metrics.catalog import (
    MetricSpec,
    catalogue,
    register_metric,
    register_profile,
    resolve_metrics,
)
from pertbench.metrics.evaluator import EvaluationResult, Evaluator, evaluate
from pertbench.metrics.objective import hpo_objective

__all__ = [
    "EvaluationResult",
    "Evaluator",
    "MetricSpec",
    "catalogue",
    "evaluate",
    "hpo_objective",
    "register_metric",
    "register_profile",
    "resolve_metrics",
    "summarize_seeds",
]
