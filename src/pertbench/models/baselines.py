"""The analytic reference baselines (no training loop), as ordinary models.

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
- ``additive_within`` (:class:`AdditiveWithin`): for a request in covariates c, control
  cell + the sum of its singles' deltas measured IN c. The cross-covariate
  ``perturbation_mean`` mixes cell-type heterogeneity into a combination's error; this one
  does not. A single without a training delta in c falls back to its cross-covariate mean
  delta, and the prediction says so (``fallbacks``, ``uns['pertbench']['notes']``).
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
from pertbench.models.pseudobulk import TrainingProfiles, combo_key, training_profiles

__all__ = ["AdditiveWithin", "CovariateMean", "NoChange", "PerturbationMean"]


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
        self.check_predictable(obs[self.keys.perturbation_key])
        n = counterfactual.n_obs
        X = self._input_matrix(counterfactual) if self.input_kind == "expression" else None
        return PredictionInputs(
            X=X,
            perturbations=sp.csr_matrix((n, 0), dtype=np.float32),
            covariate_codes=np.zeros((n, 0), dtype=np.int64),
            covariate_onehot=np.zeros((n, 0), dtype=np.float32),
            obs=obs.copy(),
        )

    @property
    def predicts_unseen_perturbations(self) -> bool:
        return True  # no_change and covariate_mean ignore the perturbation

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label this model can predict."""
        self._require_fitted()
        return np.ones(len(pd.Series(labels)), dtype=bool)


class NoChange(_AnalyticBaseline):
    """Predicts that the perturbation changes nothing: each control cell is returned as is."""

    name = "no_change"
    description = "Control cells unchanged (the covariates' control profile)."
    input_kind = "expression"

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        """Nothing to learn."""

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        return _dense(inputs.X)


class _DeltaBaseline(_AnalyticBaseline):
    """Control cell + training deltas: the shared part of the delta-summing baselines.

    Fitting keeps each single's delta averaged over the training covariates where it was
    observed (each covariate weighted equally); subclasses decide which delta a request
    gets. A perturbation whose singles lack a training delta cannot be predicted.
    """

    input_kind = "expression"

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.single_delta: np.ndarray | None = None  # (n_components, n_genes)
        self.has_delta: np.ndarray | None = None  # (n_components,) bool

    @property
    def predicts_unseen_perturbations(self) -> bool:
        return False

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        profiles = training_profiles(train, self.keys)
        labels, per_label = profiles.mean_delta_by_perturbation()
        index = {c: i for i, c in enumerate(self.encoding.perturbations)}
        self.single_delta = np.zeros((len(index), profiles.n_genes))
        self.has_delta = np.zeros(len(index), dtype=bool)
        singles = [(u, label) for u, label in enumerate(labels) if "\x1f" not in label]
        rows = np.asarray([index[label] for _, label in singles], dtype=np.int64)
        self.single_delta[rows] = per_label[[u for u, _ in singles]]
        self.has_delta[rows] = True
        self._fit_more(profiles, labels, per_label)

    def _fit_more(self, profiles: TrainingProfiles, labels: list[str], per_label) -> None:
        """Subclass hook: keep more of the training deltas."""

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label whose singles all have a training delta."""
        self._require_fitted()
        index = {c: i for i, c in enumerate(self.encoding.perturbations)}
        return np.asarray(
            [
                all(p in index and self.has_delta[index[p]] for p in self.keys.components(label))
                for label in pd.Series(labels).astype(str)
            ],
            dtype=bool,
        )

    def cannot_predict_message(self, labels: list[str]) -> str:
        return (
            f"{self.name} has no training delta for {', '.join(sorted(labels)[:5])}: "
            "each single must have training cells in a covariate with training controls"
        )

    def _cross_covariate_delta(self, parts: tuple[str, ...]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.encoding.perturbations)}
        return self.single_delta[[index[p] for p in parts]].sum(axis=0)

    def _request_deltas(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(codes per row, one delta per distinct request): subclasses choose the delta."""
        raise NotImplementedError

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        codes, deltas = self._request_deltas(inputs.obs)
        X = _dense(inputs.X).astype(np.float64)
        X += deltas[codes]
        return X

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            "single_delta": torch.from_numpy(self.single_delta),
            "has_delta": torch.from_numpy(self.has_delta),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.single_delta = state["single_delta"].cpu().numpy().astype(np.float64)
        self.has_delta = state["has_delta"].cpu().numpy().astype(bool)


