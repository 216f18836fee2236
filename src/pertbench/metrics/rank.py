"""Rank metrics (PerturBench, made deterministic) and the similarity-matrix distance.

Within one covariate combination with N perturbations, ``D[i, j]`` is the distance
between the prediction for perturbation i and the observation of perturbation j (the
negative similarity for cosine / pearson / spearman / r2). For each observed
perturbation j::

    rank_j = (#{i != j : D[i, j] < D[j, j]} + 0.5 * #{i != j : D[i, j] == D[j, j]}) / N

0 is perfect; a model predicting the same profile for every perturbation scores exactly
(N - 1) / (2N). Identical prediction rows are computed once and share one distance row,
so such ties are exact rather than at the mercy of floating-point round-off.

How the N x N matrices are shared (the cost model, see docs/metrics.md): every distance
kind is built from per-row quantities (squared norms, unit rows, centred unit rows, row
ranks) kept by :class:`ProfileOperands`; rmse, mse and r2 share one Gram product per
block; the observed profiles (and their ranks, which fit and rank metrics share) are
made once per block and aggregation and reused by the model, the baselines and the
ceiling; a prediction repeating one profile (``no_change``) costs one row. Matrices are
evaluated in column blocks of at most :data:`DISTANCE_BLOCK_ELEMENTS` entries, one
family of kinds at a time, so memory stays ~ N x genes + N x block instead of several
N^2 matrices. Time ~ N^2 x genes per kind and aggregation (BLAS products; ``mae`` is a
non-BLAS L1 loop, the largest term).

A matrix of at most :data:`DISTANCE_BLOCK_ELEMENTS` entries (N <= 2048) is computed in one
piece. Column blocks change how BLAS sums a product, so a distance may differ in its last
bits from the one-piece value; that can move a rank only between two distances equal to
about 1e-15, i.e. exact mathematical ties between different predictions (possible for
Spearman on few genes), which no floating-point matrix product resolves reliably anyway.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
from scipy.spatial.distance import cdist

from pertbench.metrics.fit import FIT_METRICS, ProfilePair, is_constant, rank_rows, unit_rows

#: Distance kinds of the rank family (one per fit metric).
DISTANCE_KINDS = FIT_METRICS
#: Entries of one column block of a distance matrix (N rows x block columns); a
#: matrix of at most this size is computed in one piece.
DISTANCE_BLOCK_ELEMENTS = 1 << 22


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
    return _column_ranks(D, 0)


def _column_ranks(D: np.ndarray, first: int) -> np.ndarray:
    """Ranks of columns ``first .. first + D.shape[1]`` of an (N, N) matrix, given as the
    (N, width) block of those columns."""
    n, width = D.shape
    diag = D[first + np.arange(width), np.arange(width)][None, :]
    less = (D < diag).sum(axis=0)
    equal = (D == diag).sum(axis=0) - 1  # minus the diagonal itself
    return (less + 0.5 * equal) / n


def _dedupe(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique rows (in order of first appearance), the index of each row among them and
    the position of each unique row's first appearance.

    Rows are told apart by a hash of their bytes (no copy of the matrix); rows sharing a
    hash are compared value by value, so a collision can never merge different rows.
    """
    import pandas as pd

    rows = np.ascontiguousarray(rows)
    hashes = np.fromiter((hash(r.tobytes()) for r in rows), dtype=np.int64, count=len(rows))
    codes, _ = pd.factorize(hashes)
    _, first = np.unique(codes, return_index=True)
    repeated = np.flatnonzero(first[codes] != np.arange(len(rows)))
    if repeated.size and not (rows[repeated] == rows[first[codes[repeated]]]).all():
        codes, _ = pd.factorize(np.array([r.tobytes() for r in rows], dtype=object))
        _, first = np.unique(codes, return_index=True)
    if first.size == len(rows):  # all distinct: no copy
        return rows, codes, first
    return rows[first], codes, first


def single_threaded_blas():
    """Context that limits BLAS to one thread (small products; avoids oversubscription).

    The thread-pool controller is built once per process (:func:`_blas_controller`):
    building one scans every loaded library (reading /proc/self/maps), which cost a
    quarter of a small evaluation when it happened at every rank computation.
    """
    controller = _blas_controller()
    if controller is None:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return None
    return ThreadpoolController()


