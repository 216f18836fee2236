"""Group statistics and aggregations against numpy by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pertbench.metrics.aggregations import aggregate, group_stats, logfc


@pytest.mark.parametrize("sparse", [False, True])
def test_group_stats_match_numpy(sparse):
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, size=(90, 12)).astype(np.float32) * 0.7
    codes = rng.integers(-1, 4, size=90)
    X = sp.csr_matrix(dense) if sparse else dense
    mean, var, n = group_stats(X, codes, 5, chunk_elements=50)  # tiny chunks
    for g in range(4):
        rows = dense[codes == g].astype(np.float64)
        assert n[g] == rows.shape[0]
        np.testing.assert_allclose(mean[g], rows.mean(axis=0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var[g], rows.var(axis=0), rtol=1e-10, atol=1e-12)
    assert n[4] == 0 and np.isnan(mean[4]).all() and np.isnan(var[4]).all()


def test_identical_rows_have_exactly_zero_variance():
    row = np.array([0.1, 1 / 3, 7.123456, 0.0])
    X = np.repeat(row[None, :], 37, axis=0)
    mean, var, _ = group_stats(X, np.zeros(37, dtype=int), 1)
    assert (var == 0).all()
    assert (mean[0] == row).all()
    mean1, var1, n1 = group_stats(X[:1], np.zeros(1, dtype=int), 1)  # single cell
    assert n1[0] == 1 and (var1 == 0).all() and (mean1[0] == row).all()


def test_logfc_and_aggregate_by_hand():
    mean = np.array([[1.0, 0.0, -0.5]])
    var = np.array([[0.2, 0.0, 0.1]])
    ctrl = np.array([[0.5, 0.3, 0.0]])
    expected_lfc = np.log2(np.array([1.0, 0.0, 0.0]) + 0.1) - np.log2(
        np.array([0.5, 0.3, 0.0]) + 0.1
    )
    np.testing.assert_allclose(logfc(mean, ctrl), [expected_lfc])
    z = np.array([[2.0, 0.0, -1.0]])
    out = aggregate(
        mean, var, ctrl, aggregations=("average", "delta", "logfc", "var", "logp"), de_scores=z
    )
    np.testing.assert_array_equal(out["average"], mean)
    np.testing.assert_allclose(out["delta"], mean - ctrl)
    np.testing.assert_array_equal(out["var"], var)
    assert out["logp"][0, 0] > 0 and out["logp"][0, 1] == 0 and out["logp"][0, 2] < 0
    with pytest.raises(ValueError, match="logp"):
        aggregate(mean, var, ctrl, aggregations=("logp",))


def test_same_cells_give_identical_means_in_any_matrix():
    """A prediction made of control cells must have exactly the controls' mean."""
    rng = np.random.default_rng(5)
    ctrl = (rng.poisson(0.7, size=(333, 9)) * rng.random((333, 9))).astype(np.float32)
    other = rng.random((500, 9)).astype(np.float32)
    truth = sp.csr_matrix(np.vstack([other[:200], ctrl, other[200:]]))
    t_codes = np.r_[np.full(200, 1), np.zeros(333, int), np.full(300, -1)]
    pred = np.vstack([ctrl, ctrl, other[:50]])  # dense, two groups of the same cells
    p_codes = np.r_[np.zeros(333, int), np.ones(333, int), np.full(50, 2)]
    t_mean, _, _ = group_stats(truth, t_codes, 2, chunk_elements=9 * 100)
    p_mean, _, _ = group_stats(pred, p_codes, 3, chunk_elements=9 * 100)
    assert (p_mean[0] == t_mean[0]).all() and (p_mean[1] == t_mean[0]).all()
