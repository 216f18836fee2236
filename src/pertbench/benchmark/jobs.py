"""The job functions a backend runs: tune one model, or fit-predict-evaluate one cell.

A *cell* is one (dataset, task, scenario, model, seed). Its folder holds
``predictions.h5ad``, ``metrics.csv`` (tidy: one row per metric), ``per_group.csv``, the
model diagnostics ``probe.csv`` and ``collapse.csv`` (:mod:`pertbench.benchmark.diagnostics`)
and, written last and atomically, ``done.json``; a resumed run skips every cell that has it.
A cell that raises writes ``error.json`` instead (no ``done.json``), so it is recorded and
retried by the next ``--resume``, and the rest of the benchmark carries on.
"""

from __future__ import annotations

import json
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.benchmark import paths
from pertbench.utils.io import write_csv_atomic, write_json_atomic

#: Columns of a cell's tidy metrics table (and of the benchmark's results table).
METRIC_COLUMNS = [
    "dataset",
    "task",
    "scenario",
    "model",
    "seed",
    "split",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "normalized",
    "n_groups",
]
TIMING_COLUMNS = ["fit_seconds", "predict_seconds", "evaluate_seconds"]
CEILING = "ceiling"
#: Status of a cell (or tuning job) whose model does not apply to the task.
SKIPPED = "skipped"
CEILING_FILE = "ceiling.csv"
#: The cell whose evaluation contributes the ceiling rows of its (dataset, task, scenario, seed).
CEILING_SOURCE = "no_change"


