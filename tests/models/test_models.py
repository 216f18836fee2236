"""Every neural model: one-epoch smoke test, save/load identity, seed determinism,
counterfactual prediction from new controls, clear errors on unknown categories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from model_helpers import NEURAL_MODELS, SMALL, transfer_split

from pertbench.data import PerturbationKeys
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    ModelError,
    UnknownCategoryError,
)
from pertbench.models import build_counterfactuals, create_model
from pertbench.models.base import PerturbationModel, heldout_groups

VARIANTS = [
    *[(name, {}) for name in NEURAL_MODELS],
    ("decoder_only", {"inputs": "covariates"}),
    ("decoder_only", {"inputs": "perturbations"}),
    ("cpa", {"likelihood": "nb", "counts_layer": "counts"}),
    ("cpa", {"variational": False, "dose_scaling": "log1p"}),
    ("sams_vae", {"likelihood": "nb"}),
    ("sams_vae", {"sparse_additive_mechanism": False, "mean_field_encoding": True}),
    ("latent_additive", {"inject_covariates_encoder": False, "softplus_output": False}),
]


def _ids(v):
    name, extra = v
    return name + "".join(f"-{k}={val}" for k, val in extra.items())


@pytest.fixture
def toy(make_toy):
    adata = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40)
    return adata, transfer_split(adata)


def _fit(name, extra, adata, split, *, seed=0, epochs=1, keys=None):
    model = create_model(name, keys=keys, **{**SMALL[name], **extra})
    return model.fit(adata, split, seed=seed, max_epochs=epochs, progress=False)


@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_one_epoch_fit_predict_save_load_identity(variant, toy, tmp_path):
    name, extra = variant
    adata, split = toy
    model = _fit(name, extra, adata, split, epochs=1)
    assert list(model.history["epoch"]) == [0]
    assert np.isfinite(model.history["train_loss"]).all()
    assert "val_loss" in model.history
    pred = model.predict_split(adata, split, on="test")
    # one predicted cell per control of the covariate, for every held-out group
    requests = heldout_groups(adata, split, model.keys, on="test")
    n_ctrl = (adata.obs.condition == "control").groupby(adata.obs.cell_type).sum()
    assert pred.n_obs == int(sum(n_ctrl[c] for c in requests.cell_type))
    assert list(pred.var_names) == list(adata.var_names)
    assert np.isfinite(pred.X).all()
    assert {"cell_type", "condition", "control_obs_name"} <= set(pred.obs.columns)
    assert pred.uns["pertbench"]["prediction"] == "counterfactual"
    # save -> load -> predict gives identical numbers
    model.save(tmp_path / "m")
    loaded = PerturbationModel.load(tmp_path / "m", device="cpu")
    assert type(loaded) is type(model)
    again = loaded.predict_split(adata, split, on="test")
    np.testing.assert_array_equal(again.X, pred.X)
    pd.testing.assert_frame_equal(again.obs, pred.obs)
    # prediction itself is deterministic (eval mode, no sampling)
    np.testing.assert_array_equal(model.predict_split(adata, split).X, pred.X)


@pytest.mark.parametrize("name", NEURAL_MODELS)
def test_same_seed_same_predictions_other_seed_differs(name, toy):
    adata, split = toy
    before = torch.random.get_rng_state()
    a = _fit(name, {}, adata, split, seed=7, epochs=2).predict_split(adata, split).X
    b = _fit(name, {}, adata, split, seed=7, epochs=2).predict_split(adata, split).X
    c = _fit(name, {}, adata, split, seed=8, epochs=2).predict_split(adata, split).X
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # training never leaves the caller's global torch random state changed
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("name", ["linear", "cpa", "decoder_only"])
def test_unknown_perturbation_or_covariate_is_a_clear_error(name, toy):
    adata, split = toy
    model = _fit(name, {}, adata, split)
    request = pd.DataFrame({"cell_type": ["C0"], "condition": ["P99"]})
    cf = build_counterfactuals(adata, request, model.keys)
    with pytest.raises(UnknownCategoryError, match=r"never saw P99 in training"):
        model.predict(cf)
    cf = build_counterfactuals(
        adata, pd.DataFrame({"cell_type": ["C0"], "condition": ["P1"]}), model.keys
    )
    cf.obs["cell_type"] = "C9"
    with pytest.raises(UnknownCategoryError, match=r"cell_type value.*C9"):
        model.predict(cf)


def test_predicts_new_control_cells_of_known_covariates(toy, make_toy):
    adata, split = toy
    model = _fit("latent_additive", {}, adata, split, epochs=2)
    new = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40, seed=5)
    # only the new data's controls are used; genes may come in another order
    new = new[:, list(reversed(new.var_names))].copy()
    request = pd.DataFrame({"cell_type": ["C0", "C1"], "condition": ["P2", "P0+P3"]})
    cf = build_counterfactuals(new, request, model.keys)
    pred = model.predict(cf)
    assert pred.n_obs == 80 and list(pred.var_names) == list(adata.var_names)
    ctrl = new.obs.loc[pred.obs["control_obs_name"]]
    assert (ctrl.condition == "control").all()
    assert (ctrl.cell_type.to_numpy() == pred.obs.cell_type.to_numpy()).all()
    # a missing training gene is an error that names it
    with pytest.raises(DataValidationError, match="G3"):
        model.predict(build_counterfactuals(new[:, new.var_names != "G3"], request, model.keys))


def test_embedding_input_for_latent_additive(toy):
    adata, split = toy
    adata = adata.copy()
    rng = np.random.default_rng(0)
    projection = rng.normal(size=(adata.n_vars, 6)).astype(np.float32)
    adata.obsm["X_emb"] = np.asarray(adata.X @ projection)
    model = _fit("latent_additive", {"embedding_key": "X_emb"}, adata, split, epochs=2)
    assert model.dims["n_input"] == 6
    assert model.module.encoder.in_dim == 6 + 2  # embedding + one-hot cell type
    pred = model.predict_split(adata, split)
    assert pred.n_vars == adata.n_vars and np.isfinite(pred.X).all()
    # the embedding drives the prediction: another embedding gives another answer
    other = adata.copy()
    other.obsm["X_emb"] = adata.obsm["X_emb"][::-1].copy()
    assert not np.allclose(model.predict_split(other, split).X, pred.X)
    del other.obsm["X_emb"]
    with pytest.raises(DataValidationError, match="obsm has no embedding 'X_emb'"):
        model.predict_split(other, split)
    with pytest.raises(DataValidationError, match="obsm has no embedding 'nope'"):
        _fit("latent_additive", {"embedding_key": "nope"}, adata, split)


def test_nb_likelihood_without_counts_layer_is_a_clear_error(toy):
    adata, split = toy
    bare = adata.copy()
    del bare.layers["counts"]
    with pytest.raises(DataValidationError, match="raw counts in layers\\['counts'\\]"):
        _fit("cpa", {"likelihood": "nb"}, bare, split)


def test_dose_scales_the_perturbation_embedding(toy):
    adata, split = toy
    adata = adata.copy()
    adata.obs["dose"] = np.where(adata.obs.condition == "control", "0", "1.0")
    keys = PerturbationKeys(dose_key="dose")
    model = _fit("cpa", {"dose_scaling": "sigmoid"}, adata, split, keys=keys, epochs=2)
    request = pd.DataFrame(
        {"cell_type": ["C0"] * 3, "condition": ["P1"] * 3, "dose": ["0.1", "1.0", "10"]}
    )
    cf = build_counterfactuals(adata, request, keys)
    pred = model.predict(cf).X.reshape(3, -1, adata.n_vars).mean(axis=1)
    assert not np.allclose(pred[0], pred[1]) and not np.allclose(pred[1], pred[2])
    with pytest.raises(DataValidationError, match="no dose column"):
        _fit("cpa", {}, adata.copy()[:, :].copy(), split, keys=PerturbationKeys(dose_key="nope"))


def test_bad_hyperparameters_are_config_errors(toy):
    adata, split = toy
    with pytest.raises(ConfigError, match="no hyperparameter n_hidden"):
        create_model("latent_additive", n_hidden=3)
    with pytest.raises(ConfigError, match="inputs must be one of"):
        create_model("decoder_only", inputs="genes")
    with pytest.raises(ConfigError, match="adv_steps must be >= 2"):
        _fit("cpa", {"adv_steps": 1}, adata, split)
    with pytest.raises(ConfigError, match="max_epochs must be >= 1"):
        _fit("linear", {}, adata, split, epochs=0)
    with pytest.raises(ConfigError, match="likelihood must be one of"):
        _fit("sams_vae", {"likelihood": "poisson"}, adata, split)
    with pytest.raises(ModelError, match="only controls"):
        ctrl = adata[adata.obs.condition == "control"].copy()
        _fit("linear", {}, ctrl, None)


def test_search_spaces_name_real_parameters_and_validate():
    from pertbench.models.registry import get_model_class
    from pertbench.models.search_space import validate_space

    for name in NEURAL_MODELS:
        cls = get_model_class(name)
        params = set(cls.default_params())
        assert cls.search_space, name
        validate_space(cls.search_space, valid_params=params)
        # every field documents itself for `pertbench models`
        import dataclasses

        for field in dataclasses.fields(cls.Params):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
    # the adversary's entries are CPA's only
    cpa, noadv = get_model_class("cpa"), get_model_class("cpa_noadv")
    assert "adv_steps" in cpa.search_space and "adv_steps" not in noadv.search_space
