"""Summary of a cell-eval / VCC evaluation with bootstrap intervals (``--profile vcc``).

cell-eval reports each metric as a mean over a cell type's perturbations and the VCC
score as the baseline-normalised mean of three of them, without any measure of
uncertainty. :func:`vcc_summary` keeps those point values exactly (per covariate block,
then the mean over blocks, each block counting once) and adds a 95% percentile interval
from resampling the perturbations of every block with replacement (seeded). The model
and the baseline are resampled together (the same perturbations in each replicate), so
the interval of a normalised score reflects which perturbations were tested, not two
independent draws.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from pertbench.metrics import vcc
from pertbench.metrics.calibration import CI_LEVEL, weighted_means
from pertbench.metrics.vcc_eval import VCCResult, metric_names

#: Prefix of the baseline's rows and of the normalised (VCC score) rows.
BASELINE_PREFIX = "baseline/"
SCORE_PREFIX = "vcc_score/"


def _block_weights(blocks: np.ndarray, n_bootstrap: int, rng) -> np.ndarray:
    """(n_bootstrap, n_groups) multiplicities, groups resampled within their block."""
    W = np.zeros((n_bootstrap, blocks.size))
    for block in np.unique(blocks):
        members = np.flatnonzero(blocks == block)
        draws = rng.integers(0, members.size, size=(n_bootstrap, members.size))
        counts = np.zeros((n_bootstrap, members.size))
        np.add.at(counts, (np.arange(n_bootstrap)[:, None], draws), 1.0)
        W[:, members] = counts
    return W


def _block_means(values: np.ndarray, blocks: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(replicates, n_blocks, n_metrics) NaN-aware means of each block's groups."""
    out = [
        weighted_means(values[blocks == block], W[:, blocks == block])
        for block in np.unique(blocks)
    ]
    return np.stack(out, axis=1)


def _scores(model: np.ndarray, baseline: np.ndarray, names: list[str]) -> np.ndarray:
    """(replicates, n_blocks, len(profile) + 1) VCC scores of block means (avg last)."""
    reps, n_blocks, _ = model.shape
    profile = [m for m in vcc.VCC_PROFILE if m in names]
    cols = [names.index(m) for m in profile]
    out = np.empty((reps, n_blocks, len(profile) + 1))
    for r in range(reps):
        for b in range(n_blocks):
            s = vcc.vcc_score(
                dict(zip(profile, model[r, b, cols], strict=True)),
                dict(zip(profile, baseline[r, b, cols], strict=True)),
                metrics=profile,
            )
            out[r, b] = [s[m] for m in profile] + [s["avg_score"]]
    return out


def vcc_summary(
    result: VCCResult, *, n_bootstrap: int = 1000, seed: int = 0, level: float = CI_LEVEL
) -> pd.DataFrame:
    """Mean over covariate blocks of each block's metric means, with intervals.

    Parameters
    ----------
    result
        What :func:`pertbench.metrics.vcc_eval.vcc_metrics` returned (with a baseline for
        the VCC score rows).
    n_bootstrap
        Resamples of each block's perturbations (0: no interval).

    Returns
    -------
    DataFrame
        Columns ``metric``, ``value``, ``ci_low``, ``ci_high``: the model's metrics
        (cell-eval's names), then ``baseline/<metric>`` and ``vcc_score/<metric>`` (the
        three VCC metrics normalised against the baseline and ``vcc_score/avg_score``)
        when the result has a baseline. With one block the values equal cell-eval's
        ``agg_results`` means and ``score``.
    """
    names = [m for m in metric_names() if m in result.per_group.columns]
    # the covariate columns: in both tables, and not a metric (block means share names)
    cov_cols = [
        c for c in result.per_covariate.columns if c in result.per_group.columns and c not in names
    ]
    if cov_cols:
        keys = result.per_group[cov_cols].astype(str).agg("\x1f".join, axis=1)
        block_of = pd.factorize(keys)[0]
    else:
        block_of = np.zeros(len(result.per_group), dtype=np.int64)
    rng = np.random.default_rng(seed)
    ones = np.ones((1, block_of.size))
    W = _block_weights(block_of, max(n_bootstrap, 0), rng) if n_bootstrap > 0 else None

    def rows(values: np.ndarray, prefix: str, metrics: list[str]) -> pd.DataFrame:
        low = high = np.full(len(metrics), np.nan)
        with warnings.catch_warnings():  # a metric undefined everywhere stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            point = np.nanmean(values[0], axis=0)
            if values.shape[0] > 1:
                reps = np.nanmean(values[1:], axis=1)
                alpha = (1.0 - level) / 2.0
                low, high = np.nanquantile(reps, [alpha, 1 - alpha], axis=0)
        return pd.DataFrame(
            {
                "metric": [prefix + m for m in metrics],
                "value": point,
                "ci_low": low,
                "ci_high": high,
            }
        )

    def means(table: pd.DataFrame) -> np.ndarray:
        values = table[names].to_numpy(dtype=np.float64)
        weights = ones if W is None else np.vstack([ones, W])
        return _block_means(values, block_of, weights)

    model = means(result.per_group)
    parts = [rows(model, "", names)]
    if result.baseline_per_group is not None:
        baseline = means(result.baseline_per_group)
        parts.append(rows(baseline, BASELINE_PREFIX, names))
        profile = [m for m in vcc.VCC_PROFILE if m in names]
        parts.append(rows(_scores(model, baseline, names), SCORE_PREFIX, [*profile, "avg_score"]))
    return pd.concat(parts, ignore_index=True)


def evaluate_vcc(
    truth,
    pred,
    *,
    keys=None,
    split: pd.Series | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    n_jobs: int = 1,
) -> tuple[VCCResult, pd.DataFrame]:
    """cell-eval's metrics, its mean baseline and the VCC score of a prediction, with
    intervals (what ``pertbench evaluate --profile vcc`` runs).

    Parameters
    ----------
    truth, pred
        AnnData or .h5ad paths, log1p-normalised (see
        :func:`pertbench.metrics.vcc_eval.vcc_metrics`).
    split
        Split labels of ``truth``'s cells (aligned to its obs_names). Given, the mean
        baseline averages the ``train`` cells' groups (what a model could have learned);
        without it, every group of ``truth`` (cell-eval's ``baseline`` run on the real
        data).

    Returns
    -------
    (VCCResult, DataFrame)
        The full result and :func:`vcc_summary` of it.
    """
    from pertbench.metrics.vcc_eval import _read, vcc_mean_baseline, vcc_metrics

    truth = _read(truth, "truth")
    pred = _read(pred, "pred")
    reference = truth
    if split is not None:
        train = split.reindex(truth.obs_names).fillna("").to_numpy() == "train"
        if not train.any():
            from pertbench.errors import EvaluationError

            raise EvaluationError(
                "the split has no train cells for the mean baseline; pass a split with a "
                "train part or none (the baseline then averages the truth)"
            )
        reference = truth[train]
    baseline = vcc_mean_baseline(reference, like=pred, keys=keys)
    result = vcc_metrics(truth, pred, keys=keys, baseline=baseline, n_jobs=n_jobs)
    return result, vcc_summary(result, n_bootstrap=n_bootstrap, seed=seed)
