"""Differential expression: a vectorised Wilcoxon rank-sum test and the DE metrics built on it.

The test compares every group with one reference set of cells (the controls of its
covariates), gene by gene: two-sided Mann-Whitney U with the normal approximation, tie
corrected as in ``scipy.stats.tiecorrect`` and scanpy's
``rank_genes_groups(method="wilcoxon", tie_correct=True)``, and Benjamini-Hochberg FDR
per group across genes.

How it is fast: all cells (reference plus every group) are sorted ONCE per gene. The sort
key packs an order-preserving integer code of the value in the high 32 bits and the
group code in the low 32 bits, so one SIMD integer sort per gene chunk orders cells by
(value, group) and every (value, group) run is contiguous. From the runs we get, per
group and gene, the Mann-Whitney U (each cell counts the reference cells below it plus
half of those tied with it) and the exact tie term of the pooled (group + reference)
sample, by sums over runs (``np.bincount``). No per-gene or per-group Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import special

from pertbench.errors import EvaluationError

#: Number of cells x genes handled per sorting chunk (bounds the memory of the test).
DEFAULT_CHUNK_ELEMENTS = 4_000_000
_LOW32 = np.int64(0xFFFFFFFF)


@dataclass
class WilcoxonResult:
    """Per group and gene results of :func:`wilcoxon_scores`.

    Attributes
    ----------
    scores
        (n_groups, n_genes) z-scores; positive when the group is above the reference.
        0 where the test is undefined (all values tied), as in scanpy.
    pvals
        Two-sided p-values from the normal approximation.
    pvals_adj
        Benjamini-Hochberg adjusted p-values, per group across genes.
    n_cells
        Cells per group.
    n_reference
        Reference (control) cells.
    """

    scores: np.ndarray
    pvals: np.ndarray
    pvals_adj: np.ndarray
    n_cells: np.ndarray
    n_reference: int

    def signed_log10_pvals(self) -> np.ndarray:
        """sign(z) * -log10(p), computed from z without underflow (finite for any z)."""
        return signed_log10_pvalue(self.scores)


def signed_log10_pvalue(z: np.ndarray) -> np.ndarray:
    """sign(z) * -log10(p) of the two-sided normal p-value p = 2 * Phi(-|z|).

    Computed as ``-(log 2 + log Phi(-|z|)) / log 10`` so that it stays finite where p
    itself underflows to 0 (|z| > 38).
    """
    z = np.asarray(z, dtype=np.float64)
    neg_log10 = -(np.log(2.0) + special.log_ndtr(-np.abs(z))) / np.log(10.0)
    return np.sign(z) * np.maximum(neg_log10, 0.0)


def benjamini_hochberg(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values along the last axis (same as statsmodels fdr_bh).

    NaN p-values are treated as 1, like scanpy does before adjusting.
    """
    p = np.where(np.isnan(pvals), 1.0, np.asarray(pvals, dtype=np.float64))
    squeeze = p.ndim == 1
    p = np.atleast_2d(p)
    m = p.shape[-1]
    if m == 0:
        return p[0] if squeeze else p
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * (m / np.arange(1, m + 1))
    # step-up: q_(i) = min_{j >= i} p_(j) m / j
    ranked = np.minimum.accumulate(ranked[:, ::-1], axis=-1)[:, ::-1]
    ranked = np.minimum(ranked, 1.0)
    out = np.empty_like(ranked)
    np.put_along_axis(out, order, ranked, axis=-1)
    return out[0] if squeeze else out


