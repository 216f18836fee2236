"""Wilcoxon rank-sum test and DE metrics against scanpy, scipy and statsmodels."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from pertbench.errors import EvaluationError
from pertbench.metrics.de import (
    benjamini_hochberg,
    direction_agreement,
    jaccard_top_k,
    overlap_top_k,
    signed_log10_pvalue,
    top_k_mask,
    wilcoxon_scores,
)


def _scanpy_scores(adata: ad.AnnData, groupby: str, reference: str, *, tie_correct: bool):
    """scanpy's wilcoxon z-scores and BH p-values per group, as (groups x genes) frames."""
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            adata,
            groupby,
            reference=reference,
            method="wilcoxon",
            tie_correct=tie_correct,
            n_genes=adata.n_vars,
        )
    res = adata.uns["rank_genes_groups"]
    groups = res["names"].dtype.names
    scores, padj = {}, {}
    for g in groups:
        names = np.asarray(res["names"][g])
        scores[g] = pd.Series(np.asarray(res["scores"][g], dtype=np.float64), index=names)
        padj[g] = pd.Series(np.asarray(res["pvals_adj"][g], dtype=np.float64), index=names)
    genes = adata.var_names
    return (
        pd.DataFrame({g: s[genes] for g, s in scores.items()}).T,
        pd.DataFrame({g: s[genes] for g, s in padj.items()}).T,
    )


def _tied_data(seed=0, n_genes=40, dtype=np.float32, step=0.5):
    """Groups and controls with many ties (zeros and repeated values) and a real effect."""
    rng = np.random.default_rng(seed)
    sizes = {"control": 50, "A": 30, "B": 27, "C": 3}
    rows, labels = [], []
    for i, (label, n) in enumerate(sizes.items()):
        lam = rng.uniform(0.2, 2.0, n_genes) * (1.0 + 0.5 * i * (np.arange(n_genes) % 3 == 0))
        rows.append(rng.poisson(lam, size=(n, n_genes)) * step)  # integer steps: many ties
        labels += [label] * n
    X = np.vstack(rows).astype(dtype)
    X[:, 0] = 1.0  # one gene where every value is tied
    X[:, 1] = -X[:, 1]  # negative values
    obs = pd.DataFrame({"g": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X=X, obs=obs)


@pytest.mark.parametrize("tie_correct", [True, False])
@pytest.mark.parametrize(
    "dtype,step",
    [(np.float32, 0.5), (np.float64, 0.5), (np.float64, 1 / 3)],  # 1/3: not float32-exact
)
@pytest.mark.parametrize("sparse", [None, "csr", "csc"])
def test_wilcoxon_matches_scanpy_with_ties(tie_correct, dtype, step, sparse):
    adata = _tied_data(dtype=dtype, step=step)
    if sparse == "csr":
        adata.X = sp.csr_matrix(adata.X)
    elif sparse == "csc":
        adata.X = sp.csc_matrix(adata.X)
    scanpy_input = adata.copy()
    if sparse == "csc":
        scanpy_input.X = sp.csr_matrix(scanpy_input.X)
    expected, expected_padj = _scanpy_scores(scanpy_input, "g", "control", tie_correct=tie_correct)
    labels = adata.obs["g"].astype(str).to_numpy()
    names = ["A", "B", "C"]
    codes = pd.Index(names).get_indexer(labels)
    res = wilcoxon_scores(adata.X, codes, labels == "control", tie_correct=tie_correct)
    np.testing.assert_allclose(res.scores, expected.loc[names].to_numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        res.pvals_adj, expected_padj.loc[names].to_numpy(), rtol=1e-5, atol=1e-7
    )
    assert (res.scores[:, 0] == 0).all() and (res.pvals[:, 0] == 1).all()  # all tied gene
    assert res.n_reference == 50 and res.n_cells.tolist() == [30, 27, 3]


def test_wilcoxon_matches_scipy_mannwhitneyu():
    adata = _tied_data(seed=3, n_genes=25, dtype=np.float64)
    X = adata.X
    labels = adata.obs["g"].astype(str).to_numpy()
    ctrl = X[labels == "control"]
    codes = np.where(labels == "A", 0, -1)
    res = wilcoxon_scores(X, codes, ctrl)  # reference given as its own matrix
    group = X[labels == "A"]
    for j in range(2, X.shape[1]):
        expected = stats.mannwhitneyu(
            group[:, j],
            ctrl[:, j],
            alternative="two-sided",
            method="asymptotic",
            use_continuity=False,
        )
        assert res.pvals[0, j] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-14)
        mean_u = group.shape[0] * ctrl.shape[0] / 2
        assert np.sign(res.scores[0, j]) == np.sign(expected.statistic - mean_u)


