"""The collapse statistics: exact values on constructed predictions, and on cells."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pertbench.data.keys import PerturbationKeys
from pertbench.metrics import Evaluator
from pertbench.metrics.collapse import (
    SPREAD_THRESHOLD,
    collapse_from_cells,
    collapse_statistics,
    mean_pairwise_cosine,
    perturbation_spread,
    rank_chance,
)


@pytest.fixture
def means():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(6, 20))  # 2 covariates x 3 perturbations
    codes = np.array([0, 0, 0, 1, 1, 1])
    controls = rng.normal(size=(2, 20))
    return truth, codes, controls


def _covariate_mean(truth, codes):
    return np.vstack([truth[codes == c].mean(axis=0) for c in codes])


def test_spread_ratio_is_one_for_truth_zero_for_one_profile_and_scales(means):
    truth, codes, controls = means
    perfect = collapse_statistics(truth, truth, controls, codes)
    assert perfect["spread_ratio"] == pytest.approx(1.0) and not perfect["collapsed"]
    assert perfect["mean_pairwise_cosine"] == pytest.approx(perfect["true_mean_pairwise_cosine"])
    collapsed = collapse_statistics(_covariate_mean(truth, codes), truth, controls, codes)
    assert collapsed["spread_ratio"] == pytest.approx(0.0, abs=1e-12) and collapsed["collapsed"]
    assert collapsed["mean_pairwise_cosine"] == pytest.approx(1.0)
    # halving every prediction's distance from its covariate's mean prediction halves it
    centre = _covariate_mean(truth, codes)
    shrunk = collapse_statistics(centre + 0.5 * (truth - centre), truth, controls, codes)
    assert shrunk["spread_ratio"] == pytest.approx(0.5)
    shrunk = collapse_statistics(centre + 0.05 * (truth - centre), truth, controls, codes)
    assert shrunk["spread_ratio"] == pytest.approx(0.05) and shrunk["collapsed"]
    assert SPREAD_THRESHOLD == 0.15
    assert perfect["n_covariates"] == 2 and perfect["n_groups"] == 6
    assert perfect["rank_chance"] == pytest.approx(1 / 3)  # N = 3: (3 - 1) / 6


def test_spread_by_hand_and_pairwise_cosine_conventions():
    pred = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    truth = np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    centre = pred.mean(axis=0)
    assert perturbation_spread(pred, truth) == pytest.approx(
        (((pred - centre) ** 2).sum(), 8 / 3)  # truth: mean (2/3, 0)
    )
    cosine, pairs = mean_pairwise_cosine(pred)
    assert pairs == 3 and cosine == pytest.approx((0 + 2 / np.sqrt(2)) / 3)
    zeros = np.zeros((3, 2))
    assert mean_pairwise_cosine(zeros) == (1.0, 3)  # identical, though all zero
    assert mean_pairwise_cosine(np.array([[0.0, 0.0], [1.0, 0.0]]))[0] == 0.0
    assert np.isnan(mean_pairwise_cosine(pred[:1])[0])


def test_rank_chance_is_the_rank_of_tied_predictions():
    assert rank_chance(np.array([4, 4, 4, 4])) == pytest.approx(3 / 8)
    assert rank_chance(np.array([2, 2, 4, 4, 4, 4, 1])) == pytest.approx(
        (2 * 1 / 4 + 4 * 3 / 8) / 6
    )
    assert np.isnan(rank_chance(np.array([1])))


def _held_out_split(adata, keys):
    """Half of every covariate's perturbations (and a third of its controls) in test."""
    obs = adata.obs
    split = pd.Series("train", index=adata.obs_names, dtype=object)
    perts = sorted(p for p in obs[keys.perturbation_key].unique() if p != keys.control)
    split[obs[keys.perturbation_key].isin(perts[::2]).to_numpy()] = "test"
    controls = np.flatnonzero((obs[keys.perturbation_key] == keys.control).to_numpy())
    split.iloc[controls[::3]] = "test"
    return split


def _prediction_from(adata, rows, groups):
    """A prediction whose cells are ``adata[rows]`` labelled with ``groups``."""
    obs = groups.reset_index(drop=True).astype(str)
    obs.index = [f"p{i}" for i in range(len(obs))]
    return ad.AnnData(X=adata.X[rows], obs=obs, var=pd.DataFrame(index=adata.var_names))


def test_from_cells_flags_no_change_and_not_the_observed_cells(make_toy):
    keys = PerturbationKeys()
    adata = make_toy(n_perturbations=6, n_cells=20, n_controls=30, n_genes=30)
    split = _held_out_split(adata, keys)
    obs = adata.obs
    test = (split == "test").to_numpy() & (obs[keys.perturbation_key] != keys.control).to_numpy()
    cols = [*keys.covariate_keys, keys.perturbation_key]
    # "perfect": the held-out cells themselves
    perfect = collapse_from_cells(
        adata,
        _prediction_from(adata, np.flatnonzero(test), obs.loc[test, cols]),
        split,
        keys=keys,
    )
    assert perfect["spread_ratio"] == pytest.approx(1.0) and not perfect["collapsed"]
    # no_change: each group predicted by its covariate's test controls
    rows, labels = [], []
    for _, group in obs.loc[test, cols].drop_duplicates().iterrows():
        ctrl = np.flatnonzero(
            (split == "test").to_numpy()
            & (obs[keys.perturbation_key] == keys.control).to_numpy()
            & (obs["cell_type"] == group["cell_type"]).to_numpy()
        )
        rows.append(ctrl)
        labels.append(pd.DataFrame([group.to_dict()] * ctrl.size))
    no_change = _prediction_from(adata, np.concatenate(rows), pd.concat(labels))
    stats = collapse_from_cells(adata, no_change, split, keys=keys)
    assert stats["spread_ratio"] == pytest.approx(0.0, abs=1e-6) and stats["collapsed"]
    # its deltas are exactly zero (controls = the evaluator's controls): identical, cosine 1
    assert stats["mean_pairwise_cosine"] == pytest.approx(1.0)
    # the rank chance is what the evaluator's rank metric gives the collapsed prediction
    rank = Evaluator(
        adata, no_change, keys=keys, metrics=["rmse_rank_average"], split=split, on="test"
    ).run()
    assert stats["rank_chance"] == pytest.approx(rank.value("rmse_rank_average"))
    assert stats["n_groups"] == len(obs.loc[test, cols].drop_duplicates())
