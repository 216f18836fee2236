"""The GEARS adapter: a clear error without the extra, data conversion, and (when the
extra is installed) a real train -> predict -> save/load round trip on synthetic GO files."""

from __future__ import annotations

import importlib.util
import pickle
import sys

import numpy as np
import pandas as pd
import pytest

from pertbench.data import PerturbationKeys, make_split
from pertbench.errors import ConfigError, MissingDependencyError, ModelError
from pertbench.models import create_model
from pertbench.models.base import PerturbationModel
from pertbench.models.gears import GO_FILES, check_go_dir, gears_condition, to_gears_adata

HAS_GEARS = (
    importlib.util.find_spec("gears") is not None
    and importlib.util.find_spec("torch_geometric") is not None
)


def test_missing_extra_is_a_clear_error(monkeypatch, make_toy):
    # Simulate an installation without the extra, whether or not it is installed here.
    monkeypatch.setitem(sys.modules, "gears", None)
    adata = make_toy(n_covariates=1)
    model = create_model("gears", go_dir="unused")
    with pytest.raises(MissingDependencyError, match=r"pip install 'pertbench\[gears\]'"):
        model.fit(adata, None, progress=False)


def test_condition_names_and_conversion(make_toy):
    keys = PerturbationKeys()
    assert gears_condition("control", keys) == "ctrl"
    assert gears_condition("KLF1", keys) == "KLF1+ctrl"
    assert gears_condition("KLF1+MAP2K6", keys) == "KLF1+MAP2K6"
    with pytest.raises(ModelError, match="single and double"):
        gears_condition("A+B+C", keys)
    adata = make_toy(n_covariates=1, combos=((0, 1),))
    genes = pd.Index(adata.var_names[::-1])
    out = to_gears_adata(adata, keys, genes)
    assert list(out.var["gene_name"]) == list(genes)
    assert set(out.obs["condition"]) == {"ctrl", "P0+P1"} | {f"P{i}+ctrl" for i in range(6)}
    np.testing.assert_array_equal(out.X.toarray(), adata[:, genes].X.toarray())


def test_go_files_must_be_supplied(tmp_path):
    with pytest.raises(ConfigError, match="go_dir"):
        check_go_dir("")
    with pytest.raises(ConfigError, match=r"lacks gene2go_all\.pkl"):
        check_go_dir(str(tmp_path))


def write_synthetic_go(folder, perturbations, seed=0):
    """GEARS' three GO files for a made-up ontology over ``perturbations``."""
    rng = np.random.default_rng(seed)
    terms = {p: {f"GO:{t}" for t in rng.choice(12, size=4, replace=False)} for p in perturbations}
    (folder / "go_essential_all").mkdir(parents=True)
    with open(folder / GO_FILES[0], "wb") as handle:
        pickle.dump(terms, handle)
    with open(folder / GO_FILES[1], "wb") as handle:
        pickle.dump(list(perturbations), handle)
    rows = [
        {
            "source": a,
            "target": b,
            "importance": len(terms[a] & terms[b]) / len(terms[a] | terms[b]),
        }
        for a in perturbations
        for b in perturbations
    ]
    pd.DataFrame(rows).to_csv(folder / GO_FILES[2], index=False)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEARS, reason="optional extra pertbench[gears] not installed")
def test_gears_trains_predicts_and_round_trips(tmp_path, make_toy):
    adata = make_toy(
        n_covariates=1,
        n_perturbations=6,
        n_cells=20,
        n_controls=40,
        n_genes=30,
        combos=((0, 1), (2, 3)),
    )
    write_synthetic_go(tmp_path / "go", [f"P{i}" for i in range(6)])
    split = make_split(adata.obs_names, "train")
    obs = adata.obs
    split[(obs.condition == "P2+P3").to_numpy()] = "test"
    split[(obs.condition == "P0+P1").to_numpy()] = "val"
    model = create_model(
        "gears",
        go_dir=str(tmp_path / "go"),
        hidden_size=16,
        batch_size=16,
        num_similar_genes_go_graph=3,
        num_similar_genes_co_express_graph=3,
    )
    model.fit(adata, split, seed=0, max_epochs=1, progress=False)
    pred = model.predict_split(adata, split, on="test")
    assert pred.n_obs == int((obs.condition == "control").sum())
    assert np.isfinite(pred.X).all() and pred.n_vars == adata.n_vars
    assert (pred.obs.condition == "P2+P3").all()
    model.save(tmp_path / "m")
    loaded = PerturbationModel.load(tmp_path / "m", device="cpu")
    np.testing.assert_array_equal(loaded.predict_split(adata, split, on="test").X, pred.X)
    # one network, one covariate state: GEARS has no covariate input
    two = make_toy(n_covariates=2, n_perturbations=6, n_cells=10, n_genes=30)
    with pytest.raises(ModelError, match="no covariate input"):
        create_model("gears", go_dir=str(tmp_path / "go")).fit(two, None, progress=False)
