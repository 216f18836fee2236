"""Calibration: bootstrap intervals, split halves and normalised scores.

- :func:`bootstrap_means`: the mean over groups of every metric with a percentile 95%
  interval from resampling groups with replacement (seeded). NaN values (a metric
  undefined for a group) are left out of that metric's mean.
- :func:`split_halves`: assigns each group's observed cells at random (seeded) to two
  halves. Scoring one half against the other is the evaluator's ``replicate_agreement``
  reference (how two half-size replicates of the experiment agree); it is NOT the noise
  ceiling: each half carries twice the sampling noise of the full group, so on metrics
  of means its error is about four times a perfect model's. The ceiling is
  :mod:`pertbench.metrics.ceiling`.
- :func:`normalized_score`: (model - baseline) / (ceiling - baseline): 0 = no better
  than the baseline (``no_change`` by default), 1 = as good as a perfect model can look
  given the measurement noise. Values above 1 mean better than the estimated ceiling
  (sampling noise of the estimate, or a ceiling rule that is conservative for that
  metric, see docs/metrics.md). It is undefined (NaN, with a note) when the ceiling is
  not better than the baseline beyond the 95% bootstrap interval of their mean gap over
  groups (:func:`ceiling_resolved`): then the measurement cannot tell a perfect model
  from doing nothing, and a ratio over that gap would be noise.
- :func:`summarize_seeds`: mean +/- sd of summary values across runs with different seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from pertbench.metrics.catalog import catalogue

CI_LEVEL = 0.95
#: Relative gap below which ceiling and baseline count as equal.
EQUAL_TOLERANCE = 1e-12


def bootstrap_weights(n_units: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """(n_bootstrap, n_units) multiplicities of each unit in each bootstrap resample.

    The array is shared between calls with the same arguments (a benchmark draws the same
    resamples for every metric and reference): it is read-only.
    """
    return _bootstrap_weights(int(n_units), int(n_bootstrap), int(seed))


@lru_cache(maxsize=64)
def _bootstrap_weights(n_units: int, n_bootstrap: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if n_units == 0 or n_bootstrap <= 0:
        out = np.zeros((max(n_bootstrap, 0), n_units))
    else:
        draws = rng.integers(0, n_units, size=(n_bootstrap, n_units))
        offsets = (np.arange(n_bootstrap) * n_units)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=n_bootstrap * n_units)
        out = counts.reshape(n_bootstrap, n_units).astype(np.float64)
    out.flags.writeable = False
    return out


def weighted_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Means over rows of ``values`` (units x metrics) under each weight row, NaN-aware."""
    present = ~np.isnan(values)
    num = weights @ np.where(present, values, 0.0)
    den = weights @ present.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_means(
    values: pd.DataFrame | np.ndarray,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> pd.DataFrame:
    """Mean of each column over rows (units) and its bootstrap percentile interval.

    Parameters
    ----------
    values
        One row per unit (group), one column per metric; NaN = undefined for that unit.
    n_bootstrap
        Resamples (0 disables the interval).
    level
        Coverage of the interval.

    Returns
    -------
    DataFrame
        Columns ``metric``, ``value``, ``ci_low``, ``ci_high``. The interval is NaN when
        fewer than 2 units have a value (a resample of one unit has no spread to show).
    """
    frame = values if isinstance(values, pd.DataFrame) else pd.DataFrame(values)
    V = frame.to_numpy(dtype=np.float64)
    point = (
        weighted_means(V, np.ones((1, V.shape[0])))[0] if V.size else np.full(V.shape[1], np.nan)
    )
    low = np.full(V.shape[1], np.nan)
    high = np.full(V.shape[1], np.nan)
    if n_bootstrap > 0 and V.shape[0] > 0:
        W = bootstrap_weights(V.shape[0], n_bootstrap, seed)
        boot = weighted_means(V, W)
        alpha = (1.0 - level) / 2.0
        enough = (~np.isnan(V)).sum(axis=0) >= 2
        with np.errstate(invalid="ignore"):
            qs = np.nanquantile(np.where(enough[None, :], boot, 0.0), [alpha, 1 - alpha], axis=0)
        low = np.where(enough, qs[0], np.nan)
        high = np.where(enough, qs[1], np.nan)
    return pd.DataFrame(
        {"metric": list(map(str, frame.columns)), "value": point, "ci_low": low, "ci_high": high}
    )


def split_halves(
    codes: np.ndarray, n_groups: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly assign each group's cells to half A or half B (seeded, vectorised).

    Parameters
    ----------
    codes
        Group code per cell (-1: not in a group).

    Returns
    -------
    half_a, half_b
        Group codes per cell for the two halves (-1 where the cell is not in that half).
        A group of n >= 2 cells gets floor(n/2) cells in A and the rest in B; a group
        with fewer than 2 cells is in neither.
    """
    codes = np.asarray(codes, dtype=np.int64)
    rng = np.random.default_rng(seed)
    cells = np.flatnonzero(codes >= 0)
    order, in_a, in_b = halves_by_key(codes[cells], rng.random(cells.size), n_groups)
    rows = cells[order]
    group_of = codes[rows]
    half_a = np.full(codes.shape, -1, dtype=np.int64)
    half_b = np.full(codes.shape, -1, dtype=np.int64)
    half_a[rows[in_a]] = group_of[in_a]
    half_b[rows[in_b]] = group_of[in_b]
    return half_a, half_b


def halves_by_key(
    groups: np.ndarray, keys: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every group of at least 2 cells in two by a random key per cell.

    Parameters
    ----------
    groups
        Group code of each cell (0..n_groups-1).
    keys
        One random key per cell: each group's cells are ordered by it.

    Returns
    -------
    order, in_a, in_b
        ``order`` sorts the cells by (group, key); ``in_a`` / ``in_b`` mark, in that order,
        the first floor(n/2) cells of each group and the rest (a group of one cell is in
        neither).
    """
    counts = np.bincount(groups, minlength=n_groups)
    order = np.lexsort((keys, groups))
    group_of = groups[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(order.size) - starts[group_of]
    half = counts[group_of] // 2
    splittable = counts[group_of] >= 2
    return order, splittable & (position < half), splittable & (position >= half)


def normalized_score(
    model: np.ndarray | float,
    baseline: np.ndarray | float,
    ceiling: np.ndarray | float,
    *,
    higher_is_better: bool,
) -> np.ndarray | float:
    """(model - baseline) / (ceiling - baseline), NaN where the ceiling is not better.

    The ceiling must beat the baseline in the metric's direction (by more than a
    relative 1e-12); otherwise the score is undefined and NaN is returned.
    """
    m, b, c = (np.asarray(x, dtype=np.float64) for x in (model, baseline, ceiling))
    gap = c - b
    direction = 1.0 if higher_is_better else -1.0
    scale = np.maximum(np.maximum(np.abs(b), np.abs(c)), 1.0)
    valid = (direction * gap > EQUAL_TOLERANCE * scale) & np.isfinite(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(valid, (m - b) / np.where(valid, gap, 1.0), np.nan) + 0.0  # no -0.0
    return float(out) if out.ndim == 0 else out


#: Resamples of the test of :func:`ceiling_resolved` (whatever the intervals' count).
RESOLUTION_RESAMPLES = 1000


def ceiling_resolved(
    baseline: np.ndarray,
    ceiling: np.ndarray,
    *,
    higher_is_better: bool,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> bool:
    """Whether the ceiling beats the baseline by more than the measurement can blur.

    The per-unit (group) gaps ``ceiling - baseline``, in the metric's direction, must
    have a positive mean whose ``level`` percentile bootstrap interval (resampling units,
    :data:`RESOLUTION_RESAMPLES` times, seeded) lies above 0, the same kind of interval
    as every other in the evaluator. Gaps that are positive in every unit always pass
    (however few and however skewed); where they do not (typically logp's errors at
    <= 20 cells per group, where an independent replicate of the measured size scores
    about as well as no change), a normalised score would divide by a gap the ceiling's
    own error exceeds: the validation measured values of -2 to 3 there. A single unit
    needs a positive gap.

    Parameters
    ----------
    baseline, ceiling
        Per-unit values, aligned; units where either is NaN are left out.
    """
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(ceiling, dtype=np.float64)
    keep = ~(np.isnan(b) | np.isnan(c))
    gap = (c[keep] - b[keep]) * (1.0 if higher_is_better else -1.0)
    if gap.size == 0:
        return False
    scale = max(float(np.abs(b[keep]).mean()), float(np.abs(c[keep]).mean()), 1.0)
    if float(gap.mean()) <= EQUAL_TOLERANCE * scale:
        return False
    if gap.size < 2 or gap.min() > 0:
        return True
    means = (bootstrap_weights(gap.size, RESOLUTION_RESAMPLES, seed) @ gap) / gap.size
    return float(np.quantile(means, (1.0 - level) / 2.0)) > 0.0


def normalized_scores(model: pd.Series, baseline: pd.Series, ceiling: pd.Series) -> pd.Series:
    """:func:`normalized_score` of each metric (index: catalogue names) in its direction."""
    specs = catalogue()
    return pd.Series(
        {
            name: normalized_score(
                model[name],
                baseline[name],
                ceiling[name],
                higher_is_better=specs[name].higher_is_better,
            )
            for name in model.index
        },
        dtype=np.float64,
    )


def bootstrap_normalized(
    model: np.ndarray,
    baseline: np.ndarray,
    ceiling: np.ndarray,
    *,
    higher_is_better: bool,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float, int]:
    """Normalised score of group means and its paired bootstrap interval over groups.

    Only groups where model, baseline and ceiling are all defined are used; the same
    resampled groups enter the three means of each replicate. NaN (value and interval)
    unless the ceiling beats the baseline beyond its interval (:func:`ceiling_resolved`).

    Returns
    -------
    value, ci_low, ci_high, n_groups
    """
    M = np.column_stack([model, baseline, ceiling]).astype(np.float64)
    M = M[~np.isnan(M).any(axis=1)]
    if M.shape[0] == 0:
        return float("nan"), float("nan"), float("nan"), 0
    resolved = ceiling_resolved(
        M[:, 1], M[:, 2], higher_is_better=higher_is_better, seed=seed, level=level
    )
    if not resolved:
        return float("nan"), float("nan"), float("nan"), int(M.shape[0])
    means = M.mean(axis=0)
    value = normalized_score(*means, higher_is_better=higher_is_better)
    low = high = float("nan")
    if n_bootstrap > 0 and M.shape[0] >= 2:
        # every resample draws M.shape[0] groups: its weights sum to that exactly
        boot = (bootstrap_weights(M.shape[0], n_bootstrap, seed) @ M) / M.shape[0]
        scores = normalized_score(
            boot[:, 0], boot[:, 1], boot[:, 2], higher_is_better=higher_is_better
        )
        if np.isfinite(scores).any():
            alpha = (1.0 - level) / 2.0
            low, high = (float(q) for q in np.nanquantile(scores, [alpha, 1 - alpha]))
    return float(value), low, high, int(M.shape[0])


def summarize_seeds(summaries: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean and sample sd (ddof=1) of each summary value across runs (e.g. seeds).

    Parameters
    ----------
    summaries
        ``EvaluationResult.summary`` tables (columns ``metric``, ``value``).

    Returns
    -------
    DataFrame
        Columns ``metric``, ``mean``, ``sd`` (NaN for a single run), ``n``.
    """
    if not summaries:
        return pd.DataFrame(columns=["metric", "mean", "sd", "n"])
    stacked = pd.concat(
        [s[["metric", "value"]].assign(run=i) for i, s in enumerate(summaries)],
        ignore_index=True,
    )
    grouped = stacked.groupby("metric", sort=False)["value"]
    out = pd.DataFrame(
        {"mean": grouped.mean(), "sd": grouped.std(ddof=1), "n": grouped.count()}
    ).reset_index()
    return out


@dataclass(frozen=True)
class BaselineComparison:
    """How a model compares with every simple baseline on one metric.

    Attributes
    ----------
    best
        Name of the best baseline (in the metric's direction, on the groups where the
        model, that baseline and the ceiling are all defined); ``None`` when no baseline
        is defined anywhere.
    normalized_best, ci_low, ci_high
        The normalised score with ``best`` as the floor, and its bootstrap interval.
    advantage
        Per baseline: (mean advantage of the model in the metric's direction, its 95%
        interval low, high), a paired bootstrap over the groups both define.
    beats_all
        True when the interval of the advantage lies above 0 for every baseline; False
        when it does not for at least one; ``None`` when undecidable (no baseline, or a
        baseline compared on fewer than 2 groups or without resampling).
    """

    best: str | None
    normalized_best: float
    ci_low: float
    ci_high: float
    advantage: dict[str, tuple[float, float, float]]
    beats_all: bool | None


def bootstrap_advantage(
    model: np.ndarray,
    baseline: np.ndarray,
    *,
    higher_is_better: bool,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[float, float, float, int]:
    """Mean advantage of ``model`` over ``baseline`` and its paired bootstrap interval.

    The advantage is ``mean(model) - mean(baseline)`` for a metric where higher is
    better, ``mean(baseline) - mean(model)`` otherwise (positive = the model is better),
    over the groups where both are defined; every bootstrap replicate resamples those
    groups once for both.

    Returns
    -------
    value, ci_low, ci_high, n_groups
    """
    value, boot, n = _advantage_draws(
        model, baseline, higher_is_better=higher_is_better, n_bootstrap=n_bootstrap, seed=seed
    )
    ((low, high),) = _intervals([boot], level)
    return value, low, high, n


def _advantage_draws(
    model: np.ndarray, baseline: np.ndarray, *, higher_is_better: bool, n_bootstrap: int, seed: int
) -> tuple[float, np.ndarray | None, int]:
    """(mean advantage, its bootstrap replicates or None, groups used): see
    :func:`bootstrap_advantage`."""
    M = np.column_stack([model, baseline]).astype(np.float64)
    M = M[~np.isnan(M).any(axis=1)]
    if M.shape[0] == 0:
        return float("nan"), None, 0
    sign = 1.0 if higher_is_better else -1.0
    diff = sign * (M[:, 0] - M[:, 1])
    boot = None
    if n_bootstrap > 0 and M.shape[0] >= 2:
        # every resample draws M.shape[0] groups: its weights sum to that exactly
        boot = (bootstrap_weights(M.shape[0], n_bootstrap, seed) @ diff) / M.shape[0]
    return float(diff.mean()), boot, int(M.shape[0])


def _intervals(draws: Sequence[np.ndarray | None], level: float) -> list[tuple[float, float]]:
    """The ``level`` percentile interval of each set of bootstrap replicates (NaN for
    None); sets of one length share one quantile call (per row, the same numbers)."""
    alpha = (1.0 - level) / 2.0
    out = [(float("nan"), float("nan"))] * len(draws)
    by_length: dict[int, list[int]] = {}
    for i, boot in enumerate(draws):
        if boot is not None:
            by_length.setdefault(boot.size, []).append(i)
    for rows in by_length.values():
        bounds = np.quantile(np.vstack([draws[i] for i in rows]), [alpha, 1 - alpha], axis=1)
        for j, i in enumerate(rows):
            out[i] = (float(bounds[0, j]), float(bounds[1, j]))
    return out


def compare_with_baselines(
    model: np.ndarray,
    baselines: dict[str, np.ndarray],
    ceiling: np.ndarray | None,
    *,
    higher_is_better: bool,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> BaselineComparison:
    """The best baseline as the floor of the normalised score, and whether the model
    beats every baseline by more than its interval.

    Parameters
    ----------
    model
        Per-group values of the model.
    baselines
        Per-group values of each simple baseline, aligned with ``model``.
    ceiling
        Per-group ceiling values (``None``: no normalised score, only the comparison).
    """
    model = np.asarray(model, dtype=np.float64)
    usable = ~np.isnan(model)
    if ceiling is not None:
        usable &= ~np.isnan(np.asarray(ceiling, dtype=np.float64))
    sign = 1.0 if higher_is_better else -1.0
    best, best_value = None, -np.inf
    for name, values in baselines.items():
        values = np.asarray(values, dtype=np.float64)
        rows = usable & ~np.isnan(values)
        if not rows.any():
            continue
        score = sign * float(values[rows].mean())
        if score > best_value:  # ties keep the first (baselines come in a fixed order)
            best, best_value = name, score
    norm = low = high = float("nan")
    if best is not None and ceiling is not None:
        norm, low, high, _ = bootstrap_normalized(
            model,
            np.asarray(baselines[best], dtype=np.float64),
            np.asarray(ceiling, dtype=np.float64),
            higher_is_better=higher_is_better,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
    advantage = {}
    decided: list[bool] = []
    undecidable = not baselines
    draws = [
        _advantage_draws(
            model,
            np.asarray(values, dtype=np.float64),
            higher_is_better=higher_is_better,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        for values in baselines.values()
    ]
    intervals = _intervals([boot for _, boot, _ in draws], CI_LEVEL)
    for name, (value, _, n), (lo, hi) in zip(baselines, draws, intervals, strict=True):
        advantage[name] = (value, lo, hi)
        if n == 0:
            continue  # a baseline defined nowhere the model is cannot be beaten or lost to
        if np.isnan(lo):
            undecidable = True
        else:
            decided.append(lo > 0)
    if not all(decided):
        beats: bool | None = False  # not clearly better than at least one baseline
    elif undecidable or not decided:
        beats = None
    else:
        beats = True
    return BaselineComparison(best, norm, low, high, advantage, beats)
