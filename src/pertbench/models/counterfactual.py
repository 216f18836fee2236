"""Counterfactual requests: which control cell each predicted cell perturbs, and into what.

A prediction request has one row per (requested group, control cell): the control cell's
expression, the group's covariates and the requested perturbation. :func:`counterfactual_plan`
decides the rows from cell metadata alone (a :class:`CounterfactualPlan`);
:meth:`CounterfactualPlan.cells` then builds the request's AnnData for all rows or for a
range of them, from an in-memory AnnData or from a file read by rows
(:class:`pertbench.data.ondisk.OnDiskData`), so that predictions can be made and written
chunk by chunk. :func:`build_counterfactuals` does both at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.ondisk import OnDiskData
from pertbench.errors import ConfigError, DataValidationError, EvaluationError

CONTROL_OBS_COLUMN = "control_obs_name"


def heldout_groups(
    adata: Any, split: pd.Series, keys: PerturbationKeys, *, on: str = "test"
) -> pd.DataFrame:
    """The (covariates, perturbation) groups with cells in ``split == on``, controls excluded.

    ``adata`` may be any object with ``obs`` (an AnnData, or an on-disk dataset).
    """
    mask = (split.to_numpy() == on) & (
        adata.obs[keys.perturbation_key].astype(str).to_numpy() != keys.control
    )
    sub = adata.obs.loc[mask, [*keys.covariate_keys, keys.perturbation_key]].astype(str)
    return (
        sub.drop_duplicates()
        .sort_values([*keys.covariate_keys, keys.perturbation_key])
        .reset_index(drop=True)
    )


@dataclass
class CounterfactualPlan:
    """The rows of a counterfactual request, decided from cell metadata.

    Attributes
    ----------
    requests
        One row per requested group (covariate columns, perturbation, optional dose).
    control_rows
        For each request row, the row of the data holding its control cell.
    request_rows
        For each request row, its group (row of ``requests``).
    keys
        The obs keys.
    """

    requests: pd.DataFrame
    control_rows: np.ndarray
    request_rows: np.ndarray
    keys: PerturbationKeys

    @property
    def n_cells(self) -> int:
        return int(self.control_rows.size)

    def obs(self, obs_names: pd.Index, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """The request's obs for rows ``start:stop`` (index ``cf<row>``).

        ``obs_names`` are the data's cell names (the controls' names are copied into
        ``control_obs_name``).
        """
        stop = self.n_cells if stop is None else int(stop)
        req = self.request_rows[start:stop]
        obs = self.requests.iloc[req].reset_index(drop=True).astype(str)
        obs[CONTROL_OBS_COLUMN] = np.asarray(obs_names)[self.control_rows[start:stop]].astype(str)
        dose_key = self.keys.dose_key
        if dose_key and dose_key in self.requests.columns:
            obs[dose_key] = self.requests[dose_key].to_numpy()[req]
        obs.index = pd.Index([f"cf{i}" for i in range(start, stop)])
        return obs

    def cells(self, data: ad.AnnData | OnDiskData, start: int = 0, stop: int | None = None):
        """The request rows ``start:stop`` as an AnnData: the controls' expression and
        ``obsm``, obs from :meth:`obs`.

        ``data`` is an in-memory AnnData or an :class:`OnDiskData` (then only the needed
        control rows are read from disk).
        """
        stop = self.n_cells if stop is None else int(stop)
        rows = self.control_rows[start:stop]
        obs = self.obs(data.obs_names, start, stop)
        if isinstance(data, OnDiskData):
            unique, inverse = np.unique(rows, return_inverse=True)
            out = ad.AnnData(X=data.X.take(unique)[inverse], obs=obs, var=data.var[[]].copy())
            for key in data.obsm_names:
                out.obsm[key] = data.obsm(key).take(unique)[inverse]
            return out
        out = ad.AnnData(X=data.X[rows], obs=obs, var=data.var[[]].copy())
        for key, value in data.obsm.items():
            out.obsm[key] = value[rows]
        return out


def counterfactual_plan(
    obs: pd.DataFrame,
    requests: pd.DataFrame,
    keys: PerturbationKeys,
    *,
    control_split: pd.Series | None = None,
    prefer_split: str | None = None,
    max_controls: int | None = None,
    seed: int = 0,
) -> CounterfactualPlan:
    """Pair each requested group with the control cells of its covariates; reads only ``obs``.

    ``control_split`` and ``prefer_split``: when given, controls in ``control_split ==
    prefer_split`` are used if the covariates have any there, otherwise all of the
    covariates' controls. ``max_controls``: subsample at most this many controls per group
    (seeded by ``seed``).
    """
    missing = [
        c for c in (*keys.covariate_keys, keys.perturbation_key) if c not in requests.columns
    ]
    if missing:
        raise ConfigError(f"counterfactual requests lack column(s) {', '.join(missing)}")
    grouping = group_cells(obs, keys)
    control_cells = grouping.is_control.copy()
    preferred = (
        control_cells & (control_split.to_numpy() == prefer_split)
        if control_split is not None and prefer_split
        else None
    )
    cov_table = grouping.covariates
    if keys.covariate_keys:
        lookup = pd.MultiIndex.from_frame(cov_table[list(keys.covariate_keys)])
        req_codes = lookup.get_indexer(
            pd.MultiIndex.from_frame(requests[list(keys.covariate_keys)].astype(str))
        )
    else:
        req_codes = np.zeros(len(requests), dtype=np.int64)
    rng = np.random.default_rng(seed)
    rows, request_rows = [], []
    # Loop over requested groups (not cells); each group's controls are found by mask.
    order = np.argsort(grouping.covariate_codes, kind="stable")
    sorted_codes = grouping.covariate_codes[order]
    for r, code in enumerate(req_codes):
        if code < 0:
            label = "/".join(requests.iloc[r][list(keys.covariate_keys)].astype(str))
            raise EvaluationError(
                f"no cells with covariates '{label}' in the data; cannot build controls"
            )
        lo, hi = np.searchsorted(sorted_codes, [code, code + 1])
        cells = order[lo:hi]
        chosen = cells[preferred[cells]] if preferred is not None else np.empty(0, dtype=np.int64)
        if chosen.size == 0:
            chosen = cells[control_cells[cells]]
        if chosen.size == 0:
            label = cov_table.loc[code, "label"]
            raise DataValidationError(f"covariates '{label}' have no control cells to perturb")
        if max_controls is not None and chosen.size > max_controls:
            chosen = np.sort(rng.choice(chosen, size=max_controls, replace=False))
        rows.append(chosen)
        request_rows.append(np.full(chosen.size, r))
    return CounterfactualPlan(
        requests=requests,
        control_rows=np.concatenate(rows).astype(np.int64),
        request_rows=np.concatenate(request_rows).astype(np.int64),
        keys=keys,
    )


def build_counterfactuals(
    adata: ad.AnnData, requests: pd.DataFrame, keys: PerturbationKeys, **options: Any
) -> ad.AnnData:
    """Pair each requested (covariates, perturbation) with the control cells of those covariates.

    Parameters
    ----------
    adata
        Data holding the control cells (in memory, or an
        :class:`~pertbench.data.ondisk.OnDiskData`).
    requests
        One row per prediction group: the covariate columns and the perturbation column.
    **options
        Of :func:`counterfactual_plan`: ``control_split``, ``prefer_split`` (when given,
        controls in ``control_split == prefer_split`` are used if the covariates have any
        there; otherwise all of the covariates' controls), ``max_controls`` (subsample at
        most this many controls per group) and its ``seed``.

    Returns
    -------
    AnnData
        One row per (request, control cell): the control's expression and obsm, obs with the
        covariates, the requested perturbation and ``control_obs_name``.
    """
    return counterfactual_plan(adata.obs, requests, keys, **options).cells(adata)
