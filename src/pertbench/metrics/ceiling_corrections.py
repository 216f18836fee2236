"""Small-sample corrections of the bootstrap ceiling: unseen genes and the variance's noise.

Unseen genes
------------

A bootstrap replicate resamples a group's ``n`` observed cells, so a gene that none of
them detected is exactly 0 in every replicate: the resampling sees no noise for it. Yet
a sparse gene with detection probability ``p`` per cell is missed by all ``n`` cells with
probability ``(1 - p)^n``; a perfect model predicts its small population value, and the
observed 0 is off by that much. On log-scale aggregations (logfc, var, ranks, mae) those
genes carry a large part of a perfect model's error at 10-20 cells per group.

Good-Turing (Good 1953; Robbins 1968) estimates, from the group itself, how much detection
mass the unseen genes have: with ``N1`` the number of genes detected in exactly one of
the ``n`` cells, ``E[sum of p over genes detected in no cell] ~ N1 / n``. That mass is
spread over the unseen genes in proportion to their chance of having gone unseen,
``r (1 - r)^n`` with ``r`` the gene's detection rate over the block's cells (controls and
every group; a gene the rest of the block detects in most cells is not missed by chance:
it is switched off, and gets nothing, as does a gene nothing in the block detects). Each
replicate then detects each unseen gene in Binomial(n, q) of its cells, each detection
worth one count of its cell, and is scored against the smoothed population it was drawn
from (:func:`population`). The inner replicates of the iterated bootstrap get the same
treatment from their parent replicate, so both levels of ``2 L(b, t) - L(bb, b)`` carry
it.

Draws come from one generator per (replicate, level, group), seeded by the evaluation
seed and the group's position among all groups, so they do not depend on how the groups
are cut into blocks and chunks.

The variance's noise
--------------------
The bootstrap underestimates how far a within-group variance of ``n`` cells falls from
the population's: the error of the variance depends on the fourth moment, which a small
sample shows too little of (at 10 cells by about 20%, on the simulator), and the iterated
bootstrap recovers only part of it. Its mean squared error has an exact unbiased
estimate instead (:func:`variance_noise`), which sets the scale of the ``var``
aggregation's noise; the bootstrap keeps giving its shape (how the error spreads over
genes, for mae and the similarities).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

from pertbench.data.groups import indicator_matrix

#: Stream of the unseen-expression draws.
UNSEEN_STREAM = 0x0A5E


def single_count_values(X) -> np.ndarray:
    """Per cell, the smallest non-zero value: in log-normalised counts, what one count of
    a gene is worth in that cell (0 for a cell without any)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        lengths = np.diff(X.indptr)
        data = np.where(X.data > 0, X.data, np.inf)
        out = np.full(X.shape[0], np.inf)
        rows = np.flatnonzero(lengths)
        out[rows] = np.minimum.reduceat(data, X.indptr[rows])
    else:
        out = np.where(np.asarray(X) > 0, np.asarray(X), np.inf).min(axis=1)
    return np.where(np.isfinite(out), out, 0.0)


