"""Run a whole benchmark: materialise inputs, tune, run every cell, collect, report, package.

``run_benchmark(config, out=DIR)`` is resumable at every step: inputs are reused when their
checksums match, tuning studies continue, finished cells (``done.json``) are skipped, and the
results table, report and RO-Crate are rebuilt from the cells' files at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pertbench.benchmark import paths
from pertbench.benchmark.backends import execute, make_backend, threads_per_worker
from pertbench.benchmark.comparison import COMPARISON_COLUMNS, add_baseline_comparison
from pertbench.benchmark.config import (
    BenchmarkConfig,
    default_config_path,
    dump_config,
    load_config,
)
from pertbench.benchmark.diagnostics import collect_diagnostics
from pertbench.benchmark.jobs import (
    CEILING,
    CEILING_FILE,
    CEILING_SOURCE,
    METRIC_COLUMNS,
    SKIPPED,
    TIMING_COLUMNS,
    CellJob,
    JobOutcome,
    TuneJob,
    run_job,
)
from pertbench.benchmark.materialize import materialize, split_key
from pertbench.benchmark.validation import ValidationJob, validation_failure, validation_jobs
from pertbench.errors import ConfigError
from pertbench.utils.io import write_csv_atomic, write_parquet_atomic, write_text_atomic
from pertbench.utils.outputs import check_output, results_folder

#: The results table: a cell's metric rows, then the comparison with the baseline cells
#: (filled when the results are collected, pertbench.benchmark.comparison), then the run.
RESULT_COLUMNS = [
    *METRIC_COLUMNS[: METRIC_COLUMNS.index("normalized") + 1],
    *COMPARISON_COLUMNS,
    *METRIC_COLUMNS[METRIC_COLUMNS.index("normalized") + 1 :],
    "status",
    "error",
    "model_name",
    "tuned",
    *TIMING_COLUMNS,
]
FAILURE_COLUMNS = [
    "dataset",
    "task",
    "scenario",
    "model",
    "seed",
    "stage",
    "status",
    "error_type",
    "error",
]


@dataclass
class BenchmarkResult:
    """A finished benchmark run."""

    out_dir: Path
    results: pd.DataFrame
    failures: pd.DataFrame
    report: Path | None
    crate: Path | None
    n_cells: int
    n_skipped: int


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    handle = open(out / paths.RUN_LOCK, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ConfigError(
                f"another 'pertbench benchmark' is running in '{out}'; wait for it or choose another --out"
            ) from exc
        yield
    finally:
        handle.close()


def prepare_out_dir(config: BenchmarkConfig, out: Path, *, resume: bool) -> None:
    """Create ``out`` or check that it holds this very benchmark (with ``resume``)."""
    import yaml

    config_file = out / paths.CONFIG_FILE
    if config_file.is_file():
        if not resume:
            raise ConfigError(
                f"'{out}' already holds a benchmark; pass --resume to continue it, --overwrite "
                "to start afresh, or choose a new --out"
            )
        previous = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        current = config.to_dict()
        if previous != current:
            differing = sorted(
                k for k in set(previous) | set(current) if previous.get(k) != current.get(k)
            )
            raise ConfigError(
                f"'{out}' was run with a different config ({', '.join(differing)} differ); "
                f"resume with {config_file} or choose a new --out"
            )
    elif out.exists() and any(p.name != paths.RUN_LOCK for p in out.iterdir()):
        raise ConfigError(f"'{out}' is not empty and holds no benchmark; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)


def build_jobs(
    config: BenchmarkConfig, out: Path, manifest: Mapping[str, Any], *, threads: int | None
) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Every tune job and cell job of ``config``, and which cells wait for which tuning."""
    jobs: dict[str, Any] = {}
    deps: dict[str, set[str]] = {}
    for task_name, task in config.tasks.items():
        for ds in task.datasets:
            keys = config.datasets[ds].keys.to_dict()
            data_path = manifest["datasets"][ds]["path"]
            for scenario in config.scenario_names(task_name):
                split_path = manifest["splits"][split_key(ds, task_name, scenario)]["path"]
                for label, model in config.models.items():
                    # What a model's tuning job and its cells have in common.
                    shared = {
                        "out_dir": str(out),
                        "dataset": ds,
                        "task": task_name,
                        "scenario": scenario,
                        "model_label": label,
                        "model": model.model,
                        "data_path": data_path,
                        "split_path": split_path,
                        "keys": keys,
                        "params": dict(model.params),
                        "max_epochs": model.max_epochs or config.max_epochs,
                        "device": config.device,
                        "threads": threads,
                    }
                    tune_job = None
                    if model.tune is not None:
                        tune_job = TuneJob(
                            **shared, tune=model.tune.to_dict(), seed=config.seeds[0]
                        )
                        jobs[tune_job.id] = tune_job
                    for seed in config.seeds:
                        cell = CellJob(
                            **shared,
                            seed=seed,
                            tuning_dir=str(tune_job.directory) if tune_job else None,
                            metrics=config.metrics,
                            on=config.on,
                            save_predictions=config.save_predictions,
                            interactions=config.interactions,
                        )
                        jobs[cell.id] = cell
                        deps[cell.id] = {tune_job.id} if tune_job else set()
    return jobs, deps


