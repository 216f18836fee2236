"""cell-eval / VCC metrics: known answers and independent computations (no cell-eval).

The parity with the cell-eval package itself is in test_vcc_parity.py.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, DataValidationError, EvaluationError
from pertbench.metrics import vcc
from pertbench.metrics.vcc_de import cell_eval_de
from pertbench.metrics.vcc_eval import (
    COUNTS,
    EMPTY,
    LOG1P,
    NEGATIVE,
    NON_FINITE,
    TOO_LARGE,
    cell_scales,
    check_log1p_scale,
    vcc_mean_baseline,
    vcc_metrics,
)

KEYS = PerturbationKeys(covariate_keys=("cell_type",))


# ---------------------------------------------------------------------------------------
# DE metrics on hand-made DE tables
# ---------------------------------------------------------------------------------------
def _de_tables():
    """Two groups x 6 genes. Truth group 0: DE genes 0..3, |lfc| order 3 (inf), 0, 1/2
    (tied, gene order); group 1: no DE gene. Prediction group 0: DE genes 0, 3, 5."""
    t_lfc = np.array([[2.0, -1.0, 1.0, np.inf, 5.0, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    t_fdr = np.array([[0.01, 0.02, 0.03, 0.001, 0.5, 0.9], [0.5] * 6])
    p_lfc = np.array([[1.0, 3.0, -0.5, 4.0, 9.0, -2.0], [1.0, -1.0, 2.0, 0.0, 0.0, 0.0]])
    p_fdr = np.array([[0.01, 0.2, 0.3, 0.01, 0.5, 0.01], [0.01, 0.01, 0.5, 0.5, 0.5, 0.5]])
    return t_lfc, t_fdr, p_lfc, p_fdr


def test_top_de_genes_rank_by_abs_lfc_and_report_ties_at_the_cut():
    t_lfc, t_fdr, _, _ = _de_tables()
    # DE genes 0..3 by |lfc|: 3 (inf), 0 (2), then 1 and 2 tied (|-1| == |1|)
    top = vcc.top_de_genes(t_lfc, t_fdr, np.array([2, 5]))
    assert top.mask.astype(int).tolist() == [[1, 0, 0, 1, 0, 0], [0] * 6]
    assert top.k.tolist() == [2, 0] and top.tied.tolist() == [0, 0]  # group 1: no DE gene
    # the third place goes to the first of the two tied genes (gene order); the tie is
    # reported: 2 genes for 1 place
    third = vcc.top_de_genes(t_lfc, t_fdr, np.array([3, 0]))
    assert third.mask[0].astype(int).tolist() == [1, 1, 0, 1, 0, 0]
    assert (third.tied[0], third.places[0]) == (2, 1)
    every = vcc.top_de_genes(t_lfc, t_fdr, np.array([9, 0]))
    assert every.mask[0].sum() == 4 and every.k[0] == 4 and every.tied[0] == 0  # no cut


def test_fdr_threshold_is_compared_in_float32_like_cell_eval():
    # 0.05 - 1e-10 rounds to float32(0.05): not significant, as in cell-eval's float32 table
    fdr = np.array([[0.05 - 1e-10, 0.0499999, 0.05]])
    assert vcc.significant(fdr).tolist() == [[False, True, False]]


def test_overlap_and_precision_at_n_known_answers():
    t_lfc, t_fdr, p_lfc, p_fdr = _de_tables()
    # truth top 4: {3, 0, 1, 2}; prediction DE ranked: 3 (4.0), 5 (-2.0), 0 (1.0)
    # overlap_at_N: k' = 4 -> prediction top 4 = {3, 5, 0} -> |{3, 0}| / 4
    assert vcc.overlap_at_n(t_lfc, t_fdr, p_lfc, p_fdr).tolist() == [0.5, 0.0]
    # overlap_at_2: truth {3, 0}, prediction {3, 5} -> 1 / 2
    assert vcc.overlap_at_n(t_lfc, t_fdr, p_lfc, p_fdr, k=2)[0] == 0.5
    # precision_at_N: k' = 3 (prediction's DE genes) -> truth top 3 {3, 0, 1 (tied with 2,
    # first in gene order)} vs {3, 5, 0}
    prec = vcc.precision_at_n(t_lfc, t_fdr, p_lfc, p_fdr)
    assert prec[0] == pytest.approx(2 / 3)
    # group 1: the truth has no DE gene -> 0, not NaN (prediction has 2 DE genes)
    assert prec[1] == 0.0
    with pytest.raises(ConfigError):
        vcc.overlap_at_n(t_lfc, t_fdr, p_lfc, p_fdr, k=0)


def test_direction_recall_counts_and_spearman_against_direct_computation():
    t_lfc, t_fdr, p_lfc, p_fdr = _de_tables()
    sig = [0, 1, 2, 3]
    same = np.sign(t_lfc[0, sig]) == np.sign(p_lfc[0, sig])
    direction = vcc.de_direction_match(t_lfc, t_fdr, p_lfc)
    assert direction[0] == same.mean() and np.isnan(direction[1])
    recall = vcc.de_sig_genes_recall(t_fdr, p_fdr)
    assert recall[0] == 2 / 4 and np.isnan(recall[1])
    n_t, n_p = vcc.de_nsig_counts(t_fdr, p_fdr)
    assert n_t.tolist() == [4, 0] and n_p.tolist() == [3, 2]
    rho = vcc.de_spearman_lfc_sig(t_lfc, t_fdr, p_lfc)
    expected = stats.spearmanr(t_lfc[0, sig], p_lfc[0, sig]).statistic
    assert rho[0] == pytest.approx(expected, abs=1e-12) and np.isnan(rho[1])
    # one group with DE genes: a correlation over one point is undefined
    assert np.isnan(vcc.de_spearman_sig(t_fdr, p_fdr))
    assert vcc.de_spearman_sig(np.ones((2, 3)), p_fdr[:, :3]) == 1.0  # no DE gene anywhere


def test_de_spearman_sig_over_groups_against_scipy():
    rng = np.random.default_rng(3)
    t_fdr = rng.uniform(0, 0.2, size=(8, 30))
    p_fdr = rng.uniform(0, 0.2, size=(8, 30))
    n_t = (t_fdr < 0.05).sum(axis=1)
    n_p = (p_fdr < 0.05).sum(axis=1)
    keep = n_t > 0
    expected = stats.spearmanr(n_t[keep], n_p[keep]).statistic
    assert vcc.de_spearman_sig(t_fdr, p_fdr) == pytest.approx(expected, abs=1e-12)


def test_de_metrics_refuse_nan():
    t_lfc, t_fdr, p_lfc, p_fdr = _de_tables()
    t_lfc[0, 0] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        vcc.overlap_at_n(t_lfc, t_fdr, p_lfc, p_fdr)


# ---------------------------------------------------------------------------------------
# Mean-based metrics and the discrimination score
# ---------------------------------------------------------------------------------------
def test_mean_metrics_against_numpy_and_scipy():
    rng = np.random.default_rng(0)
    t, p = rng.normal(size=(4, 20)), rng.normal(size=(4, 20))
    c = rng.normal(size=20)
    np.testing.assert_allclose(vcc.mae(t, p), np.abs(p - t).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(vcc.mse(t, p), ((p - t) ** 2).mean(axis=1), rtol=1e-12)
    changes = vcc.change_metrics(t, p, c)
    np.testing.assert_allclose(changes["mae_delta"], np.abs(p - t).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(changes["mse_delta"], ((p - t) ** 2).mean(axis=1), rtol=1e-12)
    expected = [stats.pearsonr(p[i] - c, t[i] - c).statistic for i in range(4)]
    np.testing.assert_allclose(changes["pearson_delta"], expected, rtol=1e-10)
    pc = c + 0.5  # the prediction's controls in another precision shift its effects
    shifted = vcc.change_metrics(t, p, c, pred_control_mean=pc)
    np.testing.assert_allclose(shifted["mae_delta"], np.abs(p - pc - (t - c)).mean(axis=1))
    const = vcc.change_metrics(t, np.repeat(c[None, :], 4, axis=0), c)["pearson_delta"]
    assert np.isnan(const).all()  # a zero predicted change has no correlation


def test_discrimination_score_ranks_and_target_gene_exclusion():
    # 3 perturbations, 4 genes; gene 3 is perturbation 0's target
    truth = np.array([[1.0, 0, 0, 9], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    control = np.zeros(4)
    perfect = vcc.discrimination_score(truth, truth, control)
    assert perfect.tolist() == [1.0, 1.0, 1.0]
    # prediction 0 misses its target's huge change: with the target gene it is closest to
    # perturbation 1 (|1|+|9| vs |1|+|1|... ), without it exactly right
    pred = truth.copy()
    pred[0] = [1.0, 0, 0, 0]
    with_target = vcc.discrimination_score(truth, pred, control)
    without = vcc.discrimination_score(truth, pred, control, target_genes=[3, -1, -1])
    assert with_target[0] == 1 - 2 / 3  # two perturbations closer (distance 2 < 9)
    assert without[0] == 1.0
    # prediction 1 equidistant from its own observation and perturbation 2's: a tie
    pred[1] = [0, 0.5, 0.5, 0]
    tied = vcc.discrimination_score(truth, pred, control, target_genes=[3, -1, -1])
    assert tied[1] == 1 - 0.5 / 3
    # one perturbation in the block: rank 0 -> 1
    assert vcc.discrimination_score(truth[:1], pred[:1], control).tolist() == [1.0]
    l2 = vcc.discrimination_score(truth, truth + 0.01, control, distance="l2")
    assert l2.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ConfigError):
        vcc.discrimination_score(truth, truth, control, distance="l3")


def test_vcc_score_normalisation_known_answer():
    model = {"mae": 0.1, "discrimination_score_l1": 0.9, "overlap_at_N": 0.2}
    base = {"mae": 0.2, "discrimination_score_l1": 0.5, "overlap_at_N": 0.3}
    score = vcc.vcc_score(model, base)
    assert list(score) == ["mae", "discrimination_score_l1", "overlap_at_N", "avg_score"]
    assert score["mae"] == pytest.approx(0.5)
    assert score["discrimination_score_l1"] == pytest.approx(0.8)
    assert score["overlap_at_N"] == 0.0  # worse than the baseline: clipped at 0
    assert score["avg_score"] == pytest.approx(1.3 / 3)
    assert vcc.vcc_score({**model, "mae": np.nan}, base)["mae"] == 0.0  # NaN -> 0
    with pytest.raises(ConfigError):
        vcc.vcc_score(model, base, metrics=["nope"])


def test_aggregate_leaves_out_undefined_values():
    agg = vcc.aggregate({"a": np.array([1.0, np.nan, 3.0]), "b": np.array([np.nan])})
    assert agg["a"] == 2.0 and np.isnan(agg["b"])


# ---------------------------------------------------------------------------------------
# cell-eval's DE against scipy
# ---------------------------------------------------------------------------------------
def test_cell_eval_de_against_scipy_mannwhitneyu_and_direct_fold_changes():
    rng = np.random.default_rng(1)
    n_genes = 25
    ctrl = np.log1p(rng.poisson(1.0, size=(40, n_genes))).astype(np.float32)
    a = np.log1p(rng.poisson(1.6, size=(30, n_genes))).astype(np.float32)
    b = np.log1p(rng.poisson(0.8, size=(12, n_genes))).astype(np.float32)
    a[:, 0] = 0.0  # a gene absent from the group: -inf fold change
    ctrl[:, 1] = 0.0
    a[:, 1] = 0.0  # absent from both: fold change 0, p = 1
    X = np.vstack([ctrl, a, b])
    codes = np.r_[np.full(40, -1), np.zeros(30, int), np.ones(12, int)]
    de = cell_eval_de(sp.csr_matrix(X), codes, codes < 0, n_groups=2)
    for g, rows in enumerate((a, b)):
        p = [
            stats.mannwhitneyu(
                rows[:, j].astype(float), ctrl[:, j].astype(float), method="asymptotic"
            ).pvalue
            if np.ptp(np.r_[rows[:, j], ctrl[:, j]]) > 0
            else 1.0
            for j in range(n_genes)
        ]
        np.testing.assert_allclose(de.pvals[g], p, rtol=1e-10)
        np.testing.assert_allclose(
            de.fdr[g], stats.false_discovery_control(p).astype(np.float32), rtol=1e-6
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            lfc = np.log2(np.expm1(rows.mean(axis=0, dtype=np.float64)) / np.expm1(ctrl.mean(0)))
        lfc[np.isnan(lfc)] = 0.0
        np.testing.assert_allclose(de.log2_fold_change[g], lfc, rtol=1e-5)
    assert de.log2_fold_change.dtype == np.float32 and de.fdr.dtype == np.float32
    assert de.log2_fold_change[0, 0] == -np.inf and de.log2_fold_change[0, 1] == 0.0
    assert de.pvals[0, 1] == 1.0
    # the prediction side: a separate control matrix gives the same result
    sep = cell_eval_de(sp.csr_matrix(X[40:]), codes[40:], sp.csr_matrix(ctrl), n_groups=2)
    np.testing.assert_array_equal(sep.log2_fold_change, de.log2_fold_change)
    np.testing.assert_array_equal(sep.pvals, de.pvals)


# ---------------------------------------------------------------------------------------
# The expression scale
# ---------------------------------------------------------------------------------------
def test_cell_scales_classify_each_row():
    X = np.array(
        [
            [0.0, 0.0, 0.0],  # empty
            [0.3, 1.7, 0.0],  # log1p
            [3.0, 0.0, 12.0],  # counts (integer-valued)
            [0.5, -0.1, 0.0],  # negative
            [0.5, 16.2, 0.0],  # too large for log1p
            [np.nan, 0.2, 0.0],  # non-finite
            [250.0, 1.0, 0.0],  # counts with a large maximum
        ]
    )
    expected = [EMPTY, LOG1P, COUNTS, NEGATIVE, TOO_LARGE, NON_FINITE, COUNTS]
    assert cell_scales(X).tolist() == expected
    assert cell_scales(sp.csr_matrix(np.nan_to_num(X, nan=0.2))).tolist() == [
        *expected[:5],
        LOG1P,
        COUNTS,
    ]


@pytest.fixture
def scales():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(20, 30)).astype(np.float32)
    logs = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    return counts, logs.astype(np.float32)


def test_check_log1p_scale_accepts_log_and_refuses_each_wrong_scale(scales):
    counts, logs = scales
    labels = np.array([f"C/P{i % 3}" for i in range(20)])
    check_log1p_scale(logs, sp.csr_matrix(logs), pred_labels=labels)  # same scale: fine
    with pytest.raises(EvaluationError, match="count scale"):
        check_log1p_scale(logs, counts, pred_labels=labels)
    mixed = logs.copy()
    mixed[5] = counts[5]  # one cell of raw counts among log1p cells (cell-eval #204)
    with pytest.raises(EvaluationError, match=r"mixes scales: 1 cell\(s\) hold integer counts"):
        check_log1p_scale(logs, mixed, pred_labels=labels)
    with pytest.raises(EvaluationError, match=r"e\.g\. group C/P2"):
        check_log1p_scale(logs, mixed, pred_labels=labels)
    negative = logs.copy()
    negative[0, 0] = -0.01
    with pytest.raises(EvaluationError, match=r"negative values.*clip"):
        check_log1p_scale(logs, negative)
    large = np.where(logs > 0, logs + 10.0, 0.0)  # log1p of ~1e8 counts: not log1p-normalised
    with pytest.raises(EvaluationError, match=">= 15"):
        check_log1p_scale(logs, large)
    bad = logs.copy()
    bad[3, 3] = np.inf
    with pytest.raises(EvaluationError, match="NaN or inf"):
        check_log1p_scale(logs, bad)
    with pytest.raises(DataValidationError, match="truth is not log1p"):
        check_log1p_scale(counts, logs)


# ---------------------------------------------------------------------------------------
# The AnnData entry point
# ---------------------------------------------------------------------------------------
def _with_target_genes(adata: ad.AnnData) -> ad.AnnData:
    """Name the first genes after the perturbations, so each targets a measured gene."""
    adata = adata.copy()
    perts = sorted(p for p in adata.obs["condition"].unique() if p != "control" and "+" not in p)
    names = list(adata.var_names)
    names[: len(perts)] = perts
    adata.var_names = names
    return adata


def test_vcc_metrics_perfect_prediction_known_answers(make_toy):
    truth = _with_target_genes(make_toy(n_covariates=2, n_perturbations=4, n_genes=40))
    pred = truth[truth.obs["condition"] != "control"].copy()  # the observed cells themselves
    result = vcc_metrics(truth, pred, keys=KEYS)
    pg = result.per_group
    assert len(pg) == 8 and set(pg["cell_type"]) == {"C0", "C1"}
    assert (pg["mae"] == 0).all() and (pg["discrimination_score_l1"] == 1).all()
    has_de = pg["de_nsig_counts_real"] > 0
    assert has_de.all()
    assert (pg["overlap_at_N"] == 1).all() and (pg["precision_at_N"] == 1).all()
    assert (pg["de_direction_match"] == 1).all() and (pg["de_sig_genes_recall"] == 1).all()
    np.testing.assert_allclose(pg["pearson_delta"], 1.0, rtol=1e-12)
    assert result.per_covariate["n_perturbations"].tolist() == [4, 4]
    # a baseline equal to the model scores 0 everywhere (no gain over the baseline)
    scored = vcc_metrics(truth, pred, keys=KEYS, baseline=pred)
    assert scored.scores["avg_score"].tolist() == [0.0, 0.0]


def test_vcc_metrics_without_covariates_is_one_block(make_toy):
    truth = make_toy(n_covariates=1, n_perturbations=3, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    pred.X = pred.X * 0.8
    with_cov = vcc_metrics(truth, pred, keys=KEYS)
    none = PerturbationKeys(covariate_keys=())
    without = vcc_metrics(
        truth, pred, keys=none, baseline=vcc_mean_baseline(truth, like=truth, keys=none)
    )
    assert without.per_covariate["label"].tolist() == ["all"]
    metrics = [c for c in with_cov.per_group.columns if c not in ("cell_type", "condition")]
    pd.testing.assert_frame_equal(
        without.per_group[metrics], with_cov.per_group[metrics], check_exact=True
    )
    assert without.scores["avg_score"].notna().all()


def test_vcc_metrics_ignores_predicted_controls(make_toy):
    truth = make_toy(n_covariates=1, n_perturbations=3, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    pred.X = pred.X * 0.9
    plain = vcc_metrics(truth, pred, keys=KEYS).per_group
    controls = truth[truth.obs["condition"] == "control"].copy()
    controls.X = controls.X * 1.3  # altered predicted controls must not matter
    with_controls = ad.concat([pred, controls])
    result = vcc_metrics(truth, with_controls, keys=KEYS)
    pd.testing.assert_frame_equal(result.per_group, plain)
    assert any("control row(s) of pred ignored" in n for n in result.notes)


def test_vcc_metrics_refuses_bad_inputs(make_toy):
    truth = make_toy(n_covariates=1, n_perturbations=3, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    with pytest.raises(EvaluationError, match="missing from pred"):
        vcc_metrics(truth, pred[:, 1:].copy(), keys=KEYS)
    unseen = pred.copy()
    unseen.obs["condition"] = "P9"
    with pytest.raises(EvaluationError, match="no observed cells"):
        vcc_metrics(truth, unseen, keys=KEYS)
    with pytest.raises(EvaluationError, match="no control cells"):
        vcc_metrics(truth[truth.obs["condition"] != "control"].copy(), pred, keys=KEYS)
    counts = pred.copy()
    counts.X = counts.layers["counts"]
    with pytest.raises(EvaluationError, match="count scale"):
        vcc_metrics(truth, counts, keys=KEYS)
    with pytest.raises(EvaluationError, match="the baseline is on the count scale"):
        vcc_metrics(truth, pred, keys=KEYS, baseline=counts)  # baselines are checked too
    with pytest.raises(EvaluationError, match="no cells for 1 scored group"):
        vcc_metrics(truth, pred, keys=KEYS, baseline=pred[pred.obs["condition"] != "P1"].copy())


def test_vcc_mean_baseline_known_answer(make_toy):
    ref = make_toy(n_covariates=2, n_perturbations=3, n_genes=20)
    base = vcc_mean_baseline(ref, like=ref, keys=KEYS)
    perturbed_only = vcc_mean_baseline(ref, like=ref, keys=KEYS, include_control=False)
    X = ref.X.toarray().astype(np.float64)
    for ct in ("C0", "C1"):
        in_ct = (ref.obs["cell_type"] == ct).to_numpy()
        labels = ref.obs["condition"].to_numpy()
        means = {g: X[in_ct & (labels == g)].mean(axis=0) for g in np.unique(labels[in_ct])}
        rows = base.X[(base.obs["cell_type"] == ct).to_numpy()]
        assert rows.shape[0] == (in_ct & (labels != "control")).sum()  # one row per cell
        every = np.mean(list(means.values()), axis=0)  # cell-eval: the control group too
        np.testing.assert_allclose(rows, np.tile(every, (rows.shape[0], 1)), rtol=1e-6)
        perturbed = np.mean([m for g, m in means.items() if g != "control"], axis=0)
        mine = perturbed_only.X[(perturbed_only.obs["cell_type"] == ct).to_numpy()][0]
        np.testing.assert_allclose(mine, perturbed, rtol=1e-6)
    assert base.X.dtype == ref.X.dtype and "control" not in set(base.obs["condition"])
    with pytest.raises(EvaluationError, match="no cells for covariates 'C1'"):
        vcc_mean_baseline(ref[ref.obs["cell_type"] == "C0"].copy(), like=ref, keys=KEYS)
