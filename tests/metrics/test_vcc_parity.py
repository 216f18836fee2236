"""pertbench's VCC metrics equal the cell-eval package's (0.8.2) on the same inputs.

Both tools get the same truth, predicted cells and (truth) controls; every metric of
:func:`pertbench.metrics.vcc_eval.metric_names` must agree to 1e-6 per perturbation:
on hand-made DE tables with edge cases, on a synthetic dataset (known answers, sparse
float32 and dense float64 predictions, the baseline-relative score), and on the shared
Kang and Norman data. The deliberate differences (controls from truth, PDS ties,
block means without undefined values) have their own tests.
"""

from __future__ import annotations

import importlib.metadata

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.metrics import vcc
from pertbench.metrics.vcc_eval import VCCResult, vcc_mean_baseline, vcc_metrics
from vcc_helpers import (
    CELL_EVAL_VERSION,
    cell_eval_blocks,
    cell_eval_means,
    compare,
    mixed_prediction,
    run_cell_eval,
    tie_bounds,
)

cell_eval = pytest.importorskip("cell_eval", reason="cell-eval is not installed (test extra)")
if importlib.metadata.version("cell-eval") != CELL_EVAL_VERSION:
    pytest.skip(
        f"parity is defined against cell-eval {CELL_EVAL_VERSION}, found "
        f"{importlib.metadata.version('cell-eval')}",
        allow_module_level=True,
    )

import polars as pl  # noqa: E402  (a cell-eval dependency)

KEYS = PerturbationKeys(covariate_keys=("cell_type",))
TOL = 1e-6
VCC = list(vcc.VCC_PROFILE)


def _assert_parity(result, blocks, keys=KEYS):
    """Equal to 1e-6 everywhere, except that where DE genes tie at a top-k cut the
    difference stays within what the tie can move (cell-eval's tie order is arbitrary)."""
    worst, tied = compare(result, blocks, keys)
    assert max(worst.values()) <= TOL, {m: v for m, v in worst.items() if v > TOL}
    assert all(diff <= bound + TOL for _, _, diff, bound in tied), tied
    return worst, tied


# ---------------------------------------------------------------------------------------
# DE metrics on hand-made DE tables (cell-eval's own DE pipeline, no pdex)
# ---------------------------------------------------------------------------------------
def _de_frame(lfc, fdr, perts, genes):
    n_groups, n_genes = lfc.shape
    return pl.DataFrame(
        {
            "target": np.repeat(perts, n_genes),
            "feature": np.tile(genes, n_groups),
            "log2_fold_change": lfc.ravel(),
            "p_value": fdr.ravel(),
            "fdr": fdr.ravel(),
        }
    )


def _cell_eval_de_results(t_lfc, t_fdr, p_lfc, p_fdr):
    """cell-eval's per-perturbation DE metrics and aggregate table for given DE tables."""
    n_groups, n_genes = t_lfc.shape
    perts = np.array([f"P{i}" for i in range(n_groups)])
    genes = np.array([f"G{j}" for j in range(n_genes)])
    comparison = cell_eval.initialize_de_comparison(
        real=_de_frame(t_lfc, t_fdr, perts, genes), pred=_de_frame(p_lfc, p_fdr, perts, genes)
    )
    pipeline = cell_eval.MetricPipeline(profile="de", break_on_error=True)
    pipeline.skip_metrics(["pr_auc", "roc_auc"])
    pipeline.compute_de_metrics(comparison)
    results = pipeline.get_results().to_pandas().set_index("perturbation").loc[perts]
    return results, pipeline.get_agg_results()


def _pertbench_de_metrics(t_lfc, t_fdr, p_lfc, p_fdr) -> dict[str, np.ndarray]:
    de = (t_lfc, t_fdr, p_lfc, p_fdr)
    mine = {}
    for k in (None, *vcc.FIXED_K):
        name = "N" if k is None else k
        mine[f"overlap_at_{name}"] = vcc.overlap_at_n(*de, k=k)
        mine[f"precision_at_{name}"] = vcc.precision_at_n(*de, k=k)
    mine["de_direction_match"] = vcc.de_direction_match(t_lfc, t_fdr, p_lfc)
    mine["de_spearman_lfc_sig"] = vcc.de_spearman_lfc_sig(t_lfc, t_fdr, p_lfc)
    mine["de_sig_genes_recall"] = vcc.de_sig_genes_recall(t_fdr, p_fdr)
    mine["de_nsig_counts_real"], mine["de_nsig_counts_pred"] = vcc.de_nsig_counts(t_fdr, p_fdr)
    mine["de_spearman_sig"] = np.full(len(t_lfc), vcc.de_spearman_sig(t_fdr, p_fdr))
    return mine


