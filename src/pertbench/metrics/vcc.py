"""cell-eval / Virtual Cell Challenge metrics with cell-eval 0.8.2's exact definitions.

Pure, vectorised functions over (n_groups, n_genes) arrays of ONE covariate block (the
unit cell-eval scores: one cell type / cell line, its perturbations and its controls).
Every function returns one value per group (perturbation) unless it says otherwise.
The VCC score is built from three of them (:data:`VCC_PROFILE`): the DE score
``overlap_at_N``, the perturbation discrimination score ``discrimination_score_l1`` and
``mae``, each normalised against a baseline's value (:func:`vcc_score`).

Inputs:

- DE results, as computed by :func:`pertbench.metrics.vcc_de.cell_eval_de`: per group
  and gene the log2 fold change against the controls and the BH FDR. cell-eval stores
  both as float32, so every DE metric here rounds them to float32 first (idempotent)
  and compares ``float32(fdr) < float32(fdr_threshold)``.
- Group means (the mean of a group's cells, per gene, in the precision of its matrix:
  cell-eval averages float32 data to float32) and the controls' mean.
- For the discrimination score, the position of each perturbation's target gene among
  the genes (-1: none); cell-eval excludes the gene whose name equals the perturbation
  label exactly, so a combination ``A+B`` or a drug excludes nothing.

Values equal cell-eval's (tested against the package) except where cell-eval's own
value is arbitrary: DE genes with equal |fold change| across a top-k cut (taken in gene
order here; cell-eval's order follows polars' unstable sort) and exactly tied
discrimination distances (counted half here).

The AnnData entry point that builds these inputs, checks the expression scale and
scores a whole prediction is :func:`pertbench.metrics.vcc_eval.vcc_metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.distance import cdist
from scipy.stats import rankdata

from pertbench.errors import ConfigError, EvaluationError

#: The metrics of cell-eval's ``vcc`` profile, the three the VCC score averages.
VCC_PROFILE = ("mae", "discrimination_score_l1", "overlap_at_N")

#: Fixed top-k sizes of cell-eval's overlap/precision metrics (besides N).
FIXED_K = (50, 100, 200, 500)

#: Distances of the discrimination score (cell-eval's names).
PDS_DISTANCES = ("l1", "l2", "cosine")

#: How each metric is normalised against the baseline (cell-eval's registry): the best
#: value 0 (error metrics) or 1; metrics not listed are not scored.
BEST_VALUE: dict[str, float] = {
    "mae": 0.0,
    "mse": 0.0,
    "mae_delta": 0.0,
    "mse_delta": 0.0,
    "pearson_delta": 1.0,
    **{f"discrimination_score_{d}": 1.0 for d in PDS_DISTANCES},
    **{f"{m}_at_{k}": 1.0 for m in ("overlap", "precision") for k in ("N", *FIXED_K)},
    "de_spearman_sig": 1.0,
    "de_direction_match": 1.0,
    "de_spearman_lfc_sig": 1.0,
    "de_sig_genes_recall": 1.0,
}

DEFAULT_FDR = 0.05


# ---------------------------------------------------------------------------------------
# DE metrics
# ---------------------------------------------------------------------------------------
def significant(fdr: np.ndarray, *, fdr_threshold: float = DEFAULT_FDR) -> np.ndarray:
    """Boolean mask of DE genes: ``float32(fdr) < float32(fdr_threshold)`` (cell-eval's
    float32 storage and comparison)."""
    fdr = np.atleast_2d(np.asarray(fdr))
    if np.isnan(fdr).any():
        raise EvaluationError("FDR values contain NaN; compute DE with cell_eval_de")
    return fdr.astype(np.float32) < np.float32(fdr_threshold)


@dataclass
class TopGenes:
    """Each group's top-k DE genes by |log2 fold change| (see :func:`top_de_genes`).

    Attributes
    ----------
    mask
        (n_groups, n_genes) True for the chosen genes.
    k
        (n_groups,) places filled: min(k, number of DE genes).
    tied
        (n_groups,) DE genes tied with the last place when that tie crosses the cut
        (some are chosen, some not), else 0.
    places
        (n_groups,) how many of the tied genes were chosen (0 without such a tie).
    """

    mask: np.ndarray
    k: np.ndarray
    tied: np.ndarray
    places: np.ndarray


def top_de_genes(
    log2_fold_change: np.ndarray,
    fdr: np.ndarray,
    k: np.ndarray,
    *,
    fdr_threshold: float = DEFAULT_FDR,
) -> TopGenes:
    """Each group's top-``k`` DE genes by |log2 fold change|, as cell-eval ranks them.

    cell-eval keeps the genes with FDR below the threshold, ranks them by the float32
    |fold change|, largest first (+inf first), and takes the first k. Genes tied with
    the k-th value are taken in gene order here (deterministic); cell-eval takes them in
    the order of polars' unstable sort, which changes with polars' number of threads.
    The two agree unless such a tie crosses the cut, which :class:`TopGenes` reports.

    Parameters
    ----------
    log2_fold_change, fdr
        (n_groups, n_genes) DE results.
    k
        (n_groups,) places per group (0: none).
    """
    lfc = _float32_lfc(log2_fold_change)
    sig = significant(fdr, fdr_threshold=fdr_threshold)
    if lfc.shape != sig.shape:
        raise EvaluationError(
            f"fold changes have shape {lfc.shape} but FDR {sig.shape}; give one per group and gene"
        )
    size = np.abs(lfc)
    k = np.minimum(np.asarray(k, dtype=np.int64), sig.sum(axis=1))
    # rank of every DE gene: a stable sort of -|lfc| keeps equal values in gene order
    order = np.argsort(-size, axis=1, kind="stable")
    sig_in_order = np.take_along_axis(sig, order, axis=1)
    rank_in_order = np.where(sig_in_order, np.cumsum(sig_in_order, axis=1) - 1, lfc.shape[1])
    rank = np.empty_like(rank_in_order)
    np.put_along_axis(rank, order, rank_in_order, axis=1)
    mask = rank < k[:, None]
    # a tie crosses the cut where an unchosen DE gene equals the last chosen value
    last = np.where(mask, size, np.float32(np.inf)).min(axis=1, keepdims=True)
    at_last = sig & (size == last)
    crosses = (at_last & ~mask).any(axis=1) & (k > 0)
    tied = np.where(crosses, at_last.sum(axis=1), 0)
    places = np.where(crosses, (at_last & mask).sum(axis=1), 0)
    return TopGenes(mask=mask, k=k, tied=tied, places=places)


@dataclass
class TopKSets:
    """The top-k DE genes of truth and prediction compared by one overlap metric.

    Attributes
    ----------
    truth, pred
        The chosen genes of each side (a side with fewer DE genes fills fewer places).
    k
        (n_groups,) places k' per group: the metric's denominator.
    """

    truth: TopGenes
    pred: TopGenes
    k: np.ndarray

    def shared(self) -> np.ndarray:
        """|A & B| / k' per group (0 where k' = 0)."""
        both = (self.truth.mask & self.pred.mask).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.k > 0, both / np.maximum(self.k, 1), 0.0)


def top_k_sets(
    truth_lfc: np.ndarray,
    truth_fdr: np.ndarray,
    pred_lfc: np.ndarray,
    pred_fdr: np.ndarray,
    *,
    k: int | None = None,
    size_from: str = "truth",
    fdr_threshold: float = DEFAULT_FDR,
) -> TopKSets:
    """The sets :func:`overlap_at_n` (``size_from="truth"``) and :func:`precision_at_n`
    (``size_from="pred"``) compare: k' = the number of DE genes of that side for
    ``k=None``, else min(k, that number); the top k' DE genes of each side."""
    if k is not None and (int(k) != k or k < 1):
        raise ConfigError(f"k must be a positive integer or None (N), got {k!r}")
    if size_from not in ("truth", "pred"):
        raise ConfigError(f"size_from must be 'truth' or 'pred', got {size_from!r}")
    if np.shape(truth_lfc) != np.shape(pred_lfc):
        raise EvaluationError(
            f"truth DE has shape {np.shape(truth_lfc)} but prediction DE "
            f"{np.shape(pred_lfc)}; give both for the same groups and genes"
        )
    fdr = truth_fdr if size_from == "truth" else pred_fdr
    n = significant(fdr, fdr_threshold=fdr_threshold).sum(axis=1)
    k_eff = n if k is None else np.minimum(int(k), n)
    return TopKSets(
        truth=top_de_genes(truth_lfc, truth_fdr, k_eff, fdr_threshold=fdr_threshold),
        pred=top_de_genes(pred_lfc, pred_fdr, k_eff, fdr_threshold=fdr_threshold),
        k=k_eff,
    )


