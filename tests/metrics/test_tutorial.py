"""The tutorial metric set against an explicit by-hand computation, and on Kang."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist, pdist
from sklearn.metrics import r2_score

from pertbench.errors import EvaluationError
from pertbench.metrics.de import jaccard_top_k, wilcoxon_scores
from pertbench.metrics.distribution import mean_var_kde
from pertbench.metrics.tutorial import tutorial_metrics

NAMES = {
    "r2",
    "mse",
    "pearson",
    "r2_boot",
    "mse_boot",
    "pearson_boot",
    "pearson_delta",
    "edistance",
    "mean_var_kde",
    "jaccard_top{k}",
    "r2_top{k}de",
    "mse_top{k}de",
    "pearson_top{k}de",
    "r2_boot_top{k}de",
    "mse_boot_top{k}de",
    "pearson_boot_top{k}de",
    "pearson_delta_top{k}de",
    "edistance_top{k}de",
    "mean_var_kde_top{k}de",
}


@pytest.fixture
def arrays(make_toy):
    adata = make_toy(n_covariates=1, n_perturbations=2, n_genes=30, n_cells=25, n_controls=30)
    X = adata.X.toarray().astype(np.float64)
    cond = adata.obs["condition"].to_numpy()
    truth, ctrl = X[cond == "P0"], X[cond == "control"]
    rng = np.random.default_rng(5)
    pred = truth[:20] + rng.normal(scale=0.3, size=(20, 30))
    return truth, pred, ctrl


def test_names_and_by_hand_values(arrays):
    truth, pred, ctrl = arrays
    k, n_boot, seed = 5, 40, 7
    out = tutorial_metrics(truth, pred, ctrl, n_bootstrap=n_boot, top_k=k, n_pcs=4, seed=seed)
    assert set(out) == {n.format(k=k) for n in NAMES}
    # bootstrap by hand: same draws, explicit loop, scikit-learn's r2 with observed truth
    rng = np.random.default_rng(seed)
    it = rng.integers(0, truth.shape[0], size=(n_boot, round(0.8 * truth.shape[0])))
    ip = rng.integers(0, pred.shape[0], size=(n_boot, round(0.8 * pred.shape[0])))
    r2s, mses, rs = [], [], []
    for b in range(n_boot):
        mt, mp = truth[it[b]].mean(axis=0), pred[ip[b]].mean(axis=0)
        r2s.append(r2_score(mt, mp))
        mses.append(np.mean((mt - mp) ** 2))
        rs.append(np.corrcoef(mt, mp)[0, 1])
    assert out["r2_boot"] == pytest.approx(np.mean(r2s), rel=1e-9)
    assert out["mse_boot"] == pytest.approx(np.mean(mses), rel=1e-9)
    assert out["pearson_boot"] == pytest.approx(np.mean(rs), rel=1e-9)
    # the plain values compare the means of ALL cells (no resampling)
    mt, mp = truth.mean(axis=0), pred.mean(axis=0)
    assert out["r2"] == pytest.approx(r2_score(mt, mp), rel=1e-9)
    assert out["mse"] == pytest.approx(np.mean((mt - mp) ** 2), rel=1e-9)
    assert out["pearson"] == pytest.approx(np.corrcoef(mt, mp)[0, 1], rel=1e-9)
    assert out["r2"] != pytest.approx(out["r2_boot"], rel=1e-6)
    c = ctrl.mean(axis=0)
    expected_pd = np.corrcoef(pred.mean(axis=0) - c, truth.mean(axis=0) - c)[0, 1]
    assert out["pearson_delta"] == pytest.approx(expected_pd, rel=1e-9)
    assert out["mean_var_kde"] == pytest.approx(
        mean_var_kde(np.c_[pred.mean(0), pred.var(0)], np.c_[truth.mean(0), truth.var(0)])
    )
    # E-distance by hand: PCA (numpy SVD) of controls + truth, all cells (< max_cells)
    obs = np.vstack([ctrl, truth])
    mu = obs.mean(axis=0)
    _, _, vt = np.linalg.svd(obs - mu, full_matrices=False)
    P, T = (pred - mu) @ vt[:4].T, (truth - mu) @ vt[:4].T
    expected_e = 2 * cdist(P, T).mean() - pdist(P).mean() - pdist(T).mean()
    assert out["edistance"] == pytest.approx(expected_e, rel=1e-8)
    # DE: top-k up-regulated genes against the controls
    zt = wilcoxon_scores(truth, np.zeros(len(truth), int), ctrl).scores
    zp = wilcoxon_scores(pred, np.zeros(len(pred), int), ctrl).scores
    assert out[f"jaccard_top{k}"] == pytest.approx(jaccard_top_k(zt, zp, k)[0])
    de = np.argsort(-zt[0], kind="stable")[:k]
    expected_pd_de = np.corrcoef(pred.mean(0)[de] - c[de], truth.mean(0)[de] - c[de])[0, 1]
    assert out[f"pearson_delta_top{k}de"] == pytest.approx(expected_pd_de, rel=1e-9)


def test_reproducible_and_invariant_to_input_form(arrays):
    truth, pred, ctrl = arrays
    a = tutorial_metrics(truth, pred, ctrl, n_bootstrap=20, top_k=5, seed=1)
    b = tutorial_metrics(truth, pred, ctrl, n_bootstrap=20, top_k=5, seed=1)
    assert a == b
    genes = [f"g{i}" for i in range(truth.shape[1])]

    def as_adata(X, order):
        return ad.AnnData(X=X[:, order], var=pd.DataFrame(index=np.asarray(genes)[order]))

    ident = np.arange(len(genes))
    perm = np.random.default_rng(0).permutation(len(genes))
    c = tutorial_metrics(
        as_adata(truth, ident),
        as_adata(pred, perm),
        as_adata(ctrl, perm[::-1]),
        n_bootstrap=20,
        top_k=5,
        seed=1,
    )
    for key in a:
        assert c[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key


def test_input_errors(arrays):
    truth, pred, ctrl = arrays
    with pytest.raises(EvaluationError, match="same number of genes"):
        tutorial_metrics(truth, pred[:, :5], ctrl)
    bad = pred.copy()
    bad[0, 0] = np.nan
    with pytest.raises(EvaluationError, match="pred contains NaN"):
        tutorial_metrics(truth, bad, ctrl)
    with pytest.raises(EvaluationError, match="all as AnnData"):
        tutorial_metrics(ad.AnnData(truth), pred, ctrl)


def test_kang_held_out_cd4t(kang_adata):
    cd4 = kang_adata[kang_adata.obs["cell_type"] == "CD4T"]
    truth = cd4[cd4.obs["condition"] == "stimulated"]
    controls = cd4[cd4.obs["condition"] == "control"]
    itself = tutorial_metrics(truth, truth, controls, n_bootstrap=20)
    assert itself["pearson_delta"] == pytest.approx(1.0)
    # E-distance by hand on the real data: PCA (numpy SVD) of controls + truth
    obs = np.vstack([controls.X.toarray(), truth.X.toarray()]).astype(np.float64)
    mu = obs.mean(axis=0)
    _, _, vt = np.linalg.svd(obs - mu, full_matrices=False)
    T = (truth.X.toarray() - mu) @ vt[:30].T
    expected = 2 * cdist(T, T).mean() - 2 * pdist(T).mean()
    assert itself["edistance"] == pytest.approx(expected, rel=1e-6)
    assert itself["jaccard_top100"] == 1.0 and itself["mean_var_kde"] == 0.0
    assert itself["r2"] == pytest.approx(1.0)  # plain R^2 of identical means
    assert 0.95 < itself["r2_boot"] < 1.0  # resampled means are noisy
    unchanged = tutorial_metrics(truth, controls, controls, n_bootstrap=20)
    assert unchanged["pearson_delta"] == 0.0  # a zero predicted change
    assert unchanged["edistance"] > itself["edistance"]
    assert unchanged["r2_top100de"] < itself["r2_top100de"]
