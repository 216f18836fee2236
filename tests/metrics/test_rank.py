"""Rank metrics against a by-hand loop, exact ties, and the similarity-matrix distance."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.metrics import fit
from pertbench.metrics.rank import (
    distance_matrix,
    matrix_distance,
    rank_metrics,
    rank_scores,
    similarity_matrix,
)


def _rank_by_hand(D: np.ndarray) -> np.ndarray:
    n = D.shape[0]
    out = []
    for j in range(n):
        less = sum(D[i, j] < D[j, j] for i in range(n) if i != j)
        equal = sum(D[i, j] == D[j, j] for i in range(n) if i != j)
        out.append((less + 0.5 * equal) / n)
    return np.array(out)


def test_rank_scores_formula_with_ties():
    D = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [3.0, 0.5, 1.0]])
    expected = _rank_by_hand(D)
    np.testing.assert_array_equal(rank_scores(D), expected)
    # column 0: D[j,j]=0, others 1 and 3 -> 0; column 1: 2 > 1, 0.5 < 1 -> 1/3;
    # column 2: both others tie with 1 -> (0.5 + 0.5)/3
    np.testing.assert_allclose(expected, [0.0, 1 / 3, 1 / 3])
    assert np.isnan(rank_scores(np.zeros((1, 1)))).all()
    with pytest.raises(ValueError, match="square"):
        rank_scores(np.zeros((2, 3)))


@pytest.mark.parametrize("metric", fit.FIT_METRICS)
def test_distance_matrix_matches_pairwise_fit_metric(metric):
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(6, 30))
    pred = truth + rng.normal(scale=0.8, size=truth.shape)
    pred[3] = 1.0  # a constant prediction row
    D = distance_matrix(pred, truth, metric)
    sign = -1.0 if metric in fit.HIGHER_IS_BETTER else 1.0
    func = getattr(fit, metric)
    for i in range(6):
        for j in range(6):
            assert D[i, j] == pytest.approx(sign * func(pred[i], truth[j]), rel=1e-7, abs=1e-9)
    ranks = rank_metrics(pred, truth, [metric])[metric]
    np.testing.assert_array_equal(ranks, _rank_by_hand(D))


def test_perfect_and_collapsed_predictions():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(7, 25))
    perfect = rank_metrics(truth, truth)
    for name, values in perfect.items():
        assert (values == 0).all(), name
    collapsed = np.repeat(truth.mean(axis=0, keepdims=True), 7, axis=0)
    for name, values in rank_metrics(collapsed, truth).items():
        # every prediction is the same profile: exact ties, (N-1)/(2N) for every group
        np.testing.assert_array_equal(values, np.full(7, 6 / 14), err_msg=name)


def test_single_perturbation_has_no_rank():
    out = rank_metrics(np.ones((1, 5)), np.ones((1, 5)))
    assert all(np.isnan(v).all() for v in out.values())


def test_matrix_distance_by_hand():
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(3)
    p, t = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    expected = np.linalg.norm(cosine_similarity(p) - cosine_similarity(t))
    assert matrix_distance(p, t) == pytest.approx(expected, rel=1e-10)
    assert matrix_distance(t, t) == 0.0
    assert np.isnan(matrix_distance(p[:1], t[:1]))
    rows = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    expected_sim = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(similarity_matrix(rows), expected_sim, rtol=1e-15)


def test_column_blocks_and_shared_truth_operands_change_no_rank():
    """Blocked distances (bounded memory) give the ranks of the whole matrix; the truth's
    operands, prepared once and restricted to a subset, give the ranks of that subset.
    (Enough genes that no two distinct Spearman correlations tie exactly: blocks change the
    BLAS summation, which can only move a rank between distances equal to ~1e-15.)"""
    from pertbench.metrics.rank import ProfileOperands, rank_family

    rng = np.random.default_rng(4)
    truth = rng.normal(size=(40, 200))
    pred = truth + rng.normal(scale=1.0, size=truth.shape)
    pred[5] = pred[9]  # a repeated prediction row: exact ties
    truth[7] = 0.5  # a constant observed row (r2 and pearson conventions)
    kinds = fit.FIT_METRICS
    whole = rank_metrics(pred, truth, kinds)
    for block_elements in (40, 40 * 7, 40 * 39):  # 1 column per block, ragged blocks
        blocked = rank_family(pred, ProfileOperands(truth), kinds, block_elements=block_elements)
        for kind in kinds:
            np.testing.assert_array_equal(blocked[kind], whole[kind], err_msg=kind)
    for kind in kinds:  # against the definition on the full matrix
        np.testing.assert_array_equal(
            whole[kind], _rank_by_hand(distance_matrix(pred, truth, kind))
        )
    shared = ProfileOperands(truth)
    for key in ("sq", "unit", "centred", "ranks", "unit_ranks", "sst", "flat"):
        shared.get(key)  # prepared once for everything
    subset = np.array([0, 3, 7, 11, 20, 39])
    from_shared = rank_family(pred[subset], shared.take(subset), kinds)
    direct = rank_metrics(pred[subset], truth[subset], kinds)
    for kind in kinds:
        np.testing.assert_array_equal(from_shared[kind], direct[kind], err_msg=kind)


def test_matrix_distance_in_row_blocks_matches_the_whole_matrix():
    rng = np.random.default_rng(5)
    p, t = rng.normal(size=(30, 10)), rng.normal(size=(30, 10))
    p[4] = 0.0  # a zero profile (cosine convention)
    whole = matrix_distance(p, t)
    assert matrix_distance(p, t, block_elements=30 * 4) == pytest.approx(whole, rel=1e-12)
    assert matrix_distance(t, t, block_elements=30) == 0.0


def test_threads_for_the_l1_distances_change_no_rank():
    from pertbench.metrics.rank import ProfileOperands, rank_family

    rng = np.random.default_rng(6)
    truth = rng.gamma(2.0, 1.0, size=(300, 30))
    pred = truth + rng.normal(scale=0.7, size=truth.shape)
    one = rank_family(pred, ProfileOperands(truth), ["mae", "rmse"])
    three = rank_family(pred, ProfileOperands(truth), ["mae", "rmse"], n_jobs=3)
    for kind in ("mae", "rmse"):
        np.testing.assert_array_equal(one[kind], three[kind])
    np.testing.assert_array_equal(one["mae"], _rank_by_hand(distance_matrix(pred, truth, "mae")))


def test_repeated_rows_are_found_even_when_hashes_collide(monkeypatch):
    from pertbench.metrics import rank

    rng = np.random.default_rng(7)
    pred = rng.normal(size=(6, 4))
    pred[4] = pred[1]
    unique, codes, first = rank._dedupe(pred)
    assert codes.tolist() == [0, 1, 2, 3, 1, 4] and first.tolist() == [0, 1, 2, 3, 5]
    monkeypatch.setattr(rank, "hash", lambda _: 0, raising=False)  # every row collides
    u2, c2, f2 = rank._dedupe(pred)
    np.testing.assert_array_equal(u2, unique)
    assert c2.tolist() == codes.tolist() and f2.tolist() == first.tolist()
