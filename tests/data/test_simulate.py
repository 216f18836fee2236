"""Simulator: layout, reproducibility, streaming writer, and recovery of the known truth."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertbench.data.groups import group_cells, group_mean
from pertbench.data.keys import PerturbationKeys
from pertbench.data.loading import validate_adata
from pertbench.data.simulate import simulate, simulate_to_h5ad, true_effects_frame
from pertbench.errors import ConfigError

SMALL = dict(
    n_covariates=2, n_perturbations=6, n_combinations=3, n_cells_per_group=20, n_genes=80, seed=7
)


def test_layout_and_contract():
    adata = simulate(**SMALL)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    counts = adata.layers["counts"]
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.float32
    # X and counts share one index structure (memory), and X = log1p(counts / total * 1e4)
    assert np.shares_memory(adata.X.indices, counts.indices)
    dense = counts.toarray().astype(np.float64)
    expected = np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(adata.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert np.all(dense == np.round(dense))
    report = validate_adata(adata, keys=PerturbationKeys())
    assert report.ok and report.value_type == "log"
    obs = adata.obs
    assert set(obs.columns) == {"condition", "cell_type"}
    assert (obs.condition == "control").groupby(obs.cell_type, observed=True).sum().tolist() == [
        40,
        40,
    ]
    combos = [c for c in obs.condition.unique() if "+" in c]
    assert len(combos) == 3
    singles = set(obs.condition.unique()) - {"control", *combos}
    assert all(set(c.split("+")) <= singles for c in combos)
    assert singles <= set(adata.var_names)  # genetic perturbations are named after genes


def test_truth_layout():
    adata = simulate(**SMALL)
    sim = adata.uns["simulation"]
    groups = sim["groups"]
    n_groups = 2 * (1 + 6 + 3)
    assert len(groups) == n_groups
    for key in ("true_effect", "true_log_fold_change", "true_log_expression"):
        assert sim[key].shape == (n_groups, 80)
    ctrl = groups["is_control"].to_numpy()
    assert np.all(sim["true_log_fold_change"][ctrl] == 0)
    frame = true_effects_frame(adata, "true_effect")
    # the knock-down target of a genetic perturbation is reduced
    for label in sim["perturbations"][:3]:
        assert frame.loc[f"CT0/{label}", label] < 0
    # combination effect = sum of its singles' effects + interaction (per covariate, before softmax)
    assert sim["interaction"].shape == (3, 2, 80)
    for j, combo in enumerate(sim["combinations"]):
        a, b = combo.split("+")
        for c, cov in enumerate(("CT0", "CT1")):
            interaction = (
                frame.loc[f"{cov}/{combo}"] - frame.loc[f"{cov}/{a}"] - frame.loc[f"{cov}/{b}"]
            )
            np.testing.assert_allclose(interaction, sim["interaction"][j, c], atol=1e-5)


def test_without_classes_the_previous_simulator_is_reproduced():
    # interaction_fraction=0 with the sparse random term of the previous version: every pair
    # is additive plus a covariate-scaled copy of one sparse vector gamma
    adata = simulate(**SMALL, interaction_fraction=0.0, interaction_scale=0.5)
    sim = adata.uns["simulation"]
    assert set(sim["interaction_class"]) == {"additive"}
    for j in range(len(sim["combinations"])):
        per_cov = sim["interaction"][j].astype(np.float64)
        support = np.flatnonzero(np.abs(per_cov).max(axis=0) > 0)
        assert 0 < support.size <= round(0.5 * round(0.05 * 80))
        ratio = per_cov[1, support] / per_cov[0, support]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)  # a[AB, c] * gamma[AB, g]


def test_counts_follow_the_truth():
    adata = simulate(
        n_covariates=2,
        n_perturbations=4,
        n_combinations=0,
        n_cells_per_group=400,
        n_control_cells=400,
        n_genes=60,
        program_size=0.2,
        library_size=5000,
        base_sd=0.5,
        seed=3,
    )
    sim = adata.uns["simulation"]
    groups = sim["groups"]
    g = group_cells(adata.obs, PerturbationKeys())
    counts = adata.layers["counts"]
    props = sp.diags(1.0 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    mean_props = group_mean(props, g.group_codes, g.n_groups)
    order = [
        g.groups.index[(g.groups.cell_type == r.cell_type) & (g.groups.condition == r.condition)][0]
        for r in groups.itertuples()
    ]
    empirical = np.log(mean_props[order])
    truth = sim["true_log_expression"]
    expected = np.log(np.expm1(truth) / 1e4)
    # expected proportions recovered (library-size noise averages out over 400 cells)
    assert np.corrcoef(empirical.ravel(), expected.ravel())[0, 1] > 0.99
    lfc_emp = empirical - empirical[[0 if c == "CT0" else 5 for c in groups.cell_type]]
    mask = np.abs(sim["true_log_fold_change"]) > 0.5
    assert np.corrcoef(lfc_emp[mask], sim["true_log_fold_change"][mask])[0, 1] > 0.95


def test_reproducible_and_thread_independent():
    a = simulate(**SMALL)
    b = simulate(**{**SMALL, "n_jobs": 2, "chunk_size": 4096})
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    c = simulate(**{**SMALL, "seed": 8})
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0


def test_streaming_writer_matches_in_memory(tmp_path):
    options = {
        **SMALL,
        "chunk_size": 50,
        "doses": (1, 10),
        "n_studies": 2,
        "interaction_classes": {"synergy": 1.0, "epistasis": 2.0},
    }
    path = simulate_to_h5ad(tmp_path / "sim.h5ad", **options)
    streamed = ad.read_h5ad(path)
    memory = simulate(**options)
    assert (streamed.X != memory.X).nnz == 0
    assert (streamed.layers["counts"] != memory.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(streamed.obs, memory.obs)
    for key in ("true_effect", "interaction", "interaction_class", "interaction_coefficients"):
        np.testing.assert_array_equal(
            streamed.uns["simulation"][key], memory.uns["simulation"][key]
        )
    # the file's own settings re-simulate it (what the metric validation study relies on)
    again = simulate(**dict(streamed.uns["simulation"]["params"]))
    assert (again.X != memory.X).nnz == 0
    assert [p.name for p in tmp_path.iterdir()] == ["sim.h5ad"]  # no temporary left


def test_dose_and_study_columns():
    adata = simulate(**{**SMALL, "doses": (0.1, 1, 10), "n_studies": 3})
    obs = adata.obs
    assert set(obs["study"]) == {"study0", "study1", "study2"}
    is_combo = obs.condition.str.contains("+", regex=False)
    assert set(obs.dose[obs.condition == "control"]) == {"0"}
    assert set(obs.dose[~is_combo & (obs.condition != "control")]) == {"0.1", "1", "10"}
    assert set(obs.dose[is_combo]) == {"0.1+0.1", "1+1", "10+10"}
    sim = adata.uns["simulation"]
    assert sim["dose_scale"].shape == (9, 3) and np.allclose(sim["dose_scale"][:, -1], 1)
    assert np.all(np.diff(sim["dose_scale"], axis=1) > 0)  # monotone Hill curves
    assert sim["study_shift"].shape == (3, 80)
    validate_adata(
        adata, keys=PerturbationKeys(dose_key="dose", covariate_keys=("cell_type", "study"))
    )


def test_imbalance_and_missing_groups():
    adata = simulate(**{**SMALL, "imbalance": 1.0, "missing_fraction": 0.4})
    sizes = (
        adata.obs[adata.obs.condition != "control"]
        .groupby(["cell_type", "condition"], observed=True)
        .size()
    )
    assert sizes.std() > 0 and sizes.min() >= 3
    # every perturbation is still measured in at least one covariate
    assert adata.obs.condition.nunique() == 1 + 6 + 3


def test_bad_knobs():
    with pytest.raises(ConfigError, match="no option n_cells"):
        simulate(n_cells=10)
    with pytest.raises(ConfigError, match="n_combinations=50 exceeds the 15 possible pairs"):
        simulate(n_perturbations=6, n_combinations=50)
    with pytest.raises(ConfigError, match="must not exceed n_genes"):
        simulate(n_perturbations=30, n_genes=20)
    with pytest.raises(ConfigError, match="program_size must be between 0 and 1"):
        simulate(program_size=2.0)
    chem = simulate(
        n_perturbations=30,
        n_combinations=0,
        n_genes=20,
        n_cells_per_group=3,
        perturbation_type="chemical",
    )
    assert chem.obs.condition.str.startswith(("DRUG", "control")).all()