def detections(X, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, n_genes) number of cells of each group with a non-zero value."""
    counts = indicator_matrix(codes, n_groups) @ (X != 0).astype(np.float64)
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return np.rint(counts).astype(np.int64)


def unseen_rates(counts: np.ndarray, n_cells: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Per group and gene, the detection probability given to genes no cell detected.

    Parameters
    ----------
    counts
        (n_groups, n_genes) :func:`detections` of the parent cells.
    n_cells
        (n_groups,) parent cells per group.
    rate
        (n_genes,) detection rate over the block's cells.

    Returns
    -------
    numpy.ndarray
        (n_groups, n_genes) ``q``: 0 for detected genes; for unseen ones the Good-Turing
        mass ``N1 / n`` spread in proportion to ``r (1 - r)^n`` (at most ``r``).
    """
    n = np.asarray(n_cells, dtype=np.float64)
    unseen = counts == 0
    singles = (counts == 1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        chance = rate[None, :] * (1.0 - rate[None, :]) ** n[:, None]
        weight = np.where(unseen, chance, 0.0)
        total = weight.sum(axis=1)
        scale = np.where((total > 0) & (n > 0), singles / np.maximum(n, 1.0) / total, 0.0)
    return np.minimum(weight * scale[:, None], rate[None, :])


def population(side, q: np.ndarray, X, codes: np.ndarray):
    """The parent population the replicates are drawn from, as statistics: ``side``'s
    (a :class:`~pertbench.metrics.aggregate.SideStats` of the parent cells ``X``, rows:
    group ``codes``) mean and variance with each unseen gene's pseudo-detections in it:
    mean ``q E[v]``, variance ``q E[v^2] - (q E[v])^2``, ``v`` the single-count value of
    a random cell of the group. Replicates are scored against it: the bootstrap's
    sample-to-population error, for the smoothed population."""
    codes = np.asarray(codes, dtype=np.int64)
    n = np.maximum(np.bincount(codes, minlength=q.shape[0]), 1)
    v = single_count_values(X)
    v_mean = np.bincount(codes, weights=v, minlength=q.shape[0]) / n
    v_square = np.bincount(codes, weights=v * v, minlength=q.shape[0]) / n
    mean = side.mean + q * v_mean[:, None]
    extra = q * v_square[:, None] - (q * v_mean[:, None]) ** 2
    var = np.where(q > 0, side.var + extra, side.var)
    return dataclasses.replace(side, mean=mean, var=var)


def add_unseen(
    X,
    codes: np.ndarray,
    q: np.ndarray,
    group_ids: np.ndarray,
    *,
    seed: int,
    replicate: int,
    level: int,
):
    """Replicate cells ``X`` (rows: group ``codes``) with pseudo-detections of the unseen
    genes added (:func:`unseen_rates` ``q``), each worth one count of its cell
    (:func:`single_count_values`); ``group_ids`` are the groups' positions among
    all groups (what their draws are seeded by). Returns a matrix of ``X``'s kind."""
    codes = np.asarray(codes, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(q.shape[0] + 1))
    rows, genes, values = [], [], []
    single = single_count_values(X)
    for g in np.flatnonzero(q.max(axis=1) > 0):
        members = order[bounds[g] : bounds[g + 1]]
        if members.size == 0:
            continue
        rng = np.random.default_rng(
            [int(seed), UNSEEN_STREAM, int(replicate), int(level), int(group_ids[g])]
        )
        candidates = np.flatnonzero(q[g] > 0)
        hits = rng.binomial(members.size, q[g, candidates])
        gene = np.repeat(candidates, hits)
        if gene.size == 0:
            continue
        cell = members[np.floor(rng.random(gene.size) * members.size).astype(np.int64)]
        rows.append(cell)
        genes.append(gene)
        values.append(single[cell])
    if not rows:
        return X
    rows, genes, values = (np.concatenate(v) for v in (rows, genes, values))
    # a cell drawn twice for one gene keeps one value (the gene was 0 in every cell)
    key = rows * X.shape[1] + genes
    _, first = np.unique(key, return_index=True)
    rows, genes, values = rows[first], genes[first], values[first]
    if sp.issparse(X):
        extra = sp.csr_matrix((values, (rows, genes)), shape=X.shape, dtype=X.dtype)
        return (sp.csr_matrix(X) + extra).tocsr()
    out = np.array(X, dtype=np.result_type(X.dtype, np.float64), copy=True)
    out[rows, genes] += values
    return out


def _variance_mse_weights(n: int) -> tuple[float, float]:
    """(a, b) with ``a m4 + b m2^2`` unbiased for the mean squared error of the ddof-0
    variance ``m2`` of ``n`` cells around the population variance (``m4``: the sample's
    fourth central moment).

    MSE = ((n-1)/n)^2 (mu4 / n - mu2^2 (n-3) / (n (n-1))) + mu2^2 / n^2, and
    E[m4] = (n-1) ((n^2-3n+3) mu4 + 3 (2n-3) mu2^2) / n^3,
    E[m2^2] = (n-1) ((n-1) mu4 + (n^2-2n+3) mu2^2) / n^3 (Kendall and Stuart), so the
    estimate solves that linear system.
    """
    moments = (
        (n - 1)
        / n**3
        * np.array([[n * n - 3 * n + 3, 3 * (2 * n - 3)], [n - 1, n * n - 2 * n + 3]])
    )
    target = np.array(
        [((n - 1) / n) ** 2 / n, 1 / n**2 - ((n - 1) / n) ** 2 * (n - 3) / (n * (n - 1))]
    )
    a, b = np.linalg.solve(moments.T, target)
    return float(a), float(b)


def variance_noise(X, codes: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Per group, the unbiased estimate of sum over genes of E[(m2 - sigma^2)^2]: the noise
    energy of the ``var`` aggregation (NaN for groups of fewer than 4 cells, where the
    estimate is undefined).

    Parameters
    ----------
    X
        (cells, genes) observed cells, dense or sparse; rows: group ``codes``.
    mean, var
        (n_groups, n_genes) the groups' mean and ddof-0 variance.
    """
    codes = np.asarray(codes, dtype=np.int64)
    n_groups = mean.shape[0]
    n = np.bincount(codes, minlength=n_groups)
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        row = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        centre = mean[codes[row], X.indices]
        # sum over cells of (x - mean)^4: zeros add mean^4 each, the others their own
        nonzero = (X.data - centre) ** 4 - centre**4
        fourth_sums = np.bincount(codes[row], weights=nonzero, minlength=n_groups)
        mean4 = np.where(np.isfinite(mean), mean, 0.0) ** 4
        fourth = fourth_sums + n * mean4.sum(axis=1)
    else:
        X = np.asarray(X, dtype=np.float64)
        per_cell = ((X - mean[codes]) ** 4).sum(axis=1)
        fourth = np.bincount(codes, weights=per_cell, minlength=n_groups)
    out = np.full(n_groups, np.nan)
    squares = np.where(np.isfinite(var), var, 0.0) ** 2
    for size in np.unique(n[n >= 4]):
        a, b = _variance_mse_weights(int(size))
        rows = np.flatnonzero(n == size)
        out[rows] = a * fourth[rows] / size + b * squares[rows].sum(axis=1)
    return out
