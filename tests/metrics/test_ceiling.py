"""The noise ceiling against known truth: Gaussian groups with closed-form answers, the
simulator's oracle, the rank and DE rules, small groups, determinism."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from oracle_helpers import oracle_normalised_scores
from pertbench.data.oracle import first_cells, simulate_with_oracle
from pertbench.metrics import Evaluator
from pertbench.metrics import ceiling as ceil
from pertbench.metrics.de import jaccard_top_k

FAST = {"n_bootstrap": 0, "keep_aggregates": False}


def _gaussian_groups(*, n_cells=20, n_perts=12, n_genes=400, n_controls=200, sigma=1.0, seed=0):
    """Cells = known per-gene means + N(0, sigma^2); returns the AnnData and the means."""
    rng = np.random.default_rng(seed)
    means = {"control": rng.normal(3.0, 1.0, n_genes)}
    for p in range(n_perts):
        means[f"P{p}"] = means["control"] + rng.normal(0.0, 0.5, n_genes)
    labels = ["control"] * n_controls + [f"P{p}" for p in range(n_perts) for _ in range(n_cells)]
    X = np.stack([means[label] for label in labels]) + sigma * rng.normal(
        size=(len(labels), n_genes)
    )
    obs = pd.DataFrame(
        {"condition": labels, "cell_type": "C0"}, index=[f"c{i}" for i in range(len(labels))]
    )
    adata = ad.AnnData(X.astype(np.float64), obs=obs)
    adata.var_names = [f"G{g}" for g in range(n_genes)]
    return adata, means


def _ceiling_rows(result) -> pd.DataFrame:
    table = result.per_group[result.per_group["model"] == "ceiling"]
    return table.set_index("condition")


def test_fit_ceiling_matches_the_closed_form_on_gaussian_groups():
    n, sigma = 20, 1.0
    truth, means = _gaussian_groups(n_cells=n, sigma=sigma)
    pred = truth[truth.obs["condition"] != "control"].copy()
    metrics = "mse_average,rmse_average,mae_average,r2_average,pearson_average,cosine_delta"
    res = Evaluator(truth, pred, metrics=metrics, ceiling=True, **FAST).run()
    table = _ceiling_rows(res)
    control_mean = truth[truth.obs["condition"] == "control"].X.mean(axis=0)
    noise = sigma**2 / n  # a perfect model's squared error per gene, in expectation
    expected = {"mse_average": [], "rmse_average": [], "mae_average": [], "r2_average": []}
    expected.update({"pearson_average": [], "cosine_delta": []})
    for pert in table.index:
        mu = means[pert]
        observed = truth[truth.obs["condition"] == pert].X.mean(axis=0)
        n_genes = mu.size
        expected["mse_average"].append(noise)
        expected["rmse_average"].append(np.sqrt(noise))
        expected["mae_average"].append(np.sqrt(2.0 / np.pi * noise))
        sst = np.sum((observed - observed.mean()) ** 2)
        expected["r2_average"].append(1.0 - n_genes * noise / sst)
        spread = np.var(mu) * n_genes
        expected["pearson_average"].append(np.sqrt(spread / (spread + n_genes * noise)))
        shift = np.sum((mu - control_mean) ** 2)  # the delta a perfect model predicts
        expected["cosine_delta"].append(np.sqrt(shift / (shift + n_genes * noise)))
    for name, values in expected.items():
        assert table[name].mean() == pytest.approx(np.mean(values), rel=0.03), name


def test_rank_ceiling_cannot_tell_identical_perturbations_apart():
    rng = np.random.default_rng(0)
    n_genes, n_datasets, n_replicates, sd = 200, 100, 8, 0.3
    profile = rng.normal(size=n_genes)
    distinct = rng.normal(size=n_genes)
    means = np.stack([profile, profile, distinct])  # twins and a distinct one
    for base in ("rmse", "mae", "cosine", "pearson", "spearman"):
        ranks = []
        for _ in range(n_datasets):  # the expectation over observed datasets
            truth = means + sd * rng.normal(size=means.shape)  # observed with sampling noise
            deviations = sd * rng.normal(size=(n_replicates, *means.shape))  # one noise draw
            if base in ceil.SIMILARITIES:
                space = ceil.SIMILARITIES[base]
                q = [ceil.noise_ratios(truth, truth + d, np.ones(3))[space] for d in deviations]
                ranks.append(ceil.replicate_rank_scores(truth, base, ratios=np.stack(q)))
            else:  # an independent replicate of j: its observed profile plus two noise draws
                own = [ceil.row_distances(truth + np.sqrt(2) * d, truth, base) for d in deviations]
                ranks.append(ceil.replicate_rank_scores(truth, base, own_distances=np.stack(own)))
        # a perfect model ties the twins (half a rank of 3) and ranks the distinct one first
        assert np.mean(ranks, axis=0) == pytest.approx([0.5 / 3, 0.5 / 3, 0.0], abs=0.05), base


def test_rank_ceiling_matches_the_replicate_noise_to_each_pair():
    rng = np.random.default_rng(1)
    n_genes = 1000
    noise = np.array([1.0, 0.1])  # mse-scale noise of each observed profile
    shift = np.sqrt(0.4)  # the two perturbations differ by mse 0.4 > 0
    means = np.stack([np.zeros(n_genes), np.full(n_genes, shift)])
    truth = means + np.sqrt(noise)[:, None] * rng.normal(size=means.shape)
    own = (2.0 * noise)[None, :]  # an independent replicate's mse: two noise draws
    plain = ceil.replicate_rank_scores(truth, "mse", own_distances=own)
    matched = ceil.replicate_rank_scores(truth, "mse", own_distances=own, noise=noise)
    # the noisy perturbation looks closer to its quiet neighbour than to its own replicate
    # (0.4 + 1.1 < 2.0) unless the replicate carries the pair's noise (1.1), as a perfect
    # model's comparison does
    assert plain[0] == 0.5 and matched[0] == 0.0


def test_de_ceiling_recovers_a_perfect_ranking_of_sparse_effects():
    rng = np.random.default_rng(1)
    n_groups, n_genes, k = 6, 400, 20
    zeta = np.zeros((n_groups, n_genes))
    zeta[:, :k] = rng.uniform(2.0, 6.0, size=(n_groups, k))  # 5% of genes carry an effect
    z = zeta + rng.normal(size=zeta.shape)
    # a perfect model ranks genes by zeta; among the tied nulls its choice is arbitrary
    perfect = np.mean(
        [jaccard_top_k(z, zeta + 1e-9 * rng.random(zeta.shape), k) for _ in range(20)], axis=0
    )
    fdr = np.where(np.abs(z) > 3, 0.01, 0.5)
    out = ceil.de_ceiling(
        z,
        fdr,
        z,
        np.ones(n_groups),
        [f"jaccard_top{k}"],
        top_k=k,
        fdr=0.05,
        n_draws=8,
        rng=np.random.default_rng(2),
    )
    estimate = out[f"jaccard_top{k}"]
    assert estimate.mean() == pytest.approx(perfect.mean(), abs=0.06)
    # far from both the bootstrap-like optimism (1) and chance
    assert 0.2 < estimate.mean() < 0.9


def test_de_ceiling_of_a_part_of_the_groups_equals_its_values_among_all():
    """A group's posterior draws depend only on its place among all groups: evaluated
    alone, in any contiguous part, the DE ceiling is bit-identical (so blocks and chunks
    of the evaluator do not change it)."""
    rng = np.random.default_rng(3)
    n_groups, n_genes = 9, 1500  # 85 groups per draw chunk: all in one
    z = rng.normal(size=(n_groups, n_genes)) + np.where(rng.random(n_genes) < 0.05, 4.0, 0.0)
    fdr = np.where(np.abs(z) > 3, 0.01, 0.5)
    sd = rng.uniform(0.5, 1.0, n_groups)
    metrics = ["jaccard_top20", "jaccard_abs_top20", "overlap_top20", "direction_agreement"]
    options = {"top_k": 20, "fdr": 0.05, "n_draws": 16}
    stream = np.random.default_rng([0, ceil.DE_STREAM])
    whole = ceil.de_ceiling(z, fdr, z, sd, metrics, rng=stream, **options)
    for lo, hi in ((0, 1), (4, 5), (2, 7), (8, 9)):
        part = ceil.de_ceiling(
            z[lo:hi], fdr[lo:hi], z[lo:hi], sd[lo:hi], metrics,
            rng=stream, first=lo, total=n_groups, **options,
        )  # fmt: skip
        for m in metrics:
            np.testing.assert_array_equal(part[m], whole[m][lo:hi])
    assert np.isfinite(whole["jaccard_top20"]).all()


def test_oracle_scores_one_on_every_fit_aggregation():
    truth, oracle = simulate_with_oracle(
        50, 600, n_covariates=2, n_perturbations=10, n_combinations=0, n_genes=200, seed=0
    )
    half = first_cells(oracle, 300)
    perturbed = truth.obs["condition"] != "control"
    assert set(
        truth.obs.loc[perturbed].groupby(["cell_type", "condition"], observed=True).size()
    ) == {50}
    assert set(half.obs.groupby(["cell_type", "condition"], observed=True).size()) == {300}
    assert oracle.n_obs == 2 * half.n_obs and not set(oracle.obs_names) & set(truth.obs_names)
    scores = oracle_normalised_scores(truth, oracle, half, "fit")
    assert len(scores) > 20
    for name, value in scores.items():
        assert value == pytest.approx(1.0, abs=0.15), name


def test_single_cell_group_gets_a_nan_ceiling_with_a_note(make_toy):
    truth = make_toy(n_covariates=1, n_perturbations=4, n_genes=30)
    obs = truth.obs
    lone = np.flatnonzero((obs["condition"] == "P0").to_numpy())
    keep = np.ones(truth.n_obs, dtype=bool)
    keep[lone[1:]] = False
    truth = truth[keep].copy()
    pred = truth[truth.obs["condition"] != "control"].copy()
    res = Evaluator(truth, pred, metrics="all", top_k=5, ceiling=True, **FAST).run()
    table = _ceiling_rows(res)
    names = [c for c in table.columns if c not in ("model", "cell_type")]
    assert table.loc["P0", names].isna().all()
    assert (
        table.drop(index="P0")[["rmse_average", "cosine_logfc", "jaccard_top5"]].notna().all().all()
    )
    assert any("fewer than 2 observed cells" in note for note in res.notes)


def test_ceiling_is_deterministic_and_seeded(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=4, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()

    def ceiling_table(seed):
        res = Evaluator(truth, pred, top_k=5, ceiling=True, seed=seed, **FAST).run()
        return _ceiling_rows(res).drop(columns=["model", "cell_type"]).to_numpy(dtype=float)

    first, again, other = ceiling_table(3), ceiling_table(3), ceiling_table(4)
    assert np.array_equal(first, again, equal_nan=True)
    assert not np.array_equal(first, other, equal_nan=True)


def test_replicate_agreement_is_a_reference_not_the_ceiling(make_toy):
    truth = make_toy(n_covariates=1, n_perturbations=4, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    res = Evaluator(
        truth,
        pred,
        metrics="rmse_average",
        baselines=["no_change"],
        ceiling=True,
        replicate_agreement=True,
        **FAST,
    ).run()
    row = res.calibration.set_index("metric").loc["rmse_average"]
    assert "replicate_agreement/rmse_average" in set(res.summary["metric"])
    # halves carry twice the noise: they agree worse than a perfect model scores
    assert row["replicate_agreement"] > row["ceiling"]
    m, b, c = row["model"], row["no_change"], row["ceiling"]
    assert row["normalized"] == pytest.approx((m - b) / (c - b))


def test_split_rows_halves_each_group_once_and_skips_single_cells():
    codes = np.array([0, 1, 0, 2, 0, 1, -1, 0, 0])  # group 0: 5 cells, 1: 2, 2: 1
    rows_a, codes_a, rows_b, codes_b = ceil.split_rows(codes, 3, rng=np.random.default_rng(0))
    assert not set(rows_a) & set(rows_b)
    assert sorted(np.concatenate([rows_a, rows_b])) == [0, 1, 2, 4, 5, 7, 8]
    np.testing.assert_array_equal(codes[rows_a], codes_a)
    np.testing.assert_array_equal(codes[rows_b], codes_b)
    assert np.bincount(codes_a, minlength=3).tolist() == [2, 1, 0]
    assert np.bincount(codes_b, minlength=3).tolist() == [3, 1, 0]
    # seeded: the same generator state gives the same halves, another one other halves
    again = ceil.split_rows(codes, 3, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], rows_a)
    others = {
        tuple(sorted(ceil.split_rows(codes, 3, rng=np.random.default_rng(s))[0])) for s in range(20)
    }
    assert len(others) > 1
    # a single-cell group before the others shifts nothing
    first = np.array([0, 1, 1, 1, 2, 2, 2, 2])  # group 0: 1 cell, 1: 3, 2: 4
    rows_a, codes_a, rows_b, codes_b = ceil.split_rows(first, 3, rng=np.random.default_rng(1))
    assert np.bincount(codes_a, minlength=3).tolist() == [0, 1, 2]
    assert np.bincount(codes_b, minlength=3).tolist() == [0, 2, 2]
    assert 0 not in set(rows_a) | set(rows_b)
