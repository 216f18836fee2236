"""Training pseudobulk profiles and deltas, shared by the analytic and embedding baselines.

A *delta* is mean(training cells of (covariates, perturbation)) - mean(training controls of
those covariates). :func:`training_profiles` computes every training group's mean and every
covariate's control mean once (sparse group sums, no per-cell Python), and the deltas of
the perturbed groups whose covariates have training controls.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.metrics.aggregations import group_stats


def combo_key(components) -> str:
    """Order-independent identity of a perturbation (``A+B`` is ``B+A``)."""
    return "\x1f".join(sorted(components))


@dataclass(frozen=True)
class TrainingProfiles:
    """Pseudobulk means of the training groups and deltas of the perturbed ones.

    Attributes
    ----------
    covariates
        One row per covariate combination (covariate columns and ``label``).
    group_means
        (n_groups, n_genes) mean of every training group, controls included; ``groups``
        describes its rows (covariate columns, perturbation, ``covariate_code``,
        ``is_control``, ``n_cells``).
    control_means
        (n_covariates, n_genes) mean of each covariate combination's training controls
        (NaN rows where it has none).
    deltas
        (n_deltas, n_genes) delta of every perturbed group with training controls;
        ``delta_groups`` describes its rows (covariate columns, perturbation,
        ``covariate_code``, ``key``: the order-independent perturbation identity).
    """

    keys: PerturbationKeys
    covariates: pd.DataFrame
    groups: pd.DataFrame
    group_means: np.ndarray
    control_means: np.ndarray
    delta_groups: pd.DataFrame
    deltas: np.ndarray

    @property
    def n_genes(self) -> int:
        return int(self.group_means.shape[1])

    def covariate_codes_of(self, frame: pd.DataFrame) -> np.ndarray:
        """Covariate code of each row of ``frame`` (-1 where training never saw them)."""
        cov_keys = list(self.keys.covariate_keys)
        if not cov_keys:
            return np.zeros(len(frame), dtype=np.int64)
        known = pd.MultiIndex.from_frame(self.covariates[cov_keys].astype(str))
        wanted = pd.MultiIndex.from_frame(frame[cov_keys].astype(str))
        return known.get_indexer(wanted).astype(np.int64)

    def mean_delta_by_perturbation(self) -> tuple[list[str], np.ndarray]:
        """Each perturbation's delta averaged over its training covariates (equal weights).

        Returns the perturbation keys (:func:`combo_key`) and the (n, n_genes) means.
        """
        codes, uniques = pd.factorize(self.delta_groups["key"].to_numpy())
        sums = np.zeros((len(uniques), self.n_genes))
        np.add.at(sums, codes, self.deltas)
        counts = np.bincount(codes, minlength=len(uniques))[:, None]
        return [str(u) for u in uniques], sums / np.maximum(counts, 1)


def training_profiles(train: ad.AnnData, keys: PerturbationKeys) -> TrainingProfiles:
    """Group means, control means and deltas of the training cells ``train``."""
    grouping = group_cells(train.obs, keys)
    mean, _, counts = group_stats(train.X, grouping.group_codes, grouping.n_groups)
    groups = grouping.groups
    cov = groups["covariate_code"].to_numpy()
    is_ctrl = groups["is_control"].to_numpy()
    control_means = np.full((len(grouping.covariates), mean.shape[1]), np.nan)
    control_means[cov[is_ctrl]] = mean[is_ctrl]
    usable = ~is_ctrl & (counts > 0) & ~np.isnan(control_means[cov]).any(axis=1)
    cols = [*keys.covariate_keys, keys.perturbation_key, "covariate_code"]
    delta_groups = groups.loc[usable, cols].reset_index(drop=True)
    delta_groups["key"] = [
        combo_key(keys.components(str(label))) for label in delta_groups[keys.perturbation_key]
    ]
    return TrainingProfiles(
        keys=keys,
        covariates=grouping.covariates,
        groups=groups,
        group_means=mean,
        control_means=control_means,
        delta_groups=delta_groups,
        deltas=mean[usable] - control_means[cov[usable]],
    )
