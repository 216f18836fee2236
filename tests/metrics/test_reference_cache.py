"""Reusing the noise ceiling across evaluations of the same observed cells."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pertbench.metrics import Evaluator
from pertbench.metrics.references import REFERENCE_CACHE

METRICS = "rmse_average,pearson_delta,cosine_rank_logfc,jaccard_top10"


def _noisy(truth, scale, seed):
    pred = truth[truth.obs["condition"] != "control"].copy()
    rng = np.random.default_rng(seed)
    pred.X = pred.X.toarray() + rng.normal(scale=scale, size=pred.shape).astype(np.float32)
    return pred


def _evaluate(truth, pred, *, reuse, seed=0):
    return Evaluator(
        truth,
        pred,
        metrics=METRICS,
        baselines=["no_change"],
        ceiling=True,
        ceiling_replicates=8,
        n_bootstrap=50,
        top_k=10,
        seed=seed,
        n_jobs=1,
        reuse_references=reuse,
    ).run()


def _tables(result):
    return result.summary.reset_index(drop=True), result.per_group.reset_index(drop=True)


def test_reused_ceiling_gives_the_numbers_of_a_fresh_evaluation(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=4, n_genes=40, n_cells=15)
    models = [_noisy(truth, 0.2, 1), _noisy(truth, 0.8, 2)]
    REFERENCE_CACHE.clear()
    fresh = [_tables(_evaluate(truth, pred, reuse=False)) for pred in models]
    assert not REFERENCE_CACHE._entries  # nothing is kept without the option
    reused = [_tables(_evaluate(truth, pred, reuse=True)) for pred in models]
    n_blocks = len(REFERENCE_CACHE._entries)
    assert n_blocks == 2  # one ceiling per covariate block, computed by the first model only
    for (summary, per_group), (summary_again, per_group_again) in zip(fresh, reused, strict=True):
        pd.testing.assert_frame_equal(summary, summary_again, check_exact=True)
        pd.testing.assert_frame_equal(per_group, per_group_again, check_exact=True)
    ceiling_rows = fresh[0][0]["metric"].str.startswith("ceiling/")
    assert np.isfinite(fresh[0][0].loc[ceiling_rows, "value"]).any()


def test_other_cells_or_another_seed_are_never_served_from_the_cache(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=4, n_genes=40, n_cells=15)
    pred = _noisy(truth, 0.3, 3)
    REFERENCE_CACHE.clear()
    first = _tables(_evaluate(truth, pred, reuse=True))[0]
    shifted = truth.copy()
    shifted.X = shifted.X * 1.5  # same design and obs, other observed values
    for other, seed in ((shifted, 0), (truth, 1)):
        expected = _tables(_evaluate(other, pred, reuse=False, seed=seed))[0]
        got = _tables(_evaluate(other, pred, reuse=True, seed=seed))[0]
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
        ceiling = got["metric"].str.startswith("ceiling/")
        assert not np.allclose(got.loc[ceiling, "value"], first.loc[ceiling, "value"])
    assert len(REFERENCE_CACHE._entries) == 6  # three distinct ceilings of two blocks
    REFERENCE_CACHE.clear()
