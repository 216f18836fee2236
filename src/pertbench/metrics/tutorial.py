"""The scGen / scPRAM tutorial metric set for ONE held-out group (e.g. stimulated CD4 T).

:func:`tutorial_metrics` returns a flat dict with stable names:

- ``r2``, ``mse``, ``pearson``: of the per-gene means of ALL truth and predicted cells
  (plain, METRICS.md's definitions; ``r2`` uses the observed means as truth,
  :func:`pertbench.metrics.fit.r2`). Anyone can recompute them from the two matrices.
- ``r2_boot``, ``mse_boot``, ``pearson_boot``: the tutorial's bootstrap variants, each the
  mean over ``n_bootstrap`` (100) draws; a draw resamples ``fraction`` (80%) of the truth
  cells and 80% of the predicted cells WITH replacement (seeded) and compares their gene
  means. They differ from the plain values (a resampled mean is noisier, which lowers
  R^2), so the two are never given under one name.
- ``pearson_delta``: Pearson of (pred mean - control mean) vs (truth mean - control mean)
  on all cells.
- ``edistance``: energy distance in a PCA space (``n_pcs``) fitted on the observed cells
  (controls + truth), at most ``max_cells`` cells per side (seeded).
- ``mean_var_kde``: L1 distance of the per-gene (mean, variance) KDEs.
- ``jaccard_top100``: Jaccard index of the top-``k`` up-regulated genes (largest Wilcoxon
  z against the controls) in truth and in prediction.
- The same, except the Jaccard index (which would be 1 by construction), restricted to
  the truth's top-``k`` up-regulated genes, named with the suffix ``_top100de``:
  ``r2_top100de``, ``r2_boot_top100de``, ``mse_top100de``, ``mse_boot_top100de``,
  ``pearson_top100de``, ``pearson_boot_top100de``, ``pearson_delta_top100de``,
  ``edistance_top100de``, ``mean_var_kde_top100de`` (``100`` is ``top_k``).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.errors import EvaluationError
from pertbench.metrics.de import jaccard_top_k, top_k_mask, wilcoxon_scores
from pertbench.metrics.distribution import (
    DEFAULT_MAX_CELLS,
    edistance,
    mean_var_kde,
    pca_basis,
    project,
    subsample,
)
from pertbench.metrics.fit import mse, pearson, r2


def _matrices(truth, pred, controls):
    """Align the three inputs on genes; returns dense-or-sparse matrices and gene names."""
    if all(isinstance(x, ad.AnnData) for x in (truth, pred, controls)):
        genes = pd.Index(truth.var_names.astype(str))
        out = []
        for label, a in (("truth", truth), ("pred", pred), ("controls", controls)):
            names = pd.Index(a.var_names.astype(str))
            idx = names.get_indexer(genes)
            if (idx < 0).any():
                missing = genes[idx < 0]
                raise EvaluationError(
                    f"{len(missing)} gene(s) of truth are missing from {label}, e.g. {', '.join(missing[:5])}"
                )
            X = a.X if np.array_equal(idx, np.arange(len(names))) else a.X[:, idx]
            out.append(X)
        return (*out, genes)
    if any(isinstance(x, ad.AnnData) for x in (truth, pred, controls)):
        raise EvaluationError("give truth, pred and controls all as AnnData or all as arrays")
    mats = [
        x if sp.issparse(x) else np.atleast_2d(np.asarray(x, dtype=np.float64))
        for x in (truth, pred, controls)
    ]
    n_genes = {m.shape[1] for m in mats}
    if len(n_genes) != 1:
        raise EvaluationError(
            f"truth, pred and controls must have the same number of genes, got {[m.shape[1] for m in mats]}"
        )
    return (*mats, pd.Index([f"gene{i}" for i in range(mats[0].shape[1])]))


def _mean_var(X) -> tuple[np.ndarray, np.ndarray]:
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float64)
        mean = np.asarray(X.mean(axis=0)).ravel()
        sq = np.asarray(X.multiply(X).mean(axis=0)).ravel()
        return mean, np.maximum(sq - mean**2, 0.0)
    X = np.asarray(X, dtype=np.float64)
    return X.mean(axis=0), X.var(axis=0)


def _bootstrap_means(X, n_bootstrap: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(n_bootstrap, n_genes) gene means of resamples of ``fraction`` of the rows."""
    n = X.shape[0]
    size = max(1, round(fraction * n))
    draws = rng.integers(0, n, size=(n_bootstrap, size))
    offsets = (np.arange(n_bootstrap) * n)[:, None]
    W = np.bincount((draws + offsets).ravel(), minlength=n_bootstrap * n).reshape(n_bootstrap, n)
    W = sp.csr_matrix(W.astype(np.float64))
    sums = W @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return sums / size