class ProfileOperands:
    """A profile matrix (one row per perturbation) and its per-row quantities.

    Each quantity (squared norms, unit rows, centred unit rows, row ranks and their
    centred unit rows, total sum of squares, constant-row mask) is computed on first use
    and kept, so every distance kind and every prediction compared with these rows
    shares it. :meth:`take` selects rows (and keeps what was computed): the truth side of
    a covariate block is prepared once and restricted to each prediction's scored groups.
    """

    def __init__(self, M: np.ndarray, *, ranks: np.ndarray | None = None) -> None:
        self.M = np.atleast_2d(np.asarray(M, dtype=np.float64))
        self._cache: dict[str, object] = {}
        if ranks is not None:
            self._cache["ranks"] = np.asarray(ranks)

    @property
    def n(self) -> int:
        return int(self.M.shape[0])

    def get(self, key: str):
        if key not in self._cache:
            M = self.M
            if key == "sq":
                value = np.einsum("ij,ij->i", M, M)
            elif key == "unit":
                value = unit_rows(M, center=False)
            elif key == "centred":
                value = unit_rows(M, center=True)
            elif key == "ranks":
                value = rank_rows(M)
            elif key == "unit_ranks":
                value = unit_rows(self.get("ranks"), center=True)
            elif key == "sst":
                centred = M - M.mean(axis=1, keepdims=True)
                value = np.einsum("ij,ij->i", centred, centred)
            elif key == "flat":
                value = is_constant(M)
            else:  # pragma: no cover - programming error
                raise KeyError(key)
            self._cache[key] = value
        return self._cache[key]

    def take(self, rows) -> ProfileOperands:
        """The same operands restricted to ``rows`` (an index array, or a slice: then views,
        no copy); what is computed on the result afterwards stays with the result."""
        out = ProfileOperands.__new__(ProfileOperands)
        out.M = self.M[rows]
        out._cache = {
            key: tuple(v[rows] for v in value) if isinstance(value, tuple) else value[rows]
            for key, value in self._cache.items()
        }
        return out


def _similarity(p: tuple, t: tuple) -> np.ndarray:
    """Pairwise similarity of unit rows with the degenerate-row conventions."""
    (pu, p_deg), (tu, t_deg) = p, t
    S = np.clip(pu @ tu.T, -1.0, 1.0)
    S[p_deg, :] = 0.0
    S[:, t_deg] = 0.0
    S[np.ix_(p_deg, t_deg)] = 1.0
    return S


