"""Layout of a benchmark directory, and safe folder names for user-supplied labels."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
FAILURES_CSV = "failures.csv"
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
DONE_FILE = "done.json"
ERROR_FILE = "error.json"
METRICS_FILE = "metrics.csv"
PER_GROUP_FILE = "per_group.csv"
PREDICTIONS_FILE = "predictions.h5ad"
RUN_LOCK = ".benchmark.lock"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(name: str) -> str:
    """A folder-safe, unique rendering of ``name``.

    Safe names stay as they are; others are cleaned and get a short hash of the original so
    two different labels never share a folder.
    """
    name = str(name)
    cleaned = _UNSAFE.sub("_", name).strip("._")[:48] or "x"
    if cleaned == name:
        return name
    return f"{cleaned}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def dataset_file(out: Path, dataset: str) -> Path:
    return Path(out) / "datasets" / f"{slug(dataset)}.h5ad"


def split_file(out: Path, dataset: str, task: str, scenario: str) -> Path:
    return Path(out) / "splits" / slug(dataset) / slug(task) / f"{slug(scenario)}.csv"


def cell_dir(out: Path, dataset: str, task: str, scenario: str, model: str, seed: int) -> Path:
    return (
        Path(out)
        / "cells"
        / slug(dataset)
        / slug(task)
        / slug(scenario)
        / slug(model)
        / f"seed_{seed}"
    )


def tuning_dir(out: Path, dataset: str, task: str, scenario: str, model: str) -> Path:
    return Path(out) / "tuning" / slug(dataset) / slug(task) / slug(scenario) / slug(model)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