class PerturbationMean(_DeltaBaseline):
    """Control cell + mean training delta of the perturbation (additive for combinations)."""

    name = "perturbation_mean"
    description = "Control + mean delta of the perturbation over training covariates; combinations add their singles."

    @dataclass
    class Params:
        additive_combinations: bool = True
        """Combinations are the sum of their singles' deltas; False: use a combination's
        own training delta when it was observed."""

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.combo_labels: list[str] = []
        self.combo_delta: np.ndarray | None = None  # (n_combos, n_genes)

    def _fit_more(self, profiles: TrainingProfiles, labels: list[str], per_label) -> None:
        combos = [u for u, label in enumerate(labels) if "\x1f" in label]
        self.combo_labels = [labels[u] for u in combos]
        self.combo_delta = (
            per_label[combos] if combos else np.zeros((0, profiles.n_genes), dtype=np.float64)
        )

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label this model can predict (all parts have a delta)."""
        labels = pd.Series(labels).astype(str)
        out = super().can_predict(labels)
        if not self.params.additive_combinations:
            own = set(self.combo_labels)
            out |= np.asarray([combo_key(self.keys.components(x)) in own for x in labels])
        return out

    def _request_deltas(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        labels = obs[self.keys.perturbation_key].astype(str).to_numpy()
        codes, uniques = pd.factorize(labels)
        own = {key: i for i, key in enumerate(self.combo_labels)}
        deltas = []
        for label in uniques:  # loops over distinct perturbations, not cells
            parts = self.keys.components(label)
            key = combo_key(parts)
            if len(parts) > 1 and not self.params.additive_combinations and key in own:
                deltas.append(self.combo_delta[own[key]])
            else:
                deltas.append(self._cross_covariate_delta(parts))
        return codes, np.vstack(deltas)

    def _extra_config(self) -> dict[str, Any]:
        return {"combo_labels": list(self.combo_labels)}

    def _state(self) -> dict[str, Any]:
        import torch

        return {**super()._state(), "combo_delta": torch.from_numpy(self.combo_delta)}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        super()._load_state(state, extra)
        self.combo_delta = state["combo_delta"].cpu().numpy().astype(np.float64)
        self.combo_labels = list(extra.get("combo_labels", []))


class AdditiveWithin(_DeltaBaseline):
    """Control cell + the sum of the singles' deltas measured in the SAME covariates.

    For a request in covariates c, each single uses its delta measured in c; only a single
    without a training delta in c falls back to its mean delta over the other training
    covariates (as ``perturbation_mean``), and every fallback is listed in
    :attr:`fallbacks` and in the prediction's ``uns['pertbench']['notes']``.
    """

    name = "additive_within"
    description = (
        "Control + sum of the singles' deltas measured in the same covariates "
        "(other covariates only for a single not measured there, noted)."
    )
    # fallbacks and notes describe a whole request, so a request is predicted in one piece
    chunked_prediction = False

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.within_pairs: list[list[str]] = []  # [*covariate values, single] per row
        self.within_delta: np.ndarray | None = None  # (n_pairs, n_genes)
        #: The fallbacks of the last prediction: covariates, perturbation, single.
        self.fallbacks = pd.DataFrame()

    def _fit_more(self, profiles: TrainingProfiles, labels: list[str], per_label) -> None:
        table = profiles.delta_groups
        # astype: an empty table (no training delta) has no string dtype to test
        single = ~table["key"].astype(str).str.contains("\x1f", regex=False).to_numpy()
        cols = [*self.keys.covariate_keys, self.keys.perturbation_key]
        self.within_pairs = table.loc[single, cols].astype(str).to_numpy().tolist()
        self.within_delta = profiles.deltas[single]

    def _request_deltas(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        cov_keys = list(self.keys.covariate_keys)
        pert = self.keys.perturbation_key
        requests = obs[[*cov_keys, pert]].astype(str)
        codes, uniques = pd.factorize(pd.MultiIndex.from_frame(requests))
        within = {tuple(row): i for i, row in enumerate(self.within_pairs)}
        deltas, fallbacks = [], []
        for request in uniques:  # loops over distinct (covariates, perturbation) requests
            covs, label = tuple(request[:-1]), request[-1]
            delta = np.zeros(self.within_delta.shape[1])
            for part in self.keys.components(label):
                row = within.get((*covs, part))
                if row is None:
                    fallbacks.append((*covs, label, part))
                    delta = delta + self._cross_covariate_delta((part,))
                else:
                    delta = delta + self.within_delta[row]
            deltas.append(delta)
        self.fallbacks = pd.DataFrame(fallbacks, columns=[*cov_keys, pert, "single"])
        if fallbacks:
            shown = ", ".join(
                f"{row[-1]} in {'/'.join(row[:-2]) or 'all'}" for row in fallbacks[:5]
            )
            self.prediction_notes.append(
                f"additive_within: {len(fallbacks)} single delta(s) not measured in the "
                f"requested covariates use their mean over the other training covariates "
                f"({shown}{' ...' if len(fallbacks) > 5 else ''})"
            )
        return codes, np.vstack(deltas) if deltas else np.zeros((0, self.within_delta.shape[1]))

    def _extra_config(self) -> dict[str, Any]:
        return {"within_pairs": self.within_pairs}

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            **super()._state(),
            "within_delta": torch.from_numpy(np.ascontiguousarray(self.within_delta)),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        super()._load_state(state, extra)
        self.within_delta = state["within_delta"].cpu().numpy().astype(np.float64)
        self.within_pairs = [list(map(str, row)) for row in extra.get("within_pairs", [])]


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
