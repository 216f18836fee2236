"""Read ``.h5ad`` files and check them against the data contract.

The contract (see ``docs/data.md``): ``X`` holds log1p-normalised expression (raw counts may
sit in ``layers['counts']``); obs has a perturbation column (default ``condition``) whose
control label is ``control``; combinations join their parts with ``+``; one or more
covariate columns (default ``cell_type``) describe the biological state. Every violation is
reported with one line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, DataValidationError, InputFileError, PertbenchWarning

ValueType = Literal["log", "counts", "integer", "unnormalized", "empty"]
OnCounts = Literal["normalize", "error", "allow"]
Expect = Literal["log", "counts", "any"]

#: Integer-valued X whose maximum exceeds this is taken for raw counts. log1p of data
#: normalised to 1e4 (or even 1e6) per cell never exceeds ~14, and is almost never integer.
COUNTS_MIN_MAX = 20.0
#: Non-integer X above this cannot be log1p-normalised (log1p(1e6) ~ 13.8).
LOG_MAX = 30.0
#: Values scanned per chunk, so checking a huge matrix needs little extra memory.
_SCAN_CHUNK = 20_000_000
#: The one message for data without cells (every reader and check uses it).
NO_CELLS = "the data have no cells (obs has 0 rows); check the file, or the filter that made it"
#: Groups with fewer cells than this are reported (not an error).
SMALL_GROUP = 5


class DataWarning(PertbenchWarning):
    """Something about the data was changed or looks questionable, but was not fatal."""


@dataclass
class ValueStats:
    """Summary of the values of a matrix, computed chunk by chunk."""

    n_nan: int = 0
    n_posinf: int = 0
    n_neginf: int = 0
    n_negative: int = 0
    minimum: float = 0.0
    maximum: float = 0.0
    all_integer: bool = True
    nnz: int = 0
    size: int = 0

    @property
    def value_type(self) -> ValueType:
        """``counts``, ``log``, ``integer`` (small integers), ``unnormalized`` or ``empty``."""
        if self.nnz == 0:
            return "empty"
        if self.all_integer and self.maximum > COUNTS_MIN_MAX:
            return "counts"
        if self.all_integer:
            return "integer"
        if self.maximum > LOG_MAX:
            return "unnormalized"
        return "log"


def scan_values(X) -> ValueStats:
    """Count NaN/inf/negative values and detect integer-valued data, without densifying.

    Sparse matrices are scanned over their stored values (implicit zeros are finite,
    non-negative integers); dense ones in row chunks; a matrix on disk (the X of a backed
    AnnData, an :class:`~pertbench.data.ondisk.OnDiskMatrix`) chunk by chunk without
    loading it (:func:`~pertbench.data.ondisk.scan_matrix`).
    """
    from pertbench.data.ondisk import OnDiskMatrix, is_backed_matrix, scan_matrix

    if is_backed_matrix(X):
        return scan_matrix(X if isinstance(X, OnDiskMatrix) else OnDiskMatrix(X, name="X"))
    stats = ValueStats(minimum=np.inf, maximum=-np.inf)
    if sp.issparse(X):
        values = X.data
        stats.size = int(np.prod(X.shape))
        chunks = (values[i : i + _SCAN_CHUNK] for i in range(0, values.size, _SCAN_CHUNK))
        has_implicit_zero = X.nnz < stats.size
    else:
        X = np.asarray(X)
        stats.size = int(X.size)
        flat = X.reshape(-1)
        chunks = (flat[i : i + _SCAN_CHUNK] for i in range(0, flat.size, _SCAN_CHUNK))
        has_implicit_zero = False
    for chunk in chunks:
        chunk = np.asarray(chunk)
        if chunk.dtype.kind not in "fiub":
            raise DataValidationError(f"X has non-numeric dtype {chunk.dtype}; store numbers in X")
        if chunk.dtype.kind == "f":
            nan = np.isnan(chunk)
            posinf = np.isposinf(chunk)
            neginf = np.isneginf(chunk)
            stats.n_nan += int(nan.sum())
            stats.n_posinf += int(posinf.sum())
            stats.n_neginf += int(neginf.sum())
            finite = chunk[~(nan | posinf | neginf)]
        else:
            finite = chunk
        if finite.size:
            stats.minimum = min(stats.minimum, float(finite.min()))
            stats.maximum = max(stats.maximum, float(finite.max()))
            stats.n_negative += int((finite < 0).sum())
            stats.nnz += int(np.count_nonzero(finite))
            if stats.all_integer and finite.dtype.kind == "f":
                stats.all_integer = bool(np.all(finite == np.round(finite)))
    if has_implicit_zero:
        stats.minimum = min(stats.minimum, 0.0)
        stats.maximum = max(stats.maximum, 0.0)
    if not np.isfinite(stats.minimum):  # no finite value at all
        stats.minimum = stats.maximum = 0.0
    return stats


@dataclass
class ValidationReport:
    """What :func:`validate_adata` found.

    Attributes
    ----------
    n_cells, n_genes
        Shape of the data.
    value_type
        ``log``, ``counts``, ``integer``, ``unnormalized`` or ``empty`` (see
        :class:`ValueStats`).
    x_format
        ``csr``, ``csc``, ``dense``...
    value_range
        (min, max) of the finite values of X.
    density
        Fraction of non-zero entries of X.
    has_counts_layer
        Whether ``layers['counts']`` exists.
    n_controls
        Number of control cells.
    n_perturbations
        Distinct non-control perturbation labels (combinations count once each).
    n_combinations
        How many of them are combinations.
    n_covariate_combinations
        Distinct covariate value combinations.
    groups
        Cells per (covariates, perturbation) group (columns: covariates, perturbation,
        ``n_cells``, ``is_control``).
    controls_per_covariate
        Control cells per covariate combination.
    errors
        Fatal problems, one line each.
    warnings
        Non-fatal problems, one line each.
    """

    n_cells: int = 0
    n_genes: int = 0
    value_type: str = "empty"
    x_format: str = "dense"
    value_range: tuple[float, float] = (0.0, 0.0)
    density: float = 0.0
    has_counts_layer: bool = False
    n_controls: int = 0
    n_perturbations: int = 0
    n_combinations: int = 0
    n_covariate_combinations: int = 0
    groups: pd.DataFrame = field(default_factory=pd.DataFrame)
    controls_per_covariate: pd.DataFrame = field(default_factory=pd.DataFrame)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_errors(self) -> None:
        """Raise :class:`DataValidationError` listing every fatal problem, on one line:
        ``"2 problems: (1) ...; (2) ..."`` (``pertbench info`` lists them one per line)."""
        if len(self.errors) == 1:
            raise DataValidationError(self.errors[0])
        if self.errors:
            listed = "; ".join(f"({i}) {e}" for i, e in enumerate(self.errors, start=1))
            raise DataValidationError(f"{len(self.errors)} problems: {listed}")

    def to_text(self) -> str:
        """Human-readable summary (used by ``pertbench info``)."""
        lines = [
            f"cells: {self.n_cells:,}   genes: {self.n_genes:,}",
            f"X: {self.x_format}, values look like {self.value_type} "
            f"(range {self.value_range[0]:.4g}..{self.value_range[1]:.4g}, "
            f"{100 * self.density:.1f}% non-zero); counts layer: "
            f"{'yes' if self.has_counts_layer else 'no'}",
            f"controls: {self.n_controls:,}   perturbations: {self.n_perturbations:,} "
            f"({self.n_combinations:,} combinations)   covariate combinations: "
            f"{self.n_covariate_combinations:,}",
        ]
        for title, items in (("errors", self.errors), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title}:")
                lines.extend(f"  - {item}" for item in items)
        if not self.errors and not self.warnings:
            lines.append("problems: none found")
        return "\n".join(lines)


def _x_format(X) -> str:
    if sp.issparse(X):
        return X.format
    fmt = getattr(X, "format", None)  # a backed sparse dataset
    return fmt if fmt in ("csr", "csc") else "dense"


def _missing_mask(values: pd.Series) -> np.ndarray:
    """Missing values: NaN/None, or empty / 'nan' / 'None' strings."""
    missing = values.isna().to_numpy()
    as_str = values.astype(str).str.strip().to_numpy()
    return missing | np.isin(as_str, ["", "nan", "NaN", "None", "<NA>"])


def _describe(values, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def validate_adata(
    adata: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    expect: Expect = "log",
    raise_errors: bool = True,
) -> ValidationReport:
    """Check ``adata`` against the data contract.

    Parameters
    ----------
    adata
        The data.
    keys
        Which obs columns hold perturbation, covariates and dose (defaults:
        ``condition`` / ``control`` / ``+`` / ``cell_type``).
    expect
        What ``X`` must hold: ``"log"`` (log1p-normalised, the default), ``"counts"``
        or ``"any"``.
    raise_errors
        Raise :class:`~pertbench.errors.DataValidationError` (one line per problem) when
        a fatal problem is found; with ``False`` the problems are only listed in the report.

    Returns
    -------
    ValidationReport
        Counts, value type and the problems found (fatal ``errors``, non-fatal ``warnings``).
    """
    if expect not in ("log", "counts", "any"):
        raise ConfigError(f"expect must be 'log', 'counts' or 'any', not {expect!r}")
    keys = keys if keys is not None else PerturbationKeys()
    report = ValidationReport(n_cells=int(adata.n_obs), n_genes=int(adata.n_vars))
    errors = report.errors
    report.has_counts_layer = "counts" in adata.layers
    if adata.n_vars == 0:
        errors.append("the data have no genes (var has 0 rows); check the file or the gene filter")

    # -- X values ------------------------------------------------------------------------
    X = adata.X
    if X is None:
        errors.append("X is empty (None); store log-normalised expression in X")
        stats = ValueStats()
    else:
        report.x_format = _x_format(X)
        stats = scan_values(X)
    _check_values(report, stats, expect=expect, has_x=X is not None)

    # -- genes and cell names ---------------------------------------------------------------
    _check_names(report, adata.var_names, adata.obs_names)

    _check_obs(adata.obs, keys, report)
    if raise_errors:
        report.raise_if_errors()
    return report


def _check_values(
    report: ValidationReport, stats: ValueStats, *, expect: Expect, has_x: bool = True
) -> None:
    """Record what the value scan of X found (type, range, density) and its problems."""
    report.value_type = stats.value_type
    report.value_range = (float(stats.minimum), float(stats.maximum))
    report.density = stats.nnz / stats.size if stats.size else 0.0
    if stats.n_nan:
        report.errors.append(
            f"X contains {stats.n_nan:,} NaN value(s); remove or impute them before using pertbench"
        )
    if stats.n_posinf or stats.n_neginf:
        report.errors.append(
            f"X contains {stats.n_posinf + stats.n_neginf:,} infinite value(s); "
            "check the normalisation (log of 0?) and recompute X"
        )
    if stats.n_negative:
        report.errors.append(
            f"X contains {stats.n_negative:,} negative value(s) (min {stats.minimum:.4g}); "
            "expression must be non-negative: do not pass scaled/centred data"
        )
    if has_x and not stats.n_negative:
        if expect == "log" and stats.value_type == "counts":
            report.errors.append(
                f"X holds raw counts (integers up to {stats.maximum:.0f}) where log-normalised "
                "values are expected; run 'pertbench preprocess' or load with on_counts='normalize'"
            )
        elif expect == "counts" and stats.value_type not in ("counts", "integer", "empty"):
            report.errors.append(
                "X is not integer-valued but raw counts are expected; pass the raw count matrix"
            )
        elif expect == "log" and stats.value_type == "unnormalized":
            report.warnings.append(
                f"X is not integer-valued but reaches {stats.maximum:.4g}, too large for "
                "log1p-normalised data; check that X was log-transformed"
            )
        elif expect == "log" and stats.value_type == "integer":
            report.warnings.append(
                f"X is integer-valued with a small maximum ({stats.maximum:.0f}); if these are "
                "counts, normalise them (pertbench preprocess)"
            )


def _check_names(report: ValidationReport, var_names: pd.Index, obs_names: pd.Index) -> None:
    """Gene names and cell names must be unique."""
    var_names = pd.Index(pd.Index(var_names).astype(str))
    if not var_names.is_unique:
        dup = var_names[var_names.duplicated()].unique()
        report.errors.append(
            f"{len(dup)} gene name(s) are duplicated ({_describe(dup)}); make them unique "
            "(adata.var_names_make_unique()) or aggregate them"
        )
    obs_names = pd.Index(pd.Index(obs_names).astype(str))
    if not obs_names.is_unique:
        dup = obs_names[obs_names.duplicated()].unique()
        report.errors.append(
            f"{len(dup)} cell name(s) are duplicated ({_describe(dup)}); split files refer to "
            "cells by name: run adata.obs_names_make_unique()"
        )


def validate_obs(
    obs: pd.DataFrame, *, keys: PerturbationKeys | None = None, raise_errors: bool = True
) -> ValidationReport:
    """Check only the cell metadata (keys, labels, controls per covariate combination).

    Used by functions that need no expression values, such as the split builders.
    """
    keys = keys if keys is not None else PerturbationKeys()
    report = ValidationReport(n_cells=len(obs))
    _check_obs(obs, keys, report)
    if raise_errors:
        report.raise_if_errors()
    return report


def _check_obs(obs: pd.DataFrame, keys: PerturbationKeys, report: ValidationReport) -> None:
    errors, notes = report.errors, report.warnings
    if not len(obs):
        errors.append(NO_CELLS)
    # -- obs keys ----------------------------------------------------------------------------
    wanted = [keys.perturbation_key, *keys.covariate_keys]
    if keys.dose_key:
        wanted.append(keys.dose_key)
    missing_cols = [k for k in wanted if k not in obs.columns]
    if missing_cols:
        available = ", ".join(map(str, obs.columns)) or "(none)"
        errors.append(
            f"obs has no column {', '.join(repr(m) for m in missing_cols)} (available: "
            f"{available}); pass the right --perturbation-key/--covariates/--dose-key"
        )
    if keys.perturbation_key in obs.columns:
        pert = obs[keys.perturbation_key]
        miss = _missing_mask(pert)
        if miss.any():
            errors.append(
                f"{int(miss.sum()):,} cell(s) have no value in '{keys.perturbation_key}'; "
                f"label them (controls as '{keys.control}') or remove them"
            )
        labels = pd.unique(pert[~miss].astype(str))
        bad_parts = [
            label
            for label in labels
            if label != keys.control and any(p.strip() == "" for p in keys.components(label))
        ]
        if bad_parts:
            errors.append(
                f"perturbation label(s) {_describe(bad_parts)} have an empty part around the "
                f"delimiter '{keys.delimiter}'; fix the labels (e.g. 'A{keys.delimiter}{keys.delimiter}B' "
                f"-> 'A{keys.delimiter}B')"
            )
        with_control = [
            label
            for label in labels
            if label != keys.control and keys.control in keys.components(label)
        ]
        if with_control:
            notes.append(
                f"combination label(s) {_describe(with_control)} contain the control label "
                f"'{keys.control}' as a part"
            )
        n_controls = int((pert.astype(str).to_numpy() == keys.control).sum())
        report.n_controls = n_controls
        non_control = [label for label in labels if label != keys.control]
        report.n_perturbations = len(non_control)
        report.n_combinations = sum(1 for label in non_control if keys.is_combination(label))
        if n_controls == 0 and len(obs):
            errors.append(
                f"no control cells: no cell has '{keys.perturbation_key}' == '{keys.control}' "
                f"(values include {_describe(sorted(map(str, labels)))}); pass --control"
            )
    cov_ok = True
    for key in keys.covariate_keys:
        if key not in obs.columns:
            cov_ok = False
            continue
        miss = _missing_mask(obs[key])
        if miss.any():
            cov_ok = False
            errors.append(
                f"{int(miss.sum()):,} cell(s) have no value in covariate '{key}'; fill them in "
                "or remove those cells"
            )
    if keys.dose_key and keys.dose_key in obs.columns:
        _check_dose(obs, keys, errors)

    # -- groups and controls per covariate combination ------------------------------------
    if keys.perturbation_key in obs.columns and cov_ok and not missing_cols and len(obs):
        grouping = group_cells(obs, keys)
        cov_cols = list(keys.covariate_keys)
        groups = grouping.groups[[*cov_cols, keys.perturbation_key, "n_cells", "is_control"]]
        report.groups = groups.reset_index(drop=True)
        report.n_covariate_combinations = len(grouping.covariates)
        n_ctrl = np.bincount(
            grouping.covariate_codes[grouping.is_control], minlength=len(grouping.covariates)
        )
        per_cov = grouping.covariates.copy()
        per_cov["n_controls"] = n_ctrl
        per_cov["n_cells"] = np.bincount(
            grouping.covariate_codes, minlength=len(grouping.covariates)
        )
        report.controls_per_covariate = per_cov
        if report.n_controls > 0 and (n_ctrl == 0).any():
            lacking = per_cov.loc[n_ctrl == 0, "label"].tolist()
            errors.append(
                f"covariate combination(s) {_describe(lacking)} have no control cells; "
                "predictions there need controls: add them or drop those cells"
            )
        small = groups[(groups["n_cells"] < SMALL_GROUP) & ~groups["is_control"]]
        if len(small):
            notes.append(
                f"{len(small)} (covariates, perturbation) group(s) have fewer than "
                f"{SMALL_GROUP} cells; their metrics will be noisy"
            )


def _check_dose(obs: pd.DataFrame, keys: PerturbationKeys, errors: list[str]) -> None:
    dose = obs[keys.dose_key]
    miss = _missing_mask(dose)
    pert = obs[keys.perturbation_key].astype(str)
    is_control = pert.to_numpy() == keys.control
    if (miss & ~is_control).any():
        errors.append(
            f"{int((miss & ~is_control).sum()):,} perturbed cell(s) have no dose in "
            f"'{keys.dose_key}'; fill them in"
        )
    pairs = pd.DataFrame({"p": pert.to_numpy(), "d": dose.astype(str).to_numpy()})[
        ~miss & ~is_control
    ].drop_duplicates()
    bad = []
    for label, value in zip(pairs["p"], pairs["d"], strict=True):  # unique pairs only
        parts = value.split(keys.delimiter)
        n = len(keys.components(label))
        try:
            [float(p) for p in parts]
        except ValueError:
            bad.append(f"{label}:{value}")
            continue
        if len(parts) not in (1, n):
            bad.append(f"{label}:{value}")
    if bad:
        errors.append(
            f"dose value(s) {_describe(bad)} are not numeric or do not give one dose per "
            f"part of the combination (e.g. '1{keys.delimiter}0.5')"
        )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputFileError(f"file '{path}' does not exist; check the path")
    if path.is_dir():
        raise InputFileError(f"'{path}' is a folder, not an .h5ad file")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"file '{path}' is not readable; check its permissions")


def check_h5ad_file(path: str | os.PathLike) -> Path:
    """Refuse, in one line, a path that is not a readable AnnData ``.h5ad`` file."""
    path = Path(path)
    _check_readable(path)
    import h5py

    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise InputFileError(f"cannot read '{path}': {exc}") from exc
    if not is_hdf5:
        raise InputFileError(
            f"'{path}' is not an AnnData .h5ad file (not HDF5); convert it with anndata/scanpy"
        )
    try:
        with h5py.File(path, "r") as handle:
            top = set(handle.keys())
    except OSError as exc:
        raise InputFileError(f"cannot read '{path}': {exc}") from exc
    if not {"obs", "var"} <= top:
        raise InputFileError(
            f"'{path}' is an HDF5 file but not an AnnData .h5ad (no obs/var groups); "
            "write it with AnnData.write_h5ad"
        )
    return path


def read_h5ad(
    path: str | os.PathLike,
    *,
    keys: PerturbationKeys | None = None,
    validate: bool = True,
    on_counts: OnCounts = "normalize",
    backed: bool = False,
) -> ad.AnnData:
    """Read an ``.h5ad`` file and check it against the data contract.

    Old AnnData layouts (for example a neighbours graph stored in ``uns``) are read
    without the FutureWarning noise of recent anndata versions.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    keys
        Which obs columns hold perturbation, covariates and dose.
    validate
        Run :func:`validate_adata` (``expect='log'``) and raise on fatal problems.
    on_counts
        What to do when ``X`` holds raw counts: ``"normalize"`` (default) normalises each
        cell to 1e4 and applies log1p with a :class:`DataWarning`, keeping the counts in
        ``layers['counts']``; ``"error"`` refuses with the fix; ``"allow"`` leaves X as is.
    backed
        Open with X on disk (anndata's backed mode, read-only; validation scans X chunk by
        chunk). To read obs and var only (no layers, obsm or uns) and X by rows, use
        :func:`pertbench.data.ondisk.open_h5ad`.

    Returns
    -------
    AnnData
    """
    if on_counts not in ("normalize", "error", "allow"):
        raise ConfigError(f"on_counts must be 'normalize', 'error' or 'allow', not {on_counts!r}")
    path = check_h5ad_file(path)
    try:
        with warnings.catch_warnings():
            # Old layouts (neighbours graph in uns, ...) are migrated by anndata itself.
            warnings.filterwarnings("ignore", message="Moving element from", category=FutureWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
            warnings.filterwarnings(
                "ignore", category=getattr(ad, "OldFormatWarning", FutureWarning)
            )
            adata = ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # corrupt or truncated file of any kind
        raise InputFileError(
            f"cannot read '{path}' as AnnData: {type(exc).__name__}: {exc}"
        ) from exc
    keys = keys if keys is not None else PerturbationKeys()
    if not validate and on_counts == "allow":
        return adata
    if backed:
        if validate:  # X is scanned chunk by chunk on disk, never loaded whole
            validate_adata(adata, keys=keys, expect="any")
        return adata
    stats = scan_values(adata.X) if adata.X is not None else ValueStats()
    if stats.value_type == "counts" and not (stats.n_nan or stats.n_negative or stats.n_posinf):
        if on_counts == "error":
            raise DataValidationError(
                f"'{path.name}' holds raw counts in X (integers up to {stats.maximum:.0f}) "
                "where log-normalised values are expected; run 'pertbench preprocess' first "
                "or load with on_counts='normalize'"
            )
        if on_counts == "normalize":
            warnings.warn(
                f"'{path.name}': X holds raw counts; normalised to 1e4 per cell + log1p "
                "(counts kept in layers['counts'])",
                DataWarning,
                stacklevel=2,
            )
            normalize_log1p(adata)
    if validate:
        expect: Expect = "any" if on_counts == "allow" else "log"
        validate_adata(adata, keys=keys, expect=expect)
    return adata


def normalize_log1p(
    adata: ad.AnnData, *, target_sum: float = 1e4, counts_layer: str = "counts"
) -> ad.AnnData:
    """Move raw counts of ``X`` to ``layers[counts_layer]``; set X = log1p(counts / total * target_sum).

    Works in place, keeps sparse X sparse (float32), and leaves cells with zero total at 0.
    """
    counts = adata.X
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts)
        totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X = counts.astype(np.float32, copy=True)
        X.data *= np.repeat(scale, np.diff(X.indptr)).astype(np.float32)
        np.log1p(X.data, out=X.data)
    else:
        counts = np.asarray(counts)
        totals = counts.sum(axis=1, dtype=np.float64)
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X = np.log1p(counts * scale[:, None]).astype(np.float32)
    adata.layers[counts_layer] = counts
    adata.X = X
    adata.uns["log1p"] = {"base": None}
    return adata
