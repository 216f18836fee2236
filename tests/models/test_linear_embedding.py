"""linear_embedding and nearest_perturbation against hand-made truth."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from delta_helpers import training_delta
from pertbench.data import PerturbationKeys, make_split
from pertbench.errors import UnseenPerturbationError
from pertbench.models import PerturbationModel, create_model
from pertbench.models.encoding import gene_pca
from pertbench.models.linear_embedding import solve_linear_embedding


def test_solver_matches_a_direct_numpy_solve():
    rng = np.random.default_rng(0)
    A, B, Y = rng.normal(size=(7, 3)), rng.normal(size=(5, 2)), rng.normal(size=(7, 5))
    lam = 0.1
    direct = (
        np.linalg.inv(A.T @ A + lam * np.eye(3))
        @ A.T
        @ Y
        @ B
        @ np.linalg.inv(B.T @ B + lam * np.eye(2))
    )
    np.testing.assert_allclose(solve_linear_embedding(Y, A, B, lam), direct, rtol=1e-12)


def test_gene_pca_is_the_scores_of_the_centred_genes_by_groups_matrix():
    rng = np.random.default_rng(1)
    means = rng.normal(size=(6, 20))  # groups x genes
    scores = gene_pca(means, 3)
    Y = means.T - means.T.mean(axis=0)
    U, S, _ = np.linalg.svd(Y, full_matrices=False)
    np.testing.assert_allclose(np.abs(scores), np.abs(U[:, :3] * S[:3]), atol=1e-10)


def _rank10_data():
    """Cells of 2 cell types whose deltas are exactly A K A[g]^T + b_c (rank 10).

    Genes G30+i mirror G_i (A[G30+i] = -A[G_i]), and perturbations come in mirrored pairs,
    so each cell type's training perturbation vectors average to zero and b_c is exactly
    the mean training delta: the model's form holds exactly.
    """
    rng = np.random.default_rng(2)
    half = rng.normal(size=(30, 10))
    A = np.vstack([half, -half])  # 60 genes x 10
    K = rng.normal(size=(10, 10))
    genes = [f"G{i}" for i in range(60)]
    perts = [f"G{i}" for i in range(20)] + [f"G{i + 30}" for i in range(20)]
    rows, labels, covs = [], [], []
    for c, cov in enumerate(("T0", "T1")):
        base = 5.0 + rng.uniform(size=60)
        offset = rng.normal(scale=0.2, size=60) * (c + 1)
        rows += [base] * 4
        labels += ["control"] * 4
        covs += [cov] * 4
        for p in perts:
            delta = A @ K @ A[genes.index(p)] * 0.01 + offset
            rows += [base + delta] * 3
            labels += [p] * 3
            covs += [cov] * 3
    obs = pd.DataFrame({"condition": labels, "cell_type": covs})
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(np.vstack(rows), obs=obs, var=pd.DataFrame(index=genes))
    adata.varm["emb"] = A * 0.1  # any invertible rescaling of A: K absorbs it
    return adata, A, K


def test_exact_recovery_of_a_rank10_linear_truth_and_unseen_prediction():
    adata, _, K = _rank10_data()
    heldout = ["G0", "G30", "G5", "G35"]  # mirrored pairs, unseen in every cell type
    split = make_split(adata.obs_names, "train")
    split[adata.obs["condition"].isin(heldout).to_numpy()] = "test"
    model = create_model(
        "linear_embedding", gene_embedding="varm:emb", perturbation_embedding="gene", ridge=0.0
    ).fit(adata, split, progress=False)
    # K on the varm scale: A_v = 0.1 A, and delta = 0.01 A K A^T = A_v K A_v^T
    np.testing.assert_allclose(model.K, K, atol=1e-7)
    assert model.unpredictable_reason(heldout) is None
    pred = model.predict_split(adata, split)
    truth = adata[split.to_numpy() == "test"]
    keys = ["cell_type", "condition"]
    got = (
        pd.DataFrame(pred.X, index=pd.MultiIndex.from_frame(pred.obs[keys]))
        .groupby(level=[0, 1])
        .mean()
    )
    want = (
        pd.DataFrame(truth.X, index=pd.MultiIndex.from_frame(truth.obs[keys]))
        .groupby(level=[0, 1])
        .mean()
    )
    np.testing.assert_allclose(got.loc[want.index].to_numpy(), want.to_numpy(), atol=1e-7)


def test_linear_embedding_save_load_and_missing_embedding_error(tmp_path):
    adata, _, _ = _rank10_data()
    split = make_split(adata.obs_names, "train")
    split[(adata.obs["condition"] == "G1").to_numpy()] = "test"
    model = create_model("linear_embedding").fit(adata, split, progress=False)  # gene PCA
    pred = model.predict_split(adata, split)
    model.save(tmp_path / "m")
    again = PerturbationModel.load(tmp_path / "m", device="cpu").predict_split(adata, split)
    np.testing.assert_array_equal(pred.X, again.X)
    from pertbench.models.base import build_counterfactuals

    request = pd.DataFrame({"cell_type": ["T0"], "condition": ["NOTAGENE"]})
    with pytest.raises(UnseenPerturbationError, match=r"no perturbation embedding .* NOTAGENE"):
        model.predict(build_counterfactuals(adata, request, PerturbationKeys()))


def test_nearest_perturbation_picks_the_nearest_training_perturbation(make_toy, tmp_path):
    adata = make_toy(n_covariates=2, n_perturbations=3, n_cells=10, n_controls=20, n_genes=12)
    table = pd.DataFrame({"d0": [1.0, 10.0, 5.0], "d1": [0.0, 1.0, 0.6]}, index=["P0", "P1", "P2"])
    table.to_csv(tmp_path / "emb.csv")
    split = make_split(adata.obs_names, "train")
    split[(adata.obs["condition"] == "P2").to_numpy()] = "test"  # P2 unseen everywhere
    # P2 = (5, 0.6): Euclidean nearest is P0 (4.04 vs 5.0), cosine nearest is P1
    for metric, neighbour in (("euclidean", "P0"), ("cosine", "P1")):
        model = create_model(
            "nearest_perturbation", perturbation_embedding=str(tmp_path / "emb.csv"), metric=metric
        ).fit(adata, split, progress=False)
        pred = model.predict_split(adata, split)
        assert model.neighbours == {"P2": neighbour}
        assert f"P2 -> {neighbour}" in pred.uns["pertbench"]["notes"][0]
        for cov in ("C0", "C1"):
            rows = (pred.obs["cell_type"] == cov).to_numpy()
            ctrl = pred.obs.loc[rows, "control_obs_name"]
            expected = adata[ctrl].X.toarray() + training_delta(adata, split, neighbour, cov)
            np.testing.assert_allclose(pred.X[rows], expected, rtol=1e-5, atol=1e-5)


def test_latent_additive_with_gene_embedding_predicts_unseen_perturbations(tmp_path):
    from pertbench.data import make_task_split
    from pertbench.data.simulate import simulate

    adata = simulate(n_covariates=2, n_perturbations=8, n_cells_per_group=8, n_genes=40, seed=2)
    split = make_task_split(adata, "unseen", fraction=0.3, seed=0).split
    params = {"encoder_width": 16, "latent_dim": 8, "n_layers": 1, "batch_size": 64}
    model = create_model("latent_additive", perturbation_embedding="gene", **params)
    assert model.predicts_unseen_perturbations
    model.fit(adata, split, max_epochs=1, progress=False, device="cpu")
    assert model.module.pert_encoder.in_dim == model.pert_embedding.dim == model.dims["n_perts"]
    pred = model.predict_split(adata, split, on="test")
    assert pred.n_obs > 0 and np.isfinite(pred.X).all()
    model.save(tmp_path / "la")
    again = PerturbationModel.load(tmp_path / "la", device="cpu").predict_split(adata, split)
    np.testing.assert_array_equal(pred.X, again.X)
    # the default multi-hot encoding cannot
    assert not create_model("latent_additive", **params).predicts_unseen_perturbations
