"""Per-group, per-gene aggregations of expression that the fit and rank metrics compare.

- ``average``: mean of ``X`` over the group's cells.
- ``delta``: average(group) - average(controls of the same covariates), in log space.
- ``logfc``: log2(average(group) + 0.1) - log2(average(controls) + 0.1) on the stored
  log1p values (PerturBench's definition, kept for comparability). Averages below 0
  (possible in predictions) are clipped at 0 first, since expression cannot be negative
  and log2 of a negative number is undefined.
- ``var``: per-gene variance within the group (ddof=0).
- ``logp``: signed -log10 p-value of the Wilcoxon test of the group against its
  controls (see :mod:`pertbench.metrics.de`).

Group statistics are computed in row chunks with sparse indicator products; each group's
first cell is subtracted before summing (the "shifted data" algorithm), so the variance
is numerically stable and exactly 0 when all cells of a group are identical, and the
same cells give bit-identical means in any matrix (see :func:`group_stats`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pertbench.data.ondisk import RowReader

AGGREGATIONS = ("average", "delta", "logfc", "var", "logp")
DEFAULT_AGGREGATIONS = ("average", "delta", "logfc", "var")
LOGFC_PSEUDOCOUNT = 0.1
#: Rows densified at once when summing groups (bounds temporary memory).
DEFAULT_CHUNK_ELEMENTS = 2_000_000


def group_stats(
    X, codes: np.ndarray, n_groups: int, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance (ddof=0) and cell count of every group, in float64.

    Each group's first cell K is subtracted before summing (the "shifted data"
    algorithm: mean = K + sum(x - K) / n), so identical cells give exactly their value
    as mean and exactly 0 as variance. Non-zero entries are summed group by group in row
    order, in pieces of a fixed number of rows counted from the group's first cell, and
    zeros are added in closed form, so sparse data are never densified and the same cells
    give bit-identical statistics whatever else the matrix holds and whether it is sparse
    or dense (a prediction made of control cells has exactly their mean).

    Parameters
    ----------
    X
        (n_cells, n_genes) dense or sparse matrix, or a :class:`~pertbench.data.ondisk.RowReader`
        (rows read from disk chunk by chunk, so memory stays bounded); only rows with a
        code >= 0 are read.
    codes
        Group code per row (-1: row belongs to no group).
    n_groups
        Number of groups; groups without cells get NaN statistics and count 0.
    chunk_elements
        Rows x genes densified at a time.

    Returns
    -------
    mean, var, counts
        (n_groups, n_genes), (n_groups, n_genes), (n_groups,).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n_genes = X.shape[1]
    rows = np.flatnonzero(codes >= 0)
    counts = np.bincount(codes[rows], minlength=n_groups).astype(np.int64)
    mean = np.full((n_groups, n_genes), np.nan)
    var = np.full((n_groups, n_genes), np.nan)
    if rows.size == 0:
        return mean, var, counts
    rows = rows[np.argsort(codes[rows], kind="stable")]  # by group, then row
    sorted_codes = codes[rows]
    present = counts > 0
    group_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shift = np.zeros((n_groups, n_genes))
    s1 = np.zeros((n_groups, n_genes))  # sums over non-zero entries of (x - K)
    s2 = np.zeros((n_groups, n_genes))  # ... and of (x - K)^2
    nnz = np.zeros((n_groups, n_genes))  # non-zero entries
    reader = isinstance(X, RowReader)
    sparse = X.is_sparse if reader else sp.issparse(X)
    if sparse and not reader:
        X = sp.csr_matrix(X)
    piece_rows = max(1, int(chunk_elements // max(n_genes, 1)))
    chunks = list(_chunks(sorted_codes, group_start, piece_rows))
    for (lo, hi), sub in _chunk_rows(X, rows, chunks, READ_CHUNKS * piece_rows):
        chunk_codes = sorted_codes[lo:hi]
        # rows are sorted by group: each group is one segment of the chunk
        seg = np.flatnonzero(np.r_[True, chunk_codes[1:] != chunk_codes[:-1]])
        seg_codes = chunk_codes[seg]
        # a group's first cell K is in the chunk where the group starts
        starting = seg_codes[group_start[seg_codes] >= lo]
        if starting.size:
            shift[starting] = _dense(sub[group_start[starting] - lo])
        if sparse:
            c1, c2, cn = _sparse_sums(sub, chunk_codes, seg, shift)
        else:
            c1, c2, cn = _dense_sums(np.asarray(sub), seg, shift[seg_codes])
        s1[seg_codes] += c1
        s2[seg_codes] += c2
        nnz[seg_codes] += cn
    # zeros (implicit in sparse data) each contribute (0 - K) and K^2
    zeros = counts[:, None] - nnz
    s1 -= zeros * shift
    s2 += zeros * shift * shift
    n = counts[present, None].astype(np.float64)
    mean[present] = shift[present] + s1[present] / n
    var[present] = np.maximum(s2[present] - s1[present] ** 2 / n, 0.0) / n
    return mean, var, counts


def _dense_sums(raw: np.ndarray, seg: np.ndarray, seg_shift: np.ndarray):
    """Per segment (group), sums of (x - K) and (x - K)^2 over non-zero x, and their count.

    Zeros contribute exactly 0.0 to the running sums, so the additions are the same, in
    the same order, as :func:`_sparse_sums` makes for the same cells stored sparse.
    """
    dev = raw.astype(np.float64)
    bounds = np.append(seg, raw.shape[0])
    for i in range(seg.size):  # one in-place subtraction per group in the chunk
        dev[bounds[i] : bounds[i + 1]] -= seg_shift[i]
    if np.count_nonzero(raw) == raw.size:
        counts = np.diff(bounds)[:, None] * np.ones((1, raw.shape[1]))
    else:
        nonzero = raw != 0
        dev[~nonzero] = 0.0
        counts = np.add.reduceat(nonzero, seg, axis=0, dtype=np.float64)
    s1 = np.add.reduceat(dev, seg, axis=0)
    dev *= dev
    return s1, np.add.reduceat(dev, seg, axis=0), counts


def _sparse_sums(sub, chunk_codes: np.ndarray, seg: np.ndarray, shift: np.ndarray):
    """:func:`_dense_sums` from a CSR chunk, without densifying (bincount adds in order)."""
    n_genes = sub.shape[1]
    seg_of_row = np.cumsum(np.r_[True, chunk_codes[1:] != chunk_codes[:-1]]) - 1
    row = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
    gene, values = sub.indices, sub.data
    keep = values != 0
    if not keep.all():
        row, gene, values = row[keep], gene[keep], values[keep]
    dev = values.astype(np.float64) - shift[chunk_codes[row], gene]
    slot = seg_of_row[row] * n_genes + gene
    size = seg.size * n_genes
    s1 = np.bincount(slot, weights=dev, minlength=size).reshape(seg.size, n_genes)
    s2 = np.bincount(slot, weights=dev * dev, minlength=size).reshape(seg.size, n_genes)
    counts = np.bincount(slot, minlength=size).reshape(seg.size, n_genes).astype(np.float64)
    return s1, s2, counts


def _chunks(sorted_codes: np.ndarray, group_start: np.ndarray, piece_rows: int):
    """(lo, hi) row ranges made of whole pieces; a piece is at most ``piece_rows`` rows
    of one group, cut at fixed offsets from the group's start; a chunk packs pieces up
    to ``piece_rows`` rows (or holds one piece)."""
    position = np.arange(sorted_codes.size) - group_start[sorted_codes]
    bounds = np.append(np.flatnonzero(position % piece_rows == 0), sorted_codes.size)
    lo = 0
    for i in range(1, bounds.size):  # loops over pieces (about one per group)
        if bounds[i] - lo > piece_rows and bounds[i - 1] > lo:
            yield lo, int(bounds[i - 1])
            lo = int(bounds[i - 1])
    if lo < sorted_codes.size:
        yield lo, int(sorted_codes.size)


def _chunk_rows(X, rows: np.ndarray, chunks: list[tuple[int, int]], read_rows: int):
    """((lo, hi), rows[lo:hi] of X) for every chunk. From a RowReader, consecutive chunks
    are read together, up to ``read_rows`` rows per read (few large reads from disk)."""
    if not isinstance(X, RowReader):
        for lo, hi in chunks:
            yield (lo, hi), X[rows[lo:hi]]
        return
    i = 0
    while i < len(chunks):
        j = i + 1
        while j < len(chunks) and chunks[j][1] - chunks[i][0] <= read_rows:
            j += 1
        start = chunks[i][0]
        batch = X.read(rows[start : chunks[j - 1][1]])
        for lo, hi in chunks[i:j]:
            yield (lo, hi), batch[lo - start : hi - start]
        i = j


#: Chunks of rows read from disk at once by :func:`group_stats`.
READ_CHUNKS = 8


def _dense(sub) -> np.ndarray:
    if sp.issparse(sub):
        return sub.toarray().astype(np.float64, copy=False)
    return np.asarray(sub, dtype=np.float64)


def logfc(average: np.ndarray, control_average: np.ndarray) -> np.ndarray:
    """PerturBench's log fold change on log1p data (negative averages clipped at 0)."""
    return np.log2(np.maximum(average, 0.0) + LOGFC_PSEUDOCOUNT) - np.log2(
        np.maximum(control_average, 0.0) + LOGFC_PSEUDOCOUNT
    )


def aggregate(
    mean: np.ndarray,
    var: np.ndarray,
    control_mean: np.ndarray,
    *,
    aggregations=DEFAULT_AGGREGATIONS,
    de_scores: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Build the requested aggregations from group statistics.

    Parameters
    ----------
    mean, var
        (n_groups, n_genes) group means and variances.
    control_mean
        (n_groups, n_genes): for every group, the mean of its covariates' controls.
    aggregations
        Names among :data:`AGGREGATIONS`.
    de_scores
        (n_groups, n_genes) Wilcoxon z-scores against the controls; needed for ``logp``.
    """
    out: dict[str, np.ndarray] = {}
    for name in aggregations:
        if name == "average":
            out[name] = mean
        elif name == "delta":
            out[name] = mean - control_mean
        elif name == "logfc":
            out[name] = logfc(mean, control_mean)
        elif name == "var":
            out[name] = var
        elif name == "logp":
            if de_scores is None:
                raise ValueError("the logp aggregation needs Wilcoxon scores (de_scores)")
            from pertbench.metrics.de import signed_log10_pvalue

            out[name] = signed_log10_pvalue(de_scores)
        else:
            raise ValueError(f"unknown aggregation '{name}'")
    return out
