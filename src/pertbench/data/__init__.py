"""Data contract, loading and validation, preprocessing, splits, scenarios and simulation."""

from pertbench.data.groups import Grouping, group_cells, group_mean, group_mean_var
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import make_split, read_split, write_split

__all__ = [
    "Grouping",
    "PerturbationKeys",
    "group_cells",
    "group_mean",
    "group_mean_var",
    "make_split",
    "read_split",
    "write_split",
]