def tutorial_metrics(
    truth,
    pred,
    controls,
    *,
    n_bootstrap: int = 100,
    fraction: float = 0.8,
    n_pcs: int = 30,
    top_k: int = 100,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    tie_correct: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """The tutorial's evaluation of one held-out group (see the module docstring).

    Parameters
    ----------
    truth, pred, controls
        Observed perturbed cells, predicted cells and observed control cells of the same
        covariates: AnnData (genes matched by name, truth's order) or arrays over the same
        genes.
    n_bootstrap, fraction
        Bootstrap draws and the share of cells (with replacement) per draw (the
        ``*_boot`` metrics).
    n_pcs
        PCA dimensions of the E-distance.
    top_k
        Size of the DE gene sets.
    max_cells
        Cells per side in the E-distance (seeded subsample).
    tie_correct
        Tie correction of the Wilcoxon test behind the DE sets.
    seed
        Seeds the bootstrap and the subsampling.

    Returns
    -------
    dict
        Metric name -> value.
    """
    T, P, C, _ = _matrices(truth, pred, controls)
    for label, M in (("truth", T), ("pred", P), ("controls", C)):
        if M.shape[0] == 0:
            raise EvaluationError(f"{label} has no cells")
        data = M.data if sp.issparse(M) else np.asarray(M)
        if not np.isfinite(data).all():
            raise EvaluationError(f"{label} contains NaN or inf values")
    if not 0.0 < fraction <= 1.0:
        raise EvaluationError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    n_genes = T.shape[1]

    # DE sets: both sides against the same observed controls, in one test call each
    codes = np.zeros(T.shape[0], dtype=np.int64)
    z_truth = wilcoxon_scores(T, codes, C, n_groups=1, tie_correct=tie_correct).scores[0]
    z_pred = wilcoxon_scores(
        P, np.zeros(P.shape[0], dtype=np.int64), C, n_groups=1, tie_correct=tie_correct
    ).scores[0]
    de_genes = np.flatnonzero(top_k_mask(z_truth, top_k)[0])

    boot_truth = _bootstrap_means(T, n_bootstrap, fraction, rng)
    boot_pred = _bootstrap_means(P, n_bootstrap, fraction, rng)
    t_mean, t_var = _mean_var(T)
    p_mean, p_var = _mean_var(P)
    c_mean, _ = _mean_var(C)

    # one E-distance space per gene set, fitted on observed cells (controls + truth)
    observed = (
        sp.vstack([sp.csr_matrix(C), sp.csr_matrix(T)])
        if sp.issparse(T) or sp.issparse(C)
        else np.vstack([C, T])
    )
    t_rows = subsample(T.shape[0], max_cells, rng)
    p_rows = subsample(P.shape[0], max_cells, rng)

    out: dict[str, float] = {}
    suffix_sets = [("", np.arange(n_genes)), (f"_top{top_k}de", de_genes)]
    for suffix, cols in suffix_sets:
        bt, bp = boot_truth[:, cols], boot_pred[:, cols]
        for name, fit in (("r2", r2), ("mse", mse), ("pearson", pearson)):
            out[f"{name}{suffix}"] = float(fit(p_mean[cols], t_mean[cols]))
            out[f"{name}_boot{suffix}"] = float(np.mean(fit(bp, bt)))
        out[f"pearson_delta{suffix}"] = float(
            pearson(p_mean[cols] - c_mean[cols], t_mean[cols] - c_mean[cols])
        )
        mean, comps = pca_basis(observed[:, cols], n_pcs=n_pcs, seed=seed)
        out[f"edistance{suffix}"] = edistance(
            project(P[p_rows][:, cols], mean, comps), project(T[t_rows][:, cols], mean, comps)
        )
        out[f"mean_var_kde{suffix}"] = mean_var_kde(
            np.column_stack([p_mean[cols], p_var[cols]]),
            np.column_stack([t_mean[cols], t_var[cols]]),
        )
        if not suffix:
            out[f"jaccard_top{top_k}"] = float(jaccard_top_k(z_truth, z_pred, top_k)[0])
    return out
