"""Genetic-interaction metrics: hand-made cases against direct numpy / scikit-learn computations,
seen0/1/2 and seen-in-another-covariate subgroups on a hand-made split."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import precision_score, recall_score, roc_auc_score

from pertbench.errors import EvaluationError
from pertbench.metrics.interactions import (
    classification_scores,
    evaluate_interactions,
    non_additivity_z,
)

GENES = ["g0", "g1", "g2", "g3", "g4"]
# (covariate, perturbation, split) -> the cells' values (rows); four genes change
GROUPS = {
    ("C0", "control", "train"): [[1, 1, 1, 1, 1], [1.2, 0.8, 1, 1.1, 0.9], [0.8, 1.2, 1, 0.9, 1.1]],
    ("C0", "A", "train"): [[2, 1, 1, 1, 1], [2.2, 1, 1.1, 1, 1]],
    ("C0", "B", "train"): [[1, 0, 1, 1, 1], [1, 0.4, 1, 1, 1.2]],
    ("C0", "C", "test"): [[1, 1, 3, 1, 1], [1, 1, 2.6, 1, 1]],
    ("C0", "D", "test"): [[1, 1, 1, 0, 1], [1, 1, 1, 0.2, 1]],
    ("C0", "A+B", "test"): [[3, 0, 1, 1, 2], [3.4, 0.2, 1, 1, 2.2]],
    ("C0", "A+C", "test"): [[2, 1, 3, 1, 1], [2.2, 1, 3, 1, 1]],
    ("C0", "C+D", "test"): [[1, 1, 2, 2, 1], [1, 1, 2.4, 1.6, 1]],
    ("C1", "control", "train"): [[1, 1, 1, 1, 1], [1, 1.2, 1, 1, 0.8]],
    ("C1", "A", "train"): [[2, 1, 1, 1, 1], [2, 1, 1, 1, 1.2]],
    ("C1", "B", "train"): [[1, 0, 1, 1, 1], [1.2, 0, 1, 1, 1]],
    ("C1", "A+B", "train"): [[3, 0, 1, 1, 2], [3, 0, 1, 1, 2.4]],
}
PRED = {  # one predicted profile per combination (two identical cells each)
    ("C0", "A+B"): [2.9, 0.1, 1.0, 1.0, 1.9],
    ("C0", "A+C"): [2.1, 1.0, 3.5, 1.0, 1.0],
    ("C0", "C+D"): [1.0, 1.0, 3.0, 0.1, 1.0],
}


def _hand_made():
    rows, obs = [], []
    for (cov, pert, part), cells in GROUPS.items():
        rows.extend(cells)
        obs.extend([(cov, pert, part)] * len(cells))
    frame = pd.DataFrame(obs, columns=["cell_type", "condition", "split"])
    frame.index = [f"c{i}" for i in range(len(frame))]
    truth = ad.AnnData(
        X=np.asarray(rows, dtype=np.float32),
        obs=frame[["cell_type", "condition"]],
        var=pd.DataFrame(index=GENES),
    )
    p_rows, p_obs = [], []
    for (cov, pert), profile in PRED.items():
        p_rows.extend([profile, profile])
        p_obs.extend([(cov, pert)] * 2)
    pred = ad.AnnData(
        X=np.asarray(p_rows, dtype=np.float32)[:, ::-1],  # genes in another order
        obs=pd.DataFrame(
            p_obs, columns=["cell_type", "condition"], index=[f"p{i}" for i in range(6)]
        ),
        var=pd.DataFrame(index=GENES[::-1]),
    )
    return truth, pred, frame["split"]


def _cells(cov, pert):
    cells = next(v for k, v in GROUPS.items() if k[:2] == (cov, pert))
    return np.asarray(cells, dtype=np.float32).astype(np.float64)


def _mean(cov, pert):
    return _cells(cov, pert).mean(axis=0)


def _se2(cov, pert):
    cells = _cells(cov, pert)
    return cells.var(axis=0, ddof=1) / len(cells)


def test_gi_metrics_match_a_direct_computation():
    truth, pred, split = _hand_made()
    result = evaluate_interactions(truth, pred, split=split, n_bootstrap=0, alpha=0.05)
    table = result.per_combination.set_index("condition")
    assert list(table.index) == ["A+B", "A+C", "C+D"]  # only C0's test combinations
    ctrl = _mean("C0", "control")
    for combo in ("A+B", "A+C", "C+D"):
        a, b = combo.split("+")
        obs = (_mean("C0", combo) - ctrl) - (_mean("C0", a) - ctrl) - (_mean("C0", b) - ctrl)
        prd = (
            (np.asarray(PRED[("C0", combo)]) - ctrl)
            - (_mean("C0", a) - ctrl)
            - (_mean("C0", b) - ctrl)
        )
        row = table.loc[combo]
        assert row["gi_norm_obs"] == pytest.approx(np.linalg.norm(obs), rel=1e-5)
        assert row["gi_norm_pred"] == pytest.approx(np.linalg.norm(prd), rel=1e-5)
        assert row["gi_pearson"] == pytest.approx(np.corrcoef(prd, obs)[0, 1], rel=1e-5)
        cosine = prd @ obs / (np.linalg.norm(prd) * np.linalg.norm(obs))
        assert row["gi_cosine"] == pytest.approx(cosine, rel=1e-5)
        rmse = np.sqrt(np.mean((np.asarray(PRED[("C0", combo)]) - _mean("C0", combo)) ** 2))
        assert row["gi_rmse"] == pytest.approx(rmse, rel=1e-5)
        assert row["gi_rmse_additive"] == pytest.approx(np.sqrt(np.mean(obs**2)), rel=1e-5)
        # noise: the four means' squared standard errors (controls once, (k - 1)^2 = 1)
        v = _se2("C0", combo) + _se2("C0", a) + _se2("C0", b) + _se2("C0", "control")
        z_obs = (obs @ obs - v.sum()) / np.sqrt(2 * (v**2).sum())
        z_pred = (prd @ prd - v.sum()) / np.sqrt(2 * (v**2).sum())
        assert row["z_obs"] == pytest.approx(z_obs, rel=1e-5)
        assert row["z_pred"] == pytest.approx(z_pred, rel=1e-5)
        assert row["called_obs"] == (z_obs > 1.6448536) and row["called_pred"] == (
            z_pred > 1.6448536
        )
        assert row["non_additive"] == row["called_obs"]  # no simulated labels: observed calls


def test_seen_subgroups_on_a_hand_made_split():
    truth, pred, split = _hand_made()
    result = evaluate_interactions(truth, pred, split=split, n_bootstrap=0)
    table = result.per_combination.set_index("condition")
    # A and B have training cells (B only in C1), C and D none
    assert table["seen_singles"].to_dict() == {"A+B": 2, "A+C": 1, "C+D": 0}
    # A+B trains in C1 while it is held out in C0
    assert table["seen_in_other_covariate"].to_dict() == {"A+B": True, "A+C": False, "C+D": False}
    summary = result.summary
    for subgroup, members in {
        "seen0": ["C+D"],
        "seen1": ["A+C"],
        "seen2": ["A+B"],
        "seen_in_other_covariate": ["A+B"],
        "never_seen": ["A+C", "C+D"],
    }.items():
        value = summary[(summary["subgroup"] == subgroup) & (summary["metric"] == "gi_rmse")]
        assert int(value["n_combinations"].iloc[0]) == len(members)
        assert value["value"].iloc[0] == pytest.approx(table.loc[members, "gi_rmse"].mean())


def test_classification_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.random(40) < 0.4
    scores = np.round(rng.normal(size=40) + labels, 1)  # rounded: ties
    calls = scores > 0.5
    got = classification_scores(labels, calls, scores)
    assert got["precision"][0] == pytest.approx(precision_score(labels, calls))
    assert got["recall"][0] == pytest.approx(recall_score(labels, calls))
    assert got["roc_auc"][0] == pytest.approx(roc_auc_score(labels, scores))
    # a resample is the same as repeating combinations
    weights = rng.integers(0, 3, size=(1, 40)).astype(float)
    repeat = np.repeat(np.arange(40), weights[0].astype(int))
    got = classification_scores(labels, calls, scores, weights=weights)
    assert got["roc_auc"][0] == pytest.approx(roc_auc_score(labels[repeat], scores[repeat]))
    one_class = classification_scores(np.ones(5, bool), np.ones(5, bool), np.arange(5.0))
    assert np.isnan(one_class["roc_auc"][0]) and one_class["precision"][0] == 1.0


def test_z_is_standard_normal_under_additivity():
    rng = np.random.default_rng(1)
    noise = rng.uniform(0.01, 0.05, size=(4000, 300))
    gi = rng.normal(0.0, np.sqrt(noise))
    z = non_additivity_z(gi, noise)
    assert abs(z.mean()) < 0.06 and abs(z.std() - 1.0) < 0.06
    assert np.isnan(non_additivity_z(np.zeros((1, 3)), np.zeros((1, 3))))[0]


def test_simulated_labels_and_an_oracle(tmp_path):
    from pertbench.data import make_task_split
    from pertbench.data.simulate import simulate

    adata = simulate(
        n_covariates=2,
        n_perturbations=8,
        n_combinations=10,
        n_cells_per_group=40,
        n_genes=80,
        seed=3,
    )
    split = make_task_split(adata, task="combo", seed=0).split
    oracle = adata[(split == "test").to_numpy()].copy()  # the observed cells themselves
    result = evaluate_interactions(adata, oracle, split=split, n_bootstrap=200)
    table = result.per_combination
    classes = dict(
        zip(
            adata.uns["simulation"]["combinations"],
            adata.uns["simulation"]["interaction_class"],
            strict=True,
        )
    )
    assert result.settings["labels"] == "simulation"
    assert (table["interaction_class"] == table["condition"].map(classes)).all()
    assert (table["non_additive"] == (table["interaction_class"] != "additive")).all()
    np.testing.assert_allclose(table["gi_pearson"], 1.0)
    np.testing.assert_allclose(table["gi_rmse"], 0.0, atol=1e-6)
    assert result.value("all", "gi_cosine") == pytest.approx(1.0)
    result.write(tmp_path)
    back = pd.read_csv(tmp_path / "interactions_summary.csv")
    assert set(back["subgroup"]) >= {"all", "interacting", "seen2"}


def test_bad_input():
    truth, pred, split = _hand_made()
    with pytest.raises(EvaluationError, match="have no prediction"):
        evaluate_interactions(truth, pred[:2], split=split)
    with pytest.raises(EvaluationError, match="missing from pred"):
        evaluate_interactions(truth, pred[:, :3], split=split)
    with pytest.raises(EvaluationError, match="needs a truth made by pertbench's simulator"):
        evaluate_interactions(truth, pred, split=split, labels="simulation")
