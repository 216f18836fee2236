"""Reference-aware metrics (Systema, Vinas Torne et al., Nature Biotechnology 2025).

Perturbed cells often share a systematic shift from their controls (stress of
transduction, selection, cell cycle). A delta measured from the controls rewards a model
that predicts only that shared shift. Systema measures effects from the *centroid* of the
perturbations instead, i.e. from the mean profile of all perturbed groups of the same
covariate combination, which removes what the perturbations have in common.

All functions work on one covariate combination at a time and on group averages (rows:
perturbations, columns: genes):

- :func:`perturbation_centroid`: r = mean over the covariate's perturbation averages.
- ``<metric>_delta_centroid`` = the fit metric on ``(pred - r, truth - r)``; the evaluator
  builds them from :mod:`pertbench.metrics.fit` with :func:`centroid_deltas`.
- :func:`centroid_accuracy`: per perturbation, the share of other perturbations whose
  observed average is farther (Euclidean) from the prediction than its own; 1 = perfect,
  0.5 = chance.
- :func:`systematic_variation`: per perturbation, cos(truth_p - control, r - control):
  how much of its control-referenced effect is the shift shared by all perturbations.
"""

from __future__ import annotations

import numpy as np


def _averages(rows) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a (perturbations x genes) matrix, got shape {arr.shape}")
    return arr


