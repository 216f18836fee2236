"""`pertbench train`, `predict` and `models`: round trip through files, errors, listing."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from model_helpers import NEURAL_MODELS, transfer_split

from pertbench.cli.main import main
from pertbench.data import read_split, write_split
from pertbench.models.base import PerturbationModel


@pytest.fixture
def files(tmp_path, make_toy):
    adata = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40)
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    split = write_split(transfer_split(adata), tmp_path / "split.csv")
    return adata, data, split


SMALL_LA = ["--set", "encoder_width=32", "--set", "n_layers=1", "--set", "latent_dim=8"]


def test_train_predict_round_trip(files, tmp_path, capsys):
    adata, data, split = files
    run = tmp_path / "runs" / "la"
    args = ["train", str(data), "--model", "latent_additive", "--split", str(split)]
    args += ["--out", str(run), "--max-epochs", "2", "--seed", "3", "--no-progress", *SMALL_LA]
    assert main(args) == 0
    assert "trained latent_additive" in capsys.readouterr().out
    for name in ("config.json", "weights.pt", "training_log.csv", "split.csv", "run.json"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "run.json").read_text())
    assert meta["model"] == "latent_additive" and meta["seed"] == 3
    assert meta["params"]["encoder_width"] == 32 and meta["epochs_trained"] == 2
    assert {"pertbench", "torch", "numpy", "anndata", "python"} <= set(meta["versions"])
    assert meta["n_cells"]["train"] == int((read_split(split) == "train").sum())
    log = pd.read_csv(run / "training_log.csv")
    assert list(log["epoch"]) == [0, 1] and {"train_loss", "val_loss"} <= set(log.columns)
    pd.testing.assert_series_equal(read_split(run / "split.csv"), read_split(split))
    assert not list(tmp_path.glob("runs/.*"))  # no partial folders left behind

    out = tmp_path / "pred.h5ad"
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    assert "test group(s)" in capsys.readouterr().out
    pred = ad.read_h5ad(out)
    expected = PerturbationModel.load(run, device="cpu").predict_split(adata, read_split(split))
    np.testing.assert_array_equal(pred.X, expected.X)
    assert {"cell_type", "condition", "control_obs_name"} <= set(pred.obs.columns)
    assert (adata.obs.loc[pred.obs["control_obs_name"], "condition"] == "control").all()
    # val groups too
    out_val = tmp_path / "pred_val.h5ad"
    assert (
        main(["predict", str(run), "--data", str(data), "--out", str(out_val), "--on", "val"]) == 0
    )
    assert ad.read_h5ad(out_val).uns["pertbench"]["split"] == "val"


def test_train_refuses_to_clobber_and_overwrites_on_request(files, tmp_path, capsys):
    _, data, split = files
    run = tmp_path / "run"
    base = ["train", str(data), "--model", "linear", "--split", str(split), "--out", str(run)]
    base += ["--epochs", "1", "--no-progress"]
    assert main(base) == 0
    before = (run / "weights.pt").read_bytes()
    assert main(base) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "weights.pt").read_bytes() == before
    assert main([*base, "--overwrite", "--seed", "1", "--set", "lr=0.01"]) == 0
    assert json.loads((run / "run.json").read_text())["params"]["lr"] == 0.01


def test_bad_input_is_a_one_line_error_and_leaves_nothing(files, tmp_path, capsys):
    _, data, split = files
    run = tmp_path / "bad"
    common = ["train", str(data), "--split", str(split), "--out", str(run), "--no-progress"]
    cases = [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "linear", "--set", "depth=3"], "no hyperparameter depth"),
        (["--model", "linear", "--set", "lr"], "--set expects key=value"),
        (
            ["--model", "cpa", "--set", "likelihood=nb", "--set", "counts_layer=raw"],
            "layers['raw']",
        ),
        (["--model", "linear", "--covariates", "tissue"], "tissue"),
    ]
    for extra, message in cases:
        assert main([*common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
        assert not run.exists() and not list(tmp_path.glob(".bad*"))
    assert main(["predict", str(tmp_path / "none"), "--data", str(data), "--out", "x.h5ad"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_predict_on_must_be_test_or_val(files, tmp_path, capsys):
    _, data, split = files
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data),
                "--model",
                "linear",
                "--split",
                str(split),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["predict", str(run), "--data", str(data), "--out", "p.h5ad", "--on", "train"]) == 2
    assert "--on must be test or val" in capsys.readouterr().err


def test_models_lists_every_model_with_parameters(capsys):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in NEURAL_MODELS:
        assert f"{name}: " in text
    assert "adv_steps = 5 (int)" in text and "inputs = 'both' (str) [both | covariates" in text
    assert main(["models", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(NEURAL_MODELS) <= set(listing)
    la = {p["name"]: p for p in listing["latent_additive"]["params"]}
    assert la["embedding_key"]["default"] == "" and la["latent_dim"]["help"]
    assert listing["cpa"]["search_space"]["adv_steps"]["choices"] == [2, 3, 5, 7, 10, 20, 30]
    assert main(["models", "cpa"]) == 0
    assert capsys.readouterr().out.startswith("cpa: ")
    assert main(["models", "nope"]) == 2


def test_every_command_has_help(capsys):
    for command in ("train", "predict", "models"):
        with pytest.raises(SystemExit) as exc:
            from pertbench.cli.main import build_app

            build_app()([command, "--help"], prog_name="pertbench")
        assert exc.value.code == 0
        assert "Usage" in capsys.readouterr().out


SMALL_CPA = [
    *("--set", "n_latent=8", "--set", "hidden_dim=16", "--set", "n_layers_encoder=1"),
    *("--set", "adv_classifier_hidden_dim=8", "--set", "adv_classifier_n_layers=1"),
]


def test_train_writes_the_probe_of_held_out_cells(files, tmp_path):
    from pertbench.models.probe import PROBE_COLUMNS

    _, data, split = files
    run = tmp_path / "cpa"
    args = ["train", str(data), "--model", "cpa", "--split", str(split), "--out", str(run)]
    assert main([*args, "--epochs", "2", "--no-progress", *SMALL_CPA]) == 0
    probe = pd.read_csv(run / "probe.csv")
    assert list(probe.columns) == PROBE_COLUMNS
    assert list(probe["target"]) == ["perturbation", "cell_type"]
    values = probe[["accuracy", "chance", "reference_accuracy"]].to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    held_out = read_split(split).isin(["val", "test"]).sum()
    assert (probe["n_cells"] <= held_out).all() and (probe["latent_dim"] == 8).all()
    meta = json.loads((run / "run.json").read_text())
    assert meta["probe"] == "val+test"
    # --no-probe, and a model without a latent space, write none
    assert (
        main(
            [
                *args[:-1],
                str(tmp_path / "np"),
                "--epochs",
                "1",
                "--no-progress",
                "--no-probe",
                *SMALL_CPA,
            ]
        )
        == 0
    )
    assert not (tmp_path / "np" / "probe.csv").exists()
    linear = ["train", str(data), "--model", "linear", "--split", str(split)]
    assert main([*linear, "--out", str(tmp_path / "lin"), "--epochs", "1", "--no-progress"]) == 0
    assert not (tmp_path / "lin" / "probe.csv").exists()
    assert json.loads((tmp_path / "lin" / "run.json").read_text())["probe"] is None
