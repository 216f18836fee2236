"""Data contract, loading and validation, preprocessing, splits, scenarios and simulation."""

from pertbench.data.groups import Grouping, group_cells, group_mean, group_mean_var
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import (
    SplitResult,
    find_leakage,
    make_split,
    make_task_split,
    read_split,
    split_celltype,
    split_combo,
    split_combo_inverse,
    split_custom,
    split_transfer,
    write_split,
)
from pertbench.data.splits_unseen import split_fewshot, split_unseen

_LAZY = {  # imported on first use: loading pulls in anndata, which `pertbench --help` avoids
    "ValidationReport": "pertbench.data.loading",
    "read_h5ad": "pertbench.data.loading",
    "validate_adata": "pertbench.data.loading",
    "validate_obs": "pertbench.data.loading",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pertbench.data' has no attribute {name!r}")


__all__ = [
    "Grouping",
    "PerturbationKeys",
    "SplitResult",
    "ValidationReport",
    "find_leakage",
    "group_cells",
    "group_mean",
    "group_mean_var",
    "make_split",
    "make_task_split",
    "read_h5ad",
    "read_split",
    "split_celltype",
    "split_combo",
    "split_combo_inverse",
    "split_custom",
    "split_fewshot",
    "split_transfer",
    "split_unseen",
    "validate_adata",
    "validate_obs",
    "write_split",
]
