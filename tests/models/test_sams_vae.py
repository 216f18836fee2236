"""SAMS-VAE with its defaults is not collapsed on a small simulated transfer task: its rank
metrics are clearly better than the rank of one prediction for every perturbation."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.data.keys import PerturbationKeys
from pertbench.data.simulate import simulate
from pertbench.data.splits import make_task_split
from pertbench.metrics.collapse import collapse_from_cells
from pertbench.tuning.fitting import fit_and_evaluate

RANKS = ["rmse_rank_average", "cosine_rank_logfc"]


@pytest.fixture(scope="module")
def simulated():
    keys = PerturbationKeys()
    adata = simulate(
        n_covariates=2,
        n_perturbations=16,
        n_combinations=0,
        n_cells_per_group=40,
        n_genes=100,
        effect_scale=1.5,
        seed=0,
    )
    split = make_task_split(adata, "transfer", keys=keys, fraction=0.5, seed=0).split
    return adata, split, keys


def test_sams_vae_ranks_perturbations_better_than_chance(simulated):
    adata, split, keys = simulated
    params = {"hidden_dim_x": 64, "hidden_dim_cond": 32, "latent_dim": 16}
    params |= {"n_layers_encoder_x": 1, "n_layers_decoder": 1}
    ranks, chance = [], []
    for seed in (0, 1):
        outcome = fit_and_evaluate(
            adata,
            split,
            model="sams_vae",
            params=params,
            keys=keys,
            seed=seed,
            on=("test",),
            metrics=RANKS,
            device="cpu",
            max_epochs=40,
        )
        ranks.append([outcome.values["test"][m] for m in RANKS])
        stats = collapse_from_cells(adata, outcome.predictions["test"], split, keys=keys)
        chance.append(stats["rank_chance"])
    mean = np.mean(ranks, axis=0)
    assert chance[0] == chance[1] == pytest.approx(0.375)  # 4 test perturbations per cell type
    assert (mean < chance[0] - 0.1).all(), ranks
