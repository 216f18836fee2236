"""Shared fixtures: paths to the real shared datasets (skipped when absent) and a small
synthetic dataset factory with known effects, built in memory for fast unit tests."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
KANG_FILE = SHARED_DATA / "kang2018_pbmc_ifnb_subset.h5ad"
NORMAN_FILE = SHARED_DATA / "norman19_mcfaline23_subset.h5ad"


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real dataset {path.name} not found at {path.parent} (shared data absent)")
    return path


@pytest.fixture(scope="session")
def kang_path() -> Path:
    """Path of the Kang 2018 PBMC IFN-beta subset (skips when the shared data are absent)."""
    return _require(KANG_FILE)


@pytest.fixture(scope="session")
def norman_path() -> Path:
    """Path of the Norman19 + McFaline-Figueroa23 subset (skips when absent)."""
    return _require(NORMAN_FILE)


@pytest.fixture(scope="session")
def kang_adata(kang_path) -> ad.AnnData:
    """The Kang subset, loaded once per session. Do not modify it in tests: copy first."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", getattr(ad, "OldFormatWarning", FutureWarning))
        return ad.read_h5ad(kang_path)


@pytest.fixture(scope="session")
def norman_adata(norman_path) -> ad.AnnData:
    """The Norman/McFaline subset, loaded once per session. Copy before modifying."""
    return ad.read_h5ad(norman_path)


def make_toy_adata(
    *,
    n_covariates: int = 2,
    n_perturbations: int = 6,
    n_cells: int = 40,
    n_controls: int = 60,
    n_genes: int = 50,
    effect: float = 1.5,
    combos: tuple[tuple[int, int], ...] = (),
    seed: int = 0,
) -> ad.AnnData:
    """Small log-normalised dataset with strong, distinct, known perturbation effects.

    Each perturbation ``P{i}`` multiplies the rate of its own block of genes by
    ``exp(effect)`` (blocks differ between perturbations); each covariate ``C{j}`` has its
    own baseline. Combinations are additive in log-rate. Counts are Poisson, then
    normalised to 1e4 and log1p, stored as CSR float32; raw counts are in ``layers['counts']``.
    The true log-rate shift of each perturbation is in ``uns['true_effects']``.
    """
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.5, 3.0, size=(n_covariates, n_genes))
    effects = np.zeros((n_perturbations, n_genes))
    block = max(n_genes // max(n_perturbations, 1), 2)
    for p in range(n_perturbations):
        genes = (np.arange(block) + p * block) % n_genes
        sign = 1.0 if p % 2 == 0 else -1.0
        effects[p, genes] = sign * effect
    labels, covs, rates = [], [], []
    for c in range(n_covariates):
        groups = [("control", np.zeros(n_genes), n_controls)]
        groups += [(f"P{p}", effects[p], n_cells) for p in range(n_perturbations)]
        groups += [(f"P{a}+P{b}", effects[a] + effects[b], n_cells) for a, b in combos]
        for label, shift, count in groups:
            labels += [label] * count
            covs += [f"C{c}"] * count
            rates.append(np.repeat(np.exp(np.log(base[c]) + shift)[None, :], count, axis=0))
    rate = np.vstack(rates)
    counts = rng.poisson(rate * rng.uniform(0.7, 1.3, size=(rate.shape[0], 1))).astype(np.float32)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    X = np.log1p(counts / totals * 1e4).astype(np.float32)
    obs = pd.DataFrame({"condition": labels, "cell_type": covs})
    obs.index = [f"cell{i}" for i in range(len(obs))]
    var = pd.DataFrame(index=[f"G{g}" for g in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.uns["true_effects"] = pd.DataFrame(
        effects, index=[f"P{p}" for p in range(n_perturbations)], columns=var.index
    )
    return adata


@pytest.fixture
def toy_adata() -> ad.AnnData:
    """A fresh small synthetic dataset (2 cell types x 6 perturbations x 50 genes)."""
    return make_toy_adata()


@pytest.fixture
def make_toy():
    """Factory fixture: ``make_toy(**kwargs)`` builds a synthetic dataset (see make_toy_adata)."""
    return make_toy_adata
