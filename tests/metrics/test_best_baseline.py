"""The best simple baseline as the floor, and the 'beats every baseline' decision."""

import numpy as np
import pytest

from pertbench.metrics.calibration import (
    bootstrap_advantage,
    compare_with_baselines,
    normalized_score,
)


def _groups(seed=0, n=30):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n) * 0.01


def test_lower_is_better_floor_is_the_lowest_baseline():
    jitter = _groups()
    model = 0.5 + jitter
    baselines = {"no_change": 1.0 + jitter, "perturbation_mean": 0.7 + jitter}
    ceiling = 0.2 + jitter
    cmp = compare_with_baselines(model, baselines, ceiling, higher_is_better=False, seed=1)
    assert cmp.best == "perturbation_mean"
    assert cmp.normalized_best == pytest.approx(
        normalized_score(model.mean(), 0.7 + jitter.mean(), ceiling.mean(), higher_is_better=False)
    )
    assert cmp.normalized_best == pytest.approx((0.5 - 0.7) / (0.2 - 0.7), abs=1e-9)
    assert cmp.beats_all is True
    assert cmp.ci_low <= cmp.normalized_best <= cmp.ci_high


def test_higher_is_better_floor_is_the_highest_baseline():
    jitter = _groups(1)
    model = 0.6 + jitter
    baselines = {"no_change": 0.0 + jitter, "perturbation_mean": 0.8 + jitter}
    cmp = compare_with_baselines(model, baselines, 0.9 + jitter, higher_is_better=True)
    assert cmp.best == "perturbation_mean"
    assert cmp.normalized_best == pytest.approx((0.6 - 0.8) / (0.9 - 0.8), abs=1e-9)
    assert cmp.beats_all is False  # clearly worse than perturbation_mean
    value, _low, hi = cmp.advantage["perturbation_mean"]
    assert value == pytest.approx(-0.2) and hi < 0


def test_a_tie_within_noise_is_not_beating():
    rng = np.random.default_rng(2)
    base = rng.normal(size=40)
    model = base + rng.normal(scale=0.5, size=40)  # same mean, noisy difference
    cmp = compare_with_baselines(
        model, {"no_change": base + 5.0, "covariate_mean": base}, None, higher_is_better=False
    )
    assert cmp.best == "covariate_mean"
    assert np.isnan(cmp.normalized_best)  # no ceiling given
    lo = cmp.advantage["covariate_mean"][1]
    assert lo < 0 < cmp.advantage["covariate_mean"][2]
    assert cmp.beats_all is False


def test_undecidable_without_groups_to_resample():
    cmp = compare_with_baselines(
        np.array([0.1]), {"no_change": np.array([0.5])}, None, higher_is_better=False
    )
    assert cmp.best == "no_change" and cmp.beats_all is None
    assert compare_with_baselines(np.ones(3), {}, None, higher_is_better=True).beats_all is None


def test_baseline_undefined_on_some_groups_is_compared_where_defined():
    model = np.array([0.1, 0.2, 0.1, 0.2, 0.15])
    partial = np.array([np.nan, np.nan, 0.9, 1.0, 0.95])
    value, lo, hi, n = bootstrap_advantage(model, partial, higher_is_better=False, seed=0)
    assert n == 3
    assert value == pytest.approx(np.mean([0.8, 0.8, 0.8]))
    assert lo == pytest.approx(0.8) and hi == pytest.approx(0.8)


def test_intervals_of_every_baseline_equal_a_direct_bootstrap():
    """compare_with_baselines computes the intervals of all baselines in one quantile
    call; each must equal the bootstrap computed directly for that baseline alone,
    including a baseline with missing groups (fewer units, other resamples)."""
    from pertbench.metrics.calibration import bootstrap_weights

    rng = np.random.default_rng(7)
    model = rng.normal(size=25)
    baselines = {
        "no_change": rng.normal(size=25) + 0.3,
        "perturbation_mean": rng.normal(size=25),
        "covariate_mean": np.where(np.arange(25) % 4 == 0, np.nan, rng.normal(size=25)),
    }
    cmp = compare_with_baselines(model, baselines, None, higher_is_better=False, seed=3)
    for name, values in baselines.items():
        both = ~np.isnan(values)
        diff = values[both] - model[both]  # lower is better: positive = the model is better
        weights = bootstrap_weights(int(both.sum()), 1000, 3)
        boot = np.array([np.sum(w * diff) / np.sum(w) for w in weights])
        low, high = np.quantile(boot, [0.025, 0.975])
        value, lo, hi = cmp.advantage[name]
        assert value == pytest.approx(diff.mean())
        assert (lo, hi) == pytest.approx((low, high), rel=1e-12)
        assert (lo, hi) == bootstrap_advantage(model, values, higher_is_better=False, seed=3)[1:3]
