"""The metric validation study as a benchmark job: one per simulated dataset.

With ``evaluation.validate_metrics: true`` every simulated dataset of a benchmark gets a
job that runs :func:`pertbench.metrics.validation.validate_metrics` on it and writes
``DIR/validation/<dataset>/`` (``scores.csv``, ``detection.csv``, ``study.json``,
``heatmap.png`` and, last, ``done.json``). It runs beside the cells (its id sorts before
theirs, so a pool starts it early instead of leaving it for the end), is skipped by
``--resume`` once done, and a failure is recorded like a cell's. The report draws its
heatmap (:mod:`pertbench.report.validation`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pertbench.benchmark import paths
from pertbench.benchmark.jobs import JobOutcome, _dataset, _run_once

VALIDATION_DIR = "validation"
STAGE = "validation"


def validation_dir(out: Path, dataset: str) -> Path:
    return Path(out) / VALIDATION_DIR / paths.slug(dataset)


@dataclass(frozen=True)
class ValidationJob:
    """Run the metric validation study on one simulated dataset of a benchmark."""

    out_dir: str
    dataset: str
    data_path: str
    keys: dict[str, Any]
    seed: int = 0
    threads: int | None = None

    @property
    def id(self) -> str:
        # "analysis:" sorts before "cell:": ready jobs start in id order after tuning
        return f"analysis:validate-metrics|{self.dataset}"

    @property
    def directory(self) -> Path:
        return validation_dir(Path(self.out_dir), self.dataset)


def validation_jobs(
    config: Any, out: Path, manifest: Mapping[str, Any], *, threads: int | None
) -> dict[str, ValidationJob]:
    """One job per simulated dataset when the config asks for the study."""
    if not getattr(config, "validate_metrics", False):
        return {}
    jobs = {}
    for name, spec in config.datasets.items():
        if spec.kind != "simulate":
            continue
        job = ValidationJob(
            out_dir=str(out),
            dataset=name,
            data_path=manifest["datasets"][name]["path"],
            keys=spec.keys.to_dict(),
            seed=config.seeds[0],
            threads=threads,
        )
        jobs[job.id] = job
    return jobs


def run_validation_job(job: ValidationJob) -> JobOutcome:
    """Run the study (skipped when already done) and record how it ended."""
    return _run_once(
        job.id, STAGE, job.directory, lambda: _run(job), {"dataset": job.dataset, "stage": STAGE}
    )


def _run(job: ValidationJob) -> dict[str, Any]:
    from pertbench.data.keys import PerturbationKeys
    from pertbench.metrics.validation import validate_metrics

    start = time.perf_counter()
    adata = _dataset(job.data_path, PerturbationKeys.from_dict(job.keys))
    study = validate_metrics(adata, seed=job.seed)
    study.write(job.directory)
    return {
        "dataset": job.dataset,
        "status": "ok",
        "seconds": round(time.perf_counter() - start, 3),
    }


def validation_failure(job: ValidationJob) -> dict[str, Any] | None:
    """The failures-table row of a study that failed, else ``None``."""
    error_file = job.directory / paths.ERROR_FILE
    if (job.directory / paths.DONE_FILE).is_file() or not error_file.is_file():
        return None
    record = json.loads(error_file.read_text())
    return {
        "dataset": job.dataset,
        "task": "",
        "scenario": "",
        "model": "",
        "seed": job.seed,
        "stage": STAGE,
        "error_type": record.get("error_type", ""),
        "error": record.get("error", ""),
    }
