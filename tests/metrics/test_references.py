"""The ceiling hook: any estimator made of replicate rows, averaged and corrected per metric."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.metrics import Evaluator
from pertbench.metrics.references import CeilingEstimator, Replicate


class BootstrapCeiling(CeilingEstimator):
    """Each group's observed cells resampled with replacement, three times; rmse halved."""

    n_replicates = 3

    def replicates(self, block):
        out = []
        for r in range(self.n_replicates):
            rows, codes = [], []
            for g in range(block.n_groups):  # seeded by the group's identity
                rng = np.random.default_rng([7, int(block.groups[g]), r])
                own = block.truth_rows[block.truth_codes == g]
                rows.append(rng.choice(own, size=own.size, replace=True))
                codes.append(np.full(own.size, g))
            out.append(Replicate(np.concatenate(rows), np.concatenate(codes)))
        return out

    def correct(self, spec, value):
        return value / 2 if spec.base == "rmse" and spec.family == "fit" else value


def test_a_bootstrap_ceiling_estimator_plugs_into_the_calibration(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=3, n_genes=15, n_cells=12)
    pred = truth[truth.obs["condition"] != "control"].copy()
    estimator = BootstrapCeiling()
    res = Evaluator(
        truth, pred, metrics="rmse_average,mae_average", ceiling=estimator, n_bootstrap=0
    ).run()
    ceiling = res.per_group[res.per_group["model"] == "ceiling"].set_index(
        ["cell_type", "condition"]
    )
    X = truth.X.toarray().astype(np.float64)
    obs = truth.obs
    group = 0
    for cov in ["C0", "C1"]:
        in_cov = (obs["cell_type"] == cov).to_numpy()
        perts = sorted(obs.loc[in_cov & (obs["condition"] != "control"), "condition"].unique())
        for pert in perts:
            own = np.flatnonzero(in_cov & (obs["condition"] == pert).to_numpy())
            full = X[own].mean(axis=0)
            rmse, mae = [], []
            for r in range(3):
                rng = np.random.default_rng([7, group, r])
                drawn = rng.choice(own, size=own.size, replace=True)
                boot = X[drawn].mean(axis=0)
                rmse.append(np.sqrt(np.mean((boot - full) ** 2)))
                mae.append(np.mean(np.abs(boot - full)))
            row = ceiling.loc[(cov, pert)]
            assert row["rmse_average"] == pytest.approx(np.mean(rmse) / 2, rel=1e-9)
            assert row["mae_average"] == pytest.approx(np.mean(mae), rel=1e-9)
            group += 1
