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


def _dedupe(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows and the index of each original row among them."""
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    return unique, np.asarray(inverse).ravel()


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


def distance_matrix(pred: np.ndarray, truth: np.ndarray, metric: str) -> np.ndarray:
    """``D[i, j]`` = distance between prediction row i and observed row j for a fit metric.

    For error metrics (rmse, mse, mae) the metric itself; for similarities (cosine,
    pearson, spearman, r2) its negative, so smaller is always closer.
    """
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    T = np.atleast_2d(np.asarray(truth, dtype=np.float64))
    U, inverse = _dedupe(P)
    n_genes = max(P.shape[1], 1)
    if metric in ("rmse", "mse", "r2"):
        sse = _sse_matrix(U, T)
        if metric == "mse":
            D = sse / n_genes
        elif metric == "rmse":
            D = np.sqrt(sse / n_genes)
        else:
            centred = T - T.mean(axis=1, keepdims=True)
            sst = np.einsum("ij,ij->i", centred, centred)
            flat = is_constant(T)
            with np.errstate(invalid="ignore", divide="ignore"):
                r2 = 1.0 - sse / np.where(flat, 1.0, sst)[None, :]
            if flat.any():  # constant truth: r2 = 1 for an exact prediction, else 0
                exact = (U[:, None, :] == T[None, flat, :]).all(axis=2)
                r2[:, flat] = np.where(exact, 1.0, 0.0)
            D = -r2
    elif metric == "mae":
        D = cdist(U, T, metric="cityblock") / n_genes
    elif metric == "cosine":
        D = -_similarity_matrix(U, T, center=False)
    elif metric == "pearson":
        D = -_similarity_matrix(U, T, center=True)
    elif metric == "spearman":
        D = -_similarity_matrix(rank_rows(U), rank_rows(T), center=True)
    else:
        raise ValueError(
            f"unknown metric '{metric}' for a distance matrix; use one of {FIT_METRICS}"
        )
    return D[inverse]


def rank_metrics(pred: np.ndarray, truth: np.ndarray, metrics=FIT_METRICS) -> dict[str, np.ndarray]:
    """Rank of each observed perturbation for several metrics.

    Parameters
    ----------
    pred, truth
        (N, n_genes) aggregates of the N perturbations of ONE covariate combination, row
        i of both describing the same perturbation.
    metrics
        Fit metric names; the rank of ``rmse``, ``mse`` and ``r2`` share one distance
        matrix computation.

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
    return {m: rank_scores(distance_matrix(P, T, m)) for m in metrics}


def similarity_matrix(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity between all pairs of rows.

    As in :func:`pertbench.metrics.fit.cosine`, a zero row has similarity 0 with a
    non-zero row and 1 with a zero row (including itself).
    """
    P = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
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
