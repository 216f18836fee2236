"""End-to-end workflows built from data, models and metrics.

:func:`celltype_transfer` is the scGen/scPRAM held-out cell-type task with baselines;
:mod:`pertbench.workflows.experiments` adds the tutorial's imbalance, hyperparameter
sensitivity and cross-study experiments.
"""

from pertbench.workflows.celltype_transfer import TransferOptions, celltype_transfer
from pertbench.workflows.experiments import (
    cross_study_transfer,
    imbalance_experiment,
    main_effect_importance,
    sensitivity_experiment,
)

__all__ = [
    "TransferOptions",
    "celltype_transfer",
    "cross_study_transfer",
    "imbalance_experiment",
    "main_effect_importance",
    "sensitivity_experiment",
]