def test_de_metrics_equal_cell_eval_on_edge_case_tables():
    """Groups without DE genes, with one, predictions without any, +-inf and 0 fold
    changes, FDR just below 0.05 that float32 rounds to 0.05, ties among genes that are
    not DE; every |fold change| of a DE gene distinct (ties at a cut: next test)."""
    rng = np.random.default_rng(7)
    n_groups, n_genes = 7, 80

    def table():
        size = rng.permutation(np.linspace(0.05, 6.0, n_genes))  # distinct magnitudes
        lfc = np.stack([rng.permutation(size) for _ in range(n_groups)])
        lfc *= rng.choice([-1.0, 1.0], size=lfc.shape)
        fdr = rng.uniform(0, 0.15, size=lfc.shape)
        fdr[rng.random(lfc.shape) < 0.1] = 0.05 - 1e-10  # float32 rounds it to 0.05: not DE
        for g in range(n_groups):  # one +-inf and one 0 per group; tied values, not DE
            lfc[g, rng.choice(n_genes, 2, replace=False)] = [rng.choice([-1, 1]) * np.inf, 0]
            not_de = np.flatnonzero(fdr[g] > 0.06)[:4]
            lfc[g, not_de] = 1.5
        return lfc, fdr

    t_lfc, t_fdr = table()
    p_lfc, p_fdr = table()
    t_fdr[1] = 0.5  # a group without true DE genes
    t_fdr[2] = 0.5
    t_fdr[2, 3] = 0.01  # a group with one: its Spearman is undefined
    p_fdr[4] = 0.5  # a prediction without DE genes
    theirs, agg = _cell_eval_de_results(t_lfc, t_fdr, p_lfc, p_fdr)
    mine = _pertbench_de_metrics(t_lfc, t_fdr, p_lfc, p_fdr)
    for name, values in mine.items():
        np.testing.assert_allclose(values, theirs[name].to_numpy(float), atol=TOL, err_msg=name)
    assert np.isnan(mine["de_spearman_lfc_sig"][[1, 2]]).all()
    # the deliberate difference: cell-eval's mean propagates group 2's NaN, pertbench's
    # block mean leaves undefined values out
    assert np.isnan(agg.filter(agg["statistic"] == "mean")["de_spearman_lfc_sig"][0])
    expected = np.nanmean(mine["de_spearman_lfc_sig"])
    assert vcc.aggregate(mine)["de_spearman_lfc_sig"] == pytest.approx(expected)


def test_top_k_ties_at_the_cut_are_taken_in_gene_order():
    """Truth DE genes by |lfc|: G0 (3), then G1 and G2 tied (2), G3 (1); the prediction's
    two DE genes are G1 and G3. precision_at_N compares them with the truth's top two:
    G0 and ONE of G1/G2. pertbench takes G1 (gene order): 1/2; cell-eval takes the one
    polars' unstable sort puts first (0.5 or 0)."""
    t_lfc = np.array([[3.0, 2.0, -2.0, 1.0, 0.0]])
    t_fdr = np.array([[0.01, 0.01, 0.01, 0.01, 0.9]])
    p_lfc = np.array([[0.1, 5.0, 0.2, 4.0, 0.3]])
    p_fdr = np.array([[0.9, 0.01, 0.9, 0.01, 0.9]])
    theirs, _ = _cell_eval_de_results(t_lfc, t_fdr, p_lfc, p_fdr)
    assert vcc.precision_at_n(t_lfc, t_fdr, p_lfc, p_fdr)[0] == 0.5
    assert theirs["precision_at_N"].iloc[0] in (0.0, 0.5)
    sets = vcc.top_k_sets(t_lfc, t_fdr, p_lfc, p_fdr, size_from="pred")
    assert (sets.truth.tied[0], sets.truth.places[0], sets.pred.tied[0]) == (2, 1, 0)
    # no cut inside the tie (overlap_at_N takes all four truth DE genes): both agree
    assert vcc.overlap_at_n(t_lfc, t_fdr, p_lfc, p_fdr)[0] == theirs["overlap_at_N"].iloc[0]
    # G2 first in gene order: pertbench now takes G2 (0), cell-eval still either
    swapped = t_lfc[:, [0, 2, 1, 3, 4]]
    swapped_p = p_lfc[:, [0, 2, 1, 3, 4]]
    swapped_pf = p_fdr[:, [0, 2, 1, 3, 4]]
    assert vcc.precision_at_n(swapped, t_fdr, swapped_p, swapped_pf)[0] == 0.0