# ---------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------
def wilcoxon_scores(
    X,
    groups: np.ndarray,
    reference,
    *,
    n_groups: int | None = None,
    tie_correct: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> WilcoxonResult:
    """Wilcoxon rank-sum test of every group against one reference set, for all genes.

    Parameters
    ----------
    X
        (n_cells, n_genes) expression, dense or sparse.
    groups
        Integer group code of each row of ``X`` (0..n_groups-1); -1 for rows in no group.
    reference
        The reference cells: a boolean mask over the rows of ``X`` (those rows must have
        group -1), or a separate (n_reference, n_genes) matrix over the same genes.
    n_groups
        Number of groups (default: max code + 1). Groups without cells get z = 0, p = 1.
    tie_correct
        Apply the tie correction to the variance (default True, the textbook test;
        scanpy's default is False, pass False to reproduce it).
    chunk_elements
        Cells x genes sorted at once; bounds memory (about 60 bytes per element).

    Returns
    -------
    WilcoxonResult
        z-scores equal to scanpy's ``rank_genes_groups(method="wilcoxon",
        reference=<controls>, tie_correct=tie_correct)`` scores, p-values and BH FDR.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if groups.ndim != 1 or groups.shape[0] != X.shape[0]:
        raise EvaluationError(
            f"groups has {groups.shape[0]} codes but X has {X.shape[0]} rows; give one code per row"
        )
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if groups.size and groups.max() >= 0 else 0
    if isinstance(reference, np.ndarray) and reference.dtype == bool:
        if reference.shape[0] != X.shape[0]:
            raise EvaluationError("reference mask must have one entry per row of X")
        if (groups[reference] >= 0).any():
            raise EvaluationError("reference cells must not belong to a group (code -1)")
        ref_rows = np.flatnonzero(reference)
        R = None
    else:
        R = reference
        if R.shape[1] != X.shape[1]:
            raise EvaluationError(
                f"reference has {R.shape[1]} genes but X has {X.shape[1]}; align the genes first"
            )
        ref_rows = None
    n_ref = int(ref_rows.size if R is None else R.shape[0])
    if n_ref == 0:
        raise EvaluationError("the Wilcoxon test needs reference (control) cells; none given")

    n_genes = X.shape[1]
    in_group = np.flatnonzero(groups >= 0)
    order = in_group[np.argsort(groups[in_group], kind="stable")]
    group_rows = order
    pooled_codes = np.concatenate(
        [np.zeros(n_ref, dtype=np.int64), groups[group_rows] + 1]
    )  # 0 = reference, g + 1 = group g; rows sorted by code
    n_cells = np.bincount(groups[in_group], minlength=n_groups).astype(np.float64)
    n_pooled = pooled_codes.size

    U = np.zeros((n_groups, n_genes))
    T = np.zeros((n_groups, n_genes))  # tie term sum(t^3 - t) of group + reference
    T_ref = np.zeros(n_genes)  # the reference-only part of it
    ref_part = _RowSource(X if R is None else R, ref_rows)
    group_part = _RowSource(X, group_rows)
    genes_per_chunk = max(1, int(chunk_elements // max(n_pooled, 1)))
    for left in range(0, n_genes, genes_per_chunk):
        right = min(left + genes_per_chunk, n_genes)
        block = np.vstack([ref_part.columns(left, right), group_part.columns(left, right)])
        u, t, t_ref = _rank_sums(block, pooled_codes, n_groups)
        U[:, left:right] = u
        T[:, left:right] = t
        T_ref[left:right] = t_ref

    n_g = n_cells[:, None]
    n_total = n_g + n_ref
    mean_u = n_g * n_ref / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        if tie_correct:
            denom = n_total**3 - n_total
            tc = np.where(
                denom > 0, 1.0 - (T + T_ref[None, :]) / np.where(denom > 0, denom, 1), 1.0
            )
        else:
            tc = 1.0
        std = np.sqrt(tc * n_g * n_ref * (n_total + 1) / 12.0)
        z = (U - mean_u) / std
    z[~np.isfinite(z)] = 0.0  # all values tied, or an empty group: no evidence
    pvals = 2.0 * special.ndtr(-np.abs(z))
    return WilcoxonResult(
        scores=z,
        pvals=pvals,
        pvals_adj=benjamini_hochberg(pvals),
        n_cells=n_cells.astype(np.int64),
        n_reference=n_ref,
    )


class _RowSource:
    """Chosen rows of a matrix, read one block of columns at a time.

    Sparse input is sliced to the rows once and kept as CSC, so column blocks are
    cheap; dense input is indexed per block, so no full copy is made.
    """

    def __init__(self, M, rows: np.ndarray | None) -> None:
        if sp.issparse(M):
            sub = M if rows is None else M[rows]
            self.M, self.rows = sp.csc_matrix(sub), None
        else:
            self.M, self.rows = M, rows

    def columns(self, left: int, right: int) -> np.ndarray:
        if sp.issparse(self.M):
            return self.M[:, left:right].toarray()
        if self.rows is None:
            return np.asarray(self.M[:, left:right])
        return np.asarray(self.M[self.rows, left:right])


def _value_codes(block: np.ndarray) -> np.ndarray:
    """Order-preserving int64 codes of the values in [-2^31, 2^31) (equal values, equal codes).

    float32 values (and float64 values that are exactly float32) map through their bit
    pattern; other values are replaced by their dense rank within the block. The range
    leaves the low 32 bits of a shifted code free for the group.
    """
    if block.dtype != np.float32:
        as32 = block.astype(np.float32)
        if np.array_equal(as32, block):
            block = as32
        else:
            _, inverse = np.unique(block, return_inverse=True)
            return inverse.reshape(block.shape).astype(np.int64)
    block = block + np.float32(0.0)  # -0.0 -> +0.0 so that equal values share a code
    bits = block.view(np.uint32).astype(np.int64)
    negative = bits >= 0x80000000
    # negative floats: larger bit pattern = more negative; map both halves monotonically
    return np.where(negative, 0x7FFFFFFF - bits, bits)


def _rank_sums(
    block: np.ndarray, pooled_codes: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U statistics and tie terms for one chunk of genes.

    ``block`` is (n_pooled, n_chunk) with the reference rows first (code 0) and group
    rows after (code g + 1). Returns U (n_groups, n_chunk), the cross/group tie term
    (n_groups, n_chunk) and the reference-only tie term (n_chunk,).
    """
    n_pooled, n_chunk = block.shape
    keys = (_value_codes(block.T) << 32) + pooled_codes[None, :]
    keys.sort(axis=1)
    keys = keys.ravel()
    n = keys.size
    gene_start = np.zeros(n, dtype=bool)
    gene_start[::n_pooled] = True
    # runs of equal (value, group): contiguous because the group sits in the low bits
    run_start = gene_start.copy()
    run_start[1:] |= keys[1:] != keys[:-1]
    value = keys >> 32
    block_start = gene_start.copy()
    block_start[1:] |= value[1:] != value[:-1]
    del value

    starts = np.flatnonzero(run_start)
    sizes = np.diff(np.append(starts, n)).astype(np.float64)
    run_group = (keys[starts] & _LOW32).astype(np.int64)  # 0 = reference
    run_gene = starts // n_pooled
    block_cum = np.cumsum(block_start)
    run_block = block_cum[starts] - 1  # value block of each run
    first_block_of_gene = block_cum[np.arange(n_chunk) * n_pooled] - 1
    n_blocks = int(block_cum[-1])
    del keys, run_start, block_start, gene_start, block_cum

    is_ref = run_group == 0
    # reference cells tied at each value (the reference run, if any, is first in a block)
    ref_in_block = np.zeros(n_blocks)
    ref_in_block[run_block[is_ref]] = sizes[is_ref]
    # reference cells below each value block, within its gene
    cum_before = np.cumsum(ref_in_block) - ref_in_block
    block_gene = np.zeros(n_blocks, dtype=np.int64)
    block_gene[run_block] = run_gene
    ref_below = cum_before - cum_before[first_block_of_gene[block_gene]]

    grp = ~is_ref
    a = sizes[grp]
    b = ref_in_block[run_block[grp]]
    below = ref_below[run_block[grp]]
    slot = (run_group[grp] - 1) * n_chunk + run_gene[grp]
    size = n_groups * n_chunk
    U = np.bincount(slot, weights=a * (below + 0.5 * b), minlength=size)
    # sum over tied values of (t^3 - t) with t = a + b, minus the reference-only part
    # b^3 - b (added once per gene below): a^3 - a + 3 a^2 b + 3 a b^2
    T = np.bincount(slot, weights=a**3 - a + 3.0 * a * a * b + 3.0 * a * b * b, minlength=size)
    r = sizes[is_ref]
    T_ref = np.bincount(run_gene[is_ref], weights=r**3 - r, minlength=n_chunk)
    return U.reshape(n_groups, n_chunk), T.reshape(n_groups, n_chunk), T_ref


# ---------------------------------------------------------------------------------------
# DE metrics (one row per group)
# ---------------------------------------------------------------------------------------
def top_k_mask(scores: np.ndarray, k: int, *, absolute: bool = False) -> np.ndarray:
    """Boolean (n_groups, n_genes) mask of each row's top-``k`` genes.

    Genes are ranked by score (largest first; by |score| with ``absolute``); ties are
    broken by gene position so the set is deterministic. ``k`` larger than the number of
    genes selects all genes.
    """
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    s = np.abs(s) if absolute else s
    k = int(min(max(k, 0), s.shape[1]))
    mask = np.zeros(s.shape, dtype=bool)
    if k == 0:
        return mask
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def jaccard_top_k(
    truth_scores: np.ndarray, pred_scores: np.ndarray, k: int = 100, *, absolute: bool = False
) -> np.ndarray:
    """|A & B| / |A | B| of the top-``k`` genes by z (or |z|) in truth (A) and prediction (B)."""
    a = top_k_mask(truth_scores, k, absolute=absolute)
    b = top_k_mask(pred_scores, k, absolute=absolute)
    union = (a | b).sum(axis=1)
    inter = (a & b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def overlap_top_k(
    truth_scores: np.ndarray,
    truth_fdr: np.ndarray,
    pred_scores: np.ndarray,
    k: int = 100,
    *,
    fdr: float = 0.05,
) -> np.ndarray:
    """Share of the truth's top DE genes that the prediction also ranks at the top.

    A = the truth's significant genes (FDR < ``fdr``) ranked by |z|, at most ``k`` of
    them (k' = min(k, number significant)); B = the prediction's top k' genes by |z|
    (over all genes: a prediction's p-values depend on how many cells it was given, so
    they are not filtered). Value = |A & B| / k'. NaN where the truth has no significant
    gene (nothing to recover).
    """
    tz = np.atleast_2d(np.asarray(truth_scores, dtype=np.float64))
    sig = np.atleast_2d(np.asarray(truth_fdr)) < fdr
    pz = np.atleast_2d(np.asarray(pred_scores, dtype=np.float64))
    k_eff = np.minimum(sig.sum(axis=1), k)
    out = np.full(tz.shape[0], np.nan)
    # rank significant genes first, by |z|; ties by gene position
    truth_key = np.where(sig, np.abs(tz), -np.inf)
    t_order = np.argsort(-truth_key, axis=1, kind="stable")
    p_order = np.argsort(-np.abs(pz), axis=1, kind="stable")
    for kk in np.unique(k_eff[k_eff > 0]):  # loop over distinct k', not groups
        rows = np.flatnonzero(k_eff == kk)
        a = np.zeros((rows.size, tz.shape[1]), dtype=bool)
        b = np.zeros_like(a)
        np.put_along_axis(a, t_order[rows, :kk], True, axis=1)
        np.put_along_axis(b, p_order[rows, :kk], True, axis=1)
        out[rows] = (a & b).sum(axis=1) / kk
    return out


def direction_agreement(
    truth_delta: np.ndarray, truth_fdr: np.ndarray, pred_delta: np.ndarray, *, fdr: float = 0.05
) -> np.ndarray:
    """Fraction of the truth's significant genes whose predicted delta has the same sign.

    Signs are compared with ``np.sign`` (a zero predicted change never agrees with a
    non-zero observed one). NaN where the truth has no significant gene.
    """
    sig = np.atleast_2d(np.asarray(truth_fdr)) < fdr
    same = np.sign(np.atleast_2d(truth_delta)) == np.sign(np.atleast_2d(pred_delta))
    n_sig = sig.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_sig > 0, (same & sig).sum(axis=1) / np.maximum(n_sig, 1), np.nan)