def _top_k_metric(name: str, size_from: str, doc: str):
    """One of cell-eval's two top-k overlap metrics: k' set by the truth or the prediction."""

    def metric(
        truth_lfc: np.ndarray,
        truth_fdr: np.ndarray,
        pred_lfc: np.ndarray,
        pred_fdr: np.ndarray,
        *,
        k: int | None = None,
        fdr_threshold: float = DEFAULT_FDR,
    ) -> np.ndarray:
        de = (truth_lfc, truth_fdr, pred_lfc, pred_fdr)
        return top_k_sets(*de, k=k, size_from=size_from, fdr_threshold=fdr_threshold).shared()

    metric.__name__ = metric.__qualname__ = name
    metric.__doc__ = doc
    return metric


overlap_at_n = _top_k_metric(
    "overlap_at_n",
    "truth",
    """cell-eval's ``overlap_at_N`` (the VCC DE score) and ``overlap_at_<k>``.

    A = the truth's DE genes (FDR < threshold) ranked by |log2 fold change|, B = the
    PREDICTION's DE genes ranked the same way (its own test against the controls). With
    n = #A: k' = n for ``k=None`` (N, the number of true DE genes), else min(k, n);
    value = |top k' of A & top k' of B| / k'. A prediction with fewer than k' DE genes
    cannot fill its share. 0 (not NaN) where the truth has no DE gene, as cell-eval.
    Genes tied at a cut are taken in gene order (see :func:`top_de_genes`).

    Parameters: ``truth_lfc, truth_fdr, pred_lfc, pred_fdr`` ((n_groups, n_genes) DE
    results), keyword-only ``k`` (None: N) and ``fdr_threshold``.
    """,
)