def _cityblock(U: np.ndarray, T: np.ndarray, n_jobs: int) -> np.ndarray:
    """L1 distances of all row pairs; rows of ``U`` split across threads (scipy releases
    the GIL; every entry is the same sum whatever the split, so results do not depend on
    ``n_jobs``)."""
    if n_jobs <= 1 or U.shape[0] < 2 * _MIN_ROWS_PER_THREAD:
        return cdist(U, T, metric="cityblock")
    from concurrent.futures import ThreadPoolExecutor

    parts = np.array_split(np.arange(U.shape[0]), min(n_jobs, U.shape[0] // _MIN_ROWS_PER_THREAD))
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        return np.vstack(list(pool.map(lambda rows: cdist(U[rows], T, metric="cityblock"), parts)))


_MIN_ROWS_PER_THREAD = 64


def _block_distance(U: ProfileOperands, T: ProfileOperands, kind: str, shared: dict) -> np.ndarray:
    """Distance matrix (unique predictions x observed rows) of one kind; ``shared``
    carries the Gram-based squared errors between the kinds of the same block."""
    n_genes = max(U.M.shape[1], 1)
    if kind in ("rmse", "mse", "r2"):
        if "sse" not in shared:
            sq_p = U.get("sq")[:, None]
            sq_t = T.get("sq")[None, :]
            shared["sse"] = np.maximum(sq_p + sq_t - 2.0 * (U.M @ T.M.T), 0.0)
        sse = shared["sse"]
        if kind == "mse":
            return sse / n_genes
        if kind == "rmse":
            return np.sqrt(sse / n_genes)
        flat = T.get("flat")
        with np.errstate(invalid="ignore", divide="ignore"):
            r2 = 1.0 - sse / np.where(flat, 1.0, T.get("sst"))[None, :]
        if flat.any():  # constant truth: r2 = 1 for an exact prediction, else 0
            exact = (U.M[:, None, :] == T.M[None, flat, :]).all(axis=2)
            r2[:, flat] = np.where(exact, 1.0, 0.0)
        return -r2
    if kind == "mae":
        return _cityblock(U.M, T.M, shared.get("n_jobs", 1)) / n_genes
    if kind == "cosine":
        return -_similarity(U.get("unit"), T.get("unit"))
    if kind == "pearson":
        return -_similarity(U.get("centred"), T.get("centred"))
    if kind == "spearman":
        return -_similarity(U.get("unit_ranks"), T.get("unit_ranks"))
    raise ValueError(f"unknown distance kind '{kind}'; use one of {', '.join(DISTANCE_KINDS)}")


def rank_family(
    pred: np.ndarray,
    truth: ProfileOperands,
    kinds: Iterable[str],
    *,
    pred_ranks: np.ndarray | None = None,
    block_elements: int = DISTANCE_BLOCK_ELEMENTS,
    n_jobs: int = 1,
) -> dict[str, np.ndarray]:
    """Column ranks of several distance kinds between predictions and observations.

    Parameters
    ----------
    pred
        (N, n_genes) predicted profiles of the N perturbations of ONE covariate block.
    truth
        Their observed profiles (row i = the same perturbation), as operands that may be
        shared with other predictions of the same block.
    kinds
        Distance kinds (:data:`DISTANCE_KINDS`).
    pred_ranks
        Row ranks of ``pred`` when already computed (spearman).
    block_elements
        Entries of one column block; all kinds are evaluated block by block.
    n_jobs
        Threads for the L1 distances of ``mae`` (the only non-BLAS kernel); BLAS runs
        single-threaded. The ranks do not depend on it.

    Returns
    -------
    dict
        kind -> (N,) ranks (NaN when N < 2).
    """
    kinds = list(dict.fromkeys(kinds))
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    if P.shape != truth.M.shape:
        raise ValueError(f"pred {P.shape} and truth {truth.M.shape} must have the same shape")
    n = P.shape[0]
    if n < 2:
        return {k: np.full(n, np.nan) for k in kinds}
    unique, inverse, first = _dedupe(P)
    u_ranks = None if pred_ranks is None else np.asarray(pred_ranks)[first]
    width = max(1, int(block_elements) // n)
    out = {k: np.empty(n) for k in kinds}
    families: dict[str, list[str]] = {}
    for kind in kinds:  # kinds sharing one matrix (rmse, mse, r2) are evaluated together
        families.setdefault(_FAMILY.get(kind, kind), []).append(kind)
    with single_threaded_blas():
        for members in families.values():
            # the prediction's operands of this family only: memory stays ~ one (N, genes)
            U = ProfileOperands(unique, ranks=u_ranks)
            for lo in range(0, n, width):
                cols = slice(lo, min(lo + width, n))
                T = truth.take(cols)  # a view; its block operands are dropped after use
                shared: dict = {"n_jobs": int(n_jobs)}
                for kind in members:
                    D = _block_distance(U, T, kind, shared)
                    if unique.shape[0] != n:  # repeated predictions share one row
                        D = D[inverse]
                    out[kind][cols] = _column_ranks(D, lo)
                    del D
    return out


#: Kinds computed from the same matrix.
_FAMILY = {"rmse": "sse", "mse": "sse", "r2": "sse"}


def distance_matrix(pred: np.ndarray, truth: np.ndarray, metric: str) -> np.ndarray:
    """``D[i, j]`` = distance between prediction row i and observed row j for a fit metric.

    For error metrics (rmse, mse, mae) the metric itself; for similarities (cosine,
    pearson, spearman, r2) its negative, so smaller is always closer.
    """
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    unique, inverse, _ = _dedupe(P)
    with single_threaded_blas():
        return _block_distance(ProfileOperands(unique), ProfileOperands(truth), metric, {})[inverse]


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
        Fit metric names; all share one pass (see :func:`rank_family`).
    pred_ranks, truth_ranks
        Row ranks (:func:`pertbench.metrics.fit.rank_rows`) when already computed.

    Returns
    -------
    dict
        metric -> (N,) ranks (NaN when N < 2).
    """
    T = ProfileOperands(truth, ranks=truth_ranks)
    P = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    if P.shape != T.M.shape:
        raise ValueError(f"pred {P.shape} and truth {T.M.shape} must have the same shape")
    return rank_family(P, T, metrics, pred_ranks=pred_ranks)


def similarity_matrix(profiles: np.ndarray) -> np.ndarray:
    """Cosine similarity between all pairs of rows.

    As in :func:`pertbench.metrics.fit.cosine`, a zero row has similarity 0 with a
    non-zero row and 1 with a zero row (including itself).
    """
    P = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
    with single_threaded_blas():
        return _similarity(unit_rows(P), unit_rows(P))


def matrix_distance(
    pred_logfc: np.ndarray,
    truth_logfc: np.ndarray,
    *,
    block_elements: int = DISTANCE_BLOCK_ELEMENTS,
) -> float:
    """Frobenius norm of S_pred - S_true, the pairwise cosine similarities of logfc profiles.

    PerturBench appendix C.1; computed over the N perturbations of one covariate
    combination. NaN when N < 2 (a 1 x 1 similarity matrix carries no information).
    Above ``block_elements`` entries the two matrices are built in row blocks.
    """
    P = np.atleast_2d(np.asarray(pred_logfc, dtype=np.float64))
    T = np.atleast_2d(np.asarray(truth_logfc, dtype=np.float64))
    n = P.shape[0]
    if n < 2:
        return float("nan")
    if n * n <= block_elements:
        return float(np.linalg.norm(similarity_matrix(P) - similarity_matrix(T)))
    p_unit, t_unit = unit_rows(P), unit_rows(T)
    step = max(1, int(block_elements) // n)
    total = 0.0
    with single_threaded_blas():
        for lo in range(0, n, step):
            rows = slice(lo, min(lo + step, n))
            diff = _similarity(tuple(v[rows] for v in p_unit), p_unit) - _similarity(
                tuple(v[rows] for v in t_unit), t_unit
            )
            total += float(np.einsum("ij,ij->", diff, diff))
    return float(np.sqrt(total))


def pair_matrix_distance(pair: ProfilePair) -> float:
    """:func:`matrix_distance` of a block's logfc :class:`ProfilePair` (the registry's compute)."""
    return matrix_distance(pair.pred, pair.truth)
