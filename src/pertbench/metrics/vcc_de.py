"""cell-eval's differential expression, vectorised: the DE results its DE metrics read.

cell-eval 0.8.2 computes DE with pdex 0.3.0 (``pdex(adata, mode="ref", is_log1p=True,
epsilon=0)``): for every perturbation against the control cells, per gene,

- a two-sided Mann-Whitney U test with the normal approximation, the tie-corrected
  variance AND a continuity correction of 1/2 (scipy's ``mannwhitneyu(...,
  method="asymptotic")``); p = 1 where every value is tied;
- Benjamini-Hochberg FDR per perturbation across genes;
- log2 fold change of the geometric means back-transformed to counts:
  ``log2(expm1(mean(x_group)) / expm1(mean(x_control)))`` with ``x`` the log1p values,
  0 where both means are 0 and +-inf where only one is.

This differs from pertbench's own test (:func:`pertbench.metrics.de.wilcoxon_scores`:
no continuity correction, DE genes ranked by |z|) only in how U becomes a p-value, so
the rank sums come from the same vectorised machinery (:func:`pertbench.metrics.de.
rank_sums`); the continuity-corrected p-value is computed here.

Precision. pdex averages a group in the precision of the matrix (float32 for float32
data) and in its storage's order of operations: a sparse matrix is scaled by 1/n then
summed, a dense one is summed then divided by n; ``expm1`` is the C library's (numba
compiles pdex), and cell-eval then stores fold changes and FDR as float32. Ranking genes
by |fold change| is sensitive to the last float32 bit (ties are broken by gene
position), so this module reproduces that arithmetic exactly: the same sums in the same
order, ``expm1`` through numba, and float32 storage. The prediction side is computed as
cell-eval computes it on a prediction file that holds the predicted cells and the
truth's control cells, in the prediction's storage (dense or sparse) and the dtype
common to both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import special

from pertbench.data.groups import indicator_matrix
from pertbench.errors import EvaluationError
from pertbench.metrics.de import DEFAULT_CHUNK_ELEMENTS, benjamini_hochberg, rank_sums


@dataclass
class CellEvalDE:
    """Per group and gene DE results, as cell-eval stores them.

    Attributes
    ----------
    log2_fold_change
        (n_groups, n_genes) float32; may hold +-inf (a gene absent from one side).
    pvals
        (n_groups, n_genes) float64 two-sided continuity-corrected Mann-Whitney p-values.
    fdr
        (n_groups, n_genes) float32 Benjamini-Hochberg FDR, per group across genes.
    n_cells
        Cells per group.
    n_reference
        Control cells.
    """

    log2_fold_change: np.ndarray
    pvals: np.ndarray
    fdr: np.ndarray
    n_cells: np.ndarray
    n_reference: int


def cell_eval_de(
    X,
    groups: np.ndarray,
    reference,
    *,
    n_groups: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    n_jobs: int = 1,
) -> CellEvalDE:
    """DE of every group against the control cells exactly as cell-eval 0.8.2 computes it.

    Parameters
    ----------
    X
        (n_cells, n_genes) log1p-normalised expression, dense or sparse.
    groups
        Integer group code of each row of ``X`` (0..n_groups-1); -1 for rows in no group.
    reference
        The control cells: a boolean mask over the rows of ``X`` (the observed side:
        groups and controls in one matrix), or a separate (n_controls, n_genes) matrix
        (the predicted side: the truth's controls, averaged as rows of a prediction
        file in ``X``'s storage).
    n_groups
        Number of groups (default: max code + 1).
    chunk_elements, n_jobs
        Memory bound and threads of the rank sums (see
        :func:`pertbench.metrics.de.wilcoxon_scores`); results do not depend on them.

    Returns
    -------
    CellEvalDE
        Fold changes, p-values and FDR equal to cell-eval's ``real_de.csv`` /
        ``pred_de.csv`` after its float32 cast.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if n_groups is None:
        n_groups = int(groups.max()) + 1 if groups.size and groups.max() >= 0 else 0
    X = _pdex_precision(X)
    if isinstance(reference, np.ndarray) and reference.dtype == bool:
        if reference.shape[0] != X.shape[0]:
            raise EvaluationError("reference mask must have one entry per row of X")
        ref_codes = np.where(reference, 0, -1)
        ref_matrix = X
    else:
        ref_matrix = _pdex_precision(reference)
        dtype = np.result_type(X.dtype, ref_matrix.dtype)
        X, ref_matrix = _as_dtype(X, dtype), _as_dtype(ref_matrix, dtype)
        ref_codes = np.zeros(ref_matrix.shape[0], dtype=np.int64)
        reference = ref_matrix
    sums = rank_sums(
        X,
        groups,
        reference,
        n_groups=n_groups,
        tie_correct=True,
        chunk_elements=chunk_elements,
        n_jobs=n_jobs,
    )
    pvals = continuity_corrected_pvalues(sums.u, sums.tie_term, sums.n_cells, sums.n_reference)
    fdr = benjamini_hochberg(pvals).astype(np.float32)
    # the mean of every group, and of the controls, as pdex forms it for this storage
    dense_style = not sp.issparse(X)
    group_log_mean = _log_means(X, groups, n_groups, dense_style=dense_style)
    control_log_mean = _log_means(ref_matrix, ref_codes, 1, dense_style=dense_style)[0]
    lfc = _kernels()(group_log_mean, control_log_mean)
    return CellEvalDE(
        log2_fold_change=lfc.astype(np.float32),
        pvals=pvals,
        fdr=fdr,
        n_cells=sums.n_cells.astype(np.int64),
        n_reference=sums.n_reference,
    )


def continuity_corrected_pvalues(
    u: np.ndarray, tie_term: np.ndarray, n_cells: np.ndarray, n_reference: int
) -> np.ndarray:
    """Two-sided Mann-Whitney p-values with tie and continuity corrections (scipy/pdex).

    z = (max(U, n1 n2 - U) - n1 n2 / 2 - 1/2) / s with s^2 = n1 n2 / 12 ((n + 1) -
    T / (n (n - 1))), p = 2 Phi(-z) clipped to [0, 1]; p = 1 where s = 0 (all tied) or
    the group is empty. The arithmetic follows pdex's order of operations.
    """
    n1 = np.asarray(n_cells, dtype=np.float64)[:, None]
    n2 = float(n_reference)
    n = n1 + n2
    u1 = np.asarray(u, dtype=np.float64)
    u_max = np.maximum(u1, n1 * n2 - u1)
    mu = n1 * n2 / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        var_inner = (n + 1.0) - tie_term / (n * (n - 1.0))
        s_sq = n1 * n2 / 12.0 * var_inner
        z = (u_max - mu - 0.5) / np.sqrt(s_sq)
        p = special.erfc(z / np.sqrt(2.0))  # = 2 Phi(-z)
    p = np.clip(p, 0.0, 1.0)
    return np.where((s_sq > 0) & (n1 > 0), p, 1.0)


def _pdex_precision(M):
    """float16 is cast to float32 (as cell-eval does for numba); other dtypes are kept."""
    dtype = M.dtype
    if dtype == np.float16:
        return M.astype(np.float32)
    if not np.issubdtype(dtype, np.floating):
        return M.astype(np.float64)
    return M


def _as_dtype(M, dtype):
    return M if M.dtype == dtype else M.astype(dtype)


def _log_means(M, codes: np.ndarray, n_groups: int, *, dense_style: bool) -> np.ndarray:
    """Mean of each group's rows of ``M`` in ``M``'s precision, summed in row order.

    ``dense_style``: sum then divide by n (numpy's ``mean`` of a dense matrix); otherwise
    scale every value by 1/n then sum (scipy's ``mean`` of a sparse matrix). Rows of a
    sparse ``M`` can feed a dense-style mean: adding the implicit zeros changes no sum.
    """
    dtype = M.dtype
    codes = np.asarray(codes, dtype=np.int64)
    counts = np.bincount(codes[codes >= 0], minlength=n_groups)
    ind = indicator_matrix(codes, n_groups)
    if not dense_style:  # one weight 1/n per row, rounded to the matrix's precision
        with np.errstate(divide="ignore"):
            weights = (1.0 / np.maximum(counts, 1)).astype(dtype)
        per_entry = np.repeat(weights, np.diff(ind.indptr))  # CSR entries, row by row
        ind = sp.csr_matrix((per_entry, ind.indices, ind.indptr), shape=ind.shape)
    ind = ind.astype(dtype)
    sums = ind @ (sp.csr_matrix(M) if sp.issparse(M) else np.asarray(M))
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    sums = sums.astype(dtype, copy=False)
    if dense_style:
        with np.errstate(invalid="ignore", divide="ignore"):
            sums = sums / counts[:, None].astype(dtype)
    return sums


@functools.cache
def _kernels():
    """The fold-change ufuncs, compiled by numba on first use.

    numba lowers ``np.expm1`` to the C library's ``expm1``/``expm1f``, which pdex uses
    and which numpy's own float32 ``expm1`` does not match bit for bit.
    """
    import numba

    @numba.vectorize(["float32(float32)", "float64(float64)"], cache=False)
    def expm1(x):
        return np.expm1(x)

    @numba.vectorize(["float64(float64, float64)"], cache=False)
    def log2_ratio(target, control):
        lfc = np.log2(target / control)
        return 0.0 if np.isnan(lfc) else lfc  # 0 / 0: absent from both sides, no change

    def geometric_log2_fold_change(group_log_mean, control_log_mean):
        target = expm1(group_log_mean).astype(np.float64)
        control = expm1(control_log_mean).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            return log2_ratio(target, control[None, :])

    return geometric_log2_fold_change