def test_wilcoxon_chunking_and_reference_forms_agree():
    adata = _tied_data(seed=1, n_genes=30)
    labels = adata.obs["g"].astype(str).to_numpy()
    codes = pd.Index(["A", "B", "C"]).get_indexer(labels)
    full = wilcoxon_scores(adata.X, codes, labels == "control")
    tiny = wilcoxon_scores(adata.X, codes, labels == "control", chunk_elements=50)
    separate = wilcoxon_scores(adata.X, codes, adata.X[labels == "control"])
    np.testing.assert_array_equal(full.scores, tiny.scores)
    np.testing.assert_array_equal(full.scores, separate.scores)


def test_wilcoxon_edge_cases():
    X = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    # single-cell group, a group without cells (code 1), constant gene
    res = wilcoxon_scores(
        X, np.array([-1, -1, -1, 0]), np.array([True, True, True, False]), n_groups=2
    )
    assert np.isfinite(res.scores).all()
    assert res.scores[0, 0] > 0 and res.scores[0, 1] == 0.0
    assert (res.scores[1] == 0).all() and (res.pvals[1] == 1).all()
    with pytest.raises(EvaluationError, match="reference"):
        wilcoxon_scores(X, np.zeros(4, dtype=int), np.zeros(4, dtype=bool))
    with pytest.raises(EvaluationError, match="genes"):
        wilcoxon_scores(X, np.zeros(4, dtype=int), np.ones((3, 5)))
    # -0.0 and +0.0 are the same value (a tie), as for scanpy
    Y = np.array([[0.0], [-0.0], [0.0], [-0.0]], dtype=np.float32)
    tied = wilcoxon_scores(Y, np.array([0, 0, -1, -1]), np.array([False, False, True, True]))
    assert tied.scores[0, 0] == 0.0


def test_wilcoxon_matches_scanpy_on_kang(kang_adata):
    cd4 = kang_adata[kang_adata.obs["cell_type"] == "CD4T"].copy()
    expected, _ = _scanpy_scores(cd4.copy(), "condition", "control", tie_correct=True)
    labels = cd4.obs["condition"].astype(str).to_numpy()
    res = wilcoxon_scores(cd4.X, np.where(labels == "stimulated", 0, -1), labels == "control")
    np.testing.assert_allclose(
        res.scores[0], expected.loc["stimulated"].to_numpy(), rtol=1e-6, atol=1e-6
    )


def test_wilcoxon_matches_scanpy_on_norman(norman_adata):
    k562 = norman_adata[norman_adata.obs["cell_type"] == "k562"].copy()
    counts = k562.obs["condition"].value_counts()
    keep = ["control", *[p for p in counts.index if p != "control"][:6]]
    sub = k562[k562.obs["condition"].isin(keep)].copy()
    sub.obs["condition"] = sub.obs["condition"].astype(str).astype("category")
    expected, expected_padj = _scanpy_scores(sub.copy(), "condition", "control", tie_correct=True)
    labels = sub.obs["condition"].astype(str).to_numpy()
    groups = keep[1:]
    codes = pd.Index(groups).get_indexer(labels)
    res = wilcoxon_scores(sub.X, codes, labels == "control")
    np.testing.assert_allclose(res.scores, expected.loc[groups].to_numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        res.pvals_adj, expected_padj.loc[groups].to_numpy(), rtol=1e-5, atol=1e-8
    )


def test_benjamini_hochberg_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    rng = np.random.default_rng(0)
    p = rng.random((4, 200)) ** 3
    p[0, :5] = p[0, 5]  # ties
    expected = np.vstack([multipletests(row, method="fdr_bh")[1] for row in p])
    np.testing.assert_allclose(benjamini_hochberg(p), expected, rtol=1e-12)
    np.testing.assert_allclose(benjamini_hochberg(p[1]), expected[1], rtol=1e-12)


