"""Training deltas computed directly from cells: the independent reference of the delta
baselines' tests."""

from __future__ import annotations

import numpy as np


def training_delta(adata, split, label: str, cov: str) -> np.ndarray:
    """mean(train cells of (cov, label)) - mean(train controls of cov), dense."""
    obs, train = adata.obs, split.to_numpy() == "train"
    in_cov = train & (obs["cell_type"] == cov).to_numpy()
    X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    cells = in_cov & (obs["condition"] == label).to_numpy()
    ctrl = in_cov & (obs["condition"] == "control").to_numpy()
    return X[cells].mean(axis=0) - X[ctrl].mean(axis=0)
