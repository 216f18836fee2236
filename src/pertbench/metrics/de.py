"""Differential expression: a vectorised Wilcoxon rank-sum test and the DE metrics built on it.

The test compares every group with one reference set of cells (the controls of its
covariates), gene by gene: two-sided Mann-Whitney U with the normal approximation, tie
corrected as in ``scipy.stats.tiecorrect`` and scanpy's
``rank_genes_groups(method="wilcoxon", tie_correct=True)``, and Benjamini-Hochberg FDR
per group across genes.

How it is fast: all non-zero entries of a chunk of genes (reference plus every group)
are sorted ONCE. One 64-bit key packs the gene, an order-preserving code of the value
and a slot (group, gene), so a single integer sort orders the entries by (gene, value,
group) and every run of equal (gene, value, group) is contiguous, with the reference
(code 0) first among equal values. The Mann-Whitney U of every group and gene is then
the sum, over its entries, of the reference entries below (a running count, summed per
slot with ``np.bincount``); ties are corrected only where values repeat, and the zeros
(most of a sparse matrix) are never sorted: they form one tied block per gene, handled
in closed form. No per-gene or per-group Python loop; chunks of genes may run in
threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import special

from pertbench.errors import EvaluationError

#: Number of cells x genes handled per sorting chunk (bounds the memory of the test).
DEFAULT_CHUNK_ELEMENTS = 2_000_000


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
@dataclass
class RankSums:
    """Mann-Whitney U statistics of every group against one reference, per gene.

    Attributes
    ----------
    u
        (n_groups, n_genes) U of the group: the number of (group cell, reference cell)
        pairs where the group cell is larger, ties counting half. Exact (a sum of
        halves), whatever the algorithm.
    tie_term
        (n_groups, n_genes) sum of t^3 - t over the tied blocks of the pooled sample
        (group + reference); all zero when computed with ``tie_correct=False``.
    n_cells
        Cells per group (float64).
    n_reference
        Reference (control) cells.
    """

    u: np.ndarray
    tie_term: np.ndarray
    n_cells: np.ndarray
    n_reference: int


def wilcoxon_scores(
    X,
    groups: np.ndarray,
    reference,
    *,
    n_groups: int | None = None,
    tie_correct: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    n_jobs: int = 1,
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
        Cells x genes sorted at once; bounds memory (about 60 bytes per element and
        thread).
    n_jobs
        Threads working on chunks of genes at once (the heavy numpy steps release the
        GIL); results do not depend on it.

    Returns
    -------
    WilcoxonResult
        z-scores equal to scanpy's ``rank_genes_groups(method="wilcoxon",
        reference=<controls>, tie_correct=tie_correct)`` scores, p-values and BH FDR.
    """
    sums = rank_sums(
        X,
        groups,
        reference,
        n_groups=n_groups,
        tie_correct=tie_correct,
        chunk_elements=chunk_elements,
        n_jobs=n_jobs,
    )
    n_g = sums.n_cells[:, None]
    n_ref = sums.n_reference
    n_total = n_g + n_ref
    mean_u = n_g * n_ref / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        if tie_correct:
            denom = n_total**3 - n_total
            tc = np.where(denom > 0, 1.0 - sums.tie_term / np.where(denom > 0, denom, 1), 1.0)
        else:
            tc = 1.0
        std = np.sqrt(tc * n_g * n_ref * (n_total + 1) / 12.0)
        z = (sums.u - mean_u) / std
    z[~np.isfinite(z)] = 0.0  # all values tied, or an empty group: no evidence
    pvals = 2.0 * special.ndtr(-np.abs(z))
    return WilcoxonResult(
        scores=z,
        pvals=pvals,
        pvals_adj=benjamini_hochberg(pvals),
        n_cells=sums.n_cells.astype(np.int64),
        n_reference=n_ref,
    )


