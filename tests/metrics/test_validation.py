"""The metric validation study: failure predictions have the documented means, the detection
rule, PerturBench's finding (collapse is flagged by rank metrics, not by rmse), the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pertbench.cli.main import main
from pertbench.data.groups import group_cells, group_mean
from pertbench.data.keys import PerturbationKeys
from pertbench.data.simulate import simulate
from pertbench.metrics.validation import (
    DEFAULT_STUDY_SIMULATION,
    detect_failures,
    failure_predictions,
    validate_metrics,
)

SMALL = dict(
    n_covariates=2, n_perturbations=6, n_combinations=4, n_cells_per_group=12, n_genes=40, seed=2
)
RANKS = ("rmse_rank_average", "cosine_rank_logfc", "pearson_rank_delta", "mse_rank_logfc")


def _means(pred, labels):
    grouping = group_cells(pred.obs, PerturbationKeys())
    means = group_mean(pred.X, grouping.group_codes, grouping.n_groups)
    index = list(grouping.group_labels())
    return means[[index.index(label) for label in labels]]


def test_failure_predictions_have_the_documented_means():
    truth = simulate(**SMALL)
    preds = dict(failure_predictions(truth, seed=1))
    grouping = group_cells(preds["perfect"].obs, PerturbationKeys())
    labels = list(grouping.group_labels())
    covariate = [label.split(":")[0] for label in labels]
    m = {f: _means(p, labels) for f, p in preds.items()}
    # same groups and sizes as the truth's perturbed groups, but new cells
    truth_groups = group_cells(truth.obs, PerturbationKeys()).groups
    assert len(labels) == int((~truth_groups["is_control"]).sum())
    perturbed = (truth.obs["condition"] != "control").to_numpy()
    assert (preds["perfect"].X != truth.X[perturbed].toarray()).any()
    # wrong_sign = 2c - m and shrunk = (m + c) / 2, with c the replicate's control mean
    control = (m["perfect"] + m["wrong_sign"]) / 2
    np.testing.assert_allclose(m["shrunk"], (m["perfect"] + control) / 2, atol=1e-5)
    for cov in set(covariate):  # one control per covariate
        rows = [i for i, c in enumerate(covariate) if c == cov]
        np.testing.assert_allclose(control[rows], control[rows[:1]].repeat(len(rows), 0), atol=1e-5)
        # collapse: every group of a covariate gets the mean of its groups' means
        expected = m["perfect"][rows].mean(axis=0)
        np.testing.assert_allclose(
            m["collapsed"][rows], expected[None].repeat(len(rows), 0), atol=1e-5
        )
    # one shared bias vs independent noise, both of the size of a typical effect
    bias = m["systematic"] - m["perfect"]
    np.testing.assert_allclose(bias, bias[:1].repeat(len(labels), 0), atol=1e-5)
    noise = m["noise"] - m["perfect"]
    tau = np.sqrt(np.mean((m["perfect"] - control) ** 2))
    assert np.std(noise[0] - noise[1]) > 0 and 0.7 < noise.std() / tau < 1.3
    # additive: interacting combinations move to the sum of their parts, nothing else moves
    classes = dict(
        zip(
            truth.uns["simulation"]["combinations"],
            truth.uns["simulation"]["interaction_class"],
            strict=True,
        )
    )
    for i, label in enumerate(labels):
        cov, pert = label.split(":")
        if classes.get(pert, "additive") == "additive":
            np.testing.assert_allclose(m["additive"][i], m["perfect"][i], atol=1e-5)
            continue
        parts = [labels.index(f"{cov}:{p}") for p in pert.split("+")]
        expected = control[i] + sum(m["perfect"][j] - control[j] for j in parts)
        np.testing.assert_allclose(m["additive"][i], expected, atol=1e-4)
    # every failure keeps the cells' spread around their group mean
    spread = preds["perfect"].X - m["perfect"][grouping.group_codes]
    moved = preds["wrong_sign"].X - m["wrong_sign"][grouping.group_codes]
    np.testing.assert_allclose(moved, spread, atol=1e-4)


def test_detection_rule_on_hand_made_scores():
    scores = pd.DataFrame(
        [
            ("rmse_average", "fit", "perfect", 1.0, 0.9, 1.1, False),
            ("rmse_average", "fit", "collapsed", 1.05, 0.9, 1.2, False),  # inside the interval
            ("rmse_average", "fit", "noise", 1.3, 1.2, 1.4, False),  # 3 half-widths worse
            ("pearson_delta", "fit", "perfect", 0.8, 0.7, 0.9, True),
            ("pearson_delta", "fit", "collapsed", 0.5, 0.4, 0.6, True),
            ("pearson_delta", "fit", "noise", 0.85, 0.8, 0.9, True),  # better than perfect
        ],
        columns=["metric", "family", "failure", "value", "ci_low", "ci_high", "higher_is_better"],
    )
    got = detect_failures(scores).set_index(["metric", "failure"])
    assert got.loc[("rmse_average", "collapsed"), "detected"] is False
    assert got.loc[("rmse_average", "noise"), "detected"] is True
    assert got.loc[("rmse_average", "noise"), "intervals"] == pytest.approx(3.0)
    assert got.loc[("pearson_delta", "collapsed"), "degradation"] == pytest.approx(0.3)
    assert got.loc[("pearson_delta", "collapsed"), "detected"] is True
    assert got.loc[("pearson_delta", "noise"), "detected"] is False
    assert got.loc[("rmse_average", "noise"), "rank"] == 1  # the most penalised
    assert got.loc[("pearson_delta", "collapsed"), "rank"] == 1


def test_collapse_is_flagged_by_rank_metrics_not_by_rmse():
    """PerturBench's finding, on the study's default simulation (docs/metric_validation.md)."""
    truth = simulate(**DEFAULT_STUDY_SIMULATION)
    study = validate_metrics(
        truth,
        metrics=["rmse_average", *RANKS],
        failures=("collapsed", "wrong_sign"),
        n_bootstrap=500,
    )
    assert not study.detected("rmse_average", "collapsed")
    for metric in RANKS:
        assert study.detected(metric, "collapsed"), metric
    # not a blind metric: rmse does see a prediction with the wrong sign
    assert study.detected("rmse_average", "wrong_sign")


def test_validate_metrics_command(tmp_path, capsys):
    data = tmp_path / "sim.h5ad"
    simulate(**SMALL).write_h5ad(data)
    out = tmp_path / "study"
    args = ["validate-metrics", "--data", str(data), "--out", str(out), "--n-bootstrap", "50"]
    assert main([*args, "--metrics", "rmse_average,rmse_rank_average"]) == 0
    detection = pd.read_csv(out / "detection.csv")
    assert set(detection["failure"]) == {
        "collapsed",
        "shrunk",
        "wrong_sign",
        "noise",
        "additive",
        "systematic",
    }
    assert {"rmse_average", "rmse_rank_average", "gi_rmse[interacting]"} <= set(detection["metric"])
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rmse_rank_average" in capsys.readouterr().out
    assert main(args) == 2  # an earlier study is never replaced silently
    assert "pass --overwrite" in capsys.readouterr().err
    plain = tmp_path / "plain.h5ad"
    adata = simulate(**SMALL)
    del adata.uns["simulation"]
    adata.write_h5ad(plain)
    assert main(["validate-metrics", "--data", str(plain), "--out", str(tmp_path / "x")]) == 2
    assert "needs a truth made by pertbench's simulator" in capsys.readouterr().err
