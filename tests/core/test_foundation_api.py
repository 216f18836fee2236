"""Tests of the shared core: keys, grouping, split I/O, encodings, atomic output, CLI errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertbench.cli.main import main
from pertbench.data import (
    PerturbationKeys,
    group_cells,
    group_mean,
    group_mean_var,
    make_split,
    read_split,
    write_split,
)
from pertbench.errors import ConfigError, DataValidationError, SplitError, UnknownCategoryError
from pertbench.models.base import build_counterfactuals, heldout_groups
from pertbench.models.encoding import CategoryEncoding
from pertbench.utils.io import atomic_path, write_text_atomic


def test_keys_reject_bad_settings():
    with pytest.raises(ConfigError, match="delimiter"):
        PerturbationKeys(control="ctrl+x")
    with pytest.raises(ConfigError, match="both"):
        PerturbationKeys(covariate_keys="condition")
    keys = PerturbationKeys(covariate_keys="cell_type, treatment")
    assert keys.covariate_keys == ("cell_type", "treatment")
    assert keys.components("A+B") == ("A", "B")
    assert keys.components("control") == ()
    assert PerturbationKeys.from_dict(keys.to_dict()) == keys


def test_grouping_matches_pandas_groupby(toy_adata):
    keys = PerturbationKeys()
    g = group_cells(toy_adata.obs, keys)
    expected = toy_adata.obs.groupby(["cell_type", "condition"]).size()
    got = g.groups.set_index(["cell_type", "condition"])["n_cells"]
    pd.testing.assert_series_equal(got.sort_index(), expected.sort_index(), check_names=False)
    assert g.is_control.sum() == (toy_adata.obs.condition == "control").sum()
    # per-cell codes point at the right group rows
    rows = g.groups.iloc[g.group_codes]
    assert (rows["condition"].to_numpy() == toy_adata.obs["condition"].to_numpy()).all()


def test_group_mean_and_var_match_numpy(toy_adata):
    g = group_cells(toy_adata.obs, PerturbationKeys())
    dense = toy_adata.X.toarray().astype(np.float64)
    mean, var = group_mean_var(toy_adata.X, g.group_codes, g.n_groups)
    mean_dense = group_mean(dense, g.group_codes, g.n_groups)
    for i in range(g.n_groups):
        rows = dense[g.group_codes == i]
        np.testing.assert_allclose(mean[i], rows.mean(axis=0), rtol=1e-10)
        np.testing.assert_allclose(var[i], rows.var(axis=0), atol=1e-9)
        np.testing.assert_allclose(mean_dense[i], rows.mean(axis=0), rtol=1e-10)


def test_missing_key_message(toy_adata):
    with pytest.raises(DataValidationError, match="no column 'dose_group'"):
        group_cells(toy_adata.obs, PerturbationKeys(covariate_keys=("dose_group",)))


def test_split_roundtrip_and_validation(tmp_path, toy_adata):
    values = np.array(["train", "val", "test", ""] * (toy_adata.n_obs // 4), dtype=object)
    split = make_split(toy_adata.obs_names, values)
    path = write_split(split, tmp_path / "split.csv")
    assert path.read_text().splitlines()[0] == "obs_name,split"
    back = read_split(path, toy_adata.obs_names)
    pd.testing.assert_series_equal(back, split)
    (tmp_path / "bad.csv").write_text("obs_name,split\ncell0,training\n")
    with pytest.raises(SplitError, match="train, val, test or empty"):
        read_split(tmp_path / "bad.csv")
    (tmp_path / "other.csv").write_text("obs_name,split\nnot_a_cell,train\n")
    with pytest.raises(SplitError, match="not in the data"):
        read_split(tmp_path / "other.csv", toy_adata.obs_names)


def test_encoding_multihot_and_unknowns(toy_adata):
    keys = PerturbationKeys()
    enc = CategoryEncoding.fit(toy_adata.obs, keys)
    m = enc.perturbation_matrix(["P0+P1", "control", "P2"])
    assert m.shape == (3, enc.n_perturbations)
    assert m[0].toarray().ravel()[
        [enc.perturbations.index("P0"), enc.perturbations.index("P1")]
    ].tolist() == [1, 1]
    assert m[1].nnz == 0
    with pytest.raises(UnknownCategoryError, match="not trained on perturbation"):
        enc.perturbation_matrix(["P99"])
    with pytest.raises(UnknownCategoryError, match="cell_type value"):
        enc.covariate_codes(pd.DataFrame({"cell_type": ["C9"]}))
    onehot = enc.covariate_onehot(toy_adata.obs.iloc[:3])
    assert onehot.sum(axis=1).tolist() == [1, 1, 1]
    dosed = enc.perturbation_matrix(["P0+P1"], dose=["2+0.5"])
    assert sorted(dosed.data.tolist()) == [0.5, 2.0]


def test_counterfactuals_use_controls_of_same_covariates(toy_adata):
    keys = PerturbationKeys()
    split = make_split(toy_adata.obs_names, "train")
    is_c1 = toy_adata.obs.cell_type.to_numpy() == "C1"
    split[is_c1 & (toy_adata.obs.condition.isin(["P0", "control"]).to_numpy())] = "test"
    requests = heldout_groups(toy_adata, split, keys, on="test")
    assert requests.to_dict("records") == [{"cell_type": "C1", "condition": "P0"}]
    cf = build_counterfactuals(toy_adata, requests, keys, control_split=split, prefer_split="test")
    ctrl = toy_adata.obs.loc[cf.obs["control_obs_name"]]
    assert (ctrl.condition == "control").all() and (ctrl.cell_type == "C1").all()
    assert cf.n_obs == ((toy_adata.obs.condition == "control") & is_c1).sum()
    assert sp.issparse(cf.X)


def test_atomic_write_keeps_old_file_on_error(tmp_path):
    target = write_text_atomic(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_cli_version_and_unknown_command(capsys):
    assert main(["--version"]) == 0
    assert "pertbench" in capsys.readouterr().out
    assert main(["no-such-command"]) == 2


def test_search_space_validation_and_sampling():
    import optuna

    from pertbench.models.search_space import suggest_params, validate_space

    space = {
        "n_layers": {"type": "int", "low": 1, "high": 7, "step": 2},
        "lr": {"type": "float", "low": 5e-6, "high": 1e-3, "log": True},
        "n_latent": {"type": "categorical", "choices": [64, 128]},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = suggest_params(study.ask(), space)
    assert params["n_layers"] in {1, 3, 5, 7}
    assert 5e-6 <= params["lr"] <= 1e-3
    assert params["n_latent"] in {64, 128}
    with pytest.raises(ConfigError, match="low <= high"):
        validate_space({"lr": {"type": "float", "low": 1.0, "high": 0.1}})
    with pytest.raises(ConfigError, match="unknown hyperparameter"):
        validate_space(space, valid_params={"lr"})


def test_atomic_write_gives_normal_file_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        target = write_text_atomic(tmp_path / "perm.txt", "x")
    finally:
        os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o644
