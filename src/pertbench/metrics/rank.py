"""Rank metrics (PerturBench, made deterministic) and the similarity-matrix distance.

Within one covariate combination with N perturbations, ``D[i, j]`` is the distance
between the prediction for perturbation i and the observation of perturbation j (the
negative similarity for cosine / pearson / spearman / r2). For each observed
perturbation j::

    rank_j = (#{i != j : D[i, j] < D[j, j]} + 0.5 * #{i != j : D[i, j] == D[j, j]}) / N

0 is perfect; a model predicting the same profile for every perturbation scores exactly
(N - 1) / (2N). Identical prediction rows are computed once and share one distance row,
so such ties are exact rather than at the mercy of floating-point round-off.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist

from pertbench.metrics.fit import FIT_METRICS, is_constant, rank_rows, unit_rows


def rank_scores(D: np.ndarray) -> np.ndarray:
    """Rank of every observed perturbation (column) among all predictions (rows).

    Parameters
    ----------
    D
        (N, N) matrix, ``D[i, j]`` = distance(prediction i, observation j); smaller is
        closer.

    Returns
    -------
    numpy.ndarray
        (N,) ranks in [0, (N-1)/N]; ties count half. All NaN when N < 2 (a rank needs
        at least one other perturbation to compare with).
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"rank_scores needs a square matrix, got shape {D.shape}")
    n = D.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    diag = np.diag(D)[None, :]
    less = (D < diag).sum(axis=0)
    equal = (D == diag).sum(axis=0) - 1  # minus the diagonal itself
    return (less + 0.5 * equal) / n


def _dedupe(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique rows (in order of first appearance), the index of each row among them and
    the position of each unique row's first appearance."""
    import pandas as pd

    rows = np.ascontiguousarray(rows)
    codes, _ = pd.factorize(np.array([r.tobytes() for r in rows], dtype=object))
    _, first = np.unique(codes, return_index=True)
    return rows[first], codes, first


def single_threaded_blas():
    """Context that limits BLAS to one thread (small products; avoids oversubscription)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _similarity_matrix(P: np.ndarray, T: np.ndarray, *, center: bool) -> np.ndarray:
    """Pairwise cosine (or, centred, pearson) similarity with the degenerate conventions."""
    p, p_deg = unit_rows(P, center=center)
    t, t_deg = unit_rows(T, center=center)
    S = np.clip(p @ t.T, -1.0, 1.0)
    S[p_deg, :] = 0.0
    S[:, t_deg] = 0.0
    S[np.ix_(p_deg, t_deg)] = 1.0
    return S


def _sse_matrix(P: np.ndarray, T: np.ndarray) -> np.ndarray:
    sq_p = np.einsum("ij,ij->i", P, P)[:, None]
    sq_t = np.einsum("ij,ij->i", T, T)[None, :]
    return np.maximum(sq_p + sq_t - 2.0 * (P @ T.T), 0.0)


def _distances(U: np.ndarray, T: np.ndarray, metric: str, cache: dict) -> np.ndarray:
    """Distance matrix between unique prediction rows ``U`` and observed rows ``T``."""
    n_genes = max(U.shape[1], 1)
    if metric in ("rmse", "mse", "r2"):
        if "sse" not in cache:
            cache["sse"] = _sse_matrix(U, T)
        sse = cache["sse"]
        if metric == "mse":
            return sse / n_genes
        if metric == "rmse":
            return np.sqrt(sse / n_genes)
        centred = T - T.mean(axis=1, keepdims=True)
        sst = np.einsum("ij,ij->i", centred, centred)
        flat = is_constant(T)
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = 1.0 - sse / np.where(flat, 1.0, sst)[None, :]
        if flat.any():  # constant truth: r2 = 1 for an exact prediction, else 0
            exact = (U[:, None, :] == T[None, flat, :]).all(axis=2)
            r2[:, flat] = np.where(exact, 1.0, 0.0)
        return -r2
    if metric == "mae":
        return cdist(U, T, metric="cityblock") / n_genes
    if metric == "cosine":
        return -_similarity_matrix(U, T, center=False)
    if metric == "pearson":
        return -_similarity_matrix(U, T, center=True)
    if metric == "spearman":
        u_ranks = cache["u_ranks"] if "u_ranks" in cache else rank_rows(U)
        t_ranks = cache["t_ranks"] if "t_ranks" in cache else rank_rows(T)
        return -_similarity_matrix(u_ranks, t_ranks, center=True)
    raise ValueError(f"unknown metric '{metric}' for a distance matrix; use one of {FIT_METRICS}")


def distance_matrix(pred: np.ndarray, truth: np.ndarray, metric: str) -> np.ndarray:
    """``D[i, j]`` = distance between prediction row i and observed row j for a fit metric.

    For error metrics (rmse, mse, mae) the metric itself; for similarities (cosine,
    pearson, spearman, r2) its negative, so smaller is always closer.
    """
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    T = np.atleast_2d(np.asarray(truth, dtype=np.float64))
    U, inverse, _ = _dedupe(P)
    with single_threaded_blas():
        return _distances(U, T, metric, {})[inverse]


def rank_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    metrics=FIT_METRICS,
    *,
    pred_ranks: np.ndarray | None = None,
    truth_ranks: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Rank of each observed perturbation for several metrics.

    Parameters
    ----------
    pred, truth
        (N, n_genes) aggregates of the N perturbations of ONE covariate combination, row
        i of both describing the same perturbation.
    metrics
        Fit metric names; ``rmse``, ``mse`` and ``r2`` share one distance computation.
    pred_ranks, truth_ranks
        Row ranks (:func:`pertbench.metrics.fit.rank_rows`) when already computed.

    Returns
    -------
    dict
        metric -> (N,) ranks (NaN when N < 2).
    """
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    T = np.atleast_2d(np.asarray(truth, dtype=np.float64))
    if P.shape != T.shape:
        raise ValueError(f"pred {P.shape} and truth {T.shape} must have the same shape")
    n = P.shape[0]
    if n < 2:
        return {m: np.full(n, np.nan) for m in metrics}
    U, inverse, first = _dedupe(P)
    cache: dict = {}
    if pred_ranks is not None:
        cache["u_ranks"] = np.asarray(pred_ranks)[first]
    if truth_ranks is not None:
        cache["t_ranks"] = np.asarray(truth_ranks)
    with single_threaded_blas():
        return {m: rank_scores(_distances(U, T, m, cache)[inverse]) for m in metrics}


def similarity_matrix(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity between all pairs of rows.

    As in :func:`pertbench.metrics.fit.cosine`, a zero row has similarity 0 with a
    non-zero row and 1 with a zero row (including itself).
    """
    P = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
    with single_threaded_blas():
        return _similarity_matrix(P, P, center=False)


def matrix_distance(pred_logfc: np.ndarray, truth_logfc: np.ndarray) -> float:
    """Frobenius norm of S_pred - S_true, the pairwise cosine similarities of logfc profiles.

    PerturBench appendix C.1; computed over the N perturbations of one covariate
    combination. NaN when N < 2 (a 1 x 1 similarity matrix carries no information).
    """
    P = np.atleast_2d(np.asarray(pred_logfc, dtype=np.float64))
    T = np.atleast_2d(np.asarray(truth_logfc, dtype=np.float64))
    if P.shape[0] < 2:
        return float("nan")
    return float(np.linalg.norm(similarity_matrix(P) - similarity_matrix(T)))
