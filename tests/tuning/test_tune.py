"""Tuning: outputs, reproducibility, failures, resumption after SIGKILL, shared PostgreSQL."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState

from bench_helpers import PYTHON, SLEEPY, subprocess_env
from pertbench.data.splits import make_task_split
from pertbench.errors import ConfigError, ModelError
from pertbench.tuning import TuneSettings, tune
from pertbench.tuning.results import TIMING_COLUMNS
from pertbench.tuning.storage import default_storage_url, make_storage


@pytest.fixture
def toy_files(tmp_path, make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=8, n_cells=20, n_controls=30, n_genes=30)
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    split = make_task_split(adata, "transfer", seed=0, fraction=0.5).write(tmp_path / "split.csv")
    return data, split


def _load(out: Path, name: str):
    return optuna.load_study(study_name=name, storage=make_storage(default_storage_url(out)))


def _search_table(out: Path) -> pd.DataFrame:
    """What a search found, as trials.csv records it: interrupted attempts and the columns
    saying when and where a trial ran left out, in the order of the search."""
    trials = pd.read_csv(out / "trials.csv")
    kept = trials[~trials["interrupted"].astype(bool)]
    kept = kept.drop(columns=[c for c in TIMING_COLUMNS if c in kept.columns])
    return kept.sort_values("index").reset_index(drop=True)


def test_tune_linear_end_to_end(tmp_path, toy_files):
    data, split = toy_files
    out = tmp_path / "tune"
    settings = TuneSettings(
        model="linear",
        n_trials=4,
        stability_seeds=2,
        max_epochs=2,
        device="cpu",
        fixed_params={"batch_size": 64},
        report_metrics=("rmse_average", "pearson_delta"),
    )
    result = tune(data, split, out=out, settings=settings, log=lambda m: None)
    for name in ("trials.csv", "best_params.json", "importances.csv", "stability.csv", "study.db"):
        assert (out / name).is_file(), name
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and set(trials["state"]) <= {"COMPLETE", "PRUNED"}
    best = json.loads((out / "best_params.json").read_text())
    complete = trials[trials["state"] == "COMPLETE"]
    assert best["value"] == pytest.approx(complete["value"].min())
    row = complete.loc[complete["value"].idxmin()]
    # the objective is the documented expression of the recorded validation metrics
    expected = row["user_attrs_val_rmse_average"] + 0.1 * row["user_attrs_val_rmse_rank_average"]
    assert row["value"] == pytest.approx(expected, rel=1e-12)
    assert best["all_params"]["batch_size"] == 64 and best["all_params"]["lr"] == pytest.approx(
        best["params"]["lr"]
    )
    # stability: mean and sd (ddof=1) over the extra seeds, recomputed independently
    per_seed = pd.read_csv(out / "stability.csv")
    assert sorted(per_seed["seed"].unique()) == [1, 2]
    summary = result.stability_summary.set_index(["split", "metric"])
    for key, values in per_seed.groupby(["split", "metric"])["value"]:
        row = summary.loc[key]
        assert row["mean"] == pytest.approx(np.mean(values))
        assert row["sd"] == pytest.approx(np.std(values, ddof=1))
    assert set(per_seed["split"]) == {"val", "test"}
    importances = pd.read_csv(out / "importances.csv")
    if importances["importance"].notna().any():
        assert importances["importance"].sum() == pytest.approx(1.0)
    else:
        assert importances["note"].iloc[0]


def test_search_space_is_sized_for_the_data_and_epochs_are_recorded(tmp_path, toy_files, capsys):
    from pertbench.cli.main import main

    # 30 genes: widths stop at max(64, 2 x 30) = 64, i.e. at the lowest width of the model's
    # range (256); depths at 3 hidden layers
    data, split = toy_files
    out = tmp_path / "la"
    args = ["tune", str(data), "--model", "latent_additive", "--split", str(split)]
    args += ["--out", str(out), "--n-trials", "1", "--epochs", "1", "--stability-seeds", "0"]
    assert main([*args, "--device", "cpu", "--set", "batch_size=64", "--pruner", "none"]) == 0
    err = capsys.readouterr().err
    assert "search space sized for 30 genes and " in err
    assert "training cells on cpu: n_layers <= 3, encoder_width <= 256" in err
    assert "trial 0: epoch 1/1 val_loss " in err  # progress inside a trial
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["params_encoder_width"] == 256).all() and (trials["params_n_layers"] <= 3).all()
    best = json.loads((out / "best_params.json").read_text())
    # --epochs (alias of --max-epochs) 1: what the trials were trained with, not the default 100
    assert best["max_epochs"] == 1 and best["all_params"]["max_epochs"] == 1
    assert best["epochs_trained"] == 1


def test_same_seed_same_trials_and_resume_adds_only_new_trials(tmp_path, toy_files):
    data, split = toy_files

    def run(out, n):
        settings = TuneSettings(model=SLEEPY, n_trials=n, stability_seeds=0, seed=7)
        return tune(data, split, out=out, settings=settings, log=lambda m: None)

    a = run(tmp_path / "a", 5)
    b3 = run(tmp_path / "b", 3)
    b = run(tmp_path / "b", 5)  # resumed with a larger budget: trials 0-2 are kept
    cols = ["number", "state", "value", "params_scale", "params_lr"]
    pd.testing.assert_frame_equal(a.trials[cols], b.trials[cols])
    pd.testing.assert_frame_equal(b3.trials[cols], b.trials[cols].iloc[:3])
    assert b3.trials["datetime_start"].tolist() == b.trials["datetime_start"].iloc[:3].tolist()
    assert a.trials["params_scale"].nunique() == 5


def test_failed_trials_are_recorded_and_search_continues(tmp_path, toy_files):
    data, split = toy_files
    settings = TuneSettings(
        model=SLEEPY, n_trials=8, stability_seeds=0, fixed_params={"fail_above": 1.0}, pruner="none"
    )
    result = tune(data, split, out=tmp_path / "t", settings=settings, log=lambda m: None)
    failed = result.trials[result.trials["state"] == "FAIL"]
    assert len(failed) >= 1
    assert (failed["params_scale"] > 1.0).all()
    assert failed["user_attrs_error"].str.contains("above fail_above").all()
    assert (result.trials[result.trials["state"] == "COMPLETE"]["params_scale"] <= 1.0).all()
    assert len(result.trials) == 8


def test_systematic_failure_stops_the_search(tmp_path, toy_files):
    data, split = toy_files
    settings = TuneSettings(
        model=SLEEPY, n_trials=20, stability_seeds=0, fixed_params={"fail_always": True}
    )
    with pytest.raises(ModelError, match="3 trials in a row failed"):
        tune(data, split, out=tmp_path / "t", settings=settings, log=lambda m: None)
    assert len(pd.read_csv(tmp_path / "t" / "trials.csv")) == 3


def test_bad_tuning_inputs(tmp_path, toy_files, make_toy):
    data, split = toy_files
    with pytest.raises(ConfigError, match="no hyperparameters to search"):
        tune(data, split, out=tmp_path / "a", settings=TuneSettings(model="no_change"))
    with pytest.raises(ConfigError, match="unknown model"):
        tune(data, split, out=tmp_path / "b", settings=TuneSettings(model="lineer"))
    only_train = tmp_path / "train.csv"
    frame = pd.read_csv(split)
    frame["split"] = "train"
    frame.to_csv(only_train, index=False)
    with pytest.raises(ConfigError, match="'val' cells"):
        tune(data, only_train, out=tmp_path / "c", settings=TuneSettings(model=SLEEPY))
    tune(
        data,
        split,
        out=tmp_path / "d",
        settings=TuneSettings(model=SLEEPY, n_trials=1, stability_seeds=0),
    )
    with pytest.raises(ConfigError, match="different objective"):
        tune(
            data,
            split,
            out=tmp_path / "d",
            settings=TuneSettings(
                model=SLEEPY, n_trials=2, stability_seeds=0, objective="rmse_average"
            ),
        )


def test_cli_error_is_one_line_exit_2(tmp_path, toy_files):
    data, split = toy_files
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "pertbench",
            "tune",
            str(data),
            "--model",
            "no_change",
            "--split",
            str(split),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model 'no_change' has no hyperparameters")
    assert len(proc.stderr.strip().splitlines()) == 1


def _tune_cmd(data, split, out, *extra):
    return [
        PYTHON,
        "-m",
        "pertbench",
        "tune",
        str(data),
        "--model",
        SLEEPY,
        "--split",
        str(split),
        "--out",
        str(out),
        "--stability-seeds",
        "1",
        "--pruner",
        "none",
        "--seed",
        "3",
        *extra,
    ]


def test_sigkill_mid_trial_resumes_without_losing_or_repeating(tmp_path, toy_files):
    data, split = toy_files
    out = tmp_path / "killed"
    cmd = _tune_cmd(data, split, out, "--n-trials", "6", "--set", "sleep=0.4", "--set", "epochs=4")
    proc = subprocess.Popen(
        cmd,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        before = None
        while time.time() < deadline:
            time.sleep(0.3)
            if not (out / "study.db").is_file():
                continue
            try:
                trials = _load(out, f"pertbench-{SLEEPY}").get_trials()
            except Exception:  # study not created yet
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            if len(done) >= 2 and running and running[0].intermediate_values:
                before = trials
                os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: it has reported epochs
                break
        if before is None:
            status = proc.poll()
            detail = proc.stderr.read()[-2000:] if status is not None else "still running"
            pytest.fail(f"the tuning run never reached a running trial (exit {status}): {detail}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    study = _load(out, f"pertbench-{SLEEPY}")
    after_kill = study.get_trials()
    killed = [t for t in after_kill if t.state == TrialState.RUNNING]
    assert len(killed) == 1  # left RUNNING by the kill
    completed_before = {
        t.number: (t.params, t.value, t.datetime_complete)
        for t in after_kill
        if t.state == TrialState.COMPLETE
    }

    resumed = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trial(s) {killed[0].number} were interrupted" in resumed.stderr
    final = _load(out, f"pertbench-{SLEEPY}").get_trials()
    by_number = {t.number: t for t in final}
    # every trial completed before the kill is kept, untouched
    for number, (params, value, finished) in completed_before.items():
        t = by_number[number]
        assert (t.state, t.params, t.value, t.datetime_complete) == (
            TrialState.COMPLETE,
            params,
            value,
            finished,
        )
    # the killed trial is failed, and its parameters were run exactly once more
    dead = by_number[killed[0].number]
    assert dead.state == TrialState.FAIL and "interrupted" in dead.user_attrs["error"]
    retries = [t for t in final if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed[0].params
    assert retries[0].user_attrs.get("error", "") == ""  # the retry itself did not fail
    # nothing repeated: every finished configuration is distinct, and the budget is exact
    finished = [t for t in final if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 6
    assert not [t for t in final if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    trials_csv = pd.read_csv(out / "trials.csv")
    assert len(trials_csv) == len(final)
    assert (out / "best_params.json").is_file() and (out / "stability.csv").is_file()

    # ... and the resumed study is exactly the uninterrupted one with the same seed: the
    # same configurations in the same order, the same values, the same best trial.
    reference = tmp_path / "uninterrupted"
    settings = TuneSettings(
        model=SLEEPY,
        n_trials=6,
        seed=3,
        stability_seeds=1,
        pruner="none",
        fixed_params={"sleep": "0.4", "epochs": "4"},  # as the command line passes them
    )
    tune(data, split, out=reference, settings=settings, log=lambda m: None)
    # (dtypes aside: the interrupted row, left out, made some integer columns float)
    pd.testing.assert_frame_equal(
        _search_table(out), _search_table(reference), check_dtype=False, check_exact=True
    )
    best, best_ref = (json.loads((d / "best_params.json").read_text()) for d in (out, reference))
    assert best["trial"] == best_ref["trial"] and best["value"] == best_ref["value"]
    assert best["params"] == best_ref["params"]


# ---------------------------------------------------------------------------------------
# PostgreSQL: a throw-away server on 127.0.0.1, two worker processes on one study
# ---------------------------------------------------------------------------------------
def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; run scripts/ensure_test_services.sh"
        )
    # pytest's tmp folders are private to their owner; the server may run as another user
    root = Path(tempfile.mkdtemp(prefix="pertbench-pg-"))
    data_dir, sock_dir = root / "data", root / "sock"
    sock_dir.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own user
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run the server")
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser to drop privileges")
        shutil.chown(root, "postgres")
        shutil.chown(sock_dir, "postgres")
        os.chmod(root, 0o755)
        prefix = [runuser, "-u", "postgres", "--"]
    port = _free_port()
    run = lambda args: subprocess.run(prefix + args, capture_output=True, text=True, timeout=120)  # noqa: E731
    result = run([initdb, "-D", str(data_dir), "-U", "pertbench", "--auth=trust", "-E", "UTF8"])
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {result.stderr.strip().splitlines()[-1:]}")
    options = f"-h 127.0.0.1 -p {port} -k {sock_dir} -c fsync=off"
    result = run(
        [pg_ctl, "-D", str(data_dir), "-o", options, "-l", str(root / "log"), "-w", "start"]
    )
    if result.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed: {result.stderr.strip()[-200:]}")
    try:
        yield f"postgresql+psycopg://pertbench@127.0.0.1:{port}/postgres"
    finally:
        run([pg_ctl, "-D", str(data_dir), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(tmp_path, toy_files, postgres_url):
    data, split = toy_files
    n_trials = 10
    common = (
        "--n-trials",
        str(n_trials),
        "--storage",
        postgres_url,
        "--study-name",
        "shared",
        "--set",
        "sleep=0.5",
        "--set",
        "epochs=2",
    )

    def start(i):
        return subprocess.Popen(
            _tune_cmd(data, split, tmp_path / f"w{i}", *common),
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # Start the second worker only once the first has finished a trial, while most of the
    # budget is left: otherwise, on a loaded machine, one worker could run the whole study
    # before the other has even imported its libraries.
    procs = [start(0)]
    storage = make_storage(postgres_url)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and procs[0].poll() is None:
        try:
            done = optuna.load_study(study_name="shared", storage=storage).get_trials(
                states=(TrialState.COMPLETE,)
            )
        except KeyError:  # the study does not exist yet
            done = []
        if done:
            break
        time.sleep(0.2)
    procs.append(start(1))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=make_storage(postgres_url))
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    # one shared study: distinct trial numbers and parameters, the budget respected
    assert n_trials <= len(finished) <= n_trials + 1  # two workers may both start the last one
    assert len({t.number for t in trials}) == len(trials)
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == len(finished)
    worker_lines = [sum("complete" in line for line in err.splitlines()) for _, err in outputs]
    assert all(n >= 1 for n in worker_lines), worker_lines
    assert sum(worker_lines) == len(finished)
    # each worker reports a best value taken from the shared study (the one that finished
    # last saw every trial, so the study's best is among the reports)
    values = {t.value for t in finished}
    best = [
        json.loads((tmp_path / f"w{i}" / "best_params.json").read_text())["value"] for i in range(2)
    ]
    assert all(b in values and b >= study.best_value for b in best)
    assert study.best_value in best
    assert math.isfinite(study.best_value)


def test_local_workers_share_the_default_sqlite_study(tmp_path, toy_files):
    data, split = toy_files
    out = tmp_path / "par"
    cmd = _tune_cmd(
        data,
        split,
        out,
        "--n-trials",
        "6",
        "--workers",
        "2",
        "--set",
        "sleep=0.15",
        "--set",
        "epochs=2",
    )
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[worker 0]" in proc.stderr and "[worker 1]" in proc.stderr
    trials = _load(out, f"pertbench-{SLEEPY}").get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 6  # the ask lock: never a seventh trial
    # the two workers really ran at the same time: some trials overlap in time
    spans = sorted((t.datetime_start, t.datetime_complete) for t in finished)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))