# ---------------------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic():
    """2 cell types x 5 perturbations and a combination; the first genes are named after
    the perturbations (target genes that the discrimination score excludes)."""
    from conftest import make_toy_adata

    truth = make_toy_adata(
        n_covariates=2, n_perturbations=5, n_genes=60, n_cells=30, combos=((0, 1),), seed=3
    )
    names = list(truth.var_names)
    names[:5] = [f"P{i}" for i in range(5)]
    truth.var_names = names
    return truth


def test_parity_synthetic_known_answers_and_predictions(synthetic, tmp_path):
    truth = synthetic
    # a perfect prediction (the observed cells): known answers in both tools
    perfect = truth[truth.obs["condition"] != "control"].copy()
    result = vcc_metrics(truth, perfect, keys=KEYS)
    blocks = cell_eval_blocks(truth, perfect, KEYS, tmp_path)
    _assert_parity(result, blocks)
    pg = result.per_group
    assert (pg["mae"] == 0).all() and (pg["discrimination_score_l1"] == 1).all()
    assert (pg["overlap_at_N"] == 1).all()
    # an imperfect prediction, dense float64 (another precision and storage for
    # cell-eval's DE than the float32 CSR truth), with swapped perturbations
    pred = mixed_prediction(truth, KEYS, seed=2, swap=2, own=0.5, dense=True, dtype=np.float64)
    result = vcc_metrics(truth, pred, keys=KEYS)
    blocks = cell_eval_blocks(truth, pred, KEYS, tmp_path)
    _assert_parity(result, blocks)
    pds = result.per_group["discrimination_score_l1"]
    assert (pds < 1).any(), "swapped perturbations must lower the discrimination score"
    for m in VCC:
        theirs = cell_eval_means(blocks, m)
        mine = result.per_covariate.set_index("label")[m]
        for label, value in theirs.items():
            assert mine[label] == pytest.approx(value, abs=TOL)


def _cell_eval_baseline(truth: ad.AnnData, keys: PerturbationKeys) -> dict[str, ad.AnnData]:
    """cell-eval's mean baseline of every block (with the block's controls, as it writes)."""
    blocks = {}
    for label in truth.obs[keys.covariate_keys[0]].unique():
        real = truth[truth.obs[keys.covariate_keys[0]] == label].copy()
        base = cell_eval.build_base_mean_adata(
            real, pert_col=keys.perturbation_key, control_pert=keys.control
        )
        base.obs[keys.covariate_keys[0]] = label
        blocks[str(label)] = base
    return blocks


def _score_parity(truth, pred, keys, tmp_path):
    """Both tools' metrics of a prediction and of cell-eval's mean baseline, per group,
    and the VCC score per block."""
    base_files = _cell_eval_baseline(truth, keys)
    non_control = [b[b.obs[keys.perturbation_key] != keys.control] for b in base_files.values()]
    result = vcc_metrics(truth, pred, keys=keys, baseline=ad.concat(non_control))
    user = cell_eval_blocks(truth, pred, keys, tmp_path)
    _assert_parity(result, user, keys)
    base = {}
    for label, base_file in base_files.items():
        real = truth[truth.obs[keys.covariate_keys[0]] == label].copy()
        base[label] = run_cell_eval(real, base_file, keys, tmp_path, de_real=user[label][2])
    baseline = VCCResult(
        per_group=result.baseline_per_group,
        per_covariate=result.baseline_per_covariate,
        ties=result.baseline_ties,
    )
    _assert_parity(baseline, base, keys)
    scores = result.scores.set_index("label")
    tied = {label for label, _, m in tie_bounds(result.ties, keys) if m in VCC}
    tied |= {label for label, _, m in tie_bounds(result.baseline_ties, keys) if m in VCC}
    for label in base_files:
        vcc_columns = ["statistic", *VCC]
        theirs = cell_eval.score_agg_metrics(
            user[label][1].select(vcc_columns), base[label][1].select(vcc_columns)
        )
        theirs = theirs.to_pandas().set_index("metric")["from_baseline"]
        if label not in tied:  # no tie at a cut: the scores agree
            for metric, value in theirs.items():
                assert scores.loc[label, metric] == pytest.approx(value, abs=TOL), label
        # with or without ties: the same formula on cell-eval's block means is its score
        model_means = {m: cell_eval_means({label: user[label]}, m)[label] for m in VCC}
        base_means = {m: cell_eval_means({label: base[label]}, m)[label] for m in VCC}
        for metric, value in vcc.vcc_score(model_means, base_means).items():
            assert theirs[metric] == pytest.approx(value, abs=TOL), (label, metric)
    return result, base_files, tied


