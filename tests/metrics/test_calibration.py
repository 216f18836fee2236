"""Bootstrap intervals, split halves, normalised scores and seed summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pertbench.metrics.calibration import (
    bootstrap_means,
    bootstrap_normalized,
    bootstrap_weights,
    ceiling_resolved,
    normalized_score,
    split_halves,
    summarize_seeds,
)


def test_bootstrap_means_match_an_explicit_resampling_loop():
    rng = np.random.default_rng(0)
    values = pd.DataFrame({"a": rng.normal(size=30), "b": rng.normal(size=30)})
    values.loc[[3, 7], "b"] = np.nan
    out = bootstrap_means(values, n_bootstrap=200, seed=5)
    W = bootstrap_weights(30, 200, 5)
    assert (W.sum(axis=1) == 30).all()
    # the same resamples, by hand
    for col in ("a", "b"):
        v = values[col].to_numpy()
        boots = []
        for w in W:
            idx = np.repeat(np.arange(30), w.astype(int))
            boots.append(np.nanmean(v[idx]))
        row = out.set_index("metric").loc[col]
        assert row["value"] == pytest.approx(np.nanmean(v))
        assert row["ci_low"] == pytest.approx(np.quantile(boots, 0.025))
        assert row["ci_high"] == pytest.approx(np.quantile(boots, 0.975))
    again = bootstrap_means(values, n_bootstrap=200, seed=5)
    pd.testing.assert_frame_equal(out, again)


def test_bootstrap_interval_needs_two_units():
    out = bootstrap_means(pd.DataFrame({"x": [1.0, np.nan], "y": [np.nan, np.nan]}), n_bootstrap=50)
    row = out.set_index("metric")
    assert row.loc["x", "value"] == 1.0 and np.isnan(row.loc["x", "ci_low"])
    assert np.isnan(row.loc["y", "value"])


def test_split_halves_disjoint_balanced_and_seeded():
    codes = np.array([0] * 7 + [1] * 4 + [2] * 1 + [-1] * 3)
    a, b = split_halves(codes, 3, seed=1)
    assert not ((a >= 0) & (b >= 0)).any()
    assert np.bincount(a[a >= 0], minlength=3).tolist() == [3, 2, 0]
    assert np.bincount(b[b >= 0], minlength=3).tolist() == [4, 2, 0]
    assert ((a >= 0) | (b >= 0)).sum() == 11  # the lone cell of group 2 is in neither
    a2, b2 = split_halves(codes, 3, seed=1)
    assert (a == a2).all() and (b == b2).all()
    many = np.repeat(np.arange(20), 10)
    x1, _ = split_halves(many, 20, seed=1)
    x2, _ = split_halves(many, 20, seed=2)
    assert not (x1 == x2).all()  # another seed, other halves
    assert set(np.flatnonzero(a >= 0)) | set(np.flatnonzero(b >= 0)) == set(
        np.flatnonzero(codes >= 0)
    ) - {11}


def test_normalized_score_directions_and_undefined_cases():
    # lower is better: baseline 1.0, ceiling 0.2, model 0.6 -> halfway
    assert normalized_score(0.6, 1.0, 0.2, higher_is_better=False) == pytest.approx(0.5)
    # higher is better: baseline 0.2, ceiling 0.8, model 0.8 -> 1
    assert normalized_score(0.8, 0.2, 0.8, higher_is_better=True) == pytest.approx(1.0)
    assert normalized_score(0.2, 0.2, 0.8, higher_is_better=True) == 0.0
    assert normalized_score(1.0, 0.2, 0.8, higher_is_better=True) > 1.0  # beats a replicate
    assert np.isnan(normalized_score(0.5, 0.3, 0.3, higher_is_better=True))  # no gap
    assert np.isnan(normalized_score(0.5, 0.3, 0.2, higher_is_better=True))  # wrong way
    vec = normalized_score(
        np.array([0.6, 0.3]), np.array([1.0, 0.3]), np.array([0.2, 0.3]), higher_is_better=False
    )
    assert vec[0] == pytest.approx(0.5) and np.isnan(vec[1])


def test_bootstrap_normalized_is_paired_and_skips_undefined_groups():
    model = np.array([0.5, 0.6, np.nan, 0.4])
    base = np.array([1.0, 1.0, 1.0, 1.0])
    ceil = np.array([0.0, 0.2, 0.1, 0.0])
    value, lo, hi, n = bootstrap_normalized(
        model, base, ceil, higher_is_better=False, n_bootstrap=300
    )
    m, b, c = 0.5, 1.0, (0.0 + 0.2 + 0.0) / 3
    assert n == 3
    assert value == pytest.approx((m - b) / (c - b))
    assert lo <= value <= hi


def test_ceiling_resolved_needs_a_gap_beyond_its_interval():
    rng = np.random.default_rng(0)
    base = 1.0 + rng.normal(0.0, 0.1, 200)
    # a clear gap (0.05 per group, sd 0.02): resolved, in the metric's direction only
    clear = base - 0.05 + rng.normal(0.0, 0.02, 200)
    assert ceiling_resolved(base, clear, higher_is_better=False)
    assert not ceiling_resolved(base, clear, higher_is_better=True)
    # a mean gap of 0.002 under per-group noise of sd 0.1 (standard error 0.007): not
    blurred = base - 0.002 + rng.normal(0.0, 0.1, 200)
    assert blurred.mean() < base.mean()  # better on average, yet within the noise
    assert not ceiling_resolved(base, blurred, higher_is_better=False)
    # the same mean gap with little spread is resolved: the rule is the interval, not the size
    tight = base - 0.002 + rng.normal(0.0, 0.001, 200)
    assert ceiling_resolved(base, tight, higher_is_better=False)
    # a skewed gap positive in every group is resolved, however wide its spread: one
    # strong perturbation among weak ones (a normal-theory interval would cover 0 here)
    skewed = np.array([0.01] * 15 + [10.0])
    assert skewed.mean() < 1.96 * skewed.std(ddof=1) / np.sqrt(skewed.size)
    assert ceiling_resolved(np.zeros(16), skewed, higher_is_better=True)
    # NaN units are left out; one unit needs a positive gap
    assert ceiling_resolved(np.array([1.0, np.nan]), np.array([0.5, 0.1]), higher_is_better=False)
    assert not ceiling_resolved(np.array([np.nan]), np.array([0.1]), higher_is_better=False)


def test_bootstrap_normalized_is_undefined_when_the_gap_is_within_the_noise():
    rng = np.random.default_rng(1)
    base = 1.0 + rng.normal(0.0, 0.1, 100)
    ceiling = base - 0.001 + rng.normal(0.0, 0.1, 100)
    model = base - 0.5  # far better than both: a ratio over the blurred gap would be huge
    plain = normalized_score(model.mean(), base.mean(), ceiling.mean(), higher_is_better=False)
    assert np.isfinite(plain) and abs(plain) > 10
    value, lo, hi, n = bootstrap_normalized(
        model, base, ceiling, higher_is_better=False, n_bootstrap=200
    )
    assert n == 100 and np.isnan(value) and np.isnan(lo) and np.isnan(hi)


def test_summarize_seeds():
    s1 = pd.DataFrame({"metric": ["a", "b"], "value": [1.0, 2.0]})
    s2 = pd.DataFrame({"metric": ["a", "b"], "value": [3.0, 2.0]})
    out = summarize_seeds([s1, s2]).set_index("metric")
    assert out.loc["a", "mean"] == 2.0 and out.loc["a", "sd"] == pytest.approx(
        np.std([1, 3], ddof=1)
    )
    assert out.loc["b", "sd"] == 0.0 and out.loc["a", "n"] == 2
    assert summarize_seeds([]).empty
