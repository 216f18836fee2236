"""Train/val/test splits of cells.

A split is a ``pandas.Series`` of strings indexed by obs names, with values ``"train"``,
``"val"``, ``"test"`` or ``""`` (cell left out of the task). On disk it is a CSV with the
header ``obs_name,split`` that reads back identically.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pertbench.errors import InputFileError, SplitError
from pertbench.utils.io import write_csv_atomic

SPLIT_NAMES = ("train", "val", "test")
LEFT_OUT = ""
SPLIT_COLUMNS = ("obs_name", "split")


def make_split(
    obs_names: pd.Index | list[str], values: np.ndarray | list[str] | str = LEFT_OUT
) -> pd.Series:
    """Build a split Series over ``obs_names`` (all cells left out unless ``values`` given)."""
    index = pd.Index(obs_names, dtype=object, name="obs_name")
    if isinstance(values, str):
        values = np.full(len(index), values, dtype=object)
    series = pd.Series(np.asarray(values, dtype=object), index=index, name="split")
    check_split_values(series)
    return series


def check_split_values(split: pd.Series) -> None:
    """Raise :class:`SplitError` if a value is not train/val/test/empty or a name repeats."""
    allowed = {*SPLIT_NAMES, LEFT_OUT}
    bad = pd.unique(split[~split.isin(allowed)].astype(str))
    if len(bad):
        raise SplitError(
            f"split values must be train, val, test or empty; found {', '.join(map(repr, bad[:5]))}"
        )
    if not split.index.is_unique:
        dup = split.index[split.index.duplicated()][:3]
        raise SplitError(f"split lists obs names more than once: {', '.join(map(str, dup))}")


def write_split(split: pd.Series, path: str | os.PathLike) -> Path:
    """Write a split as CSV (``obs_name,split``) atomically."""
    check_split_values(split)
    frame = pd.DataFrame(
        {"obs_name": split.index.astype(str), "split": split.to_numpy(dtype=object)}
    )
    return write_csv_atomic(path, frame)


def read_split(path: str | os.PathLike, obs_names: pd.Index | None = None) -> pd.Series:
    """Read a split CSV written by :func:`write_split` (or by hand).

    Parameters
    ----------
    path
        CSV with columns ``obs_name`` and ``split``.
    obs_names
        If given, the split is aligned to these cells: every listed cell must exist in
        ``obs_names``; cells absent from the file are left out (``""``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"split file '{path}' does not exist; create one with 'pertbench split'"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except Exception as exc:  # malformed CSV of any kind
        raise InputFileError(f"cannot read split file '{path}': {exc}") from exc
    if list(frame.columns[:2]) != list(SPLIT_COLUMNS):
        raise SplitError(
            f"split file '{path}' must have the header 'obs_name,split', found '{','.join(frame.columns)}'"
        )
    split = pd.Series(
        frame["split"].str.strip().to_numpy(dtype=object),
        index=pd.Index(frame["obs_name"], dtype=object, name="obs_name"),
        name="split",
    )
    check_split_values(split)
    if obs_names is not None:
        obs_names = pd.Index(obs_names, dtype=object)
        unknown = split.index.difference(obs_names)
        if len(unknown):
            raise SplitError(
                f"split file '{path}' names {len(unknown)} cell(s) not in the data "
                f"(e.g. {unknown[0]!r}); was it made for another dataset?"
            )
        split = split.reindex(obs_names, fill_value=LEFT_OUT)
        split.index.name = "obs_name"
    return split