def test_parity_synthetic_vcc_score_and_mean_baseline(synthetic, tmp_path):
    pred = mixed_prediction(synthetic, KEYS, seed=4, swap=1)
    result, base_files, tied = _score_parity(synthetic, pred, KEYS, tmp_path)
    assert not tied  # no tie at a cut: the scores were compared exactly
    assert (result.scores["avg_score"] > 0).all()  # the mixed prediction beats the mean
    # pertbench's own mean baseline is cell-eval's (cell-eval sums the group means in
    # float32 in polars' unordered group order: equal to float32 round-off)
    mine = vcc_mean_baseline(synthetic, like=synthetic, keys=KEYS)
    for label, base_file in base_files.items():
        theirs = base_file[base_file.obs["condition"] != "control"]
        theirs_X = theirs.X.toarray() if sp.issparse(theirs.X) else theirs.X
        mine_X = mine[mine.obs["cell_type"] == label].X
        assert mine_X.shape == theirs_X.shape
        np.testing.assert_allclose(mine_X[0], theirs_X[0], atol=TOL)


# ---------------------------------------------------------------------------------------
# Deliberate differences
# ---------------------------------------------------------------------------------------
def test_controls_always_come_from_truth(synthetic, tmp_path):
    """cell-eval takes the prediction file's controls (its #183/#196); pertbench ignores
    predicted controls and equals cell-eval run with the truth's controls."""
    truth = synthetic
    pred = mixed_prediction(truth, KEYS, seed=5, swap=1)

    def shifted(label, controls):
        controls = controls.copy()
        controls.X = sp.csr_matrix(controls.X) * 1.25  # still log1p-range values
        return controls

    with_truth_controls = cell_eval_blocks(truth, pred, KEYS, tmp_path)
    with_shifted = cell_eval_blocks(truth, pred, KEYS, tmp_path, controls_of=shifted)
    moved, _ = compare(vcc_metrics(truth, pred, keys=KEYS), with_shifted, KEYS)
    assert moved["overlap_at_N"] > 0.01 and moved["mae_delta"] > 0.01  # cell-eval moved
    # the same altered controls inside the prediction change nothing in pertbench
    controls = truth[truth.obs["condition"] == "control"].copy()
    controls.X = sp.csr_matrix(controls.X) * 1.25
    pred_with_controls = ad.concat([pred, controls[:, pred.var_names]])
    result = vcc_metrics(truth, pred_with_controls, keys=KEYS)
    _assert_parity(result, with_truth_controls)


def test_pds_ties_count_half(synthetic, tmp_path):
    """Two perturbations with identical observed cells: each prediction is equally close
    to both. cell-eval's rank is its position in numpy's unstable sort (0 or 1 here);
    pertbench counts the tie half."""
    block = synthetic[synthetic.obs["cell_type"] == "C0"].copy()
    p0 = block[block.obs["condition"] == "P0"]
    rest = block[~block.obs["condition"].isin(["P0", "P1"])]
    twin = p0.copy()
    twin.obs["condition"] = "P1"
    twin.obs_names = [f"{n}-twin" for n in twin.obs_names]
    truth = ad.concat([rest, p0, twin])
    pred = truth[truth.obs["condition"] != "control"].copy()
    result = vcc_metrics(truth, pred, keys=KEYS).per_group.set_index("condition")
    theirs, _, _ = cell_eval_blocks(truth, pred, KEYS, tmp_path)["C0"]
    n = len(result)
    for p in ("P0", "P1"):
        assert result.loc[p, "discrimination_score_l1"] == pytest.approx(1 - 0.5 / n)
        assert theirs.loc[p, "discrimination_score_l1"] in (1.0, pytest.approx(1 - 1 / n))
    untied = result.index.difference(["P0", "P1"])
    np.testing.assert_allclose(
        result.loc[untied, "discrimination_score_l1"],
        theirs.loc[untied, "discrimination_score_l1"],
        atol=TOL,
    )


# ---------------------------------------------------------------------------------------
# The shared real data
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_parity_kang(kang_adata, tmp_path):
    truth = kang_adata
    pred = mixed_prediction(truth, KEYS, seed=0)
    result = vcc_metrics(truth, pred, keys=KEYS)
    blocks = cell_eval_blocks(truth, pred, KEYS, tmp_path)
    _assert_parity(result, blocks)
    assert len(blocks) == 7 and (result.per_group["de_nsig_counts_real"] > 0).all()
    assert 0 < result.per_group["overlap_at_N"].min() < 1


@pytest.mark.slow
def test_parity_norman_with_vcc_score(norman_adata, tmp_path):
    truth = norman_adata
    pred = mixed_prediction(truth, KEYS, seed=0, swap=3, dense=True, dtype=np.float64)
    result, _, _ = _score_parity(truth, pred, KEYS, tmp_path)
    assert len(result.per_covariate) == 4
    assert (result.per_group["discrimination_score_l1"] < 1).any()
    assert pd.notna(result.scores["avg_score"]).all()