def perturbation_centroid(averages, *, weights=None) -> np.ndarray:
    """The centroid r of a covariate combination's perturbation profiles.

    Parameters
    ----------
    averages
        (perturbations x genes) observed group averages of one covariate combination
        (controls excluded).
    weights
        Optional weight per perturbation (default: every perturbation counts once, as in
        Systema, so large groups do not dominate the reference).

    Returns
    -------
    ndarray
        (genes,) the weighted mean of the rows; NaN when there is no perturbation.
    """
    arr = _averages(averages)
    if arr.shape[0] == 0:
        return np.full(arr.shape[1], np.nan)
    w = np.ones(arr.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (arr.shape[0],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be one non-negative value per perturbation, not all 0")
    return (w @ arr) / w.sum()


def centroid_deltas(pred, truth, centroid) -> tuple[np.ndarray, np.ndarray]:
    """``(pred - r, truth - r)``: the operands of every ``<metric>_delta_centroid``."""
    r = np.asarray(centroid, dtype=np.float64)[None, :]
    return _averages(pred) - r, _averages(truth) - r


def centroid_accuracy(pred, truth) -> np.ndarray:
    """Per perturbation, the share of others farther from its prediction than its truth.

    For perturbation p with prediction ``pred_p``: the fraction of the other
    perturbations q of the same covariate combination with
    ``d(pred_p, truth_q) > d(pred_p, truth_p)`` (Euclidean on averages; a tie counts
    one half, so a prediction equal to every truth scores 0.5). 1 = the prediction is
    closer to its own perturbation than to any other; 0.5 = chance.

    Parameters
    ----------
    pred, truth
        (perturbations x genes) predicted and observed averages, rows aligned.

    Returns
    -------
    ndarray
        (perturbations,) accuracies; NaN when the covariate has a single perturbation.
    """
    p, t = _averages(pred), _averages(truth)
    if p.shape != t.shape:
        raise ValueError(f"pred and truth shapes differ: {p.shape} vs {t.shape}")
    n = p.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    # squared distances via the Gram expansion, one matrix product (n x n)
    d2 = (p * p).sum(1)[:, None] + (t * t).sum(1)[None, :] - 2.0 * (p @ t.T)
    d2 = np.maximum(d2, 0.0)
    own = np.diag(d2)[:, None]
    # relative tolerance: distances equal up to rounding are ties
    tol = 1e-10 * np.maximum(own, d2.max(axis=1, keepdims=True)) + 1e-300
    farther = (d2 > own + tol).astype(np.float64) + 0.5 * (np.abs(d2 - own) <= tol)
    np.fill_diagonal(farther, 0.0)
    return farther.sum(axis=1) / (n - 1)


def systematic_variation(truth, control, centroid=None) -> np.ndarray:
    """Per perturbation, cos(truth_p - control, r - control).

    Parameters
    ----------
    truth
        (perturbations x genes) observed averages of one covariate combination.
    control
        (genes,) the covariate's control average.
    centroid
        (genes,) the reference r; by default :func:`perturbation_centroid` of ``truth``.

    Returns
    -------
    ndarray
        (perturbations,) cosines in [-1, 1]; NaN where an effect or the shared shift is
        exactly zero. A mean near 1 says most of the data's "effects" are one shared
        shift, which control-referenced metrics reward a model for predicting.
    """
    t = _averages(truth)
    c = np.asarray(control, dtype=np.float64)
    r = perturbation_centroid(t) if centroid is None else np.asarray(centroid, dtype=np.float64)
    effects = t - c[None, :]
    shared = r - c
    norms = np.sqrt(np.einsum("ij,ij->i", effects, effects)) * np.sqrt(shared @ shared)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(norms > 0, (effects @ shared) / np.where(norms > 0, norms, 1.0), np.nan)
    return np.clip(out, -1.0, 1.0)


def pooled_perturbation_means(
    labels, means, n_cells, *, is_control=None
) -> tuple[np.ndarray, np.ndarray]:
    """One average per perturbation from per-(perturbation, split) group averages.

    A perturbation observed in several splits of a covariate combination (rows of the
    same label) gets the cell-weighted mean of its rows, i.e. the average of all its
    cells; control rows (``is_control``) and empty rows are left out.

    Returns
    -------
    labels, averages
        The perturbations (first-seen order) and their (perturbations x genes) averages.
    """
    import pandas as pd

    labels = np.asarray(labels).astype(str)
    means = _averages(means)
    n = np.asarray(n_cells, dtype=np.float64)
    keep = n > 0
    if is_control is not None:
        keep &= ~np.asarray(is_control, dtype=bool)
    codes, uniques = pd.factorize(labels[keep])
    if uniques.size == 0:
        return np.asarray(uniques, dtype=str), np.zeros((0, means.shape[1]))
    w = n[keep]
    sums = np.zeros((uniques.size, means.shape[1]))
    np.add.at(sums, codes, means[keep] * w[:, None])
    totals = np.bincount(codes, weights=w, minlength=uniques.size)
    return np.asarray(uniques, dtype=str), sums / totals[:, None]


# ---------------------------------------------------------------------------------------
# The evaluator's block functions (MetricSpec needs="block")
# ---------------------------------------------------------------------------------------
def block_centroid(view) -> np.ndarray:
    """The centroid of a block's covariate combination: every perturbed group of the
    truth whatever its split (``view.all_groups``), each perturbation counted once."""
    table = view.all_groups.table
    _, averages = pooled_perturbation_means(
        table.iloc[:, 0].to_numpy(),
        view.all_groups.mean,
        table["n_cells"].to_numpy(),
        is_control=table["is_control"].to_numpy(),
    )
    return perturbation_centroid(averages)


def block_delta_centroid(metric: str, view) -> np.ndarray:
    """``<metric>_delta_centroid`` of a block's scored groups (``view.rows``)."""
    from pertbench.metrics.fit import ProfilePair, pair_metric

    rows = view.rows
    pred, truth = centroid_deltas(view.pred.mean[rows], view.truth.mean[rows], block_centroid(view))
    return np.asarray(pair_metric(metric, ProfilePair(pred, truth)), dtype=np.float64)


def block_centroid_accuracy(view) -> np.ndarray:
    """``centroid_accuracy`` of a block's scored groups, among themselves."""
    rows = view.rows
    return centroid_accuracy(view.pred.mean[rows], view.truth.mean[rows])


def block_systematic_variation(view) -> np.ndarray:
    """``systematic_variation`` of a block's scored groups (a property of the truth)."""
    rows = view.rows
    return systematic_variation(view.truth.mean[rows], view.control_mean, block_centroid(view))
