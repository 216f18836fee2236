"""The ceiling hook: any estimator made of replicate rows, averaged and corrected per metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


class OwnRuleCeiling(BootstrapCeiling):
    """The same replicates, merged by the estimator's own rule from the block's sides."""

    def score_block(self, view):
        from pertbench.metrics.score import SourceScores

        assert len(view.sides) == len(view.replicates) == self.n_replicates
        scored = [view.score(pred, truth) for pred, truth in view.sides]
        specs = view.settings.specs
        per_group = {
            s.name: self.combine(s, [sc.per_group[s.name] for sc in scored])
            for s in specs
            if not s.per_covariate
        }
        return SourceScores(per_group, {}, scored[0].n_perturbations)


def test_an_estimator_with_its_own_rule_sees_every_replicate(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=3, n_genes=15, n_cells=12)
    pred = truth[truth.obs["condition"] != "control"].copy()
    options = {"metrics": "rmse_average,pearson_delta,jaccard_top5", "n_bootstrap": 0}
    generic = Evaluator(truth, pred, ceiling=BootstrapCeiling(), top_k=5, **options).run()
    own = Evaluator(truth, pred, ceiling=OwnRuleCeiling(), top_k=5, **options).run()
    assert OwnRuleCeiling().scores_itself and not BootstrapCeiling().scores_itself
    pd.testing.assert_frame_equal(own.per_group, generic.per_group, check_exact=True)
