"""scGen: balanced delta, latent arithmetic, determinism, save/load, keys and errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from model_helpers import LATENT_VAE_SMALL as SMALL
from model_helpers import celltype_split

from conftest import make_toy_adata
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, ModelError, UnknownCategoryError
from pertbench.models._latent_arithmetic import ReferenceLatents, balanced_delta
from pertbench.models.base import PerturbationModel, build_counterfactuals
from pertbench.models.registry import create_model
from pertbench.models.scgen import ScGen, ScGenVAE


@pytest.fixture(scope="module")
def stim_data():
    return make_toy_adata(n_covariates=3, n_perturbations=1, n_cells=40, n_controls=40, n_genes=30)


@pytest.fixture(scope="module")
def fitted(stim_data):
    split = celltype_split(stim_data, "C2")
    model = ScGen(**SMALL).fit(stim_data, split, seed=3, device="cpu", progress=False)
    return model, stim_data, split


def hand_made_reference() -> ReferenceLatents:
    """Type A: 3 controls at (0,0), 3 stimulated at (1,0); type B: 6 at (10,10) / (10,14).

    Balanced pools both hold 2 x 6 cells, so no subsampling happens and the balanced delta
    is exactly ((1,0) + (10,14))/2 - ((0,0) + (10,10))/2 = (0.5, 2.0). The unbalanced
    (pooled) difference would be (19/3*... ) dominated by type B: (7, 9.33) - (6.67, 6.67).
    """
    latent = np.array([[0, 0]] * 3 + [[1, 0]] * 3 + [[10, 10]] * 6 + [[10, 14]] * 6, float)
    cov = np.array(["A"] * 6 + ["B"] * 12, dtype=object)
    pert = np.array(["control"] * 3 + ["stim"] * 3 + ["control"] * 6 + ["stim"] * 6, dtype=object)
    return ReferenceLatents(latent=latent.astype(np.float32), covariate=cov, perturbation=pert)


def test_balanced_delta_hand_made_case():
    ref = hand_made_reference()
    rng = np.random.default_rng(0)
    got = balanced_delta(
        ref.latent, ref.covariate, ref.perturbation == "control", ref.perturbation == "stim", rng
    )
    np.testing.assert_allclose(got, [0.5, 2.0], atol=1e-12)
    pooled = ref.latent[ref.perturbation == "stim"].mean(0) - ref.latent[
        ref.perturbation == "control"
    ].mean(0)
    assert not np.allclose(pooled, got)  # balancing matters here


def test_balanced_delta_is_unbiased_for_type_weighted_means():
    # Unequal type sizes and varying latents: resampling is random, but its expectation is
    # the equal-weight mean of the per-type means (computed here directly with numpy).
    gen = np.random.default_rng(1)
    sizes = {
        ("A", "c"): 5,
        ("A", "s"): 9,
        ("B", "c"): 30,
        ("B", "s"): 4,
        ("C", "c"): 12,
        ("C", "s"): 7,
    }
    latent, cov, cond = [], [], []
    for (t, c), n in sizes.items():
        latent.append(gen.normal(loc=len(latent), scale=1.0, size=(n, 3)))
        cov += [t] * n
        cond += [c] * n
    latent = np.vstack(latent)
    cov, cond = np.array(cov, dtype=object), np.array(cond)
    expected = np.mean(
        [latent[(cov == t) & (cond == "s")].mean(0) for t in "ABC"], axis=0
    ) - np.mean([latent[(cov == t) & (cond == "c")].mean(0) for t in "ABC"], axis=0)
    draws = np.array(
        [
            balanced_delta(latent, cov, cond == "c", cond == "s", np.random.default_rng(s))
            for s in range(400)
        ]
    )
    np.testing.assert_allclose(draws.mean(0), expected, atol=0.15)
    # and the same seed gives the same draw
    np.testing.assert_array_equal(
        balanced_delta(latent, cov, cond == "c", cond == "s", np.random.default_rng(5)),
        balanced_delta(latent, cov, cond == "c", cond == "s", np.random.default_rng(5)),
    )


def test_model_delta_uses_balanced_reference_and_restriction(fitted):
    model = copy.deepcopy(fitted[0])
    model.reference = hand_made_reference()
    model._shift_cache.clear()
    np.testing.assert_allclose(model.delta("stim"), [0.5, 2.0], atol=1e-12)
    np.testing.assert_allclose(model.delta("stim", cell_types=["B"]), [0.0, 4.0], atol=1e-12)
    np.testing.assert_allclose(model.delta("stim", cell_types=["A"]), [1.0, 0.0], atol=1e-12)
    model.params.restrict_arithmetic_to = ("B",)
    np.testing.assert_allclose(model.delta("stim"), [0.0, 4.0], atol=1e-12)
    with pytest.raises(ConfigError, match="not among the training cells"):
        model.delta("stim", cell_types=["Z"])


def test_delta_pool_paired_vs_all(fitted):
    """A held-out type H has controls only (6 cells at (100, 100)).

    ``paired`` (default) leaves H out of the control pool: (0.5, 2.0) as before. ``all``
    (original scGen) puts H's controls in the control pool but not in the stimulated one:
    balanced control mean = ((0,0) + (10,10) + (100,100)) / 3, stimulated mean =
    ((1,0) + (10,14)) / 2, so delta = (5.5, 7) - (36.67, 36.67).
    """
    model = copy.deepcopy(fitted[0])
    ref = hand_made_reference()
    model.reference = ReferenceLatents(
        latent=np.vstack([ref.latent, np.full((6, 2), 100.0, np.float32)]),
        covariate=np.concatenate([ref.covariate, np.array(["H"] * 6, dtype=object)]),
        perturbation=np.concatenate([ref.perturbation, np.array(["control"] * 6, dtype=object)]),
    )
    model._shift_cache.clear()
    assert model.params.delta_pool == "paired"
    np.testing.assert_allclose(model.delta("stim"), [0.5, 2.0], atol=1e-12)
    model.params.delta_pool = "all"
    # pools: 3 control types x 6 = 18 cells, 2 stimulated types x 6 = 12: the control pool
    # is subsampled to 12, so the exact value is random; its expectation is checked here
    draws = np.array([model.delta("stim", seed=s) for s in range(300)])
    np.testing.assert_allclose(draws.mean(0), [5.5 - 110 / 3, 7.0 - 110 / 3], atol=1.5)
    with pytest.raises(ConfigError, match="delta_pool"):
        ScGen(delta_pool="some")
    with pytest.raises(UnknownCategoryError, match="no training cells with perturbation 'P9'"):
        model.delta("P9")


def test_prediction_is_decoded_shifted_latent_mean(fitted):
    model, adata, split = fitted
    pred = model.predict_split(adata, split)
    controls = adata[pred.obs["control_obs_name"].to_numpy()]
    assert (controls.obs.condition == "control").all() and (controls.obs.cell_type == "C2").all()
    # independent recomputation with the network directly
    x = torch.from_numpy(controls.X.toarray())
    model.module.eval()
    with torch.no_grad():
        mu, _ = model.module.encode(x)
        delta = torch.from_numpy(model.delta("P0")).float()
        expected = model.module.decode(mu + delta).numpy()
    np.testing.assert_allclose(pred.X, expected, rtol=1e-5, atol=1e-5)
    # the delta comes from training cells only: the held-out type is absent among stimulated
    ref = model.reference
    assert "C2" not in set(ref.covariate[ref.perturbation == "P0"])
    assert "C2" in set(ref.covariate[ref.perturbation == "control"])


def test_same_seed_identical_predictions_and_rng_untouched(stim_data):
    split = celltype_split(stim_data, "C2")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    preds = []
    for seed in (7, 7, 8):
        model = ScGen(**SMALL).fit(stim_data, split, seed=seed, device="cpu", progress=False)
        preds.append(model.predict_split(stim_data, split).X)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is not changed
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])


def test_save_load_identity(fitted, tmp_path):
    model, adata, split = fitted
    before = model.predict_split(adata, split).X
    model.save(tmp_path / "m")
    loaded = PerturbationModel.load(tmp_path / "m", device="cpu")
    assert isinstance(loaded, ScGen)
    np.testing.assert_array_equal(loaded.predict_split(adata, split).X, before)
    np.testing.assert_array_equal(loaded.delta("P0"), model.delta("P0"))
    np.testing.assert_array_equal(loaded.latent(adata), model.latent(adata))


def test_a_batch_normalised_decoder_cannot_see_a_shift_shared_by_the_batch():
    """Why the decoder has no BatchNorm by default (docs/celltype_transfer.md, gene sets).

    In training mode BatchNorm subtracts the mini-batch mean, so with it the decoder maps a
    batch of latent codes and the same batch moved by one vector to the same output: the
    latent shift scGen transfers is invisible to the loss that trains the decoder. Without
    it (the default, ``use_batch_norm="encoder"``) the shift changes the output.
    """
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([2.0, -1.0, 0.5])
    outputs = {}
    for choice in ("both", "encoder"):
        torch.manual_seed(0)
        vae = ScGenVAE(5, n_hidden=8, n_latent=3, dropout=0.0, use_batch_norm=choice).train()
        with torch.no_grad():
            outputs[choice] = (vae.decode(z), vae.decode(z + shift))
    np.testing.assert_allclose(*outputs["both"], atol=1e-5)
    assert (outputs["encoder"][0] - outputs["encoder"][1]).abs().max() > 0.1
    # which halves carry BatchNorm, for every choice
    for choice, (in_encoder, in_decoder) in {
        "encoder": (True, False),
        "both": (True, True),
        "decoder": (False, True),
        "none": (False, False),
    }.items():
        vae = ScGenVAE(5, n_hidden=8, n_latent=3, use_batch_norm=choice)
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in vae.encoder) == in_encoder
        assert any(isinstance(m, torch.nn.BatchNorm1d) for m in vae.decoder) == in_decoder
    assert ScGen().params.use_batch_norm == "encoder"
    with pytest.raises(ConfigError, match="use_batch_norm"):
        ScGen(use_batch_norm="decoders")


def test_a_model_saved_before_use_batch_norm_existed_loads_as_it_was_trained(stim_data, tmp_path):
    split = celltype_split(stim_data, "C2")
    model = ScGen(**SMALL, use_batch_norm="both").fit(
        stim_data, split, seed=0, device="cpu", progress=False
    )
    model.save(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    del config["params"]["use_batch_norm"]  # what an earlier version wrote
    config_path.write_text(json.dumps(config))
    loaded = PerturbationModel.load(tmp_path / "m", device="cpu")
    assert loaded.params.use_batch_norm == "both"
    np.testing.assert_array_equal(
        loaded.predict_split(stim_data, split).X, model.predict_split(stim_data, split).X
    )


def test_custom_keys_and_unseen_covariates(stim_data):
    data = stim_data.copy()
    data.obs = data.obs.rename(columns={"condition": "treatment", "cell_type": "celltype"})
    data.obs["treatment"] = data.obs["treatment"].replace({"control": "ctrl", "P0": "IFN"})
    keys = PerturbationKeys(perturbation_key="treatment", control="ctrl", covariate_keys="celltype")
    split = celltype_split(data, "C1", keys=keys)
    model = create_model("scgen", keys=keys, **SMALL).fit(
        data, split, seed=0, device="cpu", progress=False
    )
    pred = model.predict_split(data, split)
    assert set(pred.obs["treatment"]) == {"IFN"} and set(pred.obs["celltype"]) == {"C1"}
    # cross-study use: controls of a cell type the model never saw are still shifted
    other = data[
        (data.obs.celltype == "C0").to_numpy() & (data.obs.treatment == "ctrl").to_numpy()
    ].copy()
    other.obs["celltype"] = "new_study_type"
    req = pd.DataFrame({"celltype": ["new_study_type"], "treatment": ["IFN"]})
    cf = build_counterfactuals(other, req, keys)
    out = model.predict(cf)
    assert out.n_obs == other.n_obs
    expected = model.decode(model.latent(other) + model.delta("IFN"))
    np.testing.assert_allclose(out.X, expected, rtol=1e-5, atol=1e-5)


def test_bad_parameters_and_requests(fitted):
    with pytest.raises(ConfigError, match="dropout"):
        ScGen(dropout=1.5)
    with pytest.raises(ConfigError, match="no hyperparameter"):
        ScGen(n_hiden=3)
    model, adata, _ = fitted
    req = pd.DataFrame({"cell_type": ["C2"], "condition": ["P7"]})
    cf = build_counterfactuals(adata, req, model.keys)
    with pytest.raises(UnknownCategoryError):
        model.predict(cf)
    with pytest.raises(ModelError, match="not trained"):
        ScGen().delta()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scgen", "scpram"])
def test_learns_the_response_of_held_out_monocytes_on_kang(kang_adata, name):
    """CD14+ monocytes have the strongest interferon response of the Kang subset: with their
    stimulated cells held out, both models must beat 'no change' on gene-mean R^2 and get
    the direction of the response (Pearson of deltas) clearly right."""
    from pertbench.data.splits import split_celltype

    split = split_celltype(kang_adata, heldout="CD14+Mono", seed=0).split
    # 15 epochs keep the test short; scGen reaches R^2 0.95 there (no change: 0.61)
    params = {"max_epochs": 15} if name == "scgen" else {}
    model = create_model(name, **params).fit(
        kang_adata, split, seed=0, device="cpu", progress=False
    )
    pred = model.predict_split(kang_adata, split).X.mean(0)
    obs = kang_adata.obs
    truth = kang_adata[(split == "test").to_numpy()].X.toarray().mean(0)
    ctrl = kang_adata[((obs.cell_type == "CD14+Mono") & (obs.condition == "control")).to_numpy()]
    ctrl_mean = ctrl.X.toarray().mean(0)

    def r2(p):
        return 1 - ((truth - p) ** 2).sum() / ((truth - truth.mean()) ** 2).sum()

    assert r2(pred) > r2(ctrl_mean) + 0.1
    assert np.corrcoef(pred - ctrl_mean, truth - ctrl_mean)[0, 1] > 0.6
