"""Scenarios: entropy against scipy, PerturBench table 7, downsampling and nested scaling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from pertbench.data.keys import PerturbationKeys
from pertbench.data.scenarios import (
    data_scaling_splits,
    downsample_perturbed,
    imbalance_by_entropy,
    normalized_entropy,
    perturbations_per_covariate,
)
from pertbench.data.simulate import simulate
from pertbench.errors import ConfigError

KEYS = PerturbationKeys()


@pytest.mark.parametrize("counts", [[188, 50, 117], [1, 2, 3, 4], [5, 0, 5], [7, 7]])
def test_normalized_entropy_matches_scipy(counts):
    expected = scipy_entropy(np.asarray(counts, float)) / np.log(len(counts))
    assert normalized_entropy(counts) == pytest.approx(expected, rel=1e-12)


def test_perturbench_table7_levels():
    # PerturBench appendix D.4 table 7: perturbations per cell type and their balance level
    for counts, level in [
        ((188, 188, 188), 1.0),
        ((188, 50, 117), 0.9),
        ((188, 81, 30), 0.8),
        ((188, 33, 33), 0.7),
    ]:
        assert normalized_entropy(counts) == pytest.approx(level, abs=0.02)


def test_normalized_entropy_edge_cases():
    assert normalized_entropy([12]) == 1.0
    with pytest.raises(ConfigError, match="all zero"):
        normalized_entropy([0, 0])
    with pytest.raises(ConfigError, match="non-negative"):
        normalized_entropy([1, -1])


@pytest.fixture(scope="module")
def balanced():
    return simulate(
        n_covariates=3,
        n_perturbations=60,
        n_combinations=0,
        n_cells_per_group=4,
        n_control_cells=10,
        n_genes=60,
        seed=2,
    )


@pytest.mark.parametrize("target", [1.0, 0.9, 0.8, 0.7])
def test_imbalance_reaches_target(balanced, target):
    out = imbalance_by_entropy(
        balanced, keys=KEYS, target_entropy=target, min_perturbations=10, seed=0
    )
    info = out.uns["pertbench_scenario"]
    per_cov = perturbations_per_covariate(out.obs, KEYS)
    assert normalized_entropy(per_cov.to_numpy()) == pytest.approx(info["perturbation_entropy"])
    assert abs(info["perturbation_entropy"] - target) <= 0.02
    assert per_cov.max() == 60 and per_cov.min() >= 10  # reference keeps everything
    # all controls kept, kept groups are whole
    n_ctrl = (balanced.obs.condition == "control").sum()
    assert (out.obs.condition == "control").sum() == n_ctrl
    sizes = (
        out.obs[out.obs.condition != "control"]
        .groupby(["cell_type", "condition"], observed=True)
        .size()
    )
    assert (sizes == 4).all()


def test_imbalance_reproducible_and_unreachable(balanced):
    a = imbalance_by_entropy(balanced, target_entropy=0.8, min_perturbations=10, seed=4)
    b = imbalance_by_entropy(balanced, target_entropy=0.8, min_perturbations=10, seed=4)
    assert a.obs_names.equals(b.obs_names)
    with pytest.raises(ConfigError, match="cannot be reached"):
        imbalance_by_entropy(balanced, target_entropy=0.3, min_perturbations=50)
    with pytest.raises(ConfigError, match="reference covariate 'XX' not found"):
        imbalance_by_entropy(balanced, target_entropy=0.9, reference_covariate="XX")


def test_downsample_keeps_controls_and_fraction(kang_adata):
    out = downsample_perturbed(kang_adata, keys=KEYS, fraction=0.2, seed=0)
    before = kang_adata.obs.groupby(["cell_type", "condition"], observed=True).size()
    after = out.obs.groupby(["cell_type", "condition"], observed=True).size()
    for (cell_type, condition), n in before.items():
        expected = n if condition == "control" else max(1, int(np.floor(0.2 * n + 0.5)))
        assert after[(cell_type, condition)] == expected
    info = out.uns["pertbench_scenario"]
    assert info["n_cells_after"] == out.n_obs
    assert info["cell_entropy"] < info["cell_entropy_before"]
    assert set(out.obs_names) <= set(kang_adata.obs_names)


def test_downsample_bad_fraction(toy_adata):
    with pytest.raises(ConfigError, match="fraction must be in"):
        downsample_perturbed(toy_adata, fraction=0)


def test_data_scaling_levels_are_nested_with_fixed_val_test():
    adata = simulate(
        n_covariates=5,
        n_perturbations=10,
        n_combinations=0,
        n_cells_per_group=5,
        n_control_cells=12,
        n_genes=30,
        seed=1,
    )
    levels = data_scaling_splits(adata, keys=KEYS, heldout_covariates="CT0", n_levels=2, seed=0)
    assert list(levels) == ["level1", "level2"]
    splits = [r.split for r in levels.values()]
    for s in splits:
        assert s[s.isin(["val", "test"])].equals(splits[0][splits[0].isin(["val", "test"])])
        assert levels["level1"].leakage().empty
    train1 = set(splits[0].index[splits[0] == "train"])
    train2 = set(splits[1].index[splits[1] == "train"])
    assert train1 < train2
    cov = adata.obs["cell_type"].astype(str)
    assert set(cov[splits[1] == "train"]) == {f"CT{i}" for i in range(5)}
    p1 = levels["level1"].params
    assert "CT0" in p1["training_covariates"] and len(p1["training_covariates"]) == 3
    assert 0 < p1["perturbation_entropy"] <= 1
    held = (splits[0].isin(["val", "test"])) & (adata.obs.condition != "control").to_numpy()
    assert set(cov[held]) == {"CT0"}
    assert (adata.obs.condition[held] != "control").sum() == 7 * 5  # 70% of 10 perturbations


def test_data_scaling_explicit_levels(toy_adata):
    levels = data_scaling_splits(
        toy_adata, heldout_covariates=["C0"], levels=[["C1"]], fraction=0.5
    )
    assert levels["level1"].params["training_covariates"] == ["C0", "C1"]
    with pytest.raises(ConfigError, match="are held out"):
        data_scaling_splits(toy_adata, heldout_covariates=["C0"], levels=[["C0"]])
