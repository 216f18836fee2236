"""Analytic baselines fitted from a file on disk, read by rows, equal fit() in memory."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.data import make_split
from pertbench.data.keys import PerturbationKeys
from pertbench.data.ondisk import RowReader, open_h5ad
from pertbench.errors import ModelError
from pertbench.models import create_model
from pertbench.models.base import build_counterfactuals


def test_baselines_fitted_from_a_backed_file_predict_like_fit(make_toy, tmp_path):
    truth = make_toy(n_covariates=3, n_perturbations=4, n_genes=20)
    obs = truth.obs
    split = make_split(truth.obs_names, "train")
    held = (obs["cell_type"] == "C2").to_numpy() & obs["condition"].isin(["P0", "P1"]).to_numpy()
    split[held] = "test"
    truth.write_h5ad(tmp_path / "truth.h5ad")
    backed = open_h5ad(tmp_path / "truth.h5ad", validate=False)
    requests = obs.loc[held, ["cell_type", "condition"]].drop_duplicates().reset_index(drop=True)
    cf = build_counterfactuals(truth, requests, PerturbationKeys())
    for name in ("no_change", "perturbation_mean", "covariate_mean"):
        in_memory = create_model(name).fit(truth, split, progress=False)
        # a small read window: the training cells come in many pieces
        streamed = create_model(name).fit_from_reader(
            backed, split, RowReader(backed.X, window_rows=7)
        )
        np.testing.assert_array_equal(
            streamed.predict(cf, seed=0).X, in_memory.predict(cf, seed=0).X, err_msg=name
        )
    with pytest.raises(ModelError, match="cannot be trained from rows"):
        create_model("linear").fit_from_reader(backed, split, RowReader(backed.X))