def test_signed_log10_pvalue_is_finite_and_exact():
    z = np.array([-3.0, 0.0, 2.0, 40.0, -100.0])
    out = signed_log10_pvalue(z)
    assert np.isfinite(out).all()
    expected = -np.log10(2 * stats.norm.sf(np.abs(z[:3])))
    np.testing.assert_allclose(np.abs(out[:3]), expected, rtol=1e-12, atol=1e-15)
    assert out[0] < 0 and out[1] == 0 and out[3] > 300 and out[4] < -2000


def test_top_k_and_jaccard_by_hand():
    truth = np.array([[5.0, 4.0, 3.0, -9.0, 0.0, 1.0]])
    pred = np.array([[5.0, 0.0, 3.0, 1.0, 4.0, -8.0]])
    assert np.flatnonzero(top_k_mask(truth, 3)[0]).tolist() == [0, 1, 2]
    assert np.flatnonzero(top_k_mask(truth, 3, absolute=True)[0]).tolist() == [0, 1, 3]
    # up: A={0,1,2}, B={0,2,4} -> 2/4 ; abs: A={0,1,3}, B={0,4,5} -> 1/5
    assert jaccard_top_k(truth, pred, 3)[0] == pytest.approx(2 / 4)
    assert jaccard_top_k(truth, pred, 3, absolute=True)[0] == pytest.approx(1 / 5)
    # ties at the cut-off are broken by gene position (deterministic)
    assert np.flatnonzero(top_k_mask(np.array([[1.0, 2.0, 2.0, 2.0]]), 2)[0]).tolist() == [1, 2]
    assert jaccard_top_k(truth, pred, 100)[0] == 1.0  # k beyond the gene count: all genes


def test_overlap_and_direction_by_hand():
    tz = np.array([[6.0, -5.0, 4.0, 0.1, 3.0], [0.1, 0.2, 0.0, 0.0, 0.0]])
    fdr = np.array([[0.001, 0.001, 0.01, 0.9, 0.2], [0.9, 0.9, 1.0, 1.0, 1.0]])
    pz = np.array([[1.0, 7.0, 0.5, 9.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # row 0: significant = {0,1,2} (k'=3, A={0,1,2}); pred top 3 by |z| = {3,1,0} -> 2/3
    out = overlap_top_k(tz, fdr, pz, k=100)
    assert out[0] == pytest.approx(2 / 3)
    assert np.isnan(out[1])  # no significant gene: undefined
    assert overlap_top_k(tz[:1], fdr[:1], pz[:1], k=1)[0] == pytest.approx(0.0)  # A={0}, B={3}
    td = np.array([[1.0, -1.0, 2.0, 5.0, 1.0]])
    pd_ = np.array([[0.5, 0.3, 0.0, -1.0, 1.0]])
    # significant genes 0,1,2: signs agree on 0 only (1 differs, 2 is zero)
    assert direction_agreement(td, fdr[:1], pd_)[0] == pytest.approx(1 / 3)
    assert np.isnan(direction_agreement(td, fdr[1:], pd_)[0])


def test_wilcoxon_dense_without_zeros_matches_scanpy():
    """Dense predictions without zeros (the common model output), with ties and negatives."""
    rng = np.random.default_rng(7)
    X = (rng.integers(-6, 6, size=(90, 25)) * 0.5 + 0.25).astype(np.float32)  # never 0
    labels = np.array(["control"] * 40 + ["A"] * 30 + ["B"] * 20)
    adata = ad.AnnData(
        X=X, obs=pd.DataFrame({"g": pd.Categorical(labels)}, index=[f"c{i}" for i in range(90)])
    )
    expected, _ = _scanpy_scores(adata.copy(), "g", "control", tie_correct=True)
    codes = pd.Index(["A", "B"]).get_indexer(labels)
    res = wilcoxon_scores(X, codes, labels == "control", chunk_elements=900)
    np.testing.assert_allclose(
        res.scores, expected.loc[["A", "B"]].to_numpy(), rtol=1e-6, atol=1e-6
    )


def test_wilcoxon_threads_give_identical_results():
    adata = _tied_data(seed=2, n_genes=60)
    labels = adata.obs["g"].astype(str).to_numpy()
    codes = pd.Index(["A", "B", "C"]).get_indexer(labels)
    one = wilcoxon_scores(adata.X, codes, labels == "control", chunk_elements=400)
    many = wilcoxon_scores(adata.X, codes, labels == "control", chunk_elements=400, n_jobs=3)
    np.testing.assert_array_equal(one.scores, many.scores)
    np.testing.assert_array_equal(one.pvals_adj, many.pvals_adj)
