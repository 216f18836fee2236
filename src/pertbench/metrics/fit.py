"""Fit metrics: predicted vs observed aggregate of one group, over genes.

All functions take ``pred`` and ``truth`` as 1-D vectors (one group) or 2-D arrays
(one row per group) and return one value per row, vectorised over rows.

Definitions (``p`` predicted, ``t`` observed):

- ``rmse`` = sqrt(mean((p - t)^2)), ``mse`` = mean((p - t)^2), ``mae`` = mean(|p - t|).
- ``cosine`` = p.t / (|p| |t|).
- ``pearson``: cosine of the mean-centred vectors; ``spearman``: pearson of the average
  ranks (ties get their mean rank).
- ``r2`` = 1 - sum((t - p)^2) / sum((t - mean(t))^2), with the OBSERVED values as truth.

Degenerate inputs get defined values, never NaN or a warning:

- cosine with a zero vector: 1 when both vectors are zero (identical), else 0 (no
  direction to agree with).
- pearson / spearman with a constant vector (max == min): 1 when both are constant
  (the same flat shape), else 0 (no linear association can be measured).
- r2 with a constant truth: 1 when the prediction is exact, else 0 (scikit-learn's
  ``force_finite`` convention).
"""

from __future__ import annotations

import numpy as np

FIT_METRICS = ("rmse", "mse", "mae", "cosine", "pearson", "spearman", "r2")
#: Metrics where a larger value is better (the others are errors: smaller is better).
HIGHER_IS_BETTER = frozenset({"cosine", "pearson", "spearman", "r2"})
#: The value of a perfect prediction.
BEST_VALUE = {m: (1.0 if m in HIGHER_IS_BETTER else 0.0) for m in FIT_METRICS}


def _rows(x) -> np.ndarray:
    return np.atleast_2d(np.asarray(x, dtype=np.float64))


def _out(values: np.ndarray, like) -> np.ndarray | float:
    return float(values[0]) if np.ndim(like) == 1 else values


def is_constant(rows: np.ndarray) -> np.ndarray:
    """True for rows whose values are all equal (exactly)."""
    rows = _rows(rows)
    if rows.shape[1] == 0:
        return np.ones(rows.shape[0], dtype=bool)
    return rows.max(axis=1) == rows.min(axis=1)


