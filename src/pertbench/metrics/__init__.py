"""Evaluation suite: aggregations, fit, rank, distribution and DE metrics, calibration.

The entry point is :class:`Evaluator` (or :func:`evaluate`); the building blocks are
importable on their own: :func:`pertbench.metrics.de.wilcoxon_scores`,
:func:`pertbench.metrics.distribution.edistance` / ``mmd`` / ``mean_var_kde``,
:func:`pertbench.metrics.rank.rank_scores`, :mod:`pertbench.metrics.fit` and
:func:`pertbench.metrics.tutorial.tutorial_metrics`.
"""

from pertbench.metrics.calibration import summarize_seeds
from pertbench.metrics.catalog import catalogue, resolve_metrics
from pertbench.metrics.evaluator import EvaluationResult, Evaluator, evaluate
from pertbench.metrics.objective import hpo_objective

__all__ = [
    "EvaluationResult",
    "Evaluator",
    "catalogue",
    "evaluate",
    "hpo_objective",
    "resolve_metrics",
    "summarize_seeds",
]
