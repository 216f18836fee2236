"""Vectorised grouping of cells by (covariates, perturbation).

A *group* is one (covariate values, perturbation) pair, the unit of splitting and of
evaluation. All grouping is done once with ``pandas.factorize``; per-group statistics are
sparse matrix products, never per-cell Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import DataValidationError

COVARIATE_LABEL_SEP = "/"


@dataclass(frozen=True)
class Grouping:
    """Integer codes for the covariate combination, perturbation and group of each cell.

    Attributes
    ----------
    keys
        The keys used to build the grouping.
    covariate_codes
        Per cell, index into ``covariates`` (0..n_covariates-1).
    covariates
        One row per covariate combination, columns = covariate keys, plus ``label``
        (values joined by ``/``) for display.
    perturbation_codes
        Per cell, index into ``perturbations``.
    perturbations
        Perturbation labels (the control included when present).
    is_control
        Per cell, True for control cells.
    group_codes
        Per cell, index into ``groups``.
    groups
        One row per (covariate combination, perturbation) present in the data: covariate
        columns, the perturbation column (named like ``keys.perturbation_key``),
        ``covariate_code``, ``perturbation_code``, ``is_control`` and ``n_cells``.
    """

    keys: PerturbationKeys
    covariate_codes: np.ndarray
    covariates: pd.DataFrame
    perturbation_codes: np.ndarray
    perturbations: pd.Index
    is_control: np.ndarray
    group_codes: np.ndarray
    groups: pd.DataFrame

    @property
    def n_cells(self) -> int:
        return int(self.group_codes.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def group_labels(self) -> pd.Series:
        """Readable label of each group: ``<covariate label>:<perturbation>``."""
        cov = self.covariates["label"].to_numpy()[self.groups["covariate_code"].to_numpy()]
        pert = self.groups[self.keys.perturbation_key].to_numpy()
        return pd.Series(
            [f"{c}:{p}" for c, p in zip(cov, pert, strict=True)], index=self.groups.index
        )

    def control_mask_for(self, covariate_code: int) -> np.ndarray:
        """Boolean mask of the control cells of one covariate combination."""
        return self.is_control & (self.covariate_codes == covariate_code)


def _covariate_frame(obs: pd.DataFrame, keys: PerturbationKeys) -> pd.DataFrame:
    if not keys.covariate_keys:
        # No covariates: all cells share one biological state.
        return pd.DataFrame(index=obs.index)
    return obs.loc[:, list(keys.covariate_keys)].astype(str)


def group_cells(obs: pd.DataFrame, keys: PerturbationKeys) -> Grouping:
    """Assign every cell to its covariate combination, perturbation and group.

    Parameters
    ----------
    obs
        Cell metadata (``adata.obs``).
    keys
        Which columns hold perturbation and covariates.

    Returns
    -------
    Grouping
        Codes and tables; groups are sorted by covariate combination then perturbation
        label, so the order is reproducible regardless of cell order.
    """
    missing = [k for k in (keys.perturbation_key, *keys.covariate_keys) if k not in obs.columns]
    if missing:
        raise DataValidationError(
            f"obs has no column {', '.join(repr(m) for m in missing)}; "
            f"available: {', '.join(map(str, obs.columns))}. Pass the right --perturbation-key/--covariates"
        )
    n = len(obs)
    cov_frame = _covariate_frame(obs, keys)
    if cov_frame.shape[1]:
        cov_tuples = pd.MultiIndex.from_frame(cov_frame)
        cov_codes_raw, cov_uniques = pd.factorize(cov_tuples, sort=True)
        covariates = cov_uniques.to_frame(index=False)
        covariates.columns = list(keys.covariate_keys)
        covariates["label"] = covariates[list(keys.covariate_keys)].agg(
            COVARIATE_LABEL_SEP.join, axis=1
        )
    else:
        cov_codes_raw = np.zeros(n, dtype=np.int64)
        covariates = pd.DataFrame({"label": ["all"]})

    perts = obs[keys.perturbation_key].astype(str).to_numpy()
    pert_codes, pert_uniques = pd.factorize(perts, sort=True)
    perturbations = pd.Index(pert_uniques, name=keys.perturbation_key)
    is_control = perts == keys.control

    n_perts = max(len(perturbations), 1)
    combined = cov_codes_raw.astype(np.int64) * n_perts + pert_codes.astype(np.int64)
    group_codes, group_uniques = pd.factorize(combined, sort=True)
    counts = np.bincount(group_codes, minlength=len(group_uniques))
    g_cov = (group_uniques // n_perts).astype(np.int64)
    g_pert = (group_uniques % n_perts).astype(np.int64)
    groups = covariates.iloc[g_cov].drop(columns="label").reset_index(drop=True)
    groups[keys.perturbation_key] = perturbations.to_numpy()[g_pert]
    groups["covariate_code"] = g_cov
    groups["perturbation_code"] = g_pert
    groups["is_control"] = groups[keys.perturbation_key].to_numpy() == keys.control
    groups["n_cells"] = counts
    return Grouping(
        keys=keys,
        covariate_codes=cov_codes_raw.astype(np.int64),
        covariates=covariates,
        perturbation_codes=pert_codes.astype(np.int64),
        perturbations=perturbations,
        is_control=is_control,
        group_codes=group_codes.astype(np.int64),
        groups=groups,
    )


def indicator_matrix(codes: np.ndarray, n_groups: int | None = None) -> sp.csr_matrix:
    """Sparse (n_groups x n_cells) 0/1 matrix with a one where cell j belongs to group i.

    Cells with a negative code belong to no group.
    """
    codes = np.asarray(codes, dtype=np.int64)
    if n_groups is None:
        n_groups = int(codes.max()) + 1 if codes.size else 0
    keep = codes >= 0
    cols = np.flatnonzero(keep)
    data = np.ones(cols.size, dtype=np.float64)
    return sp.csr_matrix((data, (codes[keep], cols)), shape=(n_groups, codes.shape[0]))


def group_mean(X, codes: np.ndarray, n_groups: int | None = None) -> np.ndarray:
    """Per-group mean of the rows of ``X`` (dense or sparse), as a dense float64 array.

    Groups with no cells get NaN rows (the caller decides what an empty group means).
    """
    ind = indicator_matrix(codes, n_groups)
    counts = np.asarray(ind.sum(axis=1)).ravel()
    sums = ind @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


def group_mean_var(
    X, codes: np.ndarray, n_groups: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean and population variance (ddof=0) of the rows of ``X``.

    Uses E[x^2] - E[x]^2 with float64 accumulation, clipped at 0 against round-off.
    """
    ind = indicator_matrix(codes, n_groups)
    counts = np.asarray(ind.sum(axis=1)).ravel()
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        sums = (ind @ X).toarray()
        sq = (ind @ X.multiply(X)).toarray()
    else:
        X = np.asarray(X, dtype=np.float64)
        sums = np.asarray(ind @ X)
        sq = np.asarray(ind @ (X * X))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts[:, None]
        var = np.maximum(sq / counts[:, None] - mean * mean, 0.0)
    return mean, var
