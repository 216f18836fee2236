"""A toy dataset with some perturbations of one cell type held out: the shared set-up of
evaluator and CLI tests."""

from __future__ import annotations

from pertbench.data import make_split


def toy_with_held_out(make_toy, *, n_perturbations: int, n_genes: int, held=("P0", "P1", "P2")):
    """Toy truth (2 cell types), a split with ``held`` of cell type C1 as test and the
    rest train, and the held-out mask."""
    truth = make_toy(n_covariates=2, n_perturbations=n_perturbations, n_genes=n_genes)
    obs = truth.obs
    split = make_split(truth.obs_names, "train")
    mask = (obs["cell_type"] == "C1").to_numpy() & obs["condition"].isin(list(held)).to_numpy()
    split[mask] = "test"
    return truth, split, mask
