"""The VCC summary keeps cell-eval's point values and adds intervals."""

import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.metrics import vcc
from pertbench.metrics.vcc_eval import vcc_mean_baseline, vcc_metrics
from pertbench.metrics.vcc_summary import vcc_summary

KEYS = PerturbationKeys(covariate_keys=("cell_type",))


def _scored(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=5, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    rng = np.random.default_rng(0)
    X = np.asarray(pred.X.todense() if hasattr(pred.X, "todense") else pred.X, dtype=np.float64)
    pred.X = np.maximum(X * 0.8 + rng.normal(scale=0.1, size=X.shape), 0.0)
    baseline = vcc_mean_baseline(truth, like=truth, keys=KEYS)
    return vcc_metrics(truth, pred, keys=KEYS, baseline=baseline)


def test_point_values_are_the_mean_of_cell_evals_block_means(make_toy):
    result = _scored(make_toy)
    table = vcc_summary(result, n_bootstrap=200, seed=1).set_index("metric")
    for metric in ("mae", "overlap_at_N", "discrimination_score_l1", "pearson_delta"):
        expected = result.per_covariate[metric].mean()  # each block counts once
        assert np.isclose(table.loc[metric, "value"], expected, rtol=1e-12)
        low, high = table.loc[metric, ["ci_low", "ci_high"]]
        assert low <= table.loc[metric, "value"] <= high
    expected_score = result.scores["avg_score"].mean()
    assert np.isclose(table.loc["vcc_score/avg_score", "value"], expected_score, rtol=1e-12)
    base = result.baseline_per_covariate["mae"].mean()
    assert np.isclose(table.loc["baseline/mae", "value"], base, rtol=1e-12)
    # every VCC metric has a normalised row
    assert {f"vcc_score/{m}" for m in vcc.VCC_PROFILE} <= set(table.index)


def test_intervals_are_seeded_and_resample_within_blocks(make_toy):
    result = _scored(make_toy)
    a = vcc_summary(result, n_bootstrap=100, seed=3)
    b = vcc_summary(result, n_bootstrap=100, seed=3)
    pd.testing.assert_frame_equal(a, b)
    c = vcc_summary(result, n_bootstrap=100, seed=4)
    assert not np.allclose(a["ci_low"], c["ci_low"], equal_nan=True)
    none = vcc_summary(result, n_bootstrap=0)
    assert none["ci_low"].isna().all()
    pd.testing.assert_series_equal(none["value"], a["value"])


def test_evaluate_vcc_takes_the_mean_baseline_from_training_cells(make_toy):
    from pertbench.metrics.vcc_summary import evaluate_vcc

    truth = make_toy(n_covariates=2, n_perturbations=5, n_genes=30)
    perts = truth.obs["condition"].astype(str)
    test = perts.isin(["P3", "P4"])  # make_toy names its perturbations P0..P4
    assert test.any()
    split = pd.Series(np.where(test, "test", "train"), index=truth.obs_names)
    pred = truth[test.to_numpy()].copy()
    result, summary = evaluate_vcc(truth, pred, keys=KEYS, split=split, n_bootstrap=50)
    expected = vcc_mean_baseline(truth[(split == "train").to_numpy()], like=pred, keys=KEYS)
    direct = vcc_metrics(truth, pred, keys=KEYS, baseline=expected)
    pd.testing.assert_frame_equal(result.scores, direct.scores)
    table = summary.set_index("metric")
    # the observed cells themselves: perfect mae, so the normalised mae is 1
    assert table.loc["mae", "value"] == 0.0
    assert np.isclose(table.loc["vcc_score/mae", "value"], 1.0)
