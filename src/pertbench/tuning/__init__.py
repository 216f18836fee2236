"""Hyperparameter optimisation with Optuna (resumable storage, pruning, seeds, importances)."""

from pertbench.metrics.objective import DEFAULT_OBJECTIVE, Objective
from pertbench.tuning.study import TuneResult, TuneSettings, tune

__all__ = ["DEFAULT_OBJECTIVE", "Objective", "TuneResult", "TuneSettings", "tune"]
