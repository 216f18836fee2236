"""The three analytic reference baselines (no training loop), as ordinary models.

They follow the :class:`~pertbench.models.base.PerturbationModel` API (fit on a split,
predict counterfactuals, save/load), so the benchmark runner and the evaluator's
calibration treat them like any model.

- ``no_change`` (:class:`NoChange`): every counterfactual row is the control cell itself.
  Its group mean is the covariates' control profile: "the perturbation does nothing".
- ``perturbation_mean`` (:class:`PerturbationMean`): control cell + the mean delta of the
  perturbation. A delta is mean(training cells of (covariates, perturbation)) -
  mean(training controls of those covariates); the perturbation's delta is the mean of
  its deltas over the training covariates where it was observed (each covariate
  weighted equally). A combination gets the SUM of its singles' deltas (the additive
  baseline); with ``additive_combinations=False`` a combination observed in training
  uses its own mean delta instead, falling back to the sum. Predicting a perturbation
  without a training delta is an error naming it (:meth:`PerturbationMean.can_predict`
  tells beforehand).
- ``covariate_mean`` (:class:`CovariateMean`): the mean of all training perturbed cells of
  the same covariates, whatever the perturbation (PerturBench's collapsed
  "Decoder (Cov)" reference). Covariates without training perturbed cells (e.g. the
  held-out cell type of the cell-type task) get the mean of all training perturbed cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import group_cells
from pertbench.errors import DataValidationError, ModelError
from pertbench.metrics.aggregations import group_stats
from pertbench.models.base import FitContext, PerturbationModel, PredictionInputs

__all__ = ["CovariateMean", "NoChange", "PerturbationMean"]


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


class _AnalyticBaseline(PerturbationModel):
    """Shared input handling: the baselines read perturbation labels from obs themselves.

    They do not use the learned category encoding at prediction time, so requests with
    perturbations or covariate values unseen in training are accepted wherever the
    baseline's definition still applies (see :meth:`can_predict`).

    They learn from group statistics of ``train.X`` only, so they can be fitted from a
    file on disk (:meth:`~pertbench.models.base.PerturbationModel.fit_from_reader`).
    """

    streams_training = True

    def prepare_inputs(self, counterfactual: ad.AnnData) -> PredictionInputs:
        self._require_fitted()
        obs = counterfactual.obs
        for key in (self.keys.perturbation_key, *self.keys.covariate_keys):
            if key not in obs.columns:
                raise DataValidationError(f"counterfactual obs has no column '{key}'")
        n = counterfactual.n_obs
        X = self._input_matrix(counterfactual) if self.input_kind == "expression" else None
        return PredictionInputs(
            X=X,
            perturbations=sp.csr_matrix((n, 0), dtype=np.float32),
            covariate_codes=np.zeros((n, 0), dtype=np.int64),
            covariate_onehot=np.zeros((n, 0), dtype=np.float32),
            obs=obs.copy(),
        )

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label this model can predict."""
        self._require_fitted()
        return np.ones(len(pd.Series(labels)), dtype=bool)


def _combo_key(components) -> str:
    """Order-independent identity of a combination (A+B is B+A)."""
    return "\x1f".join(sorted(components))


class NoChange(_AnalyticBaseline):
    """Predicts that the perturbation changes nothing: each control cell is returned as is."""

    name = "no_change"
    description = "Control cells unchanged (the covariates' control profile)."
    input_kind = "expression"

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        """Nothing to learn."""

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        return _dense(inputs.X)


