"""Distribution metrics against by-hand loops, scipy's KDE and scikit-learn's PCA."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import gaussian_kde

from pertbench.metrics.distribution import (
    _kde_on_grid,
    _scott_cov,
    edistance,
    mean_var_kde,
    mmd,
    pca_basis,
    project,
    subsample,
)


def _d(a, b):
    return float(np.sqrt(((a - b) ** 2).sum()))


def test_edistance_by_hand_excludes_self_pairs():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(7, 3)), rng.normal(loc=1.0, size=(5, 3))
    between = np.mean([_d(x, y) for x in X for y in Y])
    within_x = np.mean([_d(X[i], X[j]) for i in range(7) for j in range(7) if i != j])
    within_y = np.mean([_d(Y[i], Y[j]) for i in range(5) for j in range(5) if i != j])
    assert edistance(X, Y) == pytest.approx(2 * between - within_x - within_y, rel=1e-12)
    assert edistance(X, Y) == pytest.approx(edistance(Y, X), rel=1e-12)
    # a lone cell: its within-set term is 0
    assert edistance(X[:1], Y) == pytest.approx(
        2 * np.mean([_d(X[0], y) for y in Y]) - within_y, rel=1e-12
    )
    with pytest.raises(ValueError):
        edistance(X[:0], Y)


def test_mmd_by_hand_with_median_heuristic():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(6, 2)), rng.normal(loc=0.5, size=(8, 2))
    pooled = np.vstack([X, Y])
    dists = [_d(pooled[i], pooled[j]) for i in range(14) for j in range(i + 1, 14)]
    s = np.median(dists)

    def k(a, b):
        return np.exp(-(_d(a, b) ** 2) / (2 * s**2))

    kxx = np.mean([k(X[i], X[j]) for i in range(6) for j in range(6) if i != j])
    kyy = np.mean([k(Y[i], Y[j]) for i in range(8) for j in range(8) if i != j])
    kxy = np.mean([k(x, y) for x in X for y in Y])
    assert mmd(X, Y) == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)
    # a lone cell: its within-set kernel mean is k(x, x) = 1
    lone = Y[:1]
    pooled1 = np.vstack([X, lone])
    s1 = np.median([_d(pooled1[i], pooled1[j]) for i in range(7) for j in range(i + 1, 7)])
    k1 = [np.exp(-(_d(x, lone[0]) ** 2) / (2 * s1**2)) for x in X]
    kxx1 = np.mean(
        [np.exp(-(_d(X[i], X[j]) ** 2) / (2 * s1**2)) for i in range(6) for j in range(6) if i != j]
    )
    assert mmd(X, lone) == pytest.approx(kxx1 + 1.0 - 2 * np.mean(k1), rel=1e-10)
    same = np.ones((4, 2))
    assert mmd(same, same) == 0.0  # every point coincides
    assert mmd(X, Y + 100) > mmd(X, Y)


def test_kde_on_grid_matches_scipy():
    rng = np.random.default_rng(2)
    pts = rng.multivariate_normal([0, 1], [[1.0, 0.6], [0.6, 2.0]], size=300)
    grid = rng.normal(size=(40, 2))
    ours = _kde_on_grid(pts, _scott_cov(pts), grid, chunk=64)
    theirs = gaussian_kde(pts.T)(grid.T)
    np.testing.assert_allclose(ours / ours.sum(), theirs / theirs.sum(), rtol=1e-10)


def test_mean_var_kde_values():
    rng = np.random.default_rng(3)
    pts = np.column_stack([rng.gamma(2.0, size=200), rng.gamma(1.0, size=200)])
    assert mean_var_kde(pts, pts) == 0.0
    far = pts + 1000.0
    assert mean_var_kde(pts, far) == pytest.approx(2.0, abs=1e-6)
    shifted = mean_var_kde(pts, pts + np.array([0.3, 0.0]))
    assert 0.0 < shifted < 2.0
    # zero-variance axis (single-cell groups): still a defined value in [0, 2]
    single_a = np.column_stack([rng.random(50), np.zeros(50)])
    single_b = np.column_stack([rng.random(50) + 0.2, np.zeros(50)])
    value = mean_var_kde(single_a, single_b)
    assert np.isfinite(value) and 0.0 < value < 2.0
    one_point = mean_var_kde(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert one_point == 0.0
    with pytest.raises(ValueError, match="n_genes, 2"):
        mean_var_kde(np.ones((3, 3)), np.ones((3, 2)))


@pytest.mark.parametrize("shape", [(200, 30), (20, 60)])
@pytest.mark.parametrize("sparse", [False, True])
def test_pca_basis_spans_sklearn_components(shape, sparse):
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(4)
    dense = rng.poisson(0.8, size=shape).astype(np.float64) + rng.normal(scale=0.01, size=shape)
    X = sp.csr_matrix(dense) if sparse else dense
    mean, comps = pca_basis(X, n_pcs=5)
    ref = PCA(n_components=5, svd_solver="full").fit(dense)
    # same subspace, component by component up to sign
    np.testing.assert_allclose(np.abs(np.sum(comps * ref.components_.T, axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(
        np.abs(project(X, mean, comps)), np.abs(ref.transform(dense)), rtol=1e-6, atol=1e-8
    )
    # deterministic (including signs)
    _, again = pca_basis(X, n_pcs=5)
    np.testing.assert_array_equal(comps, again)


def test_subsample_is_seeded_and_bounded():
    a = subsample(100, 10, np.random.default_rng(0))
    b = subsample(100, 10, np.random.default_rng(0))
    assert a.tolist() == b.tolist() and a.size == 10 and np.all(np.diff(a) > 0)
    assert subsample(5, 10, np.random.default_rng(0)).tolist() == [0, 1, 2, 3, 4]