def unit_rows(rows: np.ndarray, *, center: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit norm (mean-centred first with ``center``).

    Returns the scaled rows and a mask of degenerate rows (zero, or constant when
    centring), which are returned as all-zero rows.
    """
    rows = _rows(rows)
    if center:
        degenerate = is_constant(rows)
        rows = rows - rows.mean(axis=1, keepdims=True)
    else:
        degenerate = ~np.any(rows != 0, axis=1)
    rows = np.where(degenerate[:, None], 0.0, rows)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    scaled = rows / np.where(degenerate, 1.0, norms)[:, None]
    return scaled, degenerate


def _similarity(pred, truth, *, center: bool) -> np.ndarray:
    p, p_deg = unit_rows(pred, center=center)
    t, t_deg = unit_rows(truth, center=center)
    sim = np.einsum("ij,ij->i", p, t)
    sim = np.where(p_deg | t_deg, np.where(p_deg & t_deg, 1.0, 0.0), sim)
    return np.clip(sim, -1.0, 1.0)


def rmse(pred, truth):
    """Root mean squared error over genes."""
    return _out(np.sqrt(_mse(_rows(pred), _rows(truth))), pred)


def _mse(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    d = p - t
    return np.einsum("ij,ij->i", d, d) / max(p.shape[1], 1)


def mse(pred, truth):
    """Mean squared error over genes."""
    return _out(_mse(_rows(pred), _rows(truth)), pred)


def mae(pred, truth):
    """Mean absolute error over genes."""
    p, t = _rows(pred), _rows(truth)
    return _out(np.abs(p - t).mean(axis=1), pred)


def cosine(pred, truth):
    """Cosine similarity (zero vectors: see module docstring)."""
    return _out(_similarity(pred, truth, center=False), pred)


def pearson(pred, truth):
    """Pearson correlation (constant vectors: see module docstring)."""
    return _out(_similarity(pred, truth, center=True), pred)


def rank_rows(rows: np.ndarray) -> np.ndarray:
    """Average ranks (1..n) within each row (ties get the mean of their ranks).

    Same values as ``scipy.stats.rankdata(rows, axis=1)``, vectorised over all rows.
    """
    rows = _rows(rows)
    n_rows, n = rows.shape
    if n == 0:
        return rows.copy()
    order = np.argsort(rows, axis=1)
    ordered = np.take_along_axis(rows, order, axis=1)
    new = np.ones(rows.shape, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_new = new.ravel()
    starts = np.flatnonzero(flat_new)  # tie blocks never cross rows (new[:, 0] is True)
    lengths = np.diff(np.append(starts, flat_new.size))
    block_rank = (starts % n) + (lengths + 1) / 2.0
    ranks_sorted = np.repeat(block_rank, lengths).reshape(n_rows, n)
    out = np.empty(rows.shape)
    np.put_along_axis(out, order, ranks_sorted, axis=1)
    return out


def spearman(pred, truth, *, pred_ranks=None, truth_ranks=None):
    """Spearman correlation: Pearson of the average ranks (ranks may be given)."""
    p = rank_rows(pred) if pred_ranks is None else pred_ranks
    t = rank_rows(truth) if truth_ranks is None else truth_ranks
    return _out(_similarity(p, t, center=True), pred)


def r2(pred, truth):
    """Coefficient of determination with the observed values as truth."""
    p, t = _rows(pred), _rows(truth)
    sse = np.einsum("ij,ij->i", t - p, t - p)
    centred = t - t.mean(axis=1, keepdims=True)
    sst = np.einsum("ij,ij->i", centred, centred)
    flat = is_constant(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = 1.0 - sse / np.where(flat, 1.0, sst)
    value = np.where(flat, np.where(sse == 0, 1.0, 0.0), value)
    return _out(value, pred)


_FUNCTIONS = {
    "rmse": rmse,
    "mse": mse,
    "mae": mae,
    "cosine": cosine,
    "pearson": pearson,
    "spearman": spearman,
    "r2": r2,
}


def fit_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    metrics=FIT_METRICS,
    *,
    pred_ranks: np.ndarray | None = None,
    truth_ranks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Compute several fit metrics row by row.

    Parameters
    ----------
    pred, truth
        (n_groups, n_genes) aggregates (or 1-D vectors for one group).
    metrics
        Names among :data:`FIT_METRICS`.
    pred_ranks, truth_ranks
        Row ranks (:func:`rank_rows`) when already computed, for ``spearman``.

    Returns
    -------
    dict
        metric name -> (n_groups,) values (floats for 1-D input).
    """
    unknown = [m for m in metrics if m not in _FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown fit metric(s) {', '.join(unknown)}")
    out = {}
    for m in metrics:
        if m == "spearman":
            out[m] = spearman(pred, truth, pred_ranks=pred_ranks, truth_ranks=truth_ranks)
        else:
            out[m] = _FUNCTIONS[m](pred, truth)
    return out


class ProfilePair:
    """Predicted and observed profiles of one aggregation (one row per group, same order).

    Row ranks (for spearman) are computed at most once and shared by every metric that
    reads them (fit and rank metrics alike); pass them when already known.
    """

    def __init__(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        *,
        pred_ranks: np.ndarray | None = None,
        truth_ranks: np.ndarray | None = None,
    ) -> None:
        self.pred = pred
        self.truth = truth
        self._pred_ranks = pred_ranks
        self._truth_ranks = truth_ranks

    @property
    def pred_ranks(self) -> np.ndarray:
        if self._pred_ranks is None:
            self._pred_ranks = rank_rows(self.pred)
        return self._pred_ranks

    @property
    def truth_ranks(self) -> np.ndarray:
        if self._truth_ranks is None:
            self._truth_ranks = rank_rows(self.truth)
        return self._truth_ranks


def pair_metric(metric: str, pair: ProfilePair) -> np.ndarray:
    """One fit metric of every row of a :class:`ProfilePair` (the registry's compute)."""
    if metric == "spearman":
        return spearman(
            pair.pred, pair.truth, pred_ranks=pair.pred_ranks, truth_ranks=pair.truth_ranks
        )
    return _FUNCTIONS[metric](pair.pred, pair.truth)