class PerturbationMean(_AnalyticBaseline):
    """Control cell + mean training delta of the perturbation (additive for combinations)."""

    name = "perturbation_mean"
    description = "Control + mean delta of the perturbation over training covariates; combinations add their singles."
    input_kind = "expression"

    @dataclass
    class Params:
        additive_combinations: bool = True
        """Combinations are the sum of their singles' deltas; False: use a combination's
        own training delta when it was observed."""

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.single_delta: np.ndarray | None = None  # (n_components, n_genes)
        self.has_delta: np.ndarray | None = None  # (n_components,) bool
        self.combo_labels: list[str] = []
        self.combo_delta: np.ndarray | None = None  # (n_combos, n_genes)

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        keys = self.keys
        grouping = group_cells(train.obs, keys)
        mean, _, counts = group_stats(train.X, grouping.group_codes, grouping.n_groups)
        groups = grouping.groups
        cov = groups["covariate_code"].to_numpy()
        is_ctrl = groups["is_control"].to_numpy()
        ctrl_mean = np.full((len(grouping.covariates), mean.shape[1]), np.nan)
        ctrl_mean[cov[is_ctrl]] = mean[is_ctrl]
        usable = ~is_ctrl & (counts > 0) & ~np.isnan(ctrl_mean[cov]).any(axis=1)
        deltas = mean[usable] - ctrl_mean[cov[usable]]
        labels = groups.loc[usable, keys.perturbation_key].to_numpy()
        # mean over covariates of each perturbation's delta (covariates weighted equally)
        codes, uniques = pd.factorize(labels)
        n_u = len(uniques)
        sums = np.zeros((n_u, mean.shape[1]))
        np.add.at(sums, codes, deltas)
        per_label = sums / np.bincount(codes, minlength=n_u)[:, None]
        components = self.encoding.perturbations
        index = {c: i for i, c in enumerate(components)}
        self.single_delta = np.zeros((len(components), mean.shape[1]))
        self.has_delta = np.zeros(len(components), dtype=bool)
        combo_labels, combo_rows = [], []
        for u, label in enumerate(uniques):  # loops over perturbation labels, not cells
            parts = keys.components(label)
            if len(parts) == 1:
                self.single_delta[index[parts[0]]] = per_label[u]
                self.has_delta[index[parts[0]]] = True
            elif parts:
                combo_labels.append(_combo_key(parts))
                combo_rows.append(per_label[u])
        self.combo_labels = combo_labels
        self.combo_delta = np.vstack(combo_rows) if combo_rows else np.zeros((0, mean.shape[1]))

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label this model can predict (all parts have a delta)."""
        self._require_fitted()
        index = {c: i for i, c in enumerate(self.encoding.perturbations)}
        combos = set(self.combo_labels) if not self.params.additive_combinations else set()
        out = []
        for label in pd.Series(labels).astype(str):
            parts = self.keys.components(label)
            if len(parts) > 1 and _combo_key(parts) in combos:
                out.append(True)
                continue
            out.append(all(p in index and self.has_delta[index[p]] for p in parts))
        return np.asarray(out, dtype=bool)

    def _delta_for(self, label: str) -> np.ndarray | None:
        parts = self.keys.components(label)
        if not parts:
            return np.zeros(self.single_delta.shape[1])
        if len(parts) > 1 and not self.params.additive_combinations:
            key = _combo_key(parts)
            if key in self.combo_labels:
                return self.combo_delta[self.combo_labels.index(key)]
        index = {c: i for i, c in enumerate(self.encoding.perturbations)}
        rows = [index.get(p, -1) for p in parts]
        if any(r < 0 or not self.has_delta[r] for r in rows):
            return None
        return self.single_delta[rows].sum(axis=0)

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        labels = inputs.obs[self.keys.perturbation_key].astype(str).to_numpy()
        codes, uniques = pd.factorize(labels)
        deltas, missing = [], []
        for label in uniques:  # loops over distinct perturbations, not cells
            delta = self._delta_for(label)
            if delta is None:
                missing.append(label)
                delta = np.zeros(self.single_delta.shape[1])
            deltas.append(delta)
        if missing:
            raise ModelError(
                f"perturbation_mean has no training delta for {', '.join(missing[:5])}: "
                "each single must have training cells in a covariate with training controls"
            )
        X = _dense(inputs.X).astype(np.float64)
        X += np.vstack(deltas)[codes]
        return X

    def _extra_config(self) -> dict[str, Any]:
        return {"combo_labels": list(self.combo_labels)}

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            "single_delta": torch.from_numpy(self.single_delta),
            "has_delta": torch.from_numpy(self.has_delta),
            "combo_delta": torch.from_numpy(self.combo_delta),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.single_delta = state["single_delta"].cpu().numpy().astype(np.float64)
        self.has_delta = state["has_delta"].cpu().numpy().astype(bool)
        self.combo_delta = state["combo_delta"].cpu().numpy().astype(np.float64)
        self.combo_labels = list(extra.get("combo_labels", []))


class CovariateMean(_AnalyticBaseline):
    """Mean of all training perturbed cells of the covariates: one profile per covariate."""

    name = "covariate_mean"
    description = "Mean of the training perturbed cells of the covariates (collapsed reference)."
    input_kind = "none"

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.covariate_labels: list[list[str]] = []
        self.means: np.ndarray | None = None  # (n_covariate_combinations, n_genes)
        self.pooled_mean: np.ndarray | None = None  # (n_genes,)

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        grouping = group_cells(train.obs, self.keys)
        perturbed = ~grouping.is_control
        if not perturbed.any():
            raise ModelError("covariate_mean needs perturbed training cells; the split has none")
        codes = np.where(perturbed, grouping.covariate_codes, -1)
        n_cov = len(grouping.covariates)
        mean, _, counts = group_stats(train.X, codes, n_cov)
        keep = counts > 0
        cov_keys = list(self.keys.covariate_keys)
        table = grouping.covariates.loc[keep, cov_keys] if cov_keys else None
        self.covariate_labels = table.astype(str).to_numpy().tolist() if table is not None else [[]]
        self.means = mean[keep]
        pooled, _, _ = group_stats(train.X, np.where(perturbed, 0, -1), 1)
        self.pooled_mean = pooled[0]

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        cov_keys = list(self.keys.covariate_keys)
        n = inputs.n_cells
        if not cov_keys:
            return np.broadcast_to(self.means[0], (n, self.means.shape[1])).copy()
        known = pd.MultiIndex.from_tuples([tuple(row) for row in self.covariate_labels])
        wanted = pd.MultiIndex.from_frame(inputs.obs[cov_keys].astype(str))
        idx = known.get_indexer(wanted)
        table = np.vstack([self.means, self.pooled_mean[None, :]])
        return table[np.where(idx >= 0, idx, len(self.means))]

    def _extra_config(self) -> dict[str, Any]:
        return {"covariate_labels": self.covariate_labels}

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            "means": torch.from_numpy(np.ascontiguousarray(self.means)),
            "pooled_mean": torch.from_numpy(np.ascontiguousarray(self.pooled_mean)),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.means = state["means"].cpu().numpy().astype(np.float64)
        self.pooled_mean = state["pooled_mean"].cpu().numpy().astype(np.float64)
        self.covariate_labels = [list(map(str, row)) for row in extra["covariate_labels"]]
