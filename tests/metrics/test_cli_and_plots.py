"""``pertbench evaluate`` end to end, and the evaluation figures."""

from __future__ import annotations

import matplotlib

from split_helpers import toy_with_held_out

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from pertbench import pl
from pertbench.cli.main import main
from pertbench.data import write_split
from pertbench.errors import EvaluationError
from pertbench.metrics import Evaluator


@pytest.fixture
def files(make_toy, tmp_path):
    truth, split, held = toy_with_held_out(make_toy, n_perturbations=4, n_genes=30)
    pred = truth[held].copy()
    pred.X = pred.X.toarray() + 0.2
    pred = pred[:, ::-1].copy()  # other gene order
    paths = {
        "truth": tmp_path / "truth.h5ad",
        "pred": tmp_path / "pred.h5ad",
        "split": tmp_path / "split.csv",
    }
    truth.write_h5ad(paths["truth"])
    pred.write_h5ad(paths["pred"])
    write_split(split, paths["split"])
    return paths, truth, pred, split


def test_cli_evaluate_writes_the_tables(files, tmp_path, capsys):
    paths, truth, pred, split = files
    out = tmp_path / "out"
    code = main(
        [
            "evaluate",
            "--pred", str(paths["pred"]),
            "--truth", str(paths["truth"]),
            "--out", str(out),
            "--split", str(paths["split"]),
            "--baselines",
            "--ceiling",
            "--replicate-agreement",
            "--top-k", "5",
            "--n-bootstrap", "50",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "evaluated 3 group(s) over 30 genes" in printed and "rmse_average" in printed
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["metric", "value", "ci_low", "ci_high"]
    expected = Evaluator(
        truth,
        pred,
        split=split,
        baselines=True,
        ceiling=True,
        replicate_agreement=True,
        top_k=5,
        n_bootstrap=50,
    ).run()
    pd.testing.assert_frame_equal(summary, expected.summary, check_dtype=False, rtol=1e-10)
    references = {"normalized/rmse_average", "no_change/rmse_average", "ceiling/rmse_average"}
    assert references | {"replicate_agreement/rmse_average"} <= set(summary["metric"])
    for name in ("per_group.csv", "per_covariate.csv", "calibration.csv", "evaluation.json"):
        assert (out / name).is_file()


def test_cli_errors_are_one_line_with_exit_2(files, tmp_path, capsys):
    paths, _, pred, _ = files
    broken = pred[:, 1:].copy()  # drops one gene
    broken_path = tmp_path / "broken.h5ad"
    broken.write_h5ad(broken_path)
    code = main(
        [
            "evaluate",
            "--pred",
            str(broken_path),
            "--truth",
            str(paths["truth"]),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("error: ")
        and "missing from pred" in err
        and err.count("\n") == 1
    )
    code = main(
        [
            "evaluate",
            "--pred",
            str(tmp_path / "nope.h5ad"),
            "--truth",
            str(paths["truth"]),
            "--out",
            "x",
        ]
    )
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            "--pred",
            str(paths["pred"]),
            "--truth",
            str(paths["truth"]),
            "--out",
            "x",
            "--metrics",
            "bogus",
        ]
    )
    assert code == 2 and "unknown metric 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_help(capsys):
    assert main(["evaluate", "--help"]) == 0
    text = capsys.readouterr().out
    for option in (
        "--pred",
        "--truth",
        "--out",
        "--metrics",
        "--baselines",
        "--ceiling",
        "--split",
        "--on",
        "--skip-missing",
        "--covariates",
    ):
        assert option in text, option


def test_figures(make_toy):
    truth = make_toy(n_covariates=2, n_perturbations=5, n_genes=30)
    pred = truth[truth.obs["condition"] != "control"].copy()
    result = Evaluator(
        truth, pred, top_k=5, n_bootstrap=20, ceiling=True, baselines=["no_change"]
    ).run()
    fig = pl.similarity_heatmaps(result)
    assert isinstance(fig, Figure) and len(fig.axes) == 3  # two heatmaps and a colour bar
    assert "matrix distance" in fig._suptitle.get_text()
    only_c0 = pl.similarity_heatmaps(result, covariate="C0")
    assert only_c0.axes[0].images[0].get_array().shape == (5, 5)
    bars = pl.rank_bars({"self": result})
    labels = [t.get_text() for t in bars.axes[0].get_legend().get_texts()]
    assert labels == ["self", "no_change", "ceiling"]
    with pytest.raises(EvaluationError, match="none of the metrics"):
        pl.rank_bars({"self": result}, metrics=["nope"])
    group = truth[(truth.obs["cell_type"] == "C0")]
    scatter = pl.mean_scatter(
        group[group.obs["condition"] == "P0"],
        group[group.obs["condition"] == "P0"],
        controls=group[group.obs["condition"] == "control"],
        top_k=5,
        n_labels=3,
    )
    ax = scatter.axes[0]
    assert len(ax.texts) == 3 + 1  # labelled genes + the R^2 box
    assert "R^2$ all genes = 1.000" in ax.texts[-1].get_text()
    arrays = pl.mean_scatter(np.ones((3, 4)), np.ones((2, 4)) * 2, labels=["gene1"])
    assert isinstance(arrays, Figure)
    scatter.savefig(__import__("io").BytesIO(), format="png")


def test_distinct_colors_never_repeat_for_many_models():
    import matplotlib.colors as mcolors

    for n in (3, 10, 11, 20, 25):
        colors = [mcolors.to_hex(c) for c in pl.distinct_colors(n)]
        assert len(colors) == n and len(set(colors)) == n, n


def test_rank_bars_refuse_all_nan_and_wrap_long_legends():
    nan_table = pd.DataFrame(
        {"model": ["a", "b"], "metric": ["rmse_rank_average"] * 2, "value": [np.nan, np.nan]}
    )
    with pytest.raises(EvaluationError, match="undefined"):
        pl.rank_bars(nan_table, metrics=["rmse_rank_average"])
    long_names = [f"model_{'x' * 60}_{i}" for i in range(5)]
    table = pd.DataFrame(
        {"model": long_names, "metric": ["rmse_rank_average"] * 5, "value": np.linspace(0, 0.4, 5)}
    )
    fig = pl.rank_bars(table, metrics=["rmse_rank_average"], figsize=(6.0, 3.8))
    assert fig.axes[0].get_legend()._ncols == 1  # one 70-character label per row
    short = pl.rank_bars(
        table.assign(model=list("abcde")), metrics=["rmse_rank_average"], figsize=(6.0, 3.8)
    )
    assert short.axes[0].get_legend()._ncols == 4


def test_cli_profile_vcc_prints_the_vcc_metrics_with_intervals(files, tmp_path, capsys):
    from pertbench.metrics.vcc_summary import evaluate_vcc

    paths, truth, pred, split = files
    out = tmp_path / "vcc"
    args = ["evaluate", "--pred", str(paths["pred"]), "--truth", str(paths["truth"])]
    args += ["--split", str(paths["split"]), "--n-bootstrap", "100", "--profile", "vcc"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = pd.read_csv(out / "vcc_summary.csv").set_index("metric")
    _, expected = evaluate_vcc(truth, pred, split=split, n_bootstrap=100)
    pd.testing.assert_frame_equal(summary.reset_index(), expected, check_dtype=False, rtol=1e-10)
    score = summary.loc["vcc_score/avg_score"]
    assert "vcc_score/avg_score" in printed and f"[{score['ci_low']:.4g}, " in printed
    assert "mean baseline" in printed  # the baseline is printed beside each metric
    for name in ("vcc_per_group.csv", "vcc_per_covariate.csv", "vcc_scores.csv"):
        assert (out / name).is_file()
    # the vcc profile is cell-eval's own metric set: nothing to add to it
    assert main([*args, "--metrics", "rmse_average", "--out", str(tmp_path / "x")]) == 2
    assert "--profile vcc computes cell-eval's own metric set" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_profile_vcc_refuses_bad_files_in_one_line(files, tmp_path, capsys):
    paths, truth, _, _ = files
    not_h5ad = tmp_path / "notes.h5ad"
    not_h5ad.write_text("not an AnnData file")
    empty = tmp_path / "empty.h5ad"
    truth[:0].copy().write_h5ad(empty)
    for bad, message in (
        (not_h5ad, "is not an AnnData .h5ad file (not HDF5)"),
        (empty, "truth: the data have no cells"),
        (tmp_path / "missing.h5ad", "does not exist"),
    ):
        out = tmp_path / f"out_{bad.stem}"
        args = ["evaluate", "--pred", str(paths["pred"]), "--truth", str(bad)]
        assert main([*args, "--profile", "vcc", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not out.exists()
