"""Helpers shared by the model tests: transfer- and cell-type-style splits of the synthetic
data and small, fast hyperparameters for every neural model."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pertbench.data import make_split
from pertbench.data.keys import PerturbationKeys

# Small networks so one epoch takes well under a second on two cores.
SMALL = {
    "linear": {},
    "latent_additive": {"n_layers": 1, "encoder_width": 32, "latent_dim": 16},
    "decoder_only": {"n_layers": 1, "encoder_width": 32},
    "cpa": {
        "n_latent": 16,
        "hidden_dim": 32,
        "n_layers_encoder": 1,
        "n_layers_pert_emb": 1,
        "adv_classifier_hidden_dim": 16,
        "adv_classifier_n_layers": 1,
    },
    "cpa_noadv": {"n_latent": 16, "hidden_dim": 32, "n_layers_encoder": 1, "n_layers_pert_emb": 1},
    "sams_vae": {
        "latent_dim": 8,
        "hidden_dim_x": 32,
        "hidden_dim_cond": 16,
        "n_layers_encoder_x": 1,
        "n_layers_decoder": 1,
    },
    "biolord": {"n_layers": 1, "encoder_width": 32, "latent_dim": 8},
}
NEURAL_MODELS = tuple(SMALL)

# scGen / scPRAM (latent-arithmetic VAEs) at test size.
LATENT_VAE_SMALL = {"n_hidden": 32, "n_latent": 8, "batch_size": 32, "max_epochs": 2}


def celltype_split(adata, heldout: str, *, keys: PerturbationKeys | None = None) -> pd.Series:
    """All perturbed cells of ``heldout`` in test, everything else in train."""
    keys = keys or PerturbationKeys()
    obs = adata.obs
    test = (obs[keys.covariate_keys[0]] == heldout) & (obs[keys.perturbation_key] != keys.control)
    return pd.Series(np.where(test, "test", "train"), index=adata.obs_names, dtype=object)


def transfer_split(adata, *, heldout_per_covariate: int = 2, val_fraction: float = 0.1, seed=0):
    """Hold out different perturbations in each cell type (each seen in another one);
    controls stay in train (a random ``val_fraction`` of training cells goes to val)."""
    rng = np.random.default_rng(seed)
    obs = adata.obs
    split = make_split(adata.obs_names, "train")
    perts = sorted(p for p in obs.condition.unique() if p != "control" and "+" not in p)
    cell_types = sorted(obs.cell_type.unique())
    for k, cell_type in enumerate(cell_types):
        start = k * heldout_per_covariate
        held = perts[start : start + heldout_per_covariate]
        mask = (obs.cell_type == cell_type) & obs.condition.isin(held)
        split[mask.to_numpy()] = "test"
    train = (split == "train").to_numpy()
    val = train & (rng.random(adata.n_obs) < val_fraction)
    split[val] = "val"
    return split


def group_means(adata, obs_keys=("cell_type", "condition")) -> pd.DataFrame:
    """Mean expression per (cell_type, condition), rows indexed by those keys."""
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    frame = pd.DataFrame(X, columns=adata.var_names)
    for key in obs_keys:
        frame[key] = adata.obs[key].astype(str).to_numpy()
    return frame.groupby(list(obs_keys)).mean()
