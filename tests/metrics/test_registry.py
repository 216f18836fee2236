"""The metric registry: specs, profiles, plug-ins through entry points, directions."""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
import pytest

from pertbench.cli.main import main
from pertbench.errors import ConfigError
from pertbench.metrics import Evaluator, catalog
from pertbench.metrics.catalog import MetricSpec
from pertbench.report.html import lower_is_better
from split_helpers import toy_with_held_out

PLUGIN_MODULE = '''
import numpy as np
from pertbench.metrics.catalog import MetricSpec, register_profile


def max_abs_error(pair):
    """Largest absolute error over genes of the delta profile, per group."""
    return np.abs(pair.pred - pair.truth).max(axis=1)


SPECS = [
    MetricSpec("max_abs_error_delta", "toy", "max_abs_error", "delta", needs="profiles",
               compute=max_abs_error, best=0.0, description="largest delta error"),
    MetricSpec("rmse_rank_twice", "toy", "rmse", "average", needs="distances",
               distance="rmse", compute=lambda ranks: 2 * ranks),
]
BROKEN = MetricSpec("broken_metric", "toy", "x", None, needs="nonsense", compute=max)

# a plug-in may also name a profile of its metrics (selectable with --profile)
register_profile("toy_profile", ["max_abs_error_delta", "rmse_average"], replace=True)
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A tiny installed distribution declaring metrics in the ``pertbench.metrics`` group."""
    (tmp_path / "toy_metrics.py").write_text(PLUGIN_MODULE)
    dist = tmp_path / "toy_metrics-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-metrics\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [pertbench.metrics]
            toy = toy_metrics:SPECS
            broken = toy_metrics:BROKEN
            missing = toy_metrics_not_there:SPECS
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    catalog.reload_plugins()
    yield
    catalog.reload_plugins()


def test_every_builtin_spec_is_valid_and_self_consistent():
    cat = catalog.catalogue(top_k=20)
    # fit and rank on 5 aggregations, matrix_distance, 4 DE, 3 distribution, and the
    # reference family: 4 centroid deltas, centroid_accuracy, systematic_variation
    assert len(cat) == 5 * 7 * 2 + 1 + 4 + 3 + 6
    for spec in cat.values():
        spec.check()
        centroid = spec.family == "reference" and spec.name != "centroid_accuracy"
        assert spec.source == "pertbench"
        assert spec.reference == ("centroid" if centroid else "control")
        assert spec.diagnostic == (spec.name == "systematic_variation")
        if spec.best is not None and spec.family == "fit":
            assert spec.best == (1.0 if spec.higher_is_better else 0.0)
    assert cat["jaccard_top20"].needs == "de" and cat["cosine_rank_logfc"].distance == "cosine"
    assert catalog.direction("normalized/rmse_average") == "higher"
    assert catalog.direction("normalized_best/rmse_average") == "higher"
    assert catalog.direction("no_change/pearson_delta") == "higher"
    assert catalog.direction("jaccard_top7") == "higher"  # any k
    assert catalog.direction("not_a_metric") is None
    with pytest.raises(ConfigError, match="needs"):
        MetricSpec("x", "toy", "x", None, needs="everything", compute=max).check()


def test_plugin_metrics_appear_in_the_catalogue_and_are_computed(plugin, make_toy):
    with pytest.warns(catalog.MetricPluginWarning, match="left out"):
        cat = catalog.catalogue()
    assert {"max_abs_error_delta", "rmse_rank_twice"} <= set(cat)
    assert cat["max_abs_error_delta"].source == "toy-metrics"
    problems = catalog.plugin_problems()
    assert any("broken" in p for p in problems) and any("missing" in p for p in problems)
    assert "broken_metric" not in cat
    assert lower_is_better("max_abs_error_delta") is True and lower_is_better("nope") is None

    truth = make_toy(n_covariates=2, n_perturbations=4, n_genes=20)
    pred = truth[truth.obs["condition"] != "control"].copy()
    pred.X = pred.X.toarray() + np.random.default_rng(0).normal(0, 0.3, pred.shape)
    res = Evaluator(truth, pred, metrics=["toy", "rmse_rank_average"], n_bootstrap=0).run()
    table = res.per_group.set_index(["cell_type", "condition"])

    def mean(adata, **labels):
        mask = np.all([(adata.obs[k] == v).to_numpy() for k, v in labels.items()], axis=0)
        return np.asarray(adata.X[mask].mean(axis=0), dtype=np.float64).ravel()

    for (cov, pert), row in table.iterrows():  # the plug-in metric by hand
        ctrl = mean(truth, cell_type=cov, condition="control")
        t = mean(truth, cell_type=cov, condition=pert) - ctrl
        p = mean(pred, cell_type=cov, condition=pert) - ctrl
        assert row["max_abs_error_delta"] == pytest.approx(np.abs(p - t).max(), rel=1e-5)
    np.testing.assert_array_equal(table["rmse_rank_twice"], 2 * table["rmse_rank_average"])
    all_names = {s.name for s in catalog.resolve_metrics("all")}
    assert "max_abs_error_delta" in all_names
    chosen = [s.name for s in catalog.resolve_metrics("toy_profile")]
    assert chosen == ["rmse_average", "max_abs_error_delta"]  # catalogue order
    catalog._PROFILES.pop("toy_profile", None)


def test_profiles_select_metrics_in_python_and_on_the_command_line(make_toy, tmp_path, capsys):
    catalog.register_profile("tiny", ["rmse_average", "jaccard_top100"], replace=True)
    try:
        assert catalog.profile_metrics("tiny", top_k=5) == ["rmse_average", "jaccard_top5"]
        truth = make_toy(n_covariates=1, n_perturbations=3, n_genes=20)
        pred = truth[truth.obs["condition"] != "control"].copy()
        res = Evaluator(truth, pred, profile="tiny", metrics="cosine_logfc", top_k=5).run()
        assert res.summary["metric"].tolist() == ["rmse_average", "cosine_logfc", "jaccard_top5"]
        truth.write_h5ad(tmp_path / "truth.h5ad")
        pred.write_h5ad(tmp_path / "pred.h5ad")
        code = main(
            [
                "evaluate",
                "--truth", str(tmp_path / "truth.h5ad"),
                "--pred", str(tmp_path / "pred.h5ad"),
                "--out", str(tmp_path / "out"),
                "--profile", "tiny",
                "--top-k", "5",
                "--n-bootstrap", "0",
            ]
        )  # fmt: skip
        assert code == 0
        summary = pd.read_csv(tmp_path / "out" / "summary.csv")
        assert summary["metric"].tolist() == ["rmse_average", "jaccard_top5"]
        assert summary["value"].iloc[0] == 0.0  # the truth predicted exactly
        with pytest.raises(ConfigError, match="unknown metric profile"):
            catalog.profile_metrics("nope")
        with pytest.raises(ConfigError, match="already exists"):
            catalog.register_profile("tiny", ["rmse_average"])
    finally:
        catalog._PROFILES.pop("tiny", None)


def test_register_metric_in_process(make_toy):
    spec = MetricSpec(
        "mean_abs_logfc_gap",
        "toy",
        "gap",
        "logfc",
        compute=lambda pair: np.abs(pair.pred.mean(axis=1) - pair.truth.mean(axis=1)),
    )
    catalog.register_metric(spec)
    try:
        with pytest.raises(ConfigError, match="already registered"):
            catalog.register_metric(spec)
        with pytest.raises(ConfigError, match="built-in"):
            catalog.register_metric(MetricSpec("rmse_average", "toy", "x", "average", compute=max))
        truth = make_toy(n_covariates=1, n_perturbations=3, n_genes=20)
        pred = truth[truth.obs["condition"] != "control"].copy()
        res = Evaluator(truth, pred, metrics="mean_abs_logfc_gap", n_bootstrap=0).run()
        assert res.value("mean_abs_logfc_gap") == 0.0
        # the ceiling has no rule for a plug-in metric: NaN and a note, the rest scored
        res = Evaluator(
            truth, pred, metrics="mean_abs_logfc_gap,rmse_average", ceiling=True, n_bootstrap=0
        ).run()
        assert np.isnan(res.value("ceiling/mean_abs_logfc_gap"))
        assert res.value("ceiling/rmse_average") > 0.0
        assert any("no rule for mean_abs_logfc_gap" in note for note in res.notes)
    finally:
        catalog.unregister_metric("mean_abs_logfc_gap")


def test_block_metrics_see_every_group_of_their_covariate_block(make_toy):
    """A needs='block' metric with all_groups=True: distance of the prediction to the
    centroid of the block's training perturbations (Systema-like), against numpy."""

    def to_train_centroid(view):
        groups = view.all_groups
        table = groups.table
        train = (table["split"] == "train").to_numpy() & (
            table["condition"] != "control"
        ).to_numpy()
        centroid = groups.mean[train].mean(axis=0)
        assert (table.loc[table["evaluated"] >= 0, "split"] == "test").all()
        return np.sqrt(((view.pred.mean[view.rows] - centroid) ** 2).mean(axis=1))

    spec = MetricSpec(
        "rmse_to_train_centroid", "toy", "rmse", None, needs="block", all_groups=True,
        compute=to_train_centroid,
    )  # fmt: skip
    catalog.register_metric(spec)
    try:
        truth, split, held = toy_with_held_out(
            make_toy, n_perturbations=4, n_genes=20, held=("P0", "P1")
        )
        obs = truth.obs
        pred = truth[held].copy()
        pred.X = pred.X.toarray() + 0.25
        res = Evaluator(truth, pred, split=split, metrics="rmse_to_train_centroid").run()
        X = truth.X.toarray().astype(np.float64)
        in_c1 = (obs["cell_type"] == "C1").to_numpy()
        train_means = [
            X[in_c1 & (obs["condition"] == p).to_numpy() & (split == "train").to_numpy()].mean(0)
            for p in ["P2", "P3"]
        ]
        centroid = np.mean(train_means, axis=0)
        table = res.per_group.set_index("condition")
        for p in ["P0", "P1"]:
            mean = np.asarray(pred.X[(pred.obs["condition"] == p).to_numpy()], np.float64).mean(0)
            expected = np.sqrt(((mean - centroid) ** 2).mean())
            assert table.loc[p, "rmse_to_train_centroid"] == pytest.approx(expected, rel=1e-6)
        with pytest.raises(ConfigError, match="all_groups=True"):
            MetricSpec("x", "toy", "x", "delta", reference="centroid", compute=max).check()
    finally:
        catalog.unregister_metric("rmse_to_train_centroid")
