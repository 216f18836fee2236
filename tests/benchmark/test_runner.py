"""The benchmark runner: results table, failures, tuning, scenarios, resume after SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

from bench_helpers import (
    PYTHON,
    SIMULATED,
    SLEEPY,
    descendants,
    small_config,
    small_run,
    still_running,
    subprocess_env,
)
from pertbench.benchmark import paths
from pertbench.benchmark.config import load_config, parse_config
from pertbench.benchmark.jobs import TIMING_COLUMNS
from pertbench.benchmark.materialize import materialize, read_manifest
from pertbench.benchmark.runner import build_jobs, prepare_out_dir, run_benchmark
from pertbench.data.groups import group_cells, group_mean
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import read_split
from pertbench.errors import ConfigError
from pertbench.models.registry import BASELINE_MODELS

BASELINES = set(BASELINE_MODELS)


def sleepy_config(**changes):
    """Fast benchmark with the deterministic test model (no torch training)."""
    config = small_config(
        models={"shift": {"model": SLEEPY}, "half": {"model": SLEEPY, "params": {"scale": 0.5}}},
        tasks={"transfer": {"task": "transfer", "options": {"fraction": 0.5}}},
    )
    config.update(changes)
    return config


def _quiet(_message):
    return None


def test_small_benchmark_results_table(tmp_path_factory):
    run = small_run(tmp_path_factory.mktemp("bench"))
    results = run.results
    out = run.out_dir
    cells = results[results["model"] != "ceiling"]
    # one row per cell x metric: 2 tasks x (linear + 6 baselines) x 2 seeds, 3 metrics each
    assert set(cells["model"]) == {"linear", *BASELINES}
    assert len(cells.drop_duplicates(["task", "model", "seed"])) == 2 * 7 * 2
    interactions = cells["metric"].str.startswith("gi_")
    evaluated = cells[~interactions]
    assert (evaluated.groupby(["task", "model", "seed"]).size() == 3).all()
    assert (results["status"] == "ok").all()
    assert set(evaluated["metric"]) == {"rmse_average", "pearson_delta", "rmse_rank_average"}
    # genetic-interaction metrics of the held-out combinations, the same rows in every cell
    gi = cells[interactions & (cells["task"] == "combo")]
    assert {"gi_rmse[all]", "gi_pearson[all]", "gi_roc_auc[all]"} <= set(gi["metric"])
    assert gi.groupby(["model", "seed"]).size().nunique() == 1
    # the noise ceiling once per (task, seed)
    ceiling = results[results["model"] == "ceiling"]
    assert len(ceiling.drop_duplicates(["task", "seed"])) == 4 and len(ceiling) == 12
    # parquet and csv hold the same table
    csv = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=["", "nan", "NaN"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "results.parquet").reset_index(drop=True)[
            ["model", "metric", "value"]
        ],
        csv[["model", "metric", "value"]],
    )
    # calibration: no_change scores 0 by definition
    no_change = cells[(cells["model"] == "no_change") & (cells["metric"] == "rmse_average")]
    assert np.allclose(no_change["normalized"], 0.0)
    for job_dir in (out / "cells").glob("*/*/*/*/seed_*"):
        assert (job_dir / paths.DONE_FILE).is_file()
        assert (job_dir / paths.PREDICTIONS_FILE).is_file()


def test_rmse_average_matches_an_independent_computation(tmp_path_factory):
    """rmse_average of a cell = mean over test groups of sqrt(mean_genes((pred - truth)^2))."""
    run = small_run(tmp_path_factory.mktemp("bench"))
    out = run.out_dir
    manifest = read_manifest(out)
    truth = ad.read_h5ad(manifest["datasets"]["sim"]["path"])
    keys = PerturbationKeys()
    for task in ("transfer", "combo"):
        split = read_split(manifest["splits"][f"sim|{task}|full"]["path"], truth.obs_names)
        test = truth[
            (split == "test").to_numpy() & (truth.obs["condition"] != "control").to_numpy()
        ]
        pred = ad.read_h5ad(
            paths.cell_dir(out, "sim", task, "full", "linear", 0) / paths.PREDICTIONS_FILE
        )
        t_group = group_cells(test.obs, keys)
        t_mean = pd.DataFrame(group_mean(test.X, t_group.group_codes, t_group.n_groups))
        t_mean.index = pd.MultiIndex.from_frame(t_group.groups[["cell_type", "condition"]])
        p_group = group_cells(pred.obs, keys)
        p_mean = pd.DataFrame(group_mean(pred.X, p_group.group_codes, p_group.n_groups))
        p_mean.index = pd.MultiIndex.from_frame(p_group.groups[["cell_type", "condition"]])
        p_mean = p_mean.loc[t_mean.index]
        expected = np.sqrt(((p_mean.to_numpy() - t_mean.to_numpy()) ** 2).mean(axis=1)).mean()
        row = run.results.query(
            "task == @task and model == 'linear' and seed == 0 and metric == 'rmse_average'"
        )
        assert row["value"].iloc[0] == pytest.approx(expected, rel=1e-6)
        assert row["n_groups"].iloc[0] == len(t_mean)


def test_failed_cell_is_recorded_and_the_rest_finishes(tmp_path):
    raw = sleepy_config(
        models={
            "broken": {"model": SLEEPY, "params": {"fail_always": True}},
            "shift": {"model": SLEEPY},
        },
        evaluation={"metrics": ["rmse_average"], "save_predictions": "none"},
    )
    result = run_benchmark(parse_config(raw, base_dir=tmp_path), out=tmp_path / "b", log=_quiet)
    broken = result.results[result.results["model"] == "broken"]
    assert (broken["status"] == "failed").all() and len(broken) == 2  # one row per seed
    assert not list((tmp_path / "b").glob("cells/**/predictions.h5ad"))  # save_predictions: none
    assert broken["error"].str.contains("cannot be trained").all()
    assert broken["value"].isna().all()
    ok = result.results[result.results["model"] != "broken"]
    assert (ok["status"] == "ok").all() and {"shift", *BASELINES} <= set(ok["model"])
    failures = pd.read_csv(tmp_path / "b" / paths.FAILURES_CSV)
    assert sorted(failures["seed"]) == [0, 1] and set(failures["model"]) == {"broken"}
    error = json.loads(
        (
            paths.cell_dir(tmp_path / "b", "sim", "transfer", "full", "broken", 0)
            / paths.ERROR_FILE
        ).read_text()
    )
    assert error["error_type"] == "ModelError" and "Traceback" in error["traceback"]
    assert result.report.is_file() and "Failures" in result.report.read_text()


def test_tuned_model_cells_use_the_best_parameters(tmp_path):
    raw = sleepy_config(
        models={"tuned": {"model": SLEEPY, "tune": {"n_trials": 3, "pruner": "none"}}},
        evaluation={"metrics": ["rmse_average"], "save_predictions": "mean"},
    )
    result = run_benchmark(parse_config(raw, base_dir=tmp_path), out=tmp_path / "t", log=_quiet)
    # save_predictions: mean keeps one row per predicted group
    cell = paths.cell_dir(tmp_path / "t", "sim", "transfer", "full", "tuned", 0)
    means = ad.read_h5ad(cell / paths.PREDICTIONS_FILE)
    row = result.results.query("model == 'tuned' and seed == 0 and metric == 'rmse_average'").iloc[
        0
    ]
    assert means.n_obs == row["n_groups"] and (means.obs["n_cells"] > 0).all()
    tuning = paths.tuning_dir(tmp_path / "t", "sim", "transfer", "full", "tuned")
    best = json.loads((tuning / "best_params.json").read_text())
    assert len(pd.read_csv(tuning / "trials.csv")) == 3
    for seed in (0, 1):
        done = json.loads(
            (
                paths.cell_dir(tmp_path / "t", "sim", "transfer", "full", "tuned", seed)
                / paths.DONE_FILE
            ).read_text()
        )
        assert done["tuned"] is True
        assert done["params"] == pytest.approx(best["all_params"])
    assert result.results.query("model == 'tuned'")["tuned"].all()
    assert "Hyperparameter tuning" in result.report.read_text()


def test_scenario_splits(tmp_path):
    raw = sleepy_config(
        datasets={"sim": {"simulate": {**SIMULATED, "n_covariates": 3, "n_perturbations": 8}}},
        scenarios={
            "imbalance": {"entropy": [0.8], "options": {"min_perturbations": 2}},
            "downsample": {"fractions": [0.5]},
            "data_scaling": {
                "n_levels": 2,
                "options": {"heldout_covariates": ["CT0"], "fraction": 0.5},
            },
        },
    )
    config = parse_config(raw, base_dir=tmp_path)
    names = config.scenario_names("transfer")
    assert names == [
        "full",
        "imbalance_0.8",
        "downsample_0.5",
        "data_scaling_level1",
        "data_scaling_level2",
    ]
    out = tmp_path / "s"
    out.mkdir()
    manifest = materialize(config, out, log=_quiet)
    adata = ad.read_h5ad(manifest["datasets"]["sim"]["path"])
    perturbed = (adata.obs["condition"] != "control").to_numpy()
    splits = {
        n: read_split(manifest["splits"][f"sim|transfer|{n}"]["path"], adata.obs_names)
        for n in names
    }
    # downsampling keeps about half of the perturbed cells, every control
    kept = (splits["downsample_0.5"] != "") & perturbed
    assert 0.4 < kept.sum() / perturbed.sum() < 0.6
    assert ((splits["downsample_0.5"] != "") | perturbed).all()
    # imbalance reached its entropy
    info = manifest["splits"]["sim|transfer|imbalance_0.8"]["scenario"]
    assert info["perturbation_entropy"] == pytest.approx(0.8, abs=0.02)
    assert manifest["splits"]["sim|transfer|full"]["scenario"][
        "perturbation_entropy"
    ] == pytest.approx(1.0)
    # data scaling: nested training sets, identical val/test
    one, two = splits["data_scaling_level1"], splits["data_scaling_level2"]
    assert ((one == "train") <= (two == "train")).all() and (two == "train").sum() > (
        one == "train"
    ).sum()
    assert ((one == "test") == (two == "test")).all() and ((one == "val") == (two == "val")).all()
    for entry in manifest["splits"].values():
        assert entry["sha256"] == paths.sha256_file(entry["path"])
    jobs, _ = build_jobs(config, out, manifest, threads=None)
    assert len(jobs) == len(names) * (2 + len(BASELINES)) * 2  # scenarios x models x seeds


def test_out_dir_guards(tmp_path):
    config = parse_config(sleepy_config(), base_dir=tmp_path)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no benchmark"):
        prepare_out_dir(config, tmp_path / "used", resume=True)
    out = tmp_path / "run"
    prepare_out_dir(config, out, resume=False)
    (out / paths.CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict()))
    with pytest.raises(ConfigError, match="pass --resume"):
        prepare_out_dir(config, out, resume=False)
    prepare_out_dir(config, out, resume=True)  # same config: fine
    other = parse_config(sleepy_config(seeds=[5]), base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"different config \(seeds differ\)"):
        prepare_out_dir(other, out, resume=True)


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_killed_benchmark_resumes_to_the_same_table(tmp_path):
    import torch

    raw = small_config(
        tasks={"transfer": {"task": "transfer", "options": {"fraction": 0.5}}},
        models={"linear": {"params": {"batch_size": 16}}},
        training={"max_epochs": 15, "device": "cpu"},
    )
    config_file = _write_config(tmp_path / "config.yaml", raw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess below (OMP_NUM_THREADS=1): same arithmetic
    try:
        reference = run_benchmark(
            load_config(config_file), out=tmp_path / "ref", report=False, log=_quiet
        )
    finally:
        torch.set_num_threads(threads)

    out = tmp_path / "killed"
    cmd = [
        PYTHON,
        "-m",
        "pertbench",
        "benchmark",
        str(config_file),
        "--out",
        str(out),
        "--resume",
        "--no-report",  # the report is tested elsewhere; here only the table matters
    ]
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("cells/**/done.json"))) < 3:
            time.sleep(0.05)
            assert proc.poll() is None, "the benchmark ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, mid-run
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    done_before = {p: p.stat().st_mtime_ns for p in out.glob("cells/**/done.json")}
    n_jobs = 2 * (1 + len(BASELINES))  # seeds x (the slow model + baselines)
    assert 3 <= len(done_before) < n_jobs, "kill the run mid-way"
    assert not (out / paths.RESULTS_PARQUET).exists()

    resumed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(done_before)} of {n_jobs} jobs already finished" in resumed.stderr
    assert (
        resumed.stdout.strip().splitlines()[-1]
        == f"results: {out.resolve() / paths.RESULTS_PARQUET}"
    )
    for path, mtime in done_before.items():  # finished cells were not run again
        assert path.stat().st_mtime_ns == mtime
    got = pd.read_parquet(out / paths.RESULTS_PARQUET).drop(columns=TIMING_COLUMNS)
    want = reference.results.drop(columns=TIMING_COLUMNS)
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), want.reset_index(drop=True), check_exact=True
    )


@pytest.mark.ray
def test_ray_backend_runs_the_grid(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    config = parse_config(sleepy_config(), base_dir=tmp_path)
    local = run_benchmark(config, out=tmp_path / "local", workers=1, report=False, log=_quiet)
    try:
        on_ray = run_benchmark(
            config, out=tmp_path / "ray", workers=2, backend="ray", report=False, log=_quiet
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (on_ray.results["status"] == "ok").all()
    pd.testing.assert_frame_equal(
        on_ray.results.drop(columns=TIMING_COLUMNS),
        local.results.drop(columns=TIMING_COLUMNS),
        check_exact=True,
    )
    n_cells = 2 * (2 + len(BASELINES))  # seeds x (shift, half + baselines)
    assert len(list((tmp_path / "ray").glob("cells/**/done.json"))) == n_cells


def test_cli_print_config_and_errors(tmp_path):
    config_file = _write_config(tmp_path / "c.yaml", sleepy_config())
    env = subprocess_env()
    printed = subprocess.run(
        [PYTHON, "-m", "pertbench", "benchmark", str(config_file), "--print-config"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    assert (
        parse_config(yaml.safe_load(printed.stdout), base_dir=tmp_path).to_dict()
        == load_config(config_file).to_dict()
    )
    for args, message in (
        ([], "give a CONFIG file, or --default"),
        ([str(config_file)], "--out is required"),
        ([str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")], "does not exist"),
    ):
        proc = subprocess.run(
            [PYTHON, "-m", "pertbench", "benchmark", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_registry_dataset_is_fetched_and_checksummed(tmp_path, make_toy, monkeypatch):
    from pertbench.data import public

    raw_file = tmp_path / "cache" / "kang18.h5ad"
    raw_file.parent.mkdir()
    toy = make_toy(n_covariates=2, n_perturbations=4, n_cells=10, n_controls=20, n_genes=20)
    toy.write_h5ad(raw_file)
    calls = []

    def fake_fetch(name, *, from_file=None, **kwargs):  # no network in tests
        calls.append((name, from_file))
        return raw_file

    monkeypatch.setattr(public, "fetch", fake_fetch)
    raw = sleepy_config(datasets={"pbmc": {"registry": "Kang18"}})
    config = parse_config(raw, base_dir=tmp_path)
    assert config.datasets["pbmc"].registry == "kang18"
    assert config.datasets["pbmc"].keys == public.dataset_info("kang18").keys
    out = tmp_path / "reg"
    out.mkdir()
    manifest = materialize(config, out, log=_quiet)
    entry = manifest["datasets"]["pbmc"]
    assert calls == [("kang18", None)]
    assert entry["path"] == str(raw_file) and entry["sha256"] == paths.sha256_file(raw_file)
    assert entry["source"]["registry"] == "kang18"
    assert entry["source"]["url"].startswith("https://")
    assert "pbmc|transfer|full" in manifest["splits"]
    # the file changed under a resumed run: refuse rather than mix data
    toy[:-1].copy().write_h5ad(raw_file)
    with pytest.raises(ConfigError, match="changed since this benchmark started"):
        materialize(config, out, log=_quiet)


def test_real_norman_combo_benchmark(tmp_path, norman_path):
    """The runner on the shared real Norman subset: combination prediction, baselines + linear."""
    raw = small_config(
        datasets={"norman": {"path": str(norman_path)}},
        tasks={"combo": {"task": "combo", "options": {"fraction": 0.7}}},
        models={"linear": {"params": {"batch_size": 256}}},
        seeds=[0],
        training={"max_epochs": 2, "device": "cpu"},
        evaluation={"metrics": ["rmse_average", "pearson_delta"], "save_predictions": "mean"},
    )
    result = run_benchmark(
        parse_config(raw, base_dir=tmp_path), out=tmp_path / "n", report=False, log=_quiet
    )
    results = result.results
    # only TMSB4X of the perturbed genes is measured: the gene-embedding baselines cannot
    # embed the held-out combinations, and their cells say so instead of failing
    embedding = {"linear_embedding", "nearest_perturbation"}
    skipped = results[results["status"] == "skipped"]
    assert set(skipped["model"]) == embedding
    assert skipped["error"].str.contains("has no perturbation embedding").all()
    assert (results.loc[results["status"] != "skipped", "status"] == "ok").all(), result.failures
    assert set(results["model"]) == {"linear", "ceiling", *BASELINES}
    failures = pd.read_csv(result.out_dir / paths.FAILURES_CSV)
    assert set(failures["status"]) == {"skipped"} and set(failures["model"]) == embedding
    results = results[results["status"] == "ok"]
    pearson = results[results["metric"] == "pearson_delta"].set_index("model")["value"]
    # the additive baseline beats doing nothing on Norman combinations (PerturBench table 4)
    assert abs(pearson["no_change"]) < 0.3 and pearson["perturbation_mean"] > 0.5
    entry = read_manifest(result.out_dir)["datasets"]["norman"]
    assert entry["sha256"] == paths.sha256_file(norman_path) and entry["n_obs"] == 5961


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkilled_benchmark_leaves_no_worker_running(tmp_path):
    slow = {"model": SLEEPY, "params": {"sleep": 0.5, "epochs": 20}}  # 10 s per cell
    config_file = _write_config(
        tmp_path / "config.yaml", sleepy_config(models={"slow": slow}, seeds=[0])
    )
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "pertbench", "benchmark", str(config_file), "--out", str(out)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "--no-report"],
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Wait until both workers run a cell (the slow model's cell and a baseline's).
        deadline = time.time() + 120
        workers: dict[int, str] = {}
        while time.time() < deadline:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            workers = descendants(proc.pid)
            if len(workers) >= 3 and (out / "cells").is_dir():  # 2 workers + resource tracker
                break
        assert len(workers) >= 3, f"the benchmark never started its workers: {workers}"
        os.kill(proc.pid, signal.SIGKILL)  # the main process only: nobody tells the workers
        proc.wait(10)
        time.sleep(5)
        assert still_running(workers) == [], "processes outlived the killed benchmark"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(10)
