"""The Evaluator end to end: numbers by hand, group/gene matching, calibration, edge cases."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from pertbench.data import make_split
from pertbench.errors import ConfigError, EvaluationError
from pertbench.metrics import Evaluator, evaluate, hpo_objective, resolve_metrics
from pertbench.metrics.de import jaccard_top_k
from pertbench.metrics.rank import rank_scores

FAST = {"n_bootstrap": 50}


def _perturbed(adata: ad.AnnData) -> ad.AnnData:
    return adata[adata.obs["condition"] != "control"].copy()


def _noisy_prediction(adata: ad.AnnData, seed: int = 0, scale: float = 0.3) -> ad.AnnData:
    pred = _perturbed(adata)
    rng = np.random.default_rng(seed)
    pred.X = pred.X.toarray() + rng.normal(scale=scale, size=pred.shape).astype(np.float32)
    return pred


def _group_means(adata, mask):
    return np.asarray(adata.X[np.asarray(mask)].mean(axis=0), dtype=np.float64).ravel()


def _by_hand(truth, pred, cov, pert):
    """average, delta, logfc, var of one group for truth and pred, by plain numpy."""
    t_obs, p_obs = truth.obs, pred.obs
    t_cells = truth.X[((t_obs.cell_type == cov) & (t_obs.condition == pert)).to_numpy()]
    p_cells = pred.X[((p_obs.cell_type == cov) & (p_obs.condition == pert)).to_numpy()]
    t_cells = t_cells.toarray() if sp.issparse(t_cells) else t_cells
    p_cells = p_cells.toarray() if sp.issparse(p_cells) else p_cells
    t_cells, p_cells = t_cells.astype(np.float64), p_cells.astype(np.float64)
    ctrl = _group_means(truth, (t_obs.cell_type == cov) & (t_obs.condition == "control"))
    out = {}
    for side, cells in (("t", t_cells), ("p", p_cells)):
        m = cells.mean(axis=0)
        out[side] = {
            "average": m,
            "delta": m - ctrl,
            "logfc": np.log2(np.maximum(m, 0) + 0.1) - np.log2(ctrl + 0.1),
            "var": cells.var(axis=0),
        }
    return out


def test_fit_and_rank_metrics_match_a_by_hand_computation(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=5, n_genes=40)
    pred = _noisy_prediction(truth)
    result = Evaluator(truth, pred, top_k=10, **FAST).run()
    table = result.per_group.set_index(["cell_type", "condition"])
    assert len(table) == 10
    hand = {}
    for cov, pert in table.index:
        h = _by_hand(truth, pred, cov, pert)
        hand[(cov, pert)] = h
        for agg in ("average", "delta", "logfc", "var"):
            p, t = h["p"][agg], h["t"][agg]
            row = table.loc[(cov, pert)]
            assert row[f"rmse_{agg}"] == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-6)
            assert row[f"mae_{agg}"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-6)
            assert row[f"pearson_{agg}"] == pytest.approx(np.corrcoef(p, t)[0, 1], rel=1e-6)
            assert row[f"spearman_{agg}"] == pytest.approx(stats.spearmanr(p, t)[0], rel=1e-6)
            r2 = 1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2)
            assert row[f"r2_{agg}"] == pytest.approx(r2, rel=1e-6, abs=1e-9)
    # rank of cosine on logfc in covariate C1, by hand
    perts = [p for c, p in table.index if c == "C1"]
    D = np.array(
        [
            [
                -np.dot(hand[("C1", i)]["p"]["logfc"], hand[("C1", j)]["t"]["logfc"])
                / np.linalg.norm(hand[("C1", i)]["p"]["logfc"])
                / np.linalg.norm(hand[("C1", j)]["t"]["logfc"])
                for j in perts
            ]
            for i in perts
        ]
    )
    expected = rank_scores(D)
    got = table.loc[[("C1", p) for p in perts], "cosine_rank_logfc"].to_numpy()
    np.testing.assert_allclose(got, expected)
    # summary value = mean over groups
    assert result.value("rmse_average") == pytest.approx(table["rmse_average"].mean())


def test_de_metrics_match_scanpy_based_computation(make_toy):
    import scanpy as sc

    truth = make_toy(n_covariates=1, n_perturbations=4, n_genes=40)
    pred = _noisy_prediction(truth, scale=0.5)
    result = Evaluator(truth, pred, metrics="de", top_k=8, **FAST).run()
    controls = truth[truth.obs["condition"] == "control"]

    def scanpy_z(cells: ad.AnnData, label: str) -> np.ndarray:
        both = ad.concat([controls, cells], index_unique="-")
        both.X = sp.csr_matrix(both.X).astype(np.float32)
        both.obs["g"] = pd.Categorical(np.where(both.obs["condition"] == "control", "ctrl", label))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                both,
                "g",
                groups=[label],
                reference="ctrl",
                method="wilcoxon",
                tie_correct=True,
                n_genes=both.n_vars,
            )
        r = both.uns["rank_genes_groups"]
        s = pd.Series(
            np.asarray(r["scores"][label], dtype=float), index=np.asarray(r["names"][label])
        )
        return s[truth.var_names].to_numpy()

    for pert in ["P0", "P1", "P2", "P3"]:
        tz = scanpy_z(truth[truth.obs["condition"] == pert], pert)
        pz = scanpy_z(pred[pred.obs["condition"] == pert], pert)
        row = result.per_group.set_index("condition").loc[pert]
        assert row["jaccard_top8"] == pytest.approx(jaccard_top_k(tz, pz, 8)[0])
        assert row["jaccard_abs_top8"] == pytest.approx(jaccard_top_k(tz, pz, 8, absolute=True)[0])


def test_truth_against_itself_and_a_collapsed_model(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=6, n_genes=40)
    rng = np.random.default_rng(0)
    split = make_split(truth.obs_names, "train")
    perturbed = (truth.obs["condition"] != "control").to_numpy()
    split[perturbed | (rng.random(truth.n_obs) < 0.5)] = "test"
    test_cells = truth[(split == "test").to_numpy() & perturbed].copy()
    options = {"split": split, "baselines": ["no_change"], "ceiling": True, "top_k": 10, **FAST}

    itself = Evaluator(truth, test_cells, **options).run()
    rank_names = [s.name for s in resolve_metrics("rank") if s.name != "matrix_distance"]
    ceiling = itself.calibration.set_index("metric")["ceiling"]
    for name in rank_names:
        assert itself.value(name) == 0.0, name
        # 1 where the ceiling ranks perfectly too; above 1 where it does not
        if ceiling[name] == 0.0:
            assert itself.value(f"normalized/{name}") == pytest.approx(1.0), name
        else:
            assert itself.value(f"normalized/{name}") > 1.0, name
    for name in ("rmse_rank_average", "cosine_rank_logfc"):  # PerturBench's headline ranks
        assert ceiling[name] == 0.0
        assert itself.value(f"normalized/{name}") == pytest.approx(1.0)
    assert itself.value("rmse_average") == 0.0 and itself.value("cosine_logfc") == pytest.approx(
        1.0
    )
    assert itself.value("jaccard_top10") == 1.0 and itself.value("matrix_distance") == 0.0

    collapsed = test_cells.copy()
    X = collapsed.X.toarray()
    for cov in ("C0", "C1"):
        rows = (collapsed.obs["cell_type"] == cov).to_numpy()
        X[rows] = X[rows].mean(axis=0)  # one profile per covariate, whatever the perturbation
    collapsed.X = X
    res = Evaluator(truth, collapsed, **options).run()
    n = 6
    for name in rank_names:
        assert res.value(name) == pytest.approx((n - 1) / (2 * n)), name
        assert res.value(f"normalized/{name}") == pytest.approx(0.0, abs=1e-12), name
    calib = res.calibration.set_index("metric")
    assert calib.loc["rmse_rank_average", "ceiling"] == 0.0


def test_genes_are_matched_by_name(make_toy):
    truth = make_toy(n_genes=30)
    pred = _noisy_prediction(truth)
    shuffled = pred[:, np.random.default_rng(1).permutation(30)].copy()
    a = Evaluator(truth, pred, top_k=5, **FAST).run()
    b = Evaluator(truth, shuffled, top_k=5, **FAST).run()
    pd.testing.assert_frame_equal(a.summary, b.summary, rtol=1e-9)
    with pytest.raises(EvaluationError, match=r"missing from pred, e\.g\. G3"):
        Evaluator(truth, pred[:, [g for g in pred.var_names if g != "G3"]].copy()).run()
    extra = ad.AnnData(
        X=np.hstack([pred.X, pred.X[:, :1]]),
        obs=pred.obs.copy(),
        var=pd.DataFrame(index=[*pred.var_names, "EXTRA"]),
    )
    res = Evaluator(truth, extra, top_k=5, **FAST).run()
    assert any("1 gene(s) of pred" in n for n in res.notes)
    subset = Evaluator(truth, pred, genes=["G1", "G2", "G5"], metrics="fit", **FAST).run()
    assert subset.settings["n_genes"] == 3


def test_missing_groups_fail_or_are_skipped(make_toy):
    truth = make_toy(n_perturbations=4)
    pred = _noisy_prediction(truth)
    strange = pred[:3].copy()
    strange.obs["condition"] = "UNSEEN"
    both = ad.concat([pred, strange], index_unique="-")
    with pytest.raises(EvaluationError, match="C0:UNSEEN"):
        Evaluator(truth, both).run()
    res = Evaluator(truth, both, skip_missing=True, top_k=5, **FAST).run()
    assert res.skipped[["cell_type", "condition"]].values.tolist() == [["C0", "UNSEEN"]]
    assert len(res.per_group) == 8
    # with a split, groups of the split without prediction are missing
    split = make_split(truth.obs_names, "train")
    split[(truth.obs["condition"].isin(["P0", "P1"])).to_numpy()] = "test"
    only_p0 = pred[pred.obs["condition"] == "P0"].copy()
    with pytest.raises(EvaluationError, match="has no prediction"):
        Evaluator(truth, only_p0, split=split).run()
    skipped = Evaluator(truth, only_p0, split=split, skip_missing=True, top_k=5, **FAST).run()
    assert set(skipped.skipped["condition"]) == {"P1"}
    assert set(skipped.per_group["condition"]) == {"P0"}


def test_truth_may_be_the_whole_dataset(make_toy):
    truth = make_toy(n_perturbations=5)
    pred = _noisy_prediction(truth)
    pred = pred[pred.obs["condition"].isin(["P1", "P3"])].copy()
    res = Evaluator(truth, pred, top_k=5, **FAST).run()
    assert sorted(res.per_group["condition"].unique()) == ["P1", "P3"]
    # controls come from the truth even when pred carries its own control rows
    with_ctrl = ad.concat([pred, truth[truth.obs["condition"] == "control"][:5]], index_unique="-")
    res2 = Evaluator(truth, with_ctrl, top_k=5, **FAST).run()
    pd.testing.assert_frame_equal(res.per_group, res2.per_group)
    assert any("predicted control row" in n for n in res2.notes)


def test_nan_predictions_name_the_group(make_toy):
    truth = make_toy()
    pred = _noisy_prediction(truth)
    row = np.flatnonzero(
        (pred.obs["cell_type"] == "C1").to_numpy() & (pred.obs["condition"] == "P2").to_numpy()
    )[0]
    pred.X[row, 3] = np.nan
    with pytest.raises(EvaluationError, match="C1:P2"):
        Evaluator(truth, pred).run()
    pred.X[row, 3] = np.inf
    with pytest.raises(EvaluationError, match="NaN or inf"):
        Evaluator(truth, pred).run()


def test_edge_cases_give_defined_values(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=3, n_genes=20, n_cells=10)
    truth.X = truth.X.toarray()
    truth.X[:, 0] = 0.0  # zero-variance gene
    truth.X[:, 1] = 2.0  # constant non-zero gene
    obs = truth.obs
    # C1 keeps a single perturbation; P0 in C0 has a single cell
    keep = ~((obs["cell_type"] == "C1") & obs["condition"].isin(["P1", "P2"])).to_numpy()
    single = np.flatnonzero(((obs["cell_type"] == "C0") & (obs["condition"] == "P0")).to_numpy())
    keep[single[1:]] = False
    truth = truth[keep].copy()
    pred = _perturbed(truth)
    pred.X = np.repeat(pred.X[:1], pred.n_obs, axis=0)  # identical predictions everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = Evaluator(truth, pred, metrics="all", top_k=5, ceiling=True, **FAST).run()
    table = res.per_group[res.per_group["model"] == "model"].set_index(["cell_type", "condition"])
    fit_cols = [s.name for s in resolve_metrics("fit")]
    assert np.isfinite(table[fit_cols].to_numpy()).all()
    assert np.isfinite(table[["edistance", "mmd", "mean_var_kde", "jaccard_top5"]].to_numpy()).all()
    # one perturbation in C1: rank metrics are missing (NaN), explained in the notes
    assert (
        table.loc[("C1", "P0"), "rmse_rank_average"] != table.loc[("C1", "P0"), "rmse_rank_average"]
    )
    assert any("fewer than 2 evaluated perturbations: C1" in n for n in res.notes)
    assert not np.isnan(table.loc[("C0", "P1"), "rmse_rank_average"])
    # the single-cell group has zero variance but defined metrics; no ceiling for it
    assert table.loc[("C0", "P0"), "rmse_var"] >= 0
    ceiling = res.per_group[res.per_group["model"] == "ceiling"].set_index(
        ["cell_type", "condition"]
    )
    assert np.isnan(ceiling.loc[("C0", "P0"), "rmse_average"])
    assert any("fewer than 2 observed cells" in n for n in res.notes)


def test_write_outputs_atomically(make_toy, tmp_path):
    truth = make_toy()
    pred = _noisy_prediction(truth)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "summary.csv").write_text("old\n")
    res = Evaluator(truth, pred, top_k=5, **FAST).run()
    res.write(out)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["metric", "value", "ci_low", "ci_high"]
    pd.testing.assert_frame_equal(summary, res.summary, check_dtype=False, rtol=1e-12)
    per_group = pd.read_csv(out / "per_group.csv")
    assert list(per_group.columns[:3]) == ["cell_type", "condition", "rmse_average"]
    info = json.loads((out / "evaluation.json").read_text())
    assert info["n_groups"] == 12 and info["settings"]["top_k"] == 5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.csv", "per_group.csv", "per_covariate.csv", "evaluation.json"]
    )
    no_ci = Evaluator(truth, pred, top_k=5, n_bootstrap=0).run()
    assert list(no_ci.summary.columns) == ["metric", "value"]


def test_reproducible_and_metric_selection(make_toy):
    truth = make_toy()
    pred = _noisy_prediction(truth)
    a = Evaluator(truth, pred, metrics="all", top_k=5, seed=3, **FAST).run()
    b = Evaluator(truth, pred, metrics="all", top_k=5, seed=3, **FAST).run()
    pd.testing.assert_frame_equal(a.summary, b.summary)
    pd.testing.assert_frame_equal(a.per_group, b.per_group)
    sel = Evaluator(truth, pred, metrics="rmse_average,cosine_rank_logfc", **FAST).run()
    assert sel.summary["metric"].tolist() == ["rmse_average", "cosine_rank_logfc"]
    assert sel.value("rmse_average") == pytest.approx(a.value("rmse_average"))
    assert hpo_objective(a) == pytest.approx(
        a.value("rmse_average") + 0.1 * a.value("rmse_rank_average")
    )
    with pytest.raises(ConfigError, match="unknown metric 'rmse_avg'"):
        Evaluator(truth, pred, metrics="rmse_avg").run()
    with pytest.raises(ConfigError, match="split"):
        Evaluator(truth, pred, baselines=True).run()
    same = Evaluator(truth, pred, baselines=["no_change"], model_name="no_change", **FAST).run()
    assert set(same.per_group["model"]) == {"no_change (model)", "no_change"}
    assert {"no_change (model)", "no_change"} <= set(same.calibration.columns)
    default = {s.name for s in resolve_metrics("default")}
    assert {"rmse_average", "cosine_rank_logfc", "matrix_distance", "jaccard_top100"} <= default
    assert "edistance" not in default and "rmse_logp" not in default
    assert "edistance" in {s.name for s in resolve_metrics("all")}
    res = evaluate(truth, pred, metrics="fit", **FAST)
    assert set(res.summary["metric"]) == {s.name for s in resolve_metrics("fit")}


def test_baselines_on_a_split_match_their_definitions(make_toy):
    truth = make_toy(n_covariates=3, n_perturbations=4, n_genes=30)
    obs = truth.obs
    split = make_split(truth.obs_names, "train")
    held = (obs["cell_type"] == "C2").to_numpy() & obs["condition"].isin(["P0", "P1"]).to_numpy()
    split[held] = "test"
    pred = _noisy_prediction(truth[held].copy())
    res = Evaluator(truth, pred, split=split, baselines=True, ceiling=True, top_k=5, **FAST).run()
    pg = res.per_group.set_index(["model", "cell_type", "condition"])
    ctrl = _group_means(truth, (obs["cell_type"] == "C2") & (obs["condition"] == "control"))
    t_p0 = _group_means(truth, held & (obs["condition"] == "P0").to_numpy())
    # no_change predicts the control profile of C2
    expected = np.sqrt(np.mean((ctrl - t_p0) ** 2))
    assert pg.loc[("no_change", "C2", "P0"), "rmse_average"] == pytest.approx(expected, rel=1e-5)
    assert pg.loc[("no_change", "C2", "P0"), "cosine_delta"] == 0.0  # zero predicted change
    train = (split == "train").to_numpy()

    def delta(cov):
        cells = train & (obs["cell_type"] == cov).to_numpy()
        return _group_means(truth, cells & (obs["condition"] == "P0").to_numpy()) - _group_means(
            truth, cells & (obs["condition"] == "control").to_numpy()
        )

    pm = ctrl + (delta("C0") + delta("C1")) / 2
    assert pg.loc[("perturbation_mean", "C2", "P0"), "rmse_average"] == pytest.approx(
        np.sqrt(np.mean((pm - t_p0) ** 2)), rel=1e-4
    )
    cm = _group_means(
        truth,
        train & (obs["cell_type"] == "C2").to_numpy() & (obs["condition"] != "control").to_numpy(),
    )
    assert pg.loc[("covariate_mean", "C2", "P0"), "rmse_average"] == pytest.approx(
        np.sqrt(np.mean((cm - t_p0) ** 2)), rel=1e-4
    )
    cal = res.calibration.set_index("metric")
    assert {
        "model",
        "no_change",
        "perturbation_mean",
        "covariate_mean",
        "ceiling",
        "normalized",
    } <= set(cal.columns)
    m, b, c = cal.loc["rmse_average", ["model", "no_change", "ceiling"]]
    assert cal.loc["rmse_average", "normalized"] == pytest.approx((m - b) / (c - b))
    assert res.value("no_change/rmse_average") == pytest.approx(b)
    assert set(res.per_group["model"]) == {
        "model",
        "no_change",
        "perturbation_mean",
        "covariate_mean",
        "ceiling",
    }


def test_norman_model_equals_its_baseline(norman_adata):
    """On real data: the perturbation_mean model scored as a model equals the baseline."""
    from pertbench.models import create_model

    adata = norman_adata[norman_adata.obs["dataset"] == "mcfaline23"].copy()
    obs = adata.obs
    split = make_split(adata.obs_names, "train")
    held = (obs["cell_type"] == "A172").to_numpy() & obs["condition"].isin(
        ["MAPK1", "SGK1", "PLK4", "TGFBR2"]
    ).to_numpy()
    ctrl_test = (obs["cell_type"] == "A172").to_numpy() & (obs["condition"] == "control").to_numpy()
    ctrl_test &= np.random.default_rng(0).random(adata.n_obs) < 0.5
    split[held | ctrl_test] = "test"
    model = create_model("perturbation_mean").fit(adata, split, progress=False)
    pred = model.predict_split(adata, split, on="test")
    res = Evaluator(
        adata,
        pred,
        split=split,
        baselines=["no_change", "perturbation_mean"],
        ceiling=True,
        n_bootstrap=100,
        top_k=50,
    ).run()
    cal = res.calibration.set_index("metric")
    np.testing.assert_allclose(cal["model"], cal["perturbation_mean"], rtol=1e-5, atol=1e-6)
    assert res.value("cosine_logfc") > res.value("no_change/cosine_logfc")
    assert res.settings["n_groups"] == 4
    # the numbers themselves, by hand on the real data (float64 X)
    table = res.per_group[res.per_group["model"] == "model"].set_index("condition")
    test = (split == "test").to_numpy()
    ctrl = _group_means(adata, test & (obs["condition"] == "control").to_numpy())
    hand = {}
    for pert in table.index:
        t = _group_means(adata, held & (obs["condition"] == pert).to_numpy())
        p = np.asarray(pred.X[(pred.obs["condition"] == pert).to_numpy()], dtype=np.float64).mean(
            axis=0
        )
        lt = np.log2(t + 0.1) - np.log2(ctrl + 0.1)
        lp = np.log2(np.maximum(p, 0) + 0.1) - np.log2(ctrl + 0.1)
        hand[pert] = (lp, lt)
        assert table.loc[pert, "rmse_average"] == pytest.approx(
            np.sqrt(np.mean((p - t) ** 2)), rel=1e-5
        )
        cos = lp @ lt / np.linalg.norm(lp) / np.linalg.norm(lt)
        assert table.loc[pert, "cosine_logfc"] == pytest.approx(cos, rel=1e-5)
    perts = list(table.index)
    D = np.array(
        [
            [
                -(hand[i][0] @ hand[j][1]) / np.linalg.norm(hand[i][0]) / np.linalg.norm(hand[j][1])
                for j in perts
            ]
            for i in perts
        ]
    )
    np.testing.assert_allclose(table.loc[perts, "cosine_rank_logfc"], rank_scores(D))


def test_other_keys_no_covariates_and_two_covariates(make_toy):
    from pertbench.data import PerturbationKeys

    truth = make_toy(n_covariates=2, n_perturbations=4, n_genes=20)
    truth.obs = truth.obs.rename(columns={"condition": "pert", "cell_type": "line"})
    truth.obs["pert"] = truth.obs["pert"].replace({"control": "NT"})
    rng = np.random.default_rng(0)
    truth.obs["treatment"] = np.where(rng.random(truth.n_obs) < 0.5, "dmso", "drug")
    pred = truth[truth.obs["pert"] != "NT"].copy()
    two = PerturbationKeys(
        perturbation_key="pert", control="NT", covariate_keys=("line", "treatment")
    )
    res = Evaluator(truth, pred, keys=two, top_k=5, **FAST).run()
    assert list(res.per_group.columns[:3]) == ["line", "treatment", "pert"]
    assert len(res.per_group) == 2 * 2 * 4 and res.value("rmse_rank_average") == 0.0
    assert list(res.per_covariate.columns[:2]) == ["line", "treatment"]
    none = PerturbationKeys(perturbation_key="pert", control="NT", covariate_keys=())
    res0 = Evaluator(truth, pred, keys=none, top_k=5, **FAST).run()
    assert list(res0.per_group.columns[:1]) == ["pert"] and len(res0.per_group) == 4
    assert res0.value("rmse_average") == 0.0
