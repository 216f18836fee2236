"""Known-truth oracles from the simulator: observed cells and a perfect model's cells.

:func:`simulate_with_oracle` draws, with ONE set of true effects, ``n`` observed cells per
(covariate, perturbation) group plus ``n_oracle`` further cells per group from the same
generative model. The further cells are what a perfect model would predict: cells from
each group's true population, with sampling noise independent of the observed cells'
(and ``n / n_oracle`` of it). Drawing cells, rather than writing the true profile, is what
"perfect" means for metrics of log-normalised cells: the simulator stores log1p of the
EXPECTED normalised count, not the expected log1p, whose population value it does not
know in closed form. Used to validate the noise ceiling
(``benchmarks/ceiling_validation.py``) and metrics in general.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys


def position_in_group(adata: ad.AnnData, *, keys: PerturbationKeys | None = None) -> np.ndarray:
    """Index of each cell among the cells of its (covariates, perturbation) group, in row
    order (0 for a group's first cell), vectorised."""
    codes = group_cells(adata.obs, keys if keys is not None else PerturbationKeys()).group_codes
    order = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(codes))[:-1]])
    position = np.empty(codes.size, dtype=np.int64)
    position[order] = np.arange(codes.size) - starts[codes[order]]
    return position


def first_cells(adata: ad.AnnData, n_cells: int, *, keys: PerturbationKeys | None = None):
    """The first ``n_cells`` cells of every group (all of a smaller group), as a copy."""
    return adata[position_in_group(adata, keys=keys) < int(n_cells)].copy()


def simulate_with_oracle(
    n_cells: int, n_oracle: int, **params: Any
) -> tuple[ad.AnnData, ad.AnnData]:
    """Observed truth and oracle cells drawn with the same true effects.

    Parameters
    ----------
    n_cells
        Observed cells per perturbed group.
    n_oracle
        Oracle cells per perturbed group.
    **params
        Options of :func:`pertbench.data.simulate.simulate` (``n_cells_per_group`` is
        set here; ``n_control_cells`` defaults to ``2 * n_cells``).

    Returns
    -------
    truth, oracle
        ``truth``: the controls and ``n_cells`` cells per group (with the simulation's
        ground truth in ``uns``); ``oracle``: ``n_oracle`` further cells per perturbed
        group (no controls), in the simulator's order (:func:`first_cells` takes the
        first of them).
    """
    from pertbench.data.simulate import SIMULATION_KEY, simulate

    params = {"n_control_cells": 2 * int(n_cells), **params}
    adata = simulate(n_cells_per_group=int(n_cells) + int(n_oracle), **params)
    keys = PerturbationKeys(
        perturbation_key=params.get("perturbation_key", "condition"),
        control=params.get("control", "control"),
        covariate_keys=(params.get("covariate_key", "cell_type"),),
        delimiter=params.get("delimiter", "+"),
    )
    control = group_cells(adata.obs, keys).is_control
    observed = control | (position_in_group(adata, keys=keys) < int(n_cells))
    truth = adata[observed].copy()
    oracle = adata[~observed].copy()
    del oracle.uns[SIMULATION_KEY]
    return truth, oracle
