"""Fit metrics against numpy/scipy/scikit-learn, and their degenerate-input conventions."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from pertbench.metrics import fit


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(5, 40))
    pred = truth + rng.normal(scale=0.5, size=truth.shape)
    pred[2, :10] = pred[2, 0]  # ties for spearman
    return pred, truth


def test_each_metric_matches_an_independent_computation(vectors):
    pred, truth = vectors
    values = fit.fit_metrics(pred, truth)
    for i in range(pred.shape[0]):
        p, t = pred[i], truth[i]
        assert values["rmse"][i] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-12)
        assert values["mse"][i] == pytest.approx(np.mean((p - t) ** 2), rel=1e-12)
        assert values["mae"][i] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
        cos = p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
        assert values["cosine"][i] == pytest.approx(cos, rel=1e-12)
        assert values["pearson"][i] == pytest.approx(np.corrcoef(p, t)[0, 1], rel=1e-10)
        assert values["spearman"][i] == pytest.approx(stats.spearmanr(p, t)[0], rel=1e-10)
        # observed values are the truth: r2_score(y_true=t, y_pred=p)
        assert values["r2"][i] == pytest.approx(r2_score(t, p), rel=1e-10)


def test_r2_is_not_symmetric():
    t = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.0, 3.0, 3.0, 10.0])
    assert fit.r2(p, t) == pytest.approx(r2_score(t, p))
    assert fit.r2(p, t) != pytest.approx(fit.r2(t, p))


def test_one_dimensional_input_returns_floats():
    out = fit.pearson(np.array([1.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0]))
    assert isinstance(out, float)


def test_degenerate_inputs_have_defined_values_without_warnings():
    zero = np.zeros(6)
    flat = np.full(6, 2.5)
    ramp = np.arange(6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit.cosine(zero, zero) == 1.0
        assert fit.cosine(zero, ramp) == 0.0
        assert fit.cosine(ramp, zero) == 0.0
        assert fit.pearson(flat, flat) == 1.0
        assert fit.pearson(flat, flat + 1) == 1.0  # same (flat) shape
        assert fit.pearson(flat, ramp) == 0.0
        assert fit.pearson(ramp, flat) == 0.0
        assert fit.spearman(flat, ramp) == 0.0
        assert fit.spearman(flat, flat) == 1.0
        assert fit.r2(flat, flat) == 1.0  # exact prediction of a constant truth
        assert fit.r2(ramp, flat) == 0.0  # scikit-learn's force_finite convention
        assert fit.r2(flat, flat) == r2_score(flat, flat)
        assert fit.r2(ramp, flat) == r2_score(flat, ramp)
        assert fit.rmse(ramp, ramp) == 0.0
        stacked = fit.fit_metrics(np.vstack([zero, ramp]), np.vstack([ramp, ramp]))
        for name, value in stacked.items():
            assert np.isfinite(value).all(), name


def test_identical_vectors_are_perfect(vectors):
    _, truth = vectors
    values = fit.fit_metrics(truth, truth)
    for name in ("rmse", "mse", "mae"):
        assert (values[name] == 0).all()
    for name in ("cosine", "pearson", "spearman", "r2"):
        np.testing.assert_allclose(values[name], 1.0, rtol=1e-12)


def test_unknown_metric():
    with pytest.raises(ValueError, match="unknown fit metric"):
        fit.fit_metrics(np.ones((1, 2)), np.ones((1, 2)), ["nope"])


def test_rank_rows_matches_scipy():
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 5, size=(6, 30)).astype(float)  # many ties
    rows[2] = 1.0  # all tied
    np.testing.assert_array_equal(fit.rank_rows(rows), stats.rankdata(rows, axis=1))
    assert fit.rank_rows(np.zeros((2, 0))).shape == (2, 0)