precision_at_n = _top_k_metric(
    "precision_at_n",
    "pred",
    """cell-eval's ``precision_at_N`` and ``precision_at_<k>``.

    As :func:`overlap_at_n` but k' is set by the PREDICTION's DE genes: m = #B, k' = m
    for ``k=None``, else min(k, m); value = |top k' of A & top k' of B| / k'. 0 where the
    prediction has no DE gene.
    """,
)


def de_direction_match(
    truth_lfc: np.ndarray,
    truth_fdr: np.ndarray,
    pred_lfc: np.ndarray,
    *,
    fdr_threshold: float = DEFAULT_FDR,
) -> np.ndarray:
    """cell-eval's ``de_direction_match``: among the truth's DE genes, the fraction whose
    predicted fold change has the same sign (sign 0 matches only 0). NaN where the truth
    has no DE gene (cell-eval reports no value)."""
    sig = significant(truth_fdr, fdr_threshold=fdr_threshold)
    same = np.sign(_float32_lfc(truth_lfc)) == np.sign(_float32_lfc(pred_lfc))
    n_sig = sig.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_sig > 0, (same & sig).sum(axis=1) / np.maximum(n_sig, 1), np.nan)


def de_spearman_lfc_sig(
    truth_lfc: np.ndarray,
    truth_fdr: np.ndarray,
    pred_lfc: np.ndarray,
    *,
    fdr_threshold: float = DEFAULT_FDR,
) -> np.ndarray:
    """cell-eval's ``de_spearman_lfc_sig``: Spearman correlation (Pearson of average
    ranks; +-inf rank last/first) of truth and predicted fold changes over the truth's DE
    genes. NaN with fewer than two DE genes or a constant side, as polars gives; NaN
    where the truth has no DE gene."""
    sig = significant(truth_fdr, fdr_threshold=fdr_threshold)
    t = np.where(sig, _float32_lfc(truth_lfc).astype(np.float64), np.nan)
    p = np.where(sig, _float32_lfc(pred_lfc).astype(np.float64), np.nan)
    return _pearson_rows(
        rankdata(t, axis=1, nan_policy="omit"), rankdata(p, axis=1, nan_policy="omit")
    )


