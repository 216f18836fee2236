"""Collapse check: are a model's predictions for different perturbations nearly the same?

PerturBench's mode collapse: a model that predicts (almost) one profile for every
perturbation of a covariate combination can still score well on fit metrics (the
covariate's mean response is most of the signal) while it tells the perturbations apart
no better than chance. Two statistics, from the predicted and observed group means of the
held-out groups of each covariate combination c with N_c >= 2 perturbations:

``spread_ratio``
    How much the predictions differ between perturbations, relative to how much the
    observations do::

        spread_ratio = sqrt( sum_c sum_p ||pred_cp - mean_p pred_cp||^2
                           / sum_c sum_p ||true_cp - mean_p true_cp||^2 )

    0 when every perturbation of a covariate gets the same prediction (``no_change`` and
    ``covariate_mean`` by construction), 1 for a model as diverse as the data (a perfect
    prediction), below 1 for a model that shrinks the differences. It needs no control
    profile: the covariate's control mean cancels from both sums.

``mean_pairwise_cosine``
    Mean cosine similarity, over pairs of perturbations of the same covariate, of the
    predicted deltas (predicted mean minus the observed control mean of the covariate,
    the evaluator's controls); ``true_mean_pairwise_cosine`` the same for the observed
    deltas. Near 1 for a collapsed model, but also for data whose perturbations share
    one response, hence given for context only. Two all-zero deltas count as identical
    (cosine 1), a zero and a non-zero delta as unrelated (0), as in the rank metrics.

A model is flagged **collapsed** when ``spread_ratio < SPREAD_THRESHOLD`` (0.15: its
predictions differ between perturbations by less than 15% of what the observations do;
chosen from the default benchmark, see docs/metrics.md). Independently, a rank metric
is **indistinguishable from chance** when its interval contains the rank a collapsed model
gets, the mean over groups of (N_c - 1) / (2 N_c) (:func:`rank_chance`).

Everything here is a pure function of group means (:func:`collapse_statistics`) or of the
cells (:func:`collapse_from_cells`, vectorised with :mod:`pertbench.data.groups`). The
per-covariate part (:func:`perturbation_spread`) takes the same (N x genes) predicted and
observed matrices as the evaluator's per-covariate ``matrix_distance``, so it can become a
registered per-covariate metric with the pooled summary as its aggregate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys

#: Flag a model as collapsed below this spread ratio.
SPREAD_THRESHOLD = 0.15
COLLAPSE_FILE = "collapse.csv"
COLLAPSE_COLUMNS = [
    "spread_ratio",
    "mean_pairwise_cosine",
    "true_mean_pairwise_cosine",
    "rank_chance",
    "n_covariates",
    "n_groups",
    "collapsed",
]


def perturbation_spread(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Sums of squared distances of the rows of ``pred`` and ``truth`` to their own mean.

    Parameters
    ----------
    pred, truth
        (N, n_genes) predicted and observed profiles of the N perturbations of one
        covariate combination (any aggregation whose differences matter: means, deltas).

    Returns
    -------
    (pred_spread, true_spread)
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(
            f"pred and truth must be matching 2-D arrays, got {pred.shape}, {truth.shape}"
        )
    spread = [float(((m - m.mean(axis=0)) ** 2).sum()) for m in (pred, truth)]
    return spread[0], spread[1]


def mean_pairwise_cosine(rows: np.ndarray, *, atol: float = 1e-12) -> tuple[float, int]:
    """Mean cosine similarity over the pairs of rows, and the number of pairs.

    All-zero rows (norm below ``atol``) are identical to each other (1) and unrelated to
    the others (0).
    """
    rows = np.asarray(rows, dtype=np.float64)
    n = rows.shape[0]
    if n < 2:
        return float("nan"), 0
    norms = np.linalg.norm(rows, axis=1)
    zero = norms <= atol
    unit = np.divide(rows, norms[:, None], out=np.zeros_like(rows), where=~zero[:, None])
    S = np.clip(unit @ unit.T, -1.0, 1.0)
    S[np.ix_(zero, zero)] = 1.0
    upper = np.triu_indices(n, k=1)
    return float(S[upper].mean()), int(upper[0].size)


def rank_chance(n_perturbations: np.ndarray) -> float:
    """Rank metric of a collapsed model: the mean over groups of (N - 1) / (2 N).

    ``n_perturbations`` holds, per evaluated group, N: the number of groups of its
    covariate combination (groups with N < 2 have no rank and are left out).
    """
    n = np.asarray(n_perturbations, dtype=np.float64)
    n = n[n >= 2]
    return float(np.mean((n - 1) / (2 * n))) if n.size else float("nan")


def collapse_statistics(
    pred_means: np.ndarray,
    true_means: np.ndarray,
    control_means: np.ndarray,
    covariate_codes: np.ndarray,
    *,
    threshold: float = SPREAD_THRESHOLD,
) -> dict[str, Any]:
    """The collapse statistics (module docstring) from aligned group means.

    Parameters
    ----------
    pred_means, true_means
        (n_groups, n_genes) predicted and observed means of the same held-out groups.
    control_means
        (n_covariates, n_genes) observed control mean of each covariate combination.
    covariate_codes
        (n_groups,) covariate combination of each group (row of ``control_means``).
    threshold
        ``collapsed`` is ``spread_ratio < threshold``.

    Returns
    -------
    dict
        :data:`COLLAPSE_COLUMNS`; NaN statistics (and ``collapsed`` False) when no
        covariate combination has two groups.
    """
    covariate_codes = np.asarray(covariate_codes, dtype=np.int64)
    pred_spread = true_spread = 0.0
    cos_sum = {"pred": 0.0, "true": 0.0}
    n_pairs = n_cov = n_groups = 0
    sizes = np.bincount(covariate_codes, minlength=len(control_means))
    for c in np.flatnonzero(sizes >= 2):  # loops over covariate combinations, not cells
        rows = np.flatnonzero(covariate_codes == c)
        ps, ts = perturbation_spread(pred_means[rows], true_means[rows])
        pred_spread, true_spread = pred_spread + ps, true_spread + ts
        for side, means in (("pred", pred_means), ("true", true_means)):
            cosine, pairs = mean_pairwise_cosine(means[rows] - control_means[c])
            cos_sum[side] += cosine * pairs
        n_pairs += rows.size * (rows.size - 1) // 2
        n_cov += 1
        n_groups += rows.size
    ratio = float(np.sqrt(pred_spread / true_spread)) if true_spread > 0 else float("nan")
    return {
        "spread_ratio": ratio,
        "mean_pairwise_cosine": cos_sum["pred"] / n_pairs if n_pairs else float("nan"),
        "true_mean_pairwise_cosine": cos_sum["true"] / n_pairs if n_pairs else float("nan"),
        "rank_chance": rank_chance(sizes[covariate_codes]),
        "n_covariates": n_cov,
        "n_groups": n_groups,
        "collapsed": bool(np.isfinite(ratio) and ratio < threshold),
    }


def collapse_from_cells(
    truth: Any,
    pred: Any,
    split: pd.Series | None = None,
    *,
    keys: PerturbationKeys,
    on: str = "test",
    threshold: float = SPREAD_THRESHOLD,
) -> dict[str, Any]:
    """:func:`collapse_statistics` of predicted cells against the observed held-out cells.

    Groups are the (covariates, perturbation) pairs present both in ``pred`` and among the
    perturbed ``truth`` cells of ``split == on``; controls are the truth's controls of the
    covariates in ``on`` when there are any, else all of them (as the evaluator does).
    """
    from pertbench.data.groups import group_cells
    from pertbench.metrics.aggregations import group_stats

    in_part = (
        np.ones(truth.n_obs, dtype=bool)
        if split is None
        else (split.reindex(truth.obs_names.astype(str)).to_numpy() == on)
    )
    t_group = group_cells(truth.obs, keys)
    p_group = group_cells(pred.obs, keys)
    id_cols = [*keys.covariate_keys, keys.perturbation_key]
    t_codes = np.where(in_part & ~t_group.is_control, t_group.group_codes, -1)
    t_mean, _, t_count = group_stats(truth.X, t_codes, t_group.n_groups)
    p_codes = np.where(~p_group.is_control, p_group.group_codes, -1)
    p_mean, _, p_count = group_stats(pred.X, p_codes, p_group.n_groups)
    t_ids = pd.MultiIndex.from_frame(t_group.groups[id_cols].astype(str))
    p_ids = pd.MultiIndex.from_frame(p_group.groups[id_cols].astype(str))
    p_rows = np.flatnonzero(p_count > 0)
    t_rows = t_ids.get_indexer(p_ids[p_rows])
    both = t_rows >= 0
    p_rows, t_rows = p_rows[both], t_rows[both]
    both = t_count[t_rows] > 0
    p_rows, t_rows = p_rows[both], t_rows[both]
    cov_of_group = t_group.groups["covariate_code"].to_numpy()[t_rows]
    # controls: those of the covariates in `on` when any, else all of the covariates'
    n_cov = len(t_group.covariates)
    in_on = np.bincount(
        t_group.covariate_codes[t_group.is_control & in_part], minlength=n_cov
    ).astype(bool)
    use = t_group.is_control & (in_part | ~in_on[t_group.covariate_codes])
    ctrl_mean, _, _ = group_stats(truth.X, np.where(use, t_group.covariate_codes, -1), n_cov)
    return collapse_statistics(
        p_mean[p_rows], t_mean[t_rows], ctrl_mean, cov_of_group, threshold=threshold
    )
