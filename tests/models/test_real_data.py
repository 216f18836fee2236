"""Models on the shared Norman19 + McFaline23 subset (skipped when the shared data are absent)."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.data import PerturbationKeys
from pertbench.data.splits import make_task_split
from pertbench.models import create_model
from pertbench.models.base import PerturbationModel


@pytest.fixture(scope="module")
def norman_transfer(norman_adata):
    keys = PerturbationKeys()
    result = make_task_split(
        norman_adata,
        "transfer",
        keys=keys,
        heldout_covariates=["A172", "T98G", "U87MG"],
        fraction=0.6,
        max_heldout_covariates=2,
        val_fraction=0.34,
        seed=0,
    )
    assert not len(result.leakage())
    return norman_adata, result.split


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        pytest.param("latent_additive", marks=pytest.mark.slow),
        pytest.param("cpa", marks=pytest.mark.slow),
    ],
)
def test_transfer_task_on_real_data(name, norman_transfer, tmp_path):
    adata, split = norman_transfer
    small = {
        "latent_additive": {"encoder_width": 64, "latent_dim": 16},
        "cpa": {"hidden_dim": 64, "n_latent": 16},
    }.get(name, {})
    model = create_model(name, **small).fit(adata, split, seed=0, max_epochs=2, progress=False)
    pred = model.predict_split(adata, split, on="test")
    obs = adata.obs
    test = (split == "test").to_numpy() & (obs.condition != "control").to_numpy()
    groups = obs.loc[test, ["cell_type", "condition"]].drop_duplicates()
    assert set(groups.cell_type) <= {"A172", "T98G", "U87MG"}
    # one predicted cell per test control of the cell line, for every held-out group
    test_controls = obs.loc[(split == "test").to_numpy() & (obs.condition == "control").to_numpy()]
    expected = sum((test_controls.cell_type == c).sum() for c in groups.cell_type)
    assert pred.n_obs == expected and pred.n_vars == adata.n_vars
    assert np.isfinite(pred.X).all()
    # every held-out perturbation was seen in training in another line (K562 at least)
    train = obs.loc[(split == "train").to_numpy()]
    assert set(groups.condition) <= set(train.loc[train.cell_type == "k562", "condition"])
    model.save(tmp_path / name)
    again = PerturbationModel.load(tmp_path / name, device="cpu").predict_split(adata, split)
    np.testing.assert_array_equal(again.X, pred.X)