def de_sig_genes_recall(
    truth_fdr: np.ndarray, pred_fdr: np.ndarray, *, fdr_threshold: float = DEFAULT_FDR
) -> np.ndarray:
    """cell-eval's ``de_sig_genes_recall``: |truth DE & predicted DE| / |truth DE| (no
    ranking, no top-k). NaN where the truth has no DE gene."""
    t = significant(truth_fdr, fdr_threshold=fdr_threshold)
    p = significant(pred_fdr, fdr_threshold=fdr_threshold)
    n_t = t.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_t > 0, (t & p).sum(axis=1) / np.maximum(n_t, 1), np.nan)


def de_nsig_counts(
    truth_fdr: np.ndarray, pred_fdr: np.ndarray, *, fdr_threshold: float = DEFAULT_FDR
) -> tuple[np.ndarray, np.ndarray]:
    """cell-eval's ``de_nsig_counts_real`` and ``de_nsig_counts_pred``: DE genes per group."""
    t = significant(truth_fdr, fdr_threshold=fdr_threshold).sum(axis=1)
    p = significant(pred_fdr, fdr_threshold=fdr_threshold).sum(axis=1)
    return t.astype(np.float64), p.astype(np.float64)


def de_spearman_sig(
    truth_fdr: np.ndarray, pred_fdr: np.ndarray, *, fdr_threshold: float = DEFAULT_FDR
) -> float:
    """cell-eval's ``de_spearman_sig``, ONE value per covariate block: Spearman
    correlation of the number of truth and predicted DE genes over the groups where the
    truth has any. 1.0 when no group has one; NaN with one group or a constant side.
    cell-eval copies this value into every group's row."""
    n_t, n_p = de_nsig_counts(truth_fdr, pred_fdr, fdr_threshold=fdr_threshold)
    keep = n_t > 0
    if not keep.any():
        return 1.0
    ranks_t = rankdata(n_t[keep])[None, :]
    ranks_p = rankdata(n_p[keep])[None, :]
    return float(_pearson_rows(ranks_t, ranks_p)[0])


# ---------------------------------------------------------------------------------------
# Metrics on group means
# ---------------------------------------------------------------------------------------
def mae(truth_means: np.ndarray, pred_means: np.ndarray) -> np.ndarray:
    """cell-eval's ``mae``: mean over genes of |predicted mean - observed mean| (the
    expression itself, not its change from the controls)."""
    return _mean_error(pred_means, truth_means, square=False)


def mse(truth_means: np.ndarray, pred_means: np.ndarray) -> np.ndarray:
    """cell-eval's ``mse``: mean over genes of (predicted mean - observed mean)^2."""
    return _mean_error(pred_means, truth_means, square=True)