@dataclass(frozen=True)
class CellJob:
    """Everything one cell needs, picklable for worker processes and Ray."""

    out_dir: str
    dataset: str
    task: str
    scenario: str
    model_label: str
    model: str
    seed: int
    data_path: str
    split_path: str
    keys: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    tuning_dir: str | None = None
    max_epochs: int | None = None
    device: str = "auto"
    metrics: tuple[str, ...] | None = None
    on: str = "test"
    save_predictions: str = "cells"
    interactions: bool = True
    threads: int | None = None

    @property
    def id(self) -> str:
        return f"cell:{self.dataset}|{self.task}|{self.scenario}|{self.model_label}|{self.seed}"

    @property
    def directory(self) -> Path:
        return paths.cell_dir(
            Path(self.out_dir), self.dataset, self.task, self.scenario, self.model_label, self.seed
        )

    def labels(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "task": self.task,
            "scenario": self.scenario,
            "model": self.model_label,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class TuneJob:
    """Tune one model on one (dataset, task, scenario); its cells then use the best params."""

    out_dir: str
    dataset: str
    task: str
    scenario: str
    model_label: str
    model: str
    data_path: str
    split_path: str
    keys: dict[str, Any]
    tune: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    max_epochs: int | None = None
    device: str = "auto"
    threads: int | None = None

    @property
    def id(self) -> str:
        return f"tune:{self.dataset}|{self.task}|{self.scenario}|{self.model_label}"

    @property
    def directory(self) -> Path:
        return paths.tuning_dir(
            Path(self.out_dir), self.dataset, self.task, self.scenario, self.model_label
        )


@dataclass
class JobOutcome:
    """What the runner learns from a job (the files hold the details)."""

    id: str
    kind: str
    status: str  # "ok" | "skipped" (already done) | "not_applicable" | "failed"
    error: str = ""
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------
# Per-process dataset cache: consecutive jobs of one worker usually share a dataset.
# ---------------------------------------------------------------------------------------
_DATA_CACHE: dict[str, tuple[float, Any]] = {}
_CACHE_SIZE = 2


def _dataset(path: str, keys: Any) -> Any:
    from pertbench.tuning.fitting import load_dataset

    mtime = Path(path).stat().st_mtime
    hit = _DATA_CACHE.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    adata = load_dataset(path, keys=keys)
    if len(_DATA_CACHE) >= _CACHE_SIZE:
        _DATA_CACHE.pop(next(iter(_DATA_CACHE)))
    _DATA_CACHE[path] = (mtime, adata)
    return adata


def run_job(job: Any) -> JobOutcome:
    """Run one job: a cell, a tuning or a validation study (what every backend executes)."""
    if job.threads:
        import torch

        if torch.get_num_threads() != job.threads:  # a Ray task's first job in its process
            from pertbench.utils.processes import limit_threads

            limit_threads(int(job.threads))
    if isinstance(job, TuneJob):
        return run_tune_job(job)
    if isinstance(job, CellJob):
        return run_cell_job(job)
    from pertbench.benchmark.validation import run_validation_job

    return run_validation_job(job)


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {
        "status": "failed",
        "error_type": type(exc).__name__,
        "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        "traceback": traceback.format_exc(),
    }


def _run_once(
    job_id: str,
    kind: str,
    directory: Path,
    work: Callable[[], dict[str, Any]],
    error_labels: dict[str, Any],
) -> JobOutcome:
    """Run ``work`` unless ``directory`` holds the done marker, and record how it ended.

    Success writes ``work``'s record as the done marker, last, so a job killed midway
    is never counted as done; failure writes the error record (with ``error_labels``)
    and leaves the other jobs running. A model that does not apply to the task
    (:class:`~pertbench.errors.NotApplicableError`, e.g. a one-hot model asked for unseen
    perturbations) is done with status ``skipped`` and the one-line reason: rerunning it
    would give the same answer.
    """
    from pertbench.errors import NotApplicableError

    start = time.perf_counter()
    marker = directory / paths.DONE_FILE
    if marker.is_file():
        return JobOutcome(job_id, kind, "skipped")
    (directory / paths.ERROR_FILE).unlink(missing_ok=True)
    try:
        record = work()
    except NotApplicableError as exc:
        reason = str(exc).splitlines()[0]
        record = {
            **error_labels,
            "status": SKIPPED,
            "error_type": type(exc).__name__,
            "reason": reason,
        }
        write_json_atomic(marker, record)
        return JobOutcome(job_id, kind, "not_applicable", reason, time.perf_counter() - start)
    except Exception as exc:
        record = {**error_labels, **_error_record(exc)}
        write_json_atomic(directory / paths.ERROR_FILE, record)
        return JobOutcome(job_id, kind, "failed", record["error"], time.perf_counter() - start)
    write_json_atomic(marker, record)  # last: the job counts as done only now
    return JobOutcome(job_id, kind, "ok", seconds=time.perf_counter() - start)


def run_tune_job(job: TuneJob) -> JobOutcome:
    """Tune (resumably) and write ``best_params.json`` in the job's tuning folder."""
    return _run_once(job.id, "tune", job.directory, lambda: _run_tune(job), {})


def _run_tune(job: TuneJob) -> dict[str, Any]:
    from pertbench.data.keys import PerturbationKeys
    from pertbench.tuning.study import TuneSettings, tune

    start = time.perf_counter()
    spec = dict(job.tune)
    settings = TuneSettings(
        model=job.model,
        n_trials=int(spec.get("n_trials", 20)),
        timeout=spec.get("timeout"),
        seed=job.seed,
        objective=spec.get("objective"),
        direction=spec.get("direction", "minimize"),
        stability_seeds=0,  # the benchmark's seeds are the stability runs
        fixed_params=dict(job.params),
        search_space=spec.get("search_space"),
        max_epochs=job.max_epochs,
        device=job.device,
        pruner=spec.get("pruner", "median"),
        study_name=f"pertbench-{job.dataset}-{job.task}-{job.scenario}-{job.model_label}",
    )
    keys = PerturbationKeys.from_dict(job.keys)
    adata = _dataset(job.data_path, keys)
    _check_applicable(job, adata, keys, job.split_path, on=("val",))
    tune(
        adata,
        job.split_path,
        out=job.directory,
        settings=settings,
        keys=keys,
        log=lambda msg: None,
    )
    return {"status": "ok", "seconds": round(time.perf_counter() - start, 3)}


def _check_applicable(job: CellJob | TuneJob, adata: Any, keys: Any, split: Any, *, on) -> None:
    """Skip a model that cannot predict the task's held-out perturbations before training."""
    from pertbench.data.splits import read_split
    from pertbench.models.registry import create_model
    from pertbench.tuning.fitting import check_applicable

    if not isinstance(split, pd.Series):
        split = read_split(split, adata.obs_names)
    model = create_model(job.model, keys=keys, **dict(job.params))
    check_applicable(model, adata, split, keys=keys, on=on)


def run_cell_job(job: CellJob) -> JobOutcome:
    """Fit, predict, evaluate and write one cell (skipped when already done)."""
    return _run_once(
        job.id, "cell", job.directory, lambda: _run_cell(job, job.directory), job.labels()
    )


def _run_cell(job: CellJob, directory: Path) -> dict[str, Any]:
    from pertbench.benchmark.combinations import interaction_metric_rows
    from pertbench.benchmark.diagnostics import write_cell_diagnostics
    from pertbench.data.keys import PerturbationKeys
    from pertbench.data.splits import read_split
    from pertbench.errors import ModelError
    from pertbench.tuning.fitting import fit_and_evaluate

    keys = PerturbationKeys.from_dict(job.keys)
    adata = _dataset(job.data_path, keys)
    split = read_split(job.split_path, adata.obs_names)
    _check_applicable(job, adata, keys, split, on=(job.on,))
    params = dict(job.params)
    if job.tuning_dir is not None:
        best_file = Path(job.tuning_dir) / "best_params.json"
        if not best_file.is_file():
            raise ModelError(
                f"tuning of '{job.model_label}' did not finish; see {Path(job.tuning_dir) / paths.ERROR_FILE}"
            )
        params = dict(json.loads(best_file.read_text())["all_params"])
    outcome = fit_and_evaluate(
        adata,
        split,
        model=job.model,
        params=params,
        keys=keys,
        seed=job.seed,
        on=(job.on,),
        metrics=job.metrics,
        device=job.device,
        max_epochs=job.max_epochs,
        log_dir=directory / "training",
        baselines=("no_change",),
        ceiling=True,  # the noise ceiling is always part of a benchmark
        model_name=job.model_label,
        # every cell of a split and seed has the same ceiling: computed once per worker
        reuse_references=True,
    )
    pred = outcome.predictions[job.on]
    _save_predictions(pred, directory, job, keys)
    evaluation = outcome.evaluations[job.on]
    metrics, ceiling = cell_metrics_table(evaluation, job, keys)
    if job.interactions:  # genetic interactions of the held-out combinations, if any
        gi_rows = interaction_metric_rows(
            adata, pred, split, keys=keys, job=job, directory=directory, columns=METRIC_COLUMNS
        )
        if gi_rows is not None:
            metrics = pd.concat([metrics, gi_rows], ignore_index=True)
    write_csv_atomic(directory / paths.METRICS_FILE, metrics)
    write_csv_atomic(directory / CEILING_FILE, ceiling)
    per_group = getattr(evaluation, "per_group", None)
    if isinstance(per_group, pd.DataFrame):
        write_csv_atomic(directory / paths.PER_GROUP_FILE, per_group)
    diagnostics = write_cell_diagnostics(
        outcome.model,
        adata,
        split,
        pred,
        directory=directory,
        labels=job.labels(),
        keys=keys,
        on=job.on,
        seed=job.seed,
    )
    return {
        **diagnostics,
        **job.labels(),
        "status": "ok",
        "model_name": job.model,
        "params": _jsonable(params),
        "tuned": job.tuning_dir is not None,
        "fit_seconds": round(outcome.fit_seconds, 3),
        "predict_seconds": round(outcome.predict_seconds, 3),
        "evaluate_seconds": round(outcome.evaluate_seconds, 3),
    }


def _save_predictions(pred: Any, directory: Path, job: CellJob, keys: Any) -> None:
    from pertbench.utils.io import write_h5ad_atomic

    if job.save_predictions == "none":
        return
    if job.save_predictions == "mean":
        from pertbench.data.groups import group_cells, group_mean

        grouping = group_cells(pred.obs, keys)
        means = group_mean(pred.X, grouping.group_codes, grouping.n_groups).astype(np.float32)
        import anndata as ad

        obs = grouping.groups.drop(columns=["covariate_code", "perturbation_code"]).astype(
            {"n_cells": int}
        )
        obs.index = [str(i) for i in range(len(obs))]
        pred = ad.AnnData(X=means, obs=obs, var=pred.var.copy())
    write_h5ad_atomic(directory / paths.PREDICTIONS_FILE, pred)


def cell_metrics_table(
    evaluation: Any, job: CellJob, keys: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tidy rows (one per metric) of the model and of the noise ceiling, labelled with the cell.

    The evaluator's summary holds bare metric rows (the model), ``normalized/<metric>`` rows
    (the calibrated score) and ``<reference>/<metric>`` rows (baselines, ``ceiling``).
    """
    summary = evaluation.summary.copy()
    names = summary["metric"].astype(str)
    reference = names.str.partition("/")[0].where(names.str.contains("/"), "")
    bare = names.str.partition("/")[2].where(names.str.contains("/"), names)
    summary["reference"], summary["name"] = reference, bare
    model = summary[summary["reference"] == ""].set_index("name")
    normalized = summary[summary["reference"] == "normalized"].set_index("name")["value"]
    per_group = getattr(evaluation, "per_group", None)
    n_groups = math.nan
    if isinstance(per_group, pd.DataFrame):
        # evaluated groups (a model named like a baseline appears twice in the table)
        group_columns = [*keys.covariate_keys, keys.perturbation_key]
        n_groups = len(per_group[group_columns].drop_duplicates())

    def table(frame: pd.DataFrame, label: str, norm: pd.Series | None) -> pd.DataFrame:
        out = pd.DataFrame(
            {
                "metric": frame.index.astype(str),
                "value": frame["value"].to_numpy(dtype=float),
                "ci_low": frame.get("ci_low", pd.Series(math.nan, index=frame.index)).to_numpy(
                    dtype=float
                ),
                "ci_high": frame.get("ci_high", pd.Series(math.nan, index=frame.index)).to_numpy(
                    dtype=float
                ),
            }
        )
        out["normalized"] = (
            norm.reindex(frame.index).to_numpy(dtype=float) if norm is not None else math.nan
        )
        out["n_groups"] = n_groups
        for key, value in job.labels().items():
            out[key] = value
        out["model"] = label
        out["split"] = job.on
        return out[METRIC_COLUMNS].sort_values("metric").reset_index(drop=True)

    ceiling = summary[summary["reference"] == "ceiling"].set_index("name")
    return table(model, job.model_label, normalized), table(ceiling, CEILING, None)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def job_to_dict(job: CellJob | TuneJob) -> dict[str, Any]:
    return asdict(job)
