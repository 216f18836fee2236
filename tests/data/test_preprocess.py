"""Preprocessing against scanpy run by hand, and the log-only path of the shared files."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from pertbench.data.keys import PerturbationKeys
from pertbench.data.preprocess import PREPROCESS_KEY, preprocess
from pertbench.data.simulate import simulate
from pertbench.errors import DataValidationError

KEYS = PerturbationKeys()


@pytest.fixture(scope="module")
def raw():
    sim = simulate(
        n_covariates=2,
        n_perturbations=8,
        n_combinations=2,
        n_cells_per_group=30,
        n_genes=300,
        seed=4,
    )
    return ad.AnnData(X=sim.layers["counts"].copy(), obs=sim.obs.copy(), var=sim.var[[]].copy())


def _scanpy_by_hand(raw, n_top, n_de, mode):
    """The PerturBench recipe written directly with scanpy."""
    a = raw.copy()
    a.layers["counts"] = a.X.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "batch":
            hv = sc.pp.highly_variable_genes(
                a,
                flavor="seurat_v3",
                layer="counts",
                n_top_genes=n_top,
                batch_key="cell_type",
                inplace=False,
            )["highly_variable"]
            hvg = set(a.var_names[hv.to_numpy()])
        else:
            hvg = set()
            for ct in a.obs.cell_type.unique():
                sub = a[a.obs.cell_type == ct]
                hv = sc.pp.highly_variable_genes(
                    sub, flavor="seurat_v3", layer="counts", n_top_genes=n_top, inplace=False
                )["highly_variable"]
                hvg |= set(sub.var_names[hv.to_numpy()])
        de = set()
        for ct in a.obs.cell_type.unique():
            sub = a[a.obs.cell_type == ct].copy()
            sc.tl.rank_genes_groups(
                sub, groupby="condition", reference="control", n_genes=n_de, rankby_abs=True
            )
            names = pd.DataFrame(sub.uns["rank_genes_groups"]["names"])
            de |= set(names.to_numpy().ravel())
    perturbed = {p for c in a.obs.condition.unique() for p in c.split("+")} & set(a.var_names)
    return a, hvg, de, perturbed


@pytest.mark.parametrize("mode", ["batch", "union"])
def test_matches_scanpy_recipe(raw, mode):
    out = preprocess(raw, keys=KEYS, n_top_genes=60, n_de_genes=5, hvg_mode=mode)
    ref, hvg, de, perturbed = _scanpy_by_hand(raw, 60, 5, mode)
    assert set(out.var_names[out.var.highly_variable]) == hvg
    assert set(out.var_names[out.var.de_gene]) == de
    assert set(out.var_names[out.var.perturbed_gene]) == perturbed
    assert set(out.var_names) == hvg | de | perturbed
    assert list(out.var_names) == [g for g in raw.var_names if g in set(out.var_names)]
    np.testing.assert_allclose(
        out.X.toarray(), ref[:, out.var_names].X.toarray(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(out.layers["counts"].toarray(), raw[:, out.var_names].X.toarray())
    info = out.uns[PREPROCESS_KEY]
    assert info["input"] == "counts" and info["hvg_flavor"] == "seurat_v3"
    de_table = info["de_genes"]
    assert (de_table.groupby(["covariates", "condition"]).size() == 5).all()


def test_input_is_not_modified(raw):
    before = raw.copy()
    preprocess(raw, n_top_genes=50, n_de_genes=3)
    assert (raw.X != before.X).nnz == 0 and list(raw.obs.columns) == list(before.obs.columns)
    assert not raw.layers


def test_log_only_data_is_gene_subset(norman_adata):
    out = preprocess(norman_adata, keys=KEYS, n_top_genes=200, n_de_genes=10)
    info = out.uns[PREPROCESS_KEY]
    assert info["input"] == "log" and info["hvg_flavor"] == "seurat"
    # values untouched, only columns selected
    np.testing.assert_allclose(
        out.X.toarray(), norman_adata[:, out.var_names].X.toarray().astype(np.float32)
    )
    perturbed = {p for c in norman_adata.obs.condition.unique() for p in c.split("+")} & set(
        norman_adata.var_names
    )
    assert perturbed and perturbed <= set(out.var_names)
    assert out.var.highly_variable.sum() == 200


def test_everything_kept_when_fewer_genes_than_asked(norman_adata):
    out = preprocess(norman_adata, n_top_genes=4000, n_de_genes=25)
    assert out.n_vars == norman_adata.n_vars


def test_small_groups_skipped_and_reported(make_toy):
    adata = make_toy(n_cells=1)
    out = preprocess(adata, n_top_genes=10, n_de_genes=3)
    skipped = out.uns[PREPROCESS_KEY]["de_skipped"]
    assert len(skipped) == 12 and skipped["reason"].str.contains("fewer than 2 cells").all()


def test_rejects_bad_input(toy_adata):
    toy_adata.var_names = ["G0", *toy_adata.var_names[:-1]]
    with pytest.raises(DataValidationError, match="gene names are duplicated"):
        preprocess(toy_adata)
