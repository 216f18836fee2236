"""The analytic baselines as models: semantics by hand, persistence and registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from delta_helpers import training_delta
from pertbench.data import PerturbationKeys, make_split
from pertbench.errors import ModelError
from pertbench.models import PerturbationModel, build_counterfactuals, create_model
from pertbench.models.baselines import CovariateMean, NoChange, PerturbationMean

KEYS = PerturbationKeys()


@pytest.fixture
def data(make_toy):
    adata = make_toy(n_covariates=3, n_perturbations=4, n_genes=30, combos=((0, 1), (1, 2)))
    obs = adata.obs
    split = make_split(adata.obs_names, "train")
    held = (obs["cell_type"] == "C2") & obs["condition"].isin(["P0", "P0+P1"])
    split[held.to_numpy()] = "test"
    return adata, split


def _mean(adata, mask) -> np.ndarray:
    return np.asarray(adata.X[np.asarray(mask)].mean(axis=0)).ravel()


def _requests(rows):
    return pd.DataFrame(rows, columns=["cell_type", "condition"])


def test_no_change_returns_the_control_cells(data):
    adata, split = data
    model = NoChange().fit(adata, split, progress=False)
    cf = build_counterfactuals(adata, _requests([("C2", "P0")]), KEYS)
    pred = model.predict(cf)
    np.testing.assert_allclose(pred.X, cf.X.toarray(), rtol=1e-6)


def test_perturbation_mean_by_hand(data):
    adata, split = data
    model = PerturbationMean().fit(adata, split, progress=False)

    def delta(label, cov):
        return training_delta(adata, split, label, cov)

    # P0 is held out in C2: its delta is the mean over C0 and C1 (equal weights)
    expected_p0 = (delta("P0", "C0") + delta("P0", "C1")) / 2
    expected_p1 = (delta("P1", "C0") + delta("P1", "C1") + delta("P1", "C2")) / 3
    cf = build_counterfactuals(adata, _requests([("C2", "P0"), ("C2", "P0+P1")]), KEYS)
    pred = model.predict(cf)
    ctrl_x = cf.X.toarray()
    single = cf.obs["condition"].to_numpy() == "P0"
    np.testing.assert_allclose(pred.X[single], ctrl_x[single] + expected_p0, rtol=1e-5, atol=1e-5)
    # a combination is additive: the sum of its singles' deltas
    np.testing.assert_allclose(
        pred.X[~single], ctrl_x[~single] + expected_p0 + expected_p1, rtol=1e-5, atol=1e-5
    )
    # with additive_combinations=False an observed combination uses its own delta
    own = PerturbationMean(additive_combinations=False).fit(adata, split, progress=False)
    cf12 = build_counterfactuals(adata, _requests([("C2", "P1+P2")]), KEYS)
    expected_12 = (delta("P1+P2", "C0") + delta("P1+P2", "C1") + delta("P1+P2", "C2")) / 3
    np.testing.assert_allclose(
        own.predict(cf12).X, cf12.X.toarray() + expected_12, rtol=1e-5, atol=1e-5
    )


def test_perturbation_mean_refuses_perturbations_without_delta(make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=3, n_genes=10)
    split = make_split(adata.obs_names, "train")
    split[(adata.obs["condition"] == "P2").to_numpy()] = "val"  # seen, but not in train
    model = PerturbationMean().fit(adata, split, progress=False)
    assert model.can_predict(["P0", "P2", "P0+P2", "control"]).tolist() == [
        True,
        False,
        False,
        True,
    ]
    cf = build_counterfactuals(adata, _requests([("C0", "P2")]), KEYS)
    with pytest.raises(ModelError, match="no training delta for P2"):
        model.predict(cf)


def test_covariate_mean_by_hand(data):
    adata, split = data
    obs = adata.obs
    train = (split == "train").to_numpy()
    model = CovariateMean().fit(adata, split, progress=False)
    cf = build_counterfactuals(adata, _requests([("C2", "P0"), ("C0", "P3")]), KEYS)
    pred = model.predict(cf)
    for cov in ("C2", "C0"):
        cells = (
            train
            & (obs["condition"] != "control").to_numpy()
            & (obs["cell_type"] == cov).to_numpy()
        )
        rows = (cf.obs["cell_type"] == cov).to_numpy()
        np.testing.assert_allclose(
            pred.X[rows], np.tile(_mean(adata, cells), (rows.sum(), 1)), rtol=1e-5
        )
    assert model.input_kind == "none"


def test_covariate_without_training_perturbed_cells_uses_pooled_mean(make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=2, n_genes=10)
    split = make_split(adata.obs_names, "train")
    split[((adata.obs["cell_type"] == "C1") & (adata.obs["condition"] != "control")).to_numpy()] = (
        "test"
    )
    model = CovariateMean().fit(adata, split, progress=False)
    cf = build_counterfactuals(adata, _requests([("C1", "P0")]), KEYS)
    perturbed = (split == "train").to_numpy() & (adata.obs["condition"] != "control").to_numpy()
    np.testing.assert_allclose(model.predict(cf).X[0], _mean(adata, perturbed), rtol=1e-5)


@pytest.mark.parametrize(
    "name", ["no_change", "perturbation_mean", "covariate_mean", "additive_within"]
)
def test_save_load_roundtrip_and_registry(data, tmp_path, name):
    adata, split = data
    model = create_model(name)
    assert isinstance(model, PerturbationModel)
    model.fit(adata, split, progress=False)
    pred = model.predict_split(adata, split, on="test")
    model.save(tmp_path / name)
    loaded = PerturbationModel.load(tmp_path / name, device="cpu")
    assert type(loaded) is type(model)
    again = loaded.predict_split(adata, split, on="test")
    np.testing.assert_array_equal(pred.X, again.X)
    assert pred.n_obs == again.n_obs > 0


def test_additive_within_uses_the_covariates_own_singles_and_notes_fallbacks(make_toy):
    adata = make_toy(n_covariates=3, n_perturbations=3, n_genes=20, combos=((0, 1),))
    obs = adata.obs
    split = make_split(adata.obs_names, "train")
    in_c2 = (obs["cell_type"] == "C2").to_numpy()
    split[in_c2 & obs["condition"].isin(["P0+P1"]).to_numpy()] = "test"
    split[in_c2 & (obs["condition"] == "P1").to_numpy()] = ""  # P1 not measured in C2

    def delta(label, cov):
        return training_delta(adata, split, label, cov)

    model = create_model("additive_within").fit(adata, split, progress=False)
    cf = build_counterfactuals(adata, _requests([("C2", "P0+P1"), ("C0", "P0+P1")]), KEYS)
    pred = model.predict(cf)
    ctrl_x = cf.obs["cell_type"].to_numpy()
    x = cf.X.toarray()
    in_two = ctrl_x == "C2"
    # C2: P0 measured there; P1 falls back to its mean over C0 and C1
    fallback_p1 = (delta("P1", "C0") + delta("P1", "C1")) / 2
    np.testing.assert_allclose(
        pred.X[in_two], x[in_two] + delta("P0", "C2") + fallback_p1, rtol=1e-5, atol=1e-5
    )
    # C0: both singles measured in C0 (not their cross-covariate means)
    np.testing.assert_allclose(
        pred.X[~in_two], x[~in_two] + delta("P0", "C0") + delta("P1", "C0"), rtol=1e-5, atol=1e-5
    )
    assert model.fallbacks[["cell_type", "condition", "single"]].values.tolist() == [
        ["C2", "P0+P1", "P1"]
    ]
    assert "P1 in C2" in pred.uns["pertbench"]["notes"][0]
    # the cross-covariate perturbation_mean differs from it in C0
    cross = PerturbationMean().fit(adata, split, progress=False).predict(cf)
    assert np.abs(cross.X[~in_two] - pred.X[~in_two]).max() > 1e-3


def test_additive_within_without_training_deltas_predicts_nothing(make_toy):
    """No perturbed training cell at all: the fit succeeds and nothing can be predicted
    (the evaluator then leaves the baseline out with a note instead of crashing)."""
    from pertbench.data import make_split
    from pertbench.metrics import Evaluator

    adata = make_toy(n_covariates=2, n_perturbations=3, n_genes=20, combos=((0, 1),))
    split = make_split(adata.obs_names, "train")
    split[(adata.obs["condition"] != "control").to_numpy()] = "test"
    model = create_model("additive_within").fit(adata, split, seed=0)
    assert model.within_pairs == [] and not any(model.can_predict(["P0+P1", "P0"]))
    pred = adata[(split == "test").to_numpy()].copy()
    res = Evaluator(
        adata, pred, split=split, baselines=["additive_within"], metrics="fit", n_bootstrap=0
    ).run()
    assert any("additive_within" in note and "cannot predict" in note for note in res.notes)
