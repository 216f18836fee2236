"""The disentanglement probe: its classifier against known truth, the targets and strata, and
CPA's adversary measured with it (closer to chance than without the adversary)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from model_helpers import LATENT_VAE_SMALL, SMALL, transfer_split

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError
from pertbench.models import create_model
from pertbench.models.base import PerturbationModel
from pertbench.models.probe import (
    PROBE_COLUMNS,
    disentanglement_probe,
    probe_accuracy,
    probe_cells,
    probe_targets,
)


def _labels(n_per_class: int, classes: int) -> np.ndarray:
    return np.repeat([f"L{k}" for k in range(classes)], n_per_class)


def test_separable_features_are_read_perfectly_and_chance_is_the_majority_rate():
    labels = np.concatenate([_labels(30, 3), ["L0"] * 30])  # L0: 60 of 120 cells
    rng = np.random.default_rng(0)
    codes = pd.factorize(labels, sort=True)[0]
    features = np.eye(3)[codes] * 5 + 0.1 * rng.normal(size=(labels.size, 3))
    accuracy, info = probe_accuracy(features, labels, seed=0)
    assert accuracy == 1.0
    assert info == {"chance": 0.5, "n_cells": 120, "n_classes": 3, "n_strata": 1, "folds": 5}


def test_uninformative_features_score_near_chance():
    labels = _labels(100, 3)
    features = np.random.default_rng(1).normal(size=(labels.size, 8))
    accuracy, info = probe_accuracy(features, labels, seed=0)
    assert info["chance"] == pytest.approx(1 / 3)
    assert abs(accuracy - 1 / 3) < 0.1


def test_strata_remove_what_the_stratum_explains():
    # The label is the stratum's own label for 80% of the cells; the features know only the
    # stratum. Unstratified, the probe reads the label through the stratum; within strata
    # the features tell nothing, so the probe is at the (within-stratum) chance.
    rng = np.random.default_rng(2)
    strata = np.repeat(["S0", "S1", "S2"], 100)
    labels = np.where(rng.random(300) < 0.8, np.char.replace(strata, "S", "L"), "other")
    features = np.eye(3)[pd.factorize(strata, sort=True)[0]] + 0.01 * rng.normal(size=(300, 3))
    plain, _ = probe_accuracy(features, labels, seed=0)
    within, info = probe_accuracy(features, labels, strata=strata, seed=0)
    majority = sum(pd.Series(labels[strata == s]).value_counts().max() for s in ("S0", "S1", "S2"))
    assert info["chance"] == pytest.approx(majority / 300)
    assert info["n_strata"] == 3
    assert plain > 0.75
    assert within <= info["chance"] + 1e-9  # cannot beat the majority with no information


def test_labels_too_rare_for_the_folds_are_left_out():
    labels = np.concatenate([_labels(20, 2), ["rare"] * 3])
    features = np.random.default_rng(3).normal(size=(labels.size, 4))
    _, info = probe_accuracy(features, labels, folds=5, seed=0)
    assert info["n_cells"] == 40 and info["n_classes"] == 2
    accuracy, info = probe_accuracy(features[:11], np.array(["a"] * 10 + ["b"]), seed=0)
    assert np.isnan(accuracy) and info["n_cells"] == 0
    with pytest.raises(ConfigError, match="at least 2 folds"):
        probe_accuracy(features, labels, folds=1)


def test_targets_are_probed_within_the_other_targets():
    obs = pd.DataFrame(
        {"condition": ["control", "A", "A", "B"], "cell_type": ["T1", "T1", "T2", "T2"]}
    )
    targets = probe_targets(obs, PerturbationKeys())
    assert list(targets) == ["perturbation", "cell_type"]
    column, labels, strata = targets["perturbation"]
    assert column == "condition" and list(labels) == ["control", "A", "A", "B"]
    assert strata[0] == strata[1] != strata[2] == strata[3]  # within cell type
    _, _, strata = targets["cell_type"]
    assert strata[1] == strata[2] != strata[0] and strata[3] not in (strata[0], strata[1])


def test_probe_cells_are_the_held_out_parts_subsampled_reproducibly(make_toy):
    adata = make_toy(n_perturbations=4, n_cells=20, n_controls=20, n_genes=20)
    split = transfer_split(adata, heldout_per_covariate=1, val_fraction=0.2)
    held = np.flatnonzero(split.isin(["val", "test"]).to_numpy())
    np.testing.assert_array_equal(probe_cells(adata, split), held)
    few = probe_cells(adata, split, max_cells=25, seed=4)
    assert few.size == 25 and set(few) <= set(held)
    np.testing.assert_array_equal(few, probe_cells(adata, split, max_cells=25, seed=4))


LATENT_MODELS = {
    "cpa": ("n_latent", SMALL["cpa"]),
    "cpa_noadv": ("n_latent", SMALL["cpa_noadv"]),
    "biolord": ("latent_dim", SMALL["biolord"]),
    "sams_vae": ("latent_dim", SMALL["sams_vae"]),
    "latent_additive": ("latent_dim", SMALL["latent_additive"]),
    "scgen": ("n_latent", LATENT_VAE_SMALL),
    "scpram": ("n_latent", LATENT_VAE_SMALL),
}


@pytest.mark.parametrize("name", sorted(LATENT_MODELS))
def test_every_latent_model_exposes_a_deterministic_basal_latent(name, make_toy, tmp_path):
    adata = make_toy(n_perturbations=4, n_cells=20, n_controls=20, n_genes=20)
    split = transfer_split(adata, heldout_per_covariate=1, val_fraction=0.2)
    size_key, params = LATENT_MODELS[name]
    model = create_model(name, **params).fit(adata, split, max_epochs=1, progress=False)
    cells = adata[(split == "test").to_numpy()]
    latent = model.basal_latent(cells)
    assert latent.shape == (cells.n_obs, params[size_key]) and np.isfinite(latent).all()
    np.testing.assert_array_equal(latent, model.basal_latent(cells))  # no sampling
    model.save(tmp_path / name)
    loaded = PerturbationModel.load(tmp_path / name, device="cpu")
    np.testing.assert_array_equal(latent, loaded.basal_latent(cells))
    table = disentanglement_probe(model, adata, split, folds=2)
    assert set(table["target"]) == {"perturbation", "cell_type"}


def test_models_without_a_latent_have_no_probe(make_toy):
    adata = make_toy(n_perturbations=4, n_cells=20, n_controls=20, n_genes=20)
    split = transfer_split(adata, heldout_per_covariate=1)
    model = create_model("linear").fit(adata, split, max_epochs=1, progress=False)
    assert model.basal_latent(adata) is None
    assert disentanglement_probe(model, adata, split) is None


def test_cpa_adversary_moves_the_basal_latent_towards_chance(make_toy):
    """Both targets: the basal latent of held-out cells tells less with the adversary."""
    adata = make_toy(n_covariates=3, n_perturbations=6, n_cells=30, n_controls=60, n_genes=40)
    split = transfer_split(adata, heldout_per_covariate=2, val_fraction=0.3)
    accuracy: dict[str, list[pd.Series]] = {}
    for name in ("cpa", "cpa_noadv"):
        for seed in (0, 1):
            model = create_model(name, **SMALL[name])
            model.fit(adata, split, seed=seed, max_epochs=60, progress=False)
            table = disentanglement_probe(model, adata, split, seed=seed)
            assert list(table.columns) == PROBE_COLUMNS
            accuracy.setdefault(name, []).append(table.set_index("target")["accuracy"])
            chance = table.set_index("target")["chance"]
    adv, noadv = (pd.concat(accuracy[n], axis=1) for n in ("cpa", "cpa_noadv"))
    assert (adv < noadv).all(axis=None), (adv, noadv)  # every target, every seed
    margin = noadv.mean(axis=1) - adv.mean(axis=1)
    assert (margin > 0.03).all(), margin
    assert (adv.mean(axis=1) > chance - 0.05).all()  # a probe cannot do much worse than chance


def test_the_expression_reference_is_reused_only_for_the_same_cells(make_toy):
    from pertbench.models import probe

    adata = make_toy(n_perturbations=4, n_cells=20, n_controls=20, n_genes=20)
    split = transfer_split(adata, heldout_per_covariate=1, val_fraction=0.2)
    model = create_model("latent_additive", latent_dim=4).fit(
        adata, split, max_epochs=1, progress=False
    )
    probe._REFERENCE_CACHE.clear()
    first = disentanglement_probe(model, adata, split, folds=2)
    assert len(probe._REFERENCE_CACHE) == 1
    again = disentanglement_probe(model, adata, split, folds=2)
    pd.testing.assert_frame_equal(first, again)  # computed once, same numbers
    assert len(probe._REFERENCE_CACHE) == 1
    changed = adata.copy()
    changed.X = changed.X * 2.0  # other expression, same cells: a new reference
    disentanglement_probe(model, changed, split, folds=2)
    assert len(probe._REFERENCE_CACHE) == 2
    probe._REFERENCE_CACHE.clear()
    fresh = disentanglement_probe(model, adata, split, folds=2)
    pd.testing.assert_frame_equal(first, fresh)
