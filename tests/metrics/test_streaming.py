"""Files streamed block by block give exactly the numbers of AnnData objects in memory,
whatever the chunking, and so does the Ray per-covariate evaluation."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertbench.data import make_task_split, write_split
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError
from pertbench.metrics import Evaluator


def assert_same_result(a, b) -> None:
    """Exact equality of every table and note of two evaluation results."""
    for name in ("summary", "per_group", "per_covariate", "skipped"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    if a.calibration is None:
        assert b.calibration is None
    else:
        pd.testing.assert_frame_equal(a.calibration, b.calibration, check_exact=True)
    assert a.notes == b.notes and a.settings == b.settings
    assert set(a.aggregates) == set(b.aggregates)
    for key, frame in a.aggregates.items():
        pd.testing.assert_frame_equal(frame, b.aggregates[key], check_exact=True)


def _noisy(adata: ad.AnnData, seed: int, *, sparse: bool = False) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    if sparse:  # keeps the zeros, scales the rest
        X = sp.csr_matrix(X * rng.uniform(0.6, 1.4, size=X.shape)).astype(np.float32)
    else:
        X = np.maximum(X + rng.normal(0.0, 0.3, size=X.shape), 0.0).astype(np.float32)
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.var[[]].copy())
    out.obs_names = [f"pred{i}" for i in range(out.n_obs)]
    return out


def test_streamed_kang_equals_in_memory(kang_path, kang_adata, tmp_path):
    """Shared Kang data: default metrics, the three baselines and the ceiling."""
    obs = kang_adata.obs
    test = (obs["condition"] == "stimulated").to_numpy() & obs["cell_type"].isin(
        ["CD4T", "B", "NK"]
    ).to_numpy()
    split = pd.Series(np.where(test, "test", "train"), index=obs.index.astype(str))
    write_split(split, tmp_path / "split.csv")
    pred = _noisy(kang_adata[test], 0)
    pred.write_h5ad(tmp_path / "pred.h5ad")
    options = {
        "baselines": True,
        "ceiling": True,
        "top_k": 50,
        "n_bootstrap": 50,
        "genes": list(kang_adata.var_names[:1500]),
    }
    memory = Evaluator(kang_adata, pred, split=split, **options).run()
    ev = Evaluator(kang_path, tmp_path / "pred.h5ad", split=tmp_path / "split.csv", **options)
    assert not ev.truth.X.in_memory and not ev.pred.X.in_memory  # read by rows from disk
    streamed = ev.run()
    memory.settings["split"] = streamed.settings["split"]  # a Series vs the CSV path
    assert_same_result(memory, streamed)
    assert set(streamed.per_group["model"]) == {
        "model",
        "no_change",
        "perturbation_mean",
        "covariate_mean",
        "ceiling",
    }


def test_streamed_norman_equals_in_memory(norman_path, norman_adata, tmp_path):
    """Shared Norman data, two covariate keys, sparse predictions of a transfer split."""
    keys = PerturbationKeys(covariate_keys=("cell_type", "treatment"))
    split = make_task_split(norman_adata, "transfer", keys=keys, seed=0).split
    test = (split == "test").to_numpy() & (norman_adata.obs["condition"] != "control").to_numpy()
    pred = _noisy(norman_adata[test], 1, sparse=True)
    pred.write_h5ad(tmp_path / "pred.h5ad")
    options = {"keys": keys, "split": split, "baselines": True, "ceiling": True}
    options["n_bootstrap"] = 50
    memory = Evaluator(norman_adata, pred, **options).run()
    streamed = Evaluator(norman_path, tmp_path / "pred.h5ad", **options).run()
    assert_same_result(memory, streamed)
    assert streamed.calibration is not None and len(streamed.per_covariate) > 1


@pytest.fixture(scope="module")
def simulated_files(tmp_path_factory):
    """A simulated screen with combinations, two covariate keys (six blocks), a combo split
    and a dense prediction, in memory and on disk."""
    from pertbench.data.simulate import simulate

    folder = tmp_path_factory.mktemp("simulated")
    truth = simulate(
        n_covariates=3,
        n_perturbations=8,
        n_combinations=4,
        n_genes=60,
        n_cells_per_group=10,
        n_control_cells=40,
        seed=3,
    )
    truth.obs["batch"] = np.where(np.arange(truth.n_obs) % 3 == 0, "b0", "b1")
    keys = PerturbationKeys(covariate_keys=("cell_type", "batch"))
    split = make_task_split(truth, "combo", keys=keys, seed=0).split
    test = (split == "test").to_numpy() & (truth.obs["condition"] != "control").to_numpy()
    pred = _noisy(truth[test], 2)
    paths = {"truth": folder / "truth.h5ad", "pred": folder / "pred.h5ad"}
    truth.write_h5ad(paths["truth"])
    pred.write_h5ad(paths["pred"])
    return truth, pred, split, keys, paths


def test_streamed_chunked_blocks_equal_in_memory_with_every_family(simulated_files):
    """All metric families (distribution included, with subsampling), baselines, the
    bootstrap ceiling and replicate agreement; the streamed run cuts every block into
    chunks of a few groups (so the ceiling's replicates are drawn chunk by chunk)."""
    truth, pred, split, keys, paths = simulated_files
    options = {
        "keys": keys,
        "split": split,
        "metrics": "all",
        "baselines": True,
        "ceiling": True,
        "ceiling_replicates": 4,
        "replicate_agreement": True,
        "n_bootstrap": 30,
        "top_k": 10,
        "n_pcs": 5,
        "max_cells": 6,
    }
    memory = Evaluator(truth, pred, **options).run()
    chunked = Evaluator(
        paths["truth"], paths["pred"], chunk_elements=30 * truth.n_vars, **options
    ).run()
    assert_same_result(memory, chunked)
    blocks = memory.per_covariate.groupby("model").size()
    # model, 4 baselines (combinations: additive_within too), ceiling, replicate
    # agreement x 6 blocks
    assert len(blocks) == 7 and (blocks == 6).all()
    table = memory.per_group[memory.per_group["model"] == "model"]
    assert np.isfinite(table[["edistance", "mmd", "mean_var_kde"]].to_numpy()).all()
    ceiling = memory.per_group[memory.per_group["model"] == "ceiling"]
    assert np.isfinite(ceiling[["rmse_logfc", "cosine_rank_logfc", "mean_var_kde"]]).all().all()


def test_ceiling_draws_do_not_depend_on_the_order_of_blocks(simulated_files, monkeypatch):
    """The ceiling's replicates are read at each group's place in one seeded stream: the
    blocks processed last-first, each cut into chunks, give the same tables."""
    import pertbench.metrics.evaluator as evaluator_module

    truth, pred, split, keys, paths = simulated_files
    options = {"keys": keys, "split": split, "ceiling": True, "ceiling_replicates": 3}
    options.update(
        metrics="rmse_logfc,pearson_rank_delta,jaccard_top10,spearman_logp",
        n_bootstrap=0,
        top_k=10,
    )
    forward = Evaluator(truth, pred, **options).run()
    build = evaluator_module.build_plan

    def reversed_plan(*args, **kwargs):
        plan = build(*args, **kwargs)
        plan.blocks = plan.blocks[::-1]
        return plan

    monkeypatch.setattr(evaluator_module, "build_plan", reversed_plan)
    # last block first, read from the files in chunks of one or two groups
    chunks = 30 * truth.n_vars
    backward = Evaluator(paths["truth"], paths["pred"], chunk_elements=chunks, **options).run()
    assert_same_result(forward, backward)
    ceiling = forward.per_group[forward.per_group["model"] == "ceiling"]
    drawn = ["rmse_logfc", "pearson_rank_delta", "jaccard_top10", "spearman_logp"]
    assert ceiling[drawn].notna().all().all()  # bootstrap, DE and split-half draws


@pytest.mark.ray
def test_ray_per_covariate_evaluation_merges_to_the_local_tables(simulated_files):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    truth, pred, split, keys, paths = simulated_files
    options = {"keys": keys, "split": split, "baselines": True, "ceiling": True}
    options.update(n_bootstrap=30, top_k=10, replicate_agreement=True)
    local = Evaluator(paths["truth"], paths["pred"], **options).run()
    try:
        on_ray = Evaluator(paths["truth"], paths["pred"], backend="ray", workers=2, **options).run()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert_same_result(local, on_ray)
    with pytest.raises(ConfigError, match=r"give truth as an \.h5ad path"):
        Evaluator(truth, pred, backend="ray", keys=keys).run()