def _read_metrics(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])
    text = ["dataset", "task", "scenario", "model", "split", "metric"]
    return frame.astype(dict.fromkeys(text, str))


def collect_results(jobs: Mapping[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy results table (one row per cell x metric) and the failures table.

    The failures table also lists the cells (and tuning jobs) skipped because their model
    does not apply to the task (``status`` ``skipped``, the reason in ``error``); their
    results row has status ``skipped`` and the reason in ``error``.
    """
    frames, failures = [], []
    for job in jobs.values():
        if isinstance(job, ValidationJob):
            failure = validation_failure(job)
            if failure is not None:
                failures.append(failure)
            continue
        if isinstance(job, TuneJob):
            error_file = job.directory / paths.ERROR_FILE
            done_file = job.directory / paths.DONE_FILE
            record = None
            if error_file.is_file():
                record = json.loads(error_file.read_text())
            elif done_file.is_file():
                record = json.loads(done_file.read_text())
                record = record if record.get("status") == SKIPPED else None
            if record is not None:
                failures.append(
                    {
                        "dataset": job.dataset,
                        "task": job.task,
                        "scenario": job.scenario,
                        "model": job.model_label,
                        "seed": math.nan,
                        "stage": "tune",
                        "status": record.get("status", "failed"),
                        "error_type": record.get("error_type", ""),
                        "error": record.get("error", record.get("reason", "")),
                    }
                )
            continue
        directory = job.directory
        done = directory / paths.DONE_FILE
        record = json.loads(done.read_text()) if done.is_file() else None
        if record is not None and record.get("status") == SKIPPED:
            _add_unscored(frames, failures, job, SKIPPED, record.get("reason", ""), record)
            continue
        if record is not None:
            frame = _read_metrics(directory / paths.METRICS_FILE)
            frame["status"] = "ok"
            frame["error"] = ""
            frame["model_name"] = job.model
            frame["tuned"] = bool(record.get("tuned", False))
            for column in TIMING_COLUMNS:
                frame[column] = record.get(column, math.nan)
            frames.append(frame)
            ceiling_file = directory / CEILING_FILE
            if job.model_label == CEILING_SOURCE and ceiling_file.is_file():
                # The ceiling depends on the split and seed only: take it from one cell.
                ceiling = _read_metrics(ceiling_file)
                ceiling["status"], ceiling["error"] = "ok", ""
                ceiling["model_name"], ceiling["tuned"] = CEILING, False
                frames.append(ceiling)
            continue
        error_file = directory / paths.ERROR_FILE
        if error_file.is_file():
            record = json.loads(error_file.read_text())
            error, error_type = record.get("error", ""), record.get("error_type", "")
        else:
            error, error_type = "did not run", ""
        _add_unscored(frames, failures, job, "failed", error, {"error_type": error_type})
    results = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)
    )
    for column in RESULT_COLUMNS:
        if column not in results.columns:
            results[column] = math.nan
    results = results[RESULT_COLUMNS]
    results["seed"] = results["seed"].astype(int)
    results = add_baseline_comparison(results, jobs)
    results["tuned"] = results["tuned"].astype(bool)
    results = results.sort_values(
        ["dataset", "task", "scenario", "model", "seed", "split", "metric"], kind="stable"
    )
    failures_frame = pd.DataFrame(failures, columns=FAILURE_COLUMNS)
    return results.reset_index(drop=True), failures_frame


def _add_unscored(frames: list, failures: list, job: CellJob, status: str, error: str, record):
    """A cell without metrics (failed, or skipped as not applicable): one results row
    with the status and the message, and its row in the failures table."""
    row = {
        **job.labels(),
        "split": job.on,
        "metric": "",
        "value": math.nan,
        "status": status,
        "error": error,
        "model_name": job.model,
        "tuned": job.tuning_dir is not None,
    }
    frames.append(pd.DataFrame([row]))
    failures.append(
        {
            **job.labels(),
            "stage": "cell",
            "status": status,
            "error_type": record.get("error_type", ""),
            "error": error,
        }
    )


def run_benchmark(
    config: BenchmarkConfig | str | os.PathLike | None,
    *,
    out: str | os.PathLike,
    workers: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    resume: bool = False,
    report: bool = True,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Run (or resume) a benchmark.

    Parameters
    ----------
    config
        A :class:`BenchmarkConfig`, a YAML path, or ``None`` for the shipped default.
    out
        The benchmark directory (created).
    workers
        Jobs run at once (local processes, or Ray CPUs for a local Ray cluster).
    backend
        ``local`` or ``ray``.
    ray_address
        Address of an existing Ray cluster (default: start a local one).
    resume
        Continue a run in ``out`` (the config must be the same).
    report
        Write ``report.html`` and the RO-Crate metadata at the end.
    overwrite
        Start afresh in ``out``: an earlier benchmark there is set aside and deleted once
        this run finished (put back if it fails).
    log
        Receives progress lines (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if config is None:
        config = load_config(default_config_path())
    elif not isinstance(config, BenchmarkConfig):
        config = load_config(config)
    out = Path(out).resolve()
    check_output(out, kind="resumable", overwrite=overwrite)
    if resume and overwrite:
        raise ConfigError("give either resume (continue) or overwrite (start afresh), not both")
    if overwrite and out.is_dir():
        with _run_lock(out):  # refuse to set aside a benchmark that is running
            pass
    with results_folder(out, overwrite=overwrite, has_results=_has_finished_jobs):
        prepare_out_dir(config, out, resume=resume)
        return _run(config, out, workers, backend, ray_address, report, log)


def _has_finished_jobs(out: Path) -> bool:
    """Whether a benchmark folder holds a finished tuning job or cell (worth resuming)."""
    return any(out.rglob(paths.DONE_FILE))


def _run(
    config: BenchmarkConfig,
    out: Path,
    workers: int,
    backend: str,
    ray_address: str | None,
    report: bool,
    log: Callable[[str], None],
) -> BenchmarkResult:
    start = time.perf_counter()
    with _run_lock(out):
        write_text_atomic(out / paths.CONFIG_FILE, dump_config(config))
        manifest = materialize(config, out, log=log)
        runner = make_backend(backend, workers, ray_address)
        threads = threads_per_worker(workers) if backend == "ray" or workers > 1 else None
        jobs, deps = build_jobs(config, out, manifest, threads=threads)
        jobs.update(validation_jobs(config, out, manifest, threads=threads))
        n_total = len(jobs)
        outcomes: dict[str, JobOutcome] = {}

        def on_result(jid: str, outcome: JobOutcome) -> None:
            outcomes[jid] = outcome
            if outcome.status != "skipped":
                detail = f": {outcome.error}" if outcome.error else f" ({outcome.seconds:.1f} s)"
                log(f"[{len(outcomes)}/{n_total}] {jid} {outcome.status}{detail}")

        def on_crash(jid: str, message: str) -> JobOutcome:
            job = jobs[jid]
            from pertbench.utils.io import write_json_atomic

            write_json_atomic(
                job.directory / paths.ERROR_FILE,
                {
                    "status": "failed",
                    "error_type": "WorkerError",
                    "error": message.splitlines()[0],
                    "traceback": message,
                },
            )
            return JobOutcome(
                jid,
                "tune"
                if isinstance(job, TuneJob)
                else ("validation" if isinstance(job, ValidationJob) else "cell"),
                "failed",
                message.splitlines()[0],
            )

        skipped_before = sum(
            1 for job in jobs.values() if (job.directory / paths.DONE_FILE).is_file()
        )
        if skipped_before:
            log(f"resuming: {skipped_before} of {n_total} jobs already finished")
        log(
            f"running {n_total - skipped_before} job(s) with {workers} worker(s) ({runner.name} backend)"
        )
        execute(jobs, deps, run_job, runner, on_result=on_result, on_crash=on_crash, log=log)

        results, failures = collect_results(jobs)
        collect_diagnostics((j.directory for j in jobs.values() if isinstance(j, CellJob)), out)
        write_parquet_atomic(out / paths.RESULTS_PARQUET, results)
        write_csv_atomic(out / paths.RESULTS_CSV, results)
        write_csv_atomic(out / paths.FAILURES_CSV, failures)
        cell_rows = failures[failures["stage"] == "cell"]
        n_failed = int((cell_rows["status"] != SKIPPED).sum())
        n_not_applicable = int((cell_rows["status"] == SKIPPED).sum())
        log(
            f"{len(results)} result rows from {len(jobs)} jobs in {time.perf_counter() - start:.1f} s"
            + (f"; {n_failed} cell(s) failed (see {out / paths.FAILURES_CSV})" if n_failed else "")
            + (
                f"; {n_not_applicable} cell(s) skipped: model not applicable (reasons in "
                f"{out / paths.FAILURES_CSV})"
                if n_not_applicable
                else ""
            )
        )
        report_path = crate_path = None
        if report:
            from pertbench.report import write_crate, write_report

            report_path = write_report(out)
            crate_path = write_crate(out)
    return BenchmarkResult(
        out_dir=out,
        results=results,
        failures=failures,
        report=report_path,
        crate=crate_path,
        n_cells=sum(isinstance(j, CellJob) for j in jobs.values()),
        n_skipped=skipped_before,
    )
