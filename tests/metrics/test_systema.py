"""Systema's reference-aware metrics against direct numpy computations."""

import numpy as np
import pandas as pd
import pytest

from pertbench.metrics.fit import pearson
from pertbench.metrics.systema import (
    centroid_accuracy,
    centroid_deltas,
    perturbation_centroid,
    systematic_variation,
)
from split_helpers import toy_with_held_out


@pytest.fixture
def profiles():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(6, 40))
    pred = truth + rng.normal(scale=0.8, size=truth.shape)
    control = rng.normal(size=40)
    return pred, truth, control


def test_centroid_is_the_unweighted_mean_of_perturbations(profiles):
    _, truth, _ = profiles
    np.testing.assert_allclose(perturbation_centroid(truth), truth.sum(0) / 6)
    w = np.arange(1, 7, dtype=float)
    np.testing.assert_allclose(
        perturbation_centroid(truth, weights=w), (truth * w[:, None]).sum(0) / w.sum()
    )
    with pytest.raises(ValueError, match="weights"):
        perturbation_centroid(truth, weights=np.zeros(6))


def test_pearson_delta_centroid_matches_numpy(profiles):
    pred, truth, _ = profiles
    r = truth.mean(0)
    p, t = centroid_deltas(pred, truth, r)
    expected = [np.corrcoef(pred[i] - r, truth[i] - r)[0, 1] for i in range(6)]
    np.testing.assert_allclose(pearson(p, t), expected, rtol=1e-12)


def test_centroid_accuracy_matches_a_direct_count(profiles):
    pred, truth, _ = profiles
    n = len(truth)
    expected = []
    for i in range(n):
        d = np.linalg.norm(pred[i][None, :] - truth, axis=1)
        expected.append(np.mean([d[q] > d[i] for q in range(n) if q != i]))
    np.testing.assert_allclose(centroid_accuracy(pred, truth), expected)
    # perfect predictions are closer to their own truth than to any other
    np.testing.assert_array_equal(centroid_accuracy(truth, truth), np.ones(n))


def test_centroid_accuracy_of_a_collapsed_prediction_is_chance(profiles):
    _, truth, _ = profiles
    collapsed = np.repeat(truth.mean(0, keepdims=True), len(truth), axis=0)
    acc = centroid_accuracy(collapsed, truth)
    # one shared prediction ranks the truths identically for every perturbation: the
    # accuracies are (n-1-k)/(n-1) for k = 0..n-1, whose mean is exactly one half
    assert acc.mean() == pytest.approx(0.5)
    same = np.repeat(truth[:1], 3, axis=0)
    np.testing.assert_array_equal(centroid_accuracy(same, same), [0.5, 0.5, 0.5])
    assert np.isnan(centroid_accuracy(truth[:1], truth[:1])).all()


def test_systematic_variation_matches_numpy(profiles):
    _, truth, control = profiles
    r = truth.mean(0)
    expected = [
        (t - control) @ (r - control) / np.linalg.norm(t - control) / np.linalg.norm(r - control)
        for t in truth
    ]
    np.testing.assert_allclose(systematic_variation(truth, control), expected, rtol=1e-12)


def test_systematic_variation_near_one_when_effects_share_one_shift():
    rng = np.random.default_rng(0)
    control = rng.normal(size=200)
    shift = rng.normal(size=200) * 2.0
    truth = control + shift + rng.normal(scale=0.1, size=(8, 200))
    assert systematic_variation(truth, control).min() > 0.99
    # independent effects, no shared shift: cosines ~ 1/sqrt(n) on average
    independent = control + rng.normal(size=(8, 200))
    assert systematic_variation(independent, control).mean() < 0.5
    # an effect of exactly zero has no direction
    assert np.isnan(systematic_variation(np.vstack([control, truth]), control)[0])


def test_pooled_means_weight_splits_by_cells_and_drop_controls():
    from pertbench.metrics.systema import pooled_perturbation_means

    means = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [9.0, 9.0], [0.0, 0.0]])
    labels = ["A", "A", "B", "control", "C"]
    n = [1, 3, 2, 10, 0]  # A in two splits (1 and 3 cells); C has no cells
    names, avg = pooled_perturbation_means(
        labels, means, n, is_control=[False, False, False, True, False]
    )
    assert names.tolist() == ["A", "B"]
    np.testing.assert_allclose(avg, [[2.5, 1.5], [5.0, 5.0]])


# ---------------------------------------------------------------------------------------
# In the evaluator
# ---------------------------------------------------------------------------------------
def _means(adata, mask):
    X = adata.X[np.asarray(mask)]
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return X.astype(np.float64).mean(axis=0)


def test_evaluator_centroid_uses_every_perturbation_of_the_covariate(make_toy):
    from pertbench.metrics import Evaluator

    truth, split, held = toy_with_held_out(make_toy, n_perturbations=5, n_genes=30)
    obs = truth.obs
    pred = truth[held].copy()
    rng = np.random.default_rng(1)
    dense = pred.X.toarray()
    pred.X = np.maximum(dense + rng.normal(scale=0.3, size=dense.shape), 0).astype(np.float32)
    res = Evaluator(
        truth, pred, split=split, metrics="reference", baselines=True, n_bootstrap=50
    ).run()
    table = res.per_group.set_index(["model", "condition"])
    in_c1 = (obs["cell_type"] == "C1").to_numpy()
    perts = ["P0", "P1", "P2", "P3", "P4"]  # P3, P4 are training groups: still in r
    r = np.mean([_means(truth, in_c1 & (obs["condition"] == p).to_numpy()) for p in perts], axis=0)
    ctrl = _means(truth, in_c1 & (obs["condition"] == "control").to_numpy())
    tested = ["P0", "P1", "P2"]
    t = np.array([_means(truth, in_c1 & (obs["condition"] == p).to_numpy()) for p in tested])
    p_ = np.array([_means(pred, (pred.obs["condition"] == q).to_numpy()) for q in tested])
    for i, q in enumerate(tested):
        row = table.loc[("model", q)]
        assert row["pearson_delta_centroid"] == pytest.approx(
            np.corrcoef(p_[i] - r, t[i] - r)[0, 1], rel=1e-5
        )
        cos = (t[i] - ctrl) @ (r - ctrl) / np.linalg.norm(t[i] - ctrl) / np.linalg.norm(r - ctrl)
        assert row["systematic_variation"] == pytest.approx(cos, rel=1e-5)
        d = np.linalg.norm(p_[i][None, :] - t, axis=1)
        assert row["centroid_accuracy"] == pytest.approx(np.mean(np.delete(d, i) > d[i]))
    # the diagnostic is the same for every source and never normalised
    sv = res.per_group.groupby("model")["systematic_variation"].mean()
    assert np.allclose(sv.to_numpy(), sv.iloc[0])
    cal = res.calibration.set_index("metric")
    assert np.isnan(cal.loc["systematic_variation", "normalized_best"])
    assert pd.isna(cal.loc["systematic_variation", "beats_baselines"])
    # single perturbations only: additive_within is not one of "every baseline"
    assert "additive_within" not in res.settings["baselines"]
    assert cal.loc["centroid_accuracy", "best_baseline"] in res.settings["baselines"]