def change_metrics(
    truth_means: np.ndarray,
    pred_means: np.ndarray,
    control_mean: np.ndarray,
    *,
    pred_control_mean: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """cell-eval's metrics on the changes from the controls (effects e = mean - control).

    Returns ``mae_delta`` (mean over genes of |e_pred - e_truth|), ``mse_delta`` (of the
    squares) and ``pearson_delta`` (Pearson correlation over genes of e_pred and
    e_truth; NaN for a constant change, scipy's value). See :func:`discrimination_score`
    for ``pred_control_mean``.
    """
    t, p = _effects(truth_means, pred_means, control_mean, pred_control_mean)
    return {
        "mae_delta": _mean_error(p, t, square=False),
        "mse_delta": _mean_error(p, t, square=True),
        "pearson_delta": _pearson_rows(p.astype(np.float64), t.astype(np.float64)),
    }


def discrimination_score(
    truth_means: np.ndarray,
    pred_means: np.ndarray,
    control_mean: np.ndarray,
    *,
    pred_control_mean: np.ndarray | None = None,
    target_genes: Sequence[int] | np.ndarray | None = None,
    distance: str = "l1",
) -> np.ndarray:
    """cell-eval's perturbation discrimination score (PDS), ``discrimination_score_<d>``.

    With effects e = group mean - control mean, for each perturbation p the distances
    d_q = distance(e_pred[p], e_truth[q]) to the OBSERVED effect of every perturbation q
    of the block are computed over all genes except p's target gene; the score is
    1 - rank / N with rank = #{q : d_q < d_p} (0 when p's own observation is the
    closest) and N the number of perturbations: 1 is perfect, 1/N the worst, and a block
    with one perturbation scores 1.

    Ties (d_q == d_p exactly, q != p) count half: rank = #{d_q < d_p} + 0.5 #{tied}.
    cell-eval takes p's position in numpy's unstable argsort, which depends on the sort
    algorithm; without ties the two agree exactly.

    Parameters
    ----------
    truth_means, pred_means
        (N, n_genes) observed and predicted group means of the block's perturbations.
    control_mean
        (n_genes,) mean of the block's observed control cells.
    pred_control_mean
        The same controls averaged in the prediction's precision, where it differs from
        the truth's (cell-eval averages the controls of the prediction file in that
        file's dtype); default ``control_mean``.
    target_genes
        (N,) gene position of each perturbation's target, -1 for none (default: none).
    distance
        ``l1`` (the VCC's), ``l2`` or ``cosine``.
    """
    if distance not in PDS_DISTANCES:
        raise ConfigError(
            f"unknown discrimination distance {distance!r}; use one of {', '.join(PDS_DISTANCES)}"
        )
    t, p = _effects(truth_means, pred_means, control_mean, pred_control_mean)
    n, n_genes = t.shape
    targets = np.full(n, -1, dtype=np.int64) if target_genes is None else np.asarray(target_genes)
    if targets.shape != (n,):
        raise EvaluationError(f"give one target gene position per perturbation ({n})")
    if ((targets < -1) | (targets >= n_genes)).any():
        raise EvaluationError(f"target gene positions must be -1 or in 0..{n_genes - 1}")
    metric = {"l1": "cityblock", "l2": "euclidean", "cosine": "cosine"}[distance]
    D = np.empty((n, n))
    keep = np.ones(n_genes, dtype=bool)
    for target in np.unique(targets):  # perturbations sharing a target share a gene mask
        rows = np.flatnonzero(targets == target)
        keep[:] = True
        if target >= 0:
            keep[target] = False
        D[rows] = cdist(p[rows][:, keep], t[:, keep], metric)
    own = np.diag(D)[:, None]
    closer = (D < own).sum(axis=1)
    tied = (D == own).sum(axis=1) - 1
    return 1.0 - (closer + 0.5 * tied) / n


def _effects(truth_means, pred_means, control_mean, pred_control_mean):
    """Observed and predicted changes from the controls, in the precision of the means."""
    t = np.atleast_2d(np.asarray(truth_means))
    p = np.atleast_2d(np.asarray(pred_means))
    c = np.asarray(control_mean)
    pc = c if pred_control_mean is None else np.asarray(pred_control_mean)
    if t.shape != p.shape or c.shape != (t.shape[1],) or pc.shape != c.shape:
        raise EvaluationError(
            f"means do not line up: truth {t.shape}, prediction {p.shape}, controls "
            f"{c.shape}; give (n_groups, n_genes) means and (n_genes,) control means"
        )
    return t - c, p - pc


def _mean_error(pred: np.ndarray, truth: np.ndarray, *, square: bool) -> np.ndarray:
    p = np.atleast_2d(np.asarray(pred))
    t = np.atleast_2d(np.asarray(truth))
    if p.shape != t.shape:
        raise EvaluationError(f"prediction means {p.shape} and truth means {t.shape} differ")
    diff = (p - t).astype(np.float64)  # the difference in the means' precision
    return (diff * diff if square else np.abs(diff)).mean(axis=1)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair over its non-NaN entries; NaN with fewer
    than two entries or zero variance."""
    both = ~(np.isnan(x) | np.isnan(y))
    n = both.sum(axis=1)
    x = np.where(both, x, 0.0)
    y = np.where(both, y, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = x.sum(axis=1, keepdims=True) / n[:, None]
        my = y.sum(axis=1, keepdims=True) / n[:, None]
        dx = np.where(both, x - mx, 0.0)
        dy = np.where(both, y - my, 0.0)
        sxx = (dx * dx).sum(axis=1)
        syy = (dy * dy).sum(axis=1)
        r = (dx * dy).sum(axis=1) / np.sqrt(sxx * syy)
    r = np.where((n >= 2) & (sxx > 0) & (syy > 0), r, np.nan)
    return np.clip(r, -1.0, 1.0)


def _float32_lfc(lfc: np.ndarray) -> np.ndarray:
    lfc = np.atleast_2d(np.asarray(lfc)).astype(np.float32)
    if np.isnan(lfc).any():
        raise EvaluationError(
            "fold changes contain NaN; cell-eval's DE gives 0 where both means are 0 "
            "(compute DE with cell_eval_de)"
        )
    return lfc


# ---------------------------------------------------------------------------------------
# Aggregation and the baseline-relative score
# ---------------------------------------------------------------------------------------
def aggregate(per_group: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean over the block's groups of each metric (cell-eval's ``agg_results`` mean).

    Groups without a value (NaN) are left out. cell-eval leaves out groups it gives no
    value but propagates a NaN it computed (a DE Spearman over fewer than two genes);
    that only concerns ``de_spearman_lfc_sig``, never the VCC profile.
    """
    out = {}
    for name, values in per_group.items():
        values = np.asarray(values, dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[name] = float(finite.mean()) if finite.size else float("nan")
    return out


def vcc_score(
    model: Mapping[str, float],
    baseline: Mapping[str, float],
    *,
    metrics: Sequence[str] = VCC_PROFILE,
) -> dict[str, float]:
    """cell-eval's ``score_agg_metrics``: each block-mean metric normalised by the
    baseline's, and their average ``avg_score`` (the VCC's overall score).

    Error metrics (best value 0, e.g. ``mae``): ``1 - model / baseline``; bounded
    metrics (best value 1, e.g. ``overlap_at_N``, ``discrimination_score_l1``):
    ``(model - baseline) / (1 - baseline)``. NaN becomes 0 and negative values are
    clipped to 0 (no upper clip: beating a perfect baseline divides by zero and gives
    inf, as cell-eval). Inputs are per-block means (:func:`aggregate`) of the model and
    of the baseline prediction (e.g. :func:`pertbench.metrics.vcc_eval.vcc_mean_baseline`)
    scored against the same truth.

    Returns
    -------
    dict
        One normalised value per metric (error metrics first, then bounded ones, in the
        order given, as cell-eval writes them) and ``avg_score``.
    """
    unknown = [m for m in metrics if m not in BEST_VALUE]
    if unknown:
        raise ConfigError(f"metric(s) {', '.join(unknown)} have no baseline normalisation")
    missing = [m for m in metrics if m not in model or m not in baseline]
    if missing:
        raise EvaluationError(
            f"metric(s) {', '.join(missing)} missing from the model or baseline results"
        )
    ordered = [m for m in metrics if BEST_VALUE[m] == 0.0] + [
        m for m in metrics if BEST_VALUE[m] == 1.0
    ]
    user = np.array([model[m] for m in ordered], dtype=np.float64)
    base = np.array([baseline[m] for m in ordered], dtype=np.float64)
    best_zero = np.array([BEST_VALUE[m] == 0.0 for m in ordered])
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(best_zero, 1.0 - user / base, (user - base) / (1.0 - base))
    scores[np.isnan(scores)] = 0.0
    scores = np.clip(scores, 0.0, None)
    out = {m: float(v) for m, v in zip(ordered, scores, strict=True)}
    out["avg_score"] = float(scores.mean()) if scores.size else float("nan")
    return out