def rank_sums(
    X,
    groups: np.ndarray,
    reference,
    *,
    n_groups: int | None = None,
    tie_correct: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    n_jobs: int = 1,
) -> RankSums:
    """Mann-Whitney U and tie terms of every group against one reference, for all genes.

    The statistics behind :func:`wilcoxon_scores` (same parameters), for tests that turn
    them into p-values differently (e.g. with a continuity correction, see
    :mod:`pertbench.metrics.vcc_de`).
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
    n_cells = np.bincount(groups[in_group], minlength=n_groups).astype(np.float64)
    n_pooled = n_ref + group_rows.size

    U = np.zeros((n_groups, n_genes))
    T = np.zeros((n_groups, n_genes))  # tie term sum(t^3 - t) of group + reference
    T_ref = np.zeros(n_genes)  # the reference-only part of it
    ref_codes = np.zeros(n_ref, dtype=np.int64)
    if R is None and sp.issparse(X) and X.format == "csc":
        # one column slice per chunk serves reference and groups alike
        sources = [
            _RowSource(
                X,
                np.concatenate([ref_rows, group_rows]),
                np.concatenate([ref_codes, groups[group_rows] + 1]),
            )
        ]
    else:
        sources = [
            _RowSource(X if R is None else R, ref_rows, ref_codes),
            _RowSource(X, group_rows, groups[group_rows] + 1),
        ]
    # slot = code * n_chunk + gene must fit the low bits of a sort key
    genes_per_chunk = int(
        min(
            _MAX_CHUNK_GENES,
            max(1, chunk_elements // max(n_pooled, 1)),
            max(1, ((1 << _SLOT_BITS) - 1) // (n_groups + 1)),
        )
    )
    if (n_groups + 1) * genes_per_chunk >= 1 << _SLOT_BITS:
        raise EvaluationError(
            f"{n_groups} groups against one reference are more than the test supports; "
            "split the call into several"
        )

    def chunk(left: int) -> None:
        right = min(left + genes_per_chunk, n_genes)
        n_chunk = right - left
        parts = [source.entries(left, right, n_chunk) for source in sources]
        u, t, t_ref = _rank_sums(parts, n_ref, n_cells, n_chunk, tie_correct)
        U[:, left:right] = u  # disjoint slices: threads never write the same cells
        T[:, left:right] = t
        T_ref[left:right] = t_ref

    lefts = range(0, n_genes, genes_per_chunk)
    if n_jobs > 1 and len(lefts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=int(n_jobs)) as pool:
            list(pool.map(chunk, lefts))
    else:
        for left in lefts:
            chunk(left)

    return RankSums(u=U, tie_term=T + T_ref[None, :], n_cells=n_cells, n_reference=n_ref)


_SLOT_BITS = 23  # low bits of a sort key: slot = pooled code * n_chunk + gene offset
_VALUE_BITS = 32  # middle bits: order-preserving code of the value
_GENE_SHIFT = _SLOT_BITS + _VALUE_BITS  # high bits: gene offset within the chunk
_MAX_CHUNK_GENES = 1 << (63 - _GENE_SHIFT)
_SLOT_MASK = np.int64((1 << _SLOT_BITS) - 1)


class _RowSource:
    """Chosen rows of a matrix, read one block of genes at a time as explicit entries.

    CSC input is read in place: each gene block is a cheap column slice whose entries
    are filtered by row (pass a CSC matrix to test many row subsets without copies).
    Other sparse input is sliced to the rows once and converted to CSC. Dense input is
    indexed per block, so no full copy is made. ``codes`` is the pooled code of each
    chosen row (0 = reference, g + 1 = group g).
    """

    def __init__(self, M, rows: np.ndarray | None, codes: np.ndarray) -> None:
        codes = np.asarray(codes, dtype=np.int64)
        self._templates: dict[int, np.ndarray] = {}  # key bits of a dense block, per width
        self.code_of_row = None
        if sp.issparse(M) and M.format == "csc" and rows is not None:
            self.M, self.rows = M, None
            self.code_of_row = np.full(M.shape[0], -1, dtype=np.int64)
            self.code_of_row[rows] = codes
            self.codes = None
        elif sp.issparse(M):
            sub = M if rows is None else M[rows]
            self.M, self.rows, self.codes = sp.csc_matrix(sub), None, codes
        else:
            self.M, self.rows, self.codes = M, rows, codes

    def _low_bits(self, gene: np.ndarray, code: np.ndarray, n_chunk: int) -> np.ndarray:
        return (gene << _GENE_SHIFT) | (code * n_chunk + gene)

    def entries(self, left: int, right: int, n_chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Non-zero values of genes [left, right) and their key bits (gene and slot)."""
        if sp.issparse(self.M):
            sub = self.M[:, left:right]
            gene = np.repeat(np.arange(right - left, dtype=np.int64), np.diff(sub.indptr))
            values = sub.data
            if self.code_of_row is not None:
                code = self.code_of_row[sub.indices]
                keep = (code >= 0) & (values != 0)
            else:
                code = self.codes[sub.indices]
                keep = values != 0  # explicit zeros are zeros like the implicit ones
            if not keep.all():
                gene, values, code = gene[keep], values[keep], code[keep]
            return values, self._low_bits(gene, code, n_chunk)
        block = self.M[:, left:right] if self.rows is None else self.M[self.rows, left:right]
        flat = np.ascontiguousarray(block).ravel()  # cells x genes; entry order is irrelevant
        template = self._templates.get(n_chunk)
        if template is None or template.size != flat.size:  # key bits of every entry
            gene = np.tile(np.arange(n_chunk, dtype=np.int64), flat.size // max(n_chunk, 1))
            template = self._low_bits(gene, np.repeat(self.codes, n_chunk), n_chunk)
            self._templates[n_chunk] = template
        if np.count_nonzero(flat) == flat.size:  # typical predictions: no zeros
            return flat, template
        keep = flat != 0
        return flat[keep], template[keep]


def _float32_exact(values: np.ndarray) -> bool:
    return values.dtype == np.float32 or bool(np.array_equal(values.astype(np.float32), values))


def _bit_codes(values: np.ndarray) -> np.ndarray:
    """Order-preserving codes in [0, 2^32) of non-zero float32 values, as int64.

    The bit pattern with the sign bit flipped for positives and all bits flipped for
    negatives (zeros never reach here: they are implicit).
    """
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    flip = bits >> np.uint32(31)
    flip *= np.uint32(0x7FFFFFFF)
    flip |= np.uint32(0x80000000)
    flip ^= bits
    return flip.astype(np.int64)


_ZERO_BIT_CODE = 0x80000000


def _sort_keys(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Sort keys (gene, value code, slot) of all parts, and the value code of zero.

    float32 values (and float64 values that are exactly float32) use their bit codes;
    otherwise all values are replaced by their dense rank, zero inserted among them.
    """
    if all(_float32_exact(v) for v, _ in parts):
        keys = []
        for v, low in parts:
            k = _bit_codes(v)
            k <<= _SLOT_BITS
            k |= low
            keys.append(k)
        return (keys[0] if len(keys) == 1 else np.concatenate(keys)), _ZERO_BIT_CODE
    values = np.concatenate([np.asarray(v, dtype=np.float64) for v, _ in parts] + [[0.0]])
    _, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    low = np.concatenate([low for _, low in parts])
    return (inverse[:-1] << _SLOT_BITS) | low, int(inverse[-1])


def _tie_terms(
    keys: np.ndarray, n_chunk: int, size: int, tie_correct: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tie corrections from sorted keys: per slot, the U overcount 0.5 a b and the tie
    term (a + b)^3 - b^3 - a, and per gene the reference-only term r^3 - r.

    a = size of a run of equal (gene, value, slot); b = reference entries tied with it
    (the reference run comes first in its value block). Reference runs land in the
    reference slots (0..n_chunk-1), which the caller discards.
    """
    m = keys.size
    run_start = np.empty(m, dtype=bool)
    run_start[0] = True
    np.not_equal(keys[1:], keys[:-1], out=run_start[1:])
    starts = np.flatnonzero(run_start)
    del run_start
    a = np.diff(starts, append=m).astype(np.float64)
    run_key = keys[starts]
    run_slot = run_key & _SLOT_MASK
    run_head = run_key >> _SLOT_BITS
    del run_key, starts
    block_start = np.empty(run_head.size, dtype=bool)
    block_start[0] = True
    np.not_equal(run_head[1:], run_head[:-1], out=block_start[1:])
    first = np.maximum.accumulate(np.where(block_start, np.arange(run_head.size), 0))
    b = np.where(run_slot[first] < n_chunk, a[first], 0.0)
    u_corr = np.bincount(run_slot, weights=0.5 * a * b, minlength=size)
    if not tie_correct:
        return u_corr, np.zeros(size), np.zeros(n_chunk)
    total = a + b
    t_grp = np.bincount(run_slot, weights=total * total * total - b * b * b - a, minlength=size)
    ref_runs = run_slot < n_chunk
    r = a[ref_runs]
    t_ref = np.bincount(run_slot[ref_runs], weights=r * r * r - r, minlength=n_chunk)
    return u_corr, t_grp, t_ref


def _rank_sums(
    parts: list[tuple[np.ndarray, np.ndarray]],
    n_ref: int,
    n_cells: np.ndarray,
    n_chunk: int,
    tie_correct: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mann-Whitney U and tie terms of every group for one chunk of genes.

    ``parts`` hold the non-zero values and their key bits (gene offset, slot =
    code * n_chunk + gene with code 0 for the reference); zeros are implicit and handled
    as one tied block per gene. Returns U (n_groups, n_chunk), the group/cross tie term
    (n_groups, n_chunk) and the reference-only tie term (n_chunk,).

    After one sort of the keys (gene, value, slot), every entry's count of reference
    entries below it is a cumulative sum; tied reference entries come first within a
    value (code 0), so they were counted fully and are halved afterwards, on the few
    tied entries only.
    """
    n_groups = n_cells.size
    size = (n_groups + 1) * n_chunk
    keys, zero_code = _sort_keys(parts)
    keys.sort()

    slot = keys & _SLOT_MASK
    # reference entries strictly before each entry (in this chunk): the reference
    # positions split the sorted keys into segments of constant count
    ref_at = np.flatnonzero(slot < n_chunk)
    lengths = np.diff(np.concatenate([[0], ref_at + 1, [keys.size]]))
    ref_before = np.repeat(np.arange(ref_at.size + 1, dtype=np.float64), lengths)
    nnz = np.bincount(slot, minlength=size).reshape(n_groups + 1, n_chunk)
    ref_offset = np.concatenate([[0], np.cumsum(nnz[0])[:-1]])  # per gene, before its start
    U = np.bincount(slot, weights=ref_before, minlength=size).reshape(n_groups + 1, n_chunk)
    U = (U[1:] - nnz[1:] * ref_offset[None, :]).astype(np.float64)
    del ref_before, ref_at, lengths

    # negative entries: per gene, the keys below the zero value (usually none)
    gene_base = np.arange(n_chunk, dtype=np.int64) << _GENE_SHIFT
    starts = np.searchsorted(keys, gene_base)
    zeros_at = np.searchsorted(keys, gene_base | (np.int64(zero_code) << _SLOT_BITS))
    n_neg_total = int((zeros_at - starts).sum())
    if n_neg_total:
        lengths = zeros_at - starts
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        idx = np.arange(n_neg_total) + offsets
        n_neg = np.bincount(slot[idx], minlength=size).reshape(n_groups + 1, n_chunk)
    else:
        n_neg = np.zeros((n_groups + 1, n_chunk), dtype=np.int64)
    n_pos = nnz - n_neg

    # ties among explicit values: only entries whose (gene, value) repeats matter
    head = keys >> _SLOT_BITS  # gene and value
    same = head[1:] == head[:-1]
    T = np.zeros(size)
    T_ref = np.zeros(n_chunk)
    n_same = int(np.count_nonzero(same))
    if n_same:
        if 2 * n_same < keys.size:  # few ties (predictions): work on the tied entries
            tied = np.zeros(keys.size, dtype=bool)
            tied[1:] = same
            tied[:-1] |= same
            tk = keys[tied]
        else:  # many ties (counts): untied entries are runs of one and add nothing
            tk = keys
        del head, same
        u_corr, t_grp, t_ref = _tie_terms(tk, n_chunk, size, tie_correct)
        U -= u_corr.reshape(n_groups + 1, n_chunk)[1:]
        T += t_grp
        T_ref += t_ref
    T = T.reshape(n_groups + 1, n_chunk)[1:]

    # the zero block of each gene: group zeros vs reference zeros and negatives
    z_ref = (n_ref - nnz[0]).astype(np.float64)
    z_grp = n_cells[:, None] - nnz[1:]
    U += z_grp * (n_neg[0] + 0.5 * z_ref)[None, :] + n_pos[1:] * z_ref[None, :]
    if tie_correct:
        total = z_grp + z_ref
        T += total**3 - z_ref**3 - z_grp
        T_ref += z_ref**3 - z_ref
    return U, T, T_ref


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
    n = s.shape[1]
    k = int(min(max(k, 0), n))
    if k == 0:
        return np.zeros(s.shape, dtype=bool)
    if k == n:
        return np.ones(s.shape, dtype=bool)
    # the k-th largest value of each row, then everything above it and, among the values
    # equal to it, the first ones by position (a partition, not a full sort)
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
    above = s > kth
    equal = s == kth
    room = k - above.sum(axis=1, keepdims=True)
    return above | (equal & (np.cumsum(equal, axis=1) <= room))


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


@dataclass
class DEPair:
    """What DE metrics compare for the scored groups of a block (one row per group).

    ``truth_z``/``pred_z`` are Wilcoxon z-scores against the observed controls,
    ``truth_fdr`` the truth's BH-adjusted p-values, ``truth_delta``/``pred_delta`` the mean
    differences to the controls; ``top_k`` and ``fdr`` are the evaluation's settings.
    """

    truth_z: np.ndarray
    truth_fdr: np.ndarray
    pred_z: np.ndarray
    truth_delta: np.ndarray
    pred_delta: np.ndarray
    top_k: int = 100
    fdr: float = 0.05


def pair_jaccard(de: DEPair, *, absolute: bool = False) -> np.ndarray:
    """:func:`jaccard_top_k` of a :class:`DEPair` (the registry's compute)."""
    return jaccard_top_k(de.truth_z, de.pred_z, de.top_k, absolute=absolute)


def pair_overlap(de: DEPair) -> np.ndarray:
    """:func:`overlap_top_k` of a :class:`DEPair`."""
    return overlap_top_k(de.truth_z, de.truth_fdr, de.pred_z, de.top_k, fdr=de.fdr)


def pair_direction_agreement(de: DEPair) -> np.ndarray:
    """:func:`direction_agreement` of a :class:`DEPair`."""
    return direction_agreement(de.truth_delta, de.truth_fdr, de.pred_delta, fdr=de.fdr)
