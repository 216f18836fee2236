"""The data commands end to end: exit codes, one-line errors on stderr, files written."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pertbench.cli.main import main
from pertbench.data.splits import read_split


@pytest.fixture
def sim_path(tmp_path):
    path = tmp_path / "sim.h5ad"
    code = main(
        [
            "simulate",
            "--out",
            str(path),
            "--n-perturbations",
            "6",
            "--n-combinations",
            "2",
            "--n-genes",
            "60",
            "--n-cells-per-group",
            "12",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_everywhere(capsys):
    for args in (
        ["--help"],
        ["simulate", "--help"],
        ["preprocess", "--help"],
        ["split", "--help"],
        ["scenario", "--help"],
        ["scenario", "imbalance", "--help"],
        ["scenario", "downsample", "--help"],
        ["scenario", "scaling", "--help"],
        ["datasets", "--help"],
        ["datasets", "fetch", "--help"],
        ["info", "--help"],
    ):
        assert main(args) == 0, args
    assert "--heldout-covariates" in capsys.readouterr().out


def test_simulate_info_preprocess_split(sim_path, tmp_path, capsys):
    adata = ad.read_h5ad(sim_path)
    assert adata.n_obs == 3 * (24 + 8 * 12) and "counts" in adata.layers
    assert main(["info", str(sim_path)]) == 0
    out = capsys.readouterr().out
    assert "controls: 72" in out and "problems: none found" in out and "CT2" in out
    pp = tmp_path / "pp.h5ad"
    assert (
        main(
            [
                "preprocess",
                str(sim_path),
                "--out",
                str(pp),
                "--n-top-genes",
                "20",
                "--n-de-genes",
                "3",
            ]
        )
        == 0
    )
    assert ad.read_h5ad(pp).n_vars <= 60
    split = tmp_path / "split.csv"
    assert (
        main(
            [
                "split",
                str(pp),
                "--task",
                "transfer",
                "--out",
                str(split),
                "--fraction",
                "0.5",
                "--heldout-covariates",
                "CT0,CT1",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "leakage: none" in out and "wrote" in out
    s = read_split(split, adata.obs_names)
    held = adata.obs.loc[
        s.isin(["val", "test"]).to_numpy() & (adata.obs.condition != "control").to_numpy()
    ]
    assert set(held.cell_type) == {"CT0", "CT1"}
    # same seed, same file
    again = tmp_path / "again.csv"
    main(
        [
            "split",
            str(pp),
            "--task",
            "transfer",
            "--out",
            str(again),
            "--fraction",
            "0.5",
            "--heldout-covariates",
            "CT0,CT1",
            "--seed",
            "2",
        ]
    )
    assert again.read_text() == split.read_text()


def test_split_tasks_and_custom(sim_path, tmp_path, capsys):
    combo = tmp_path / "combo.csv"
    assert main(["split", str(sim_path), "--task", "combo", "--out", str(combo)]) == 0
    inverse = tmp_path / "inv.csv"
    assert main(["split", str(sim_path), "--task", "combo_inverse", "--out", str(inverse)]) == 0
    cell = tmp_path / "cell.csv"
    assert (
        main(["split", str(sim_path), "--task", "celltype", "--heldout", "CT1", "--out", str(cell)])
        == 0
    )
    checked = tmp_path / "checked.csv"
    assert (
        main(
            [
                "split",
                str(sim_path),
                "--task",
                "custom",
                "--split-file",
                str(combo),
                "--out",
                str(checked),
            ]
        )
        == 0
    )
    assert pd.read_csv(checked, keep_default_na=False).equals(
        pd.read_csv(combo, keep_default_na=False)
    )


def test_scenarios(sim_path, tmp_path, capsys):
    imb = tmp_path / "imb.h5ad"
    assert (
        main(
            [
                "scenario",
                "imbalance",
                str(sim_path),
                "--out",
                str(imb),
                "--target-entropy",
                "0.9",
                "--min-perturbations",
                "2",
            ]
        )
        == 0
    )
    assert "(target 0.9)" in capsys.readouterr().out
    ds = tmp_path / "ds.h5ad"
    assert (
        main(["scenario", "downsample", str(sim_path), "--out", str(ds), "--fraction", "0.5"]) == 0
    )
    assert ad.read_h5ad(ds).n_obs == 72 + 3 * 8 * 6
    assert (
        main(
            [
                "scenario",
                "scaling",
                str(sim_path),
                "--out-dir",
                str(tmp_path / "sc"),
                "--heldout-covariates",
                "CT0",
                "--n-levels",
                "2",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "sc").iterdir()) == ["level1.csv", "level2.csv"]


def test_datasets_list_info_and_offline_fetch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PERTBENCH_CACHE", str(tmp_path / "cache"))
    assert main(["datasets", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("norman19", "srivatsan20", "frangieh21", "jiang24", "mcfaline23", "kang18"):
        assert name in out
    assert main(["datasets", "info", "srivatsan20"]) == 0
    assert "zenodo.org/records/7041849" in capsys.readouterr().out
    assert main(["datasets", "info", "nope"]) == 2
    assert "unknown dataset 'nope'" in _error_line(capsys)


# -- bad input: exit 2, one line on stderr, traceback only with --debug ----------------------


def test_missing_file_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.h5ad")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_bad_values_exit_2_and_debug_traceback(sim_path, tmp_path, capsys):
    adata = ad.read_h5ad(sim_path)
    X = adata.X.toarray()
    X[0, 0] = np.nan
    adata.X = X
    bad = tmp_path / "bad.h5ad"
    adata.write_h5ad(bad)
    args = ["split", str(bad), "--task", "transfer", "--out", str(tmp_path / "s.csv")]
    assert main(args) == 2
    assert "NaN value" in _error_line(capsys)
    assert not (tmp_path / "s.csv").exists()
    assert main(["--debug", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: X contains 1 NaN value(s)" in err


def test_info_lists_problems_and_exits_2(sim_path, tmp_path, capsys):
    adata = ad.read_h5ad(sim_path)
    adata.obs["condition"] = adata.obs["condition"].astype(str).replace({"control": "ctrl"})
    bad = tmp_path / "noctrl.h5ad"
    adata.write_h5ad(bad)
    assert main(["info", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "no control cells" in captured.out  # the full report
    assert captured.err.strip().startswith("error: 1 problem(s) found")
    assert main(["info", str(bad), "--control", "ctrl"]) == 0


def test_counts_input_warns_and_missing_key(sim_path, tmp_path, capsys):
    adata = ad.read_h5ad(sim_path)
    counts = ad.AnnData(X=adata.layers["counts"], obs=adata.obs, var=adata.var)
    path = tmp_path / "counts.h5ad"
    counts.write_h5ad(path)
    assert main(["split", str(path), "--task", "combo", "--out", str(tmp_path / "c.csv")]) == 0
    assert "warning: 'counts.h5ad': X holds raw counts" in capsys.readouterr().err
    assert (
        main(["split", str(path), "--covariates", "cell_line", "--out", str(tmp_path / "d.csv")])
        == 2
    )
    assert "no column 'cell_line'" in _error_line(capsys)


def test_option_errors_exit_2(sim_path, tmp_path, capsys):
    out = str(tmp_path / "x.csv")
    assert main(["split", str(sim_path), "--task", "celltype", "--out", out]) == 2
    assert "needs --heldout" in _error_line(capsys)
    assert (
        main(
            ["split", str(sim_path), "--task", "combo", "--heldout-covariates", "CT0", "--out", out]
        )
        == 2
    )
    assert "only applies to --task transfer" in _error_line(capsys)
    assert main(["simulate", "--out", out, "--doses", "a,b"]) == 2
    assert "--doses must be comma-separated numbers" in _error_line(capsys)
    assert (
        main(
            [
                "scenario",
                "imbalance",
                str(sim_path),
                "--out",
                str(tmp_path / "i.h5ad"),
                "--target-entropy",
                "0.1",
            ]
        )
        == 2
    )
    assert "cannot be reached" in _error_line(capsys)


def test_fetch_from_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERTBENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"label": ["ctrl", "stim"] * 5, "cell_type": "NK"}, index=[f"c{i}" for i in range(10)]
    )
    raw = ad.AnnData(X=rng.poisson(2, size=(10, 8)).astype(np.float32), obs=obs)
    raw.write_h5ad(tmp_path / "raw.h5ad")
    assert main(["datasets", "fetch", "kang18", "--from-file", str(tmp_path / "raw.h5ad")]) == 0
    assert (tmp_path / "cache" / "kang18.h5ad").is_file()
    assert "--covariates cell_type" in capsys.readouterr().out


def test_simulate_stream_equals_in_memory(tmp_path):
    args = [
        "--n-perturbations",
        "4",
        "--n-combinations",
        "1",
        "--n-genes",
        "30",
        "--n-cells-per-group",
        "5",
        "--doses",
        "1,10",
        "--n-studies",
        "2",
        "--seed",
        "9",
    ]
    assert main(["simulate", "--out", str(tmp_path / "a.h5ad"), *args]) == 0
    assert main(["simulate", "--out", str(tmp_path / "b.h5ad"), "--stream", *args]) == 0
    a, b = ad.read_h5ad(tmp_path / "a.h5ad"), ad.read_h5ad(tmp_path / "b.h5ad")
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert {"dose", "study"} <= set(a.obs.columns)
