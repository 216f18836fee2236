"""Held-out cell-type workflow: end-to-end smoke, resume, baselines, experiments, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import make_toy_adata
from pertbench.cli.main import main
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import split_celltype
from pertbench.errors import ConfigError, DataValidationError
from pertbench.metrics.tutorial import tutorial_metrics
from pertbench.models.baselines import PerturbationMean
from pertbench.workflows import (
    TransferOptions,
    celltype_transfer,
    cross_study_transfer,
    imbalance_experiment,
    main_effect_importance,
    sensitivity_experiment,
)

TINY = {"n_hidden": 16, "n_latent": 4, "batch_size": 32, "max_epochs": 2}


def tiny_options(**kw) -> TransferOptions:
    models = kw.get("models", ("scgen", "scpram"))
    base = {"model_params": {m: dict(TINY) for m in models}, "n_bootstrap": 5, "device": "cpu"}
    base.update(kw)
    return TransferOptions(**base)


@pytest.fixture(scope="module")
def toy():
    data = make_toy_adata(n_covariates=3, n_perturbations=1, n_cells=30, n_controls=30, n_genes=24)
    data.obs["condition"] = data.obs["condition"].replace({"P0": "stimulated"})
    return data


@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    lines: list[str] = []
    table = celltype_transfer(
        toy, out_dir=out, cell_types="C0,C1", options=tiny_options(), log=lines.append
    )
    return out, table, lines


def test_end_to_end_outputs(finished_run):
    out, _, _ = finished_run
    on_disk = pd.read_csv(out / "metrics.csv")
    assert len(on_disk) == 2 * 4  # cell types x (scgen, scpram, no_change, perturbation_mean)
    assert set(on_disk["model"]) == {"scgen", "scpram", "no_change", "perturbation_mean"}
    assert set(on_disk["cell_type"]) == {"C0", "C1"}
    for column in ("r2", "pearson_delta", "edistance", "jaccard_top100", "train_seconds"):
        assert column in on_disk and np.isfinite(on_disk[column]).all()
    assert (on_disk["n_truth"] == 30).all() and (on_disk["n_controls"] == 30).all()
    assert (on_disk.loc[on_disk.model == "scgen", "epochs"] == 2).all()
    for cell_type in ("C0", "C1"):
        for model in ("scgen", "scpram"):
            for kind in ("pca", "mean_regression", "edistance", "de_dotplot", "de_violin"):
                assert (out / "figures" / cell_type / f"{model}_{kind}.png").stat().st_size > 0
        assert (out / "figures" / cell_type / "scpram_attention.png").is_file()
    attention = pd.read_csv(out / "attention.csv").set_index("query")
    assert list(attention.index) == ["C0", "C1"] and list(attention.columns) == ["C0", "C1", "C2"]
    # the held-out type is never its own reference; each row sums to 1
    assert np.isnan(attention.loc["C0", "C0"]) and np.isnan(attention.loc["C1", "C1"])
    np.testing.assert_allclose(attention.sum(axis=1, skipna=True), 1.0)


def test_no_change_row_matches_direct_metrics(finished_run, toy):
    _, table, _ = finished_run
    obs = toy.obs
    truth = toy[((obs.cell_type == "C1") & (obs.condition == "stimulated")).to_numpy()]
    controls = toy[((obs.cell_type == "C1") & (obs.condition == "control")).to_numpy()]
    expected = tutorial_metrics(truth, controls, controls, n_bootstrap=5, seed=0)
    row = table[(table.model == "no_change") & (table.cell_type == "C1")].iloc[0]
    for key in ("r2", "mse", "edistance", "jaccard_top100"):
        assert row[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12)


def test_metrics_recompute_from_saved_predictions(finished_run, toy):
    """Plain r2/mse/pearson of gene means, from the saved predicted cells and the truth."""
    import anndata as ad
    from sklearn.metrics import r2_score

    out, table, _ = finished_run
    obs = toy.obs
    for cell_type in ("C0", "C1"):
        truth = toy[((obs.cell_type == cell_type) & (obs.condition == "stimulated")).to_numpy()]
        truth_mean = np.asarray(truth.X.mean(axis=0)).ravel()
        n_controls = int(((obs.cell_type == cell_type) & (obs.condition == "control")).sum())
        for model in ("scgen", "scpram", "no_change", "perturbation_mean"):
            pred = ad.read_h5ad(out / "runs" / cell_type / f"{model}_pred.h5ad")
            assert pred.n_obs == n_controls and list(pred.var_names) == list(toy.var_names)
            pred_mean = np.asarray(pred.X.mean(axis=0), dtype=np.float64).ravel()
            row = table[(table.model == model) & (table.cell_type == cell_type)].iloc[0]
            assert row["r2"] == pytest.approx(r2_score(truth_mean, pred_mean), rel=1e-5)
            assert row["mse"] == pytest.approx(np.mean((truth_mean - pred_mean) ** 2), rel=1e-5)
            assert row["pearson"] == pytest.approx(
                np.corrcoef(truth_mean, pred_mean)[0, 1], rel=1e-5
            )
            assert "r2_boot" in row and row["r2_boot"] != row["r2"]  # the bootstrap variant


def test_rerun_keeps_finished_results_and_recomputes_on_change(finished_run, toy):
    out, table, _ = finished_run
    result_file = out / "runs" / "C0" / "scgen.json"
    stamp = result_file.stat().st_mtime_ns
    lines: list[str] = []
    again = celltype_transfer(
        toy, out_dir=out, cell_types="C0,C1", options=tiny_options(), log=lines.append
    )
    assert all("kept the finished result" in line for line in lines)
    pd.testing.assert_frame_equal(again, table)
    assert result_file.stat().st_mtime_ns == stamp
    # a changed hyperparameter recomputes only that model
    lines.clear()
    options = tiny_options()
    options.model_params["scgen"]["n_latent"] = 3
    celltype_transfer(toy, out_dir=out, cell_types="C0", options=options, log=lines.append)
    trained = [line for line in lines if "training and scoring" in line]
    assert trained == ["C0 / scgen: training and scoring"]
    stored = json.loads(result_file.read_text())["settings"]["params"]
    assert stored["n_latent"] == 3 and stored["kl_weight"] == 5e-5  # defaults recorded too


def test_reruns_into_the_same_folder_add_rows_instead_of_replacing_them(toy, tmp_path):
    options = tiny_options(models=(), baselines=("no_change", "perturbation_mean"))
    first = celltype_transfer(toy, out_dir=tmp_path, cell_types="C0", options=options)
    celltype_transfer(toy, out_dir=tmp_path, cell_types="C1", options=options)
    table = pd.read_csv(tmp_path / "metrics.csv")
    assert sorted(zip(table["cell_type"], table["model"], strict=True)) == [
        ("C0", "no_change"),
        ("C0", "perturbation_mean"),
        ("C1", "no_change"),
        ("C1", "perturbation_mean"),
    ]
    # the earlier cell type's rows are the ones the first run wrote
    kept = table[table["cell_type"] == "C0"].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept[first.columns], first, check_dtype=False)
    # recomputing C1 replaces its rows only
    again = celltype_transfer(toy, out_dir=tmp_path, cell_types="C1", options=options, resume=False)
    assert len(again) == 4 and len(pd.read_csv(tmp_path / "metrics.csv")) == 4


def test_perturbation_mean_is_control_plus_mean_delta_of_other_types(toy):
    keys = PerturbationKeys()
    split = split_celltype(toy, keys=keys, heldout="C2", seed=0).split
    model = PerturbationMean(keys=keys).fit(toy, split, progress=False)
    pred = model.predict_split(toy, split)
    X = toy.X.toarray().astype(np.float64)
    obs = toy.obs
    train = (split == "train").to_numpy()
    deltas = []
    for t in ("C0", "C1"):
        stim = train & (obs.cell_type == t).to_numpy() & (obs.condition == "stimulated").to_numpy()
        ctrl = train & (obs.cell_type == t).to_numpy() & (obs.condition == "control").to_numpy()
        deltas.append(X[stim].mean(0) - X[ctrl].mean(0))
    controls = X[toy.obs_names.get_indexer(pred.obs["control_obs_name"])]
    np.testing.assert_allclose(pred.X, controls + np.mean(deltas, axis=0), atol=1e-5)


def test_bad_requests_are_typed_errors(toy, tmp_path):
    with pytest.raises(ConfigError, match="not in 'cell_type'"):
        celltype_transfer(toy, out_dir=tmp_path, cell_types="Tcell", options=tiny_options())
    with pytest.raises(ConfigError, match="unknown model"):
        celltype_transfer(toy, out_dir=tmp_path, options=tiny_options(models=("scgenn",)))
    with pytest.raises(ConfigError, match="no cells labelled 'IFN'"):
        celltype_transfer(toy, out_dir=tmp_path, stimulated="IFN", options=tiny_options())
    with pytest.raises(DataValidationError, match="no column 'donor'"):
        celltype_transfer(
            toy,
            out_dir=tmp_path,
            keys=PerturbationKeys(covariate_keys="donor"),
            options=tiny_options(),
        )


def test_imbalance_keeps_the_truth_and_thins_training(toy, tmp_path):
    options = tiny_options(models=("scgen",), figures=False)
    comparison = imbalance_experiment(
        toy, out_dir=tmp_path, fraction=0.5, cell_types="C0", options=options
    )
    stacked = pd.read_csv(tmp_path / "imbalance_metrics.csv")
    bal = stacked[stacked.scenario == "balanced"].set_index("model")
    imb = stacked[stacked.scenario == "imbalanced_0.5"].set_index("model")
    assert (bal["n_truth"] == imb["n_truth"]).all()  # scored on the same real cells
    # training loses half of the other types' stimulated cells (2 types x 15 of 30 cells)
    assert ((bal["n_train"] + bal["n_val"]) - (imb["n_train"] + imb["n_val"]) == 30).all()
    assert set(comparison["model"]) == {"scgen", "no_change", "perturbation_mean"}
    np.testing.assert_allclose(
        comparison["r2_difference"], comparison["r2_imbalanced_0.5"] - comparison["r2_balanced"]
    )
    # no_change ignores the training data: identical in both scenarios
    no_change = comparison.set_index("model").loc["no_change"]
    assert no_change["r2_difference"] == pytest.approx(0.0, abs=1e-12)


def test_main_effect_importance_on_a_known_factorial():
    rows = []
    for cell, offset in (("A", 0.0), ("B", 10.0)):
        for a in (1, 2, 3):
            for b in ("x", "y"):
                rows.append({"cell_type": cell, "a": a, "b": b, "r2": offset + 2.0 * a})
    table = pd.DataFrame(rows)
    imp = main_effect_importance(table, ["a", "b"], metrics=("r2",)).iloc[0]
    assert imp["a"] == pytest.approx(1.0) and imp["b"] == pytest.approx(0.0)
    assert imp["most_influential"] == "a" and imp["interaction"] == pytest.approx(0.0, abs=1e-12)
    # an interaction-only metric: no main effect explains it
    table["mse"] = np.where((table.a == 1) == (table.b == "x"), 1.0, -1.0) * (table.a != 2)
    imp = main_effect_importance(table, ["a", "b"], metrics=("mse",)).iloc[0]
    assert imp["b"] == pytest.approx(0.0, abs=1e-12) and imp["interaction"] > 0.9
    # without blocking, the cell-type offset would swamp the parameter effect
    raw = main_effect_importance(table, ["a", "b"], metrics=("r2",), block=None).iloc[0]
    assert raw["a"] < 0.2


def test_sensitivity_grid_smoke(toy, tmp_path):
    results, importance = sensitivity_experiment(
        toy,
        out_dir=tmp_path,
        model="scgen",
        grid={"n_layers": [1, 2], "dropout": [0.0]},
        cell_types="C0",
        options=tiny_options(models=("scgen",), baselines=()),
    )
    assert len(results) == 2 and set(results["n_layers"]) == {"1", "2"}
    assert set(importance["metric"]) >= {"r2", "edistance"}
    assert (tmp_path / "sensitivity.png").is_file()
    assert (tmp_path / "sensitivity_importance.csv").is_file()
    with pytest.raises(ConfigError, match="no hyperparameter"):
        sensitivity_experiment(toy, out_dir=tmp_path, model="scgen", grid={"depth": [1]})


def test_cross_study_on_simulated_batch_shift(tmp_path):
    from pertbench.data.simulate import simulate

    # a strong, study-independent response and a gene-wise batch shift between studies
    data = simulate(
        n_covariates=3,
        n_perturbations=1,
        n_combinations=0,
        n_studies=2,
        n_genes=40,
        n_cells_per_group=60,
        perturbation_type="chemical",
        effect_scale=2.0,
        program_size=0.3,
        study_shift_sd=0.5,
        seed=0,
    )
    table = cross_study_transfer(
        data,
        out_dir=tmp_path,
        study_key="study",
        train_study="study0",
        test_study="study1",
        options=tiny_options(n_bootstrap=10),
    )
    assert set(table["cell_type"]) == {"CT0", "CT1", "CT2"}
    assert (table["test_study"] == "study1").all() and (table["train_study"] == "study0").all()
    obs = data.obs
    in_b = (obs.study == "study1").to_numpy()
    by = table.set_index(["model", "cell_type"])
    for t in ("CT0", "CT1", "CT2"):
        n_ctrl = int(
            (in_b & (obs.cell_type == t).to_numpy() & (obs.condition == "control").to_numpy()).sum()
        )
        assert (table.loc[table.cell_type == t, "n_controls"] == n_ctrl).all()  # B's own controls
        # study0's mean delta moved onto study1's controls points the right way
        assert by.loc[("perturbation_mean", t), "pearson_delta"] > 0.5
    # and, over the cell types, beats doing nothing (effects differ per type, so one
    # mean delta overshoots for some; the average is the fair comparison)
    mean_r2 = table.groupby("model")["r2"].mean()
    assert mean_r2["perturbation_mean"] > mean_r2["no_change"]
    attention = pd.read_csv(tmp_path / "attention.csv").set_index("query")
    assert list(attention.index) == ["CT0", "CT1", "CT2"]  # study1's types as queries
    assert list(attention.columns) == ["CT0", "CT1", "CT2"]  # study0's types as references
    np.testing.assert_allclose(attention.sum(axis=1), 1.0)
    assert (tmp_path / "figures" / "CT1" / "scgen_mean_regression.png").is_file()
    with pytest.raises(ConfigError, match="study 'study7' not found"):
        cross_study_transfer(
            data, out_dir=tmp_path, study_key="study", train_study="study7", test_study="study1"
        )


def test_cli_runs_and_reports_bad_input(toy, tmp_path, capsys):
    path = tmp_path / "toy.h5ad"
    toy.write_h5ad(path)
    out = tmp_path / "run"
    code = main(
        [
            "celltype-transfer",
            str(path),
            "--cell-type",
            "C1",
            "--out",
            str(out),
            "--models",
            "scgen",
            "--set",
            "scgen.n_hidden=16",
            "--set",
            "scgen.n_latent=4",
            "--epochs",
            "1",
            "--n-bootstrap",
            "3",
            "--no-figures",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out / "metrics.csv")
    assert list(table["model"]) == ["scgen", "no_change", "perturbation_mean"]
    assert table.loc[0, "epochs"] == 1
    capsys.readouterr()
    code = main(["celltype-transfer", str(path), "--cell-type", "Tcell", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cell type 'Tcell'") and len(err.splitlines()) == 1
    code = main(
        ["celltype-transfer", str(path), "--cell-type", "C1", "--out", str(out), "--set", "lr=1"]
    )
    assert code == 2 and "MODEL.NAME=VALUE" in capsys.readouterr().err
    for command in ("celltype-transfer", "sensitivity", "cross-study"):
        assert main([command, "--help"]) == 0
