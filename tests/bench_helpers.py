"""Helpers shared by the tuning, benchmark and report tests.

- :class:`SleepyShift`: a tiny deterministic model (control + scale x the perturbation's
  mean training shift) whose epochs can be made slow and whose trials can be made to fail,
  so resume and failure handling are tested without waiting on real training.
- :func:`small_config` / :func:`small_run`: a tiny benchmark on simulated data, run once
  per test session and shared by the benchmark and report tests.
- :func:`subprocess_env`: environment for ``pertbench`` subprocesses that sees this
  checkout's sources and these helpers.
- :func:`descendants` / :func:`still_running`: the processes a command started, read from
  ``/proc`` (Linux), to check that none outlives it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from pertbench.data.groups import group_cells, group_mean
from pertbench.errors import ModelError
from pertbench.models.base import FitContext, PerturbationModel, PredictionInputs

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"


class SleepyShift(PerturbationModel):
    """Prediction = control expression + scale * mean training shift of each component."""

    name = "sleepy_shift"

    @dataclasses.dataclass
    class Params:
        scale: float = 1.0
        lr: float = 1e-3
        epochs: int = 3
        sleep: float = 0.0
        fail_above: float = 10.0
        fail_always: bool = False

    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "scale": {"type": "float", "low": 0.0, "high": 2.0},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
    }

    def _fit(self, train, val, context: FitContext) -> None:
        p = self.params
        if p.fail_always:
            raise ModelError("this configuration cannot be trained (test failure)")
        if p.scale > p.fail_above:
            raise ModelError(f"scale {p.scale:.3f} is above fail_above {p.fail_above}")
        keys = self.keys
        grouping = group_cells(train.obs, keys)
        means = group_mean(train.X, grouping.group_codes, grouping.n_groups)
        groups = grouping.groups
        control = {
            int(c): means[i]
            for i, c in enumerate(groups["covariate_code"])
            if groups["is_control"].iloc[i]
        }
        shifts = np.zeros((self.encoding.n_perturbations, train.n_vars))
        counts = np.zeros(self.encoding.n_perturbations)
        index = {name: i for i, name in enumerate(self.encoding.perturbations)}
        for i, row in groups.iterrows():  # loops over groups, not cells
            label = row[keys.perturbation_key]
            parts = keys.components(label)
            if len(parts) != 1 or parts[0] not in index:
                continue
            shifts[index[parts[0]]] += means[i] - control[int(row["covariate_code"])]
            counts[index[parts[0]]] += 1
        self.shift = shifts / np.maximum(counts, 1)[:, None]
        for epoch in range(int(p.epochs)):
            time.sleep(float(p.sleep))
            if context.epoch_callback is not None:
                loss = (p.scale - 1.0) ** 2 + 1.0 / (epoch + 1)
                context.epoch_callback(epoch, {"val_loss": loss})

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        X = inputs.X.toarray() if sp.issparse(inputs.X) else np.asarray(inputs.X)
        return X + self.params.scale * (inputs.perturbations @ self.shift)

    def _state(self) -> dict[str, Any]:
        import torch

        return {"shift": torch.from_numpy(self.shift)}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.shift = state["shift"].numpy()


SLEEPY = "bench_helpers:SleepyShift"

SIMULATED = {
    "n_covariates": 2,
    "n_perturbations": 6,
    "n_combinations": 3,
    "n_cells_per_group": 16,
    "n_genes": 40,
    "seed": 3,
}


def small_config(**changes: Any) -> dict[str, Any]:
    """A tiny benchmark: simulated data, transfer + combo, linear (2 epochs) + baselines."""
    config: dict[str, Any] = {
        "name": "small",
        "datasets": {"sim": {"simulate": dict(SIMULATED)}},
        "tasks": {
            "transfer": {"task": "transfer", "options": {"fraction": 0.5}},
            "combo": {"task": "combo", "options": {"fraction": 0.7}},
        },
        "models": {"linear": {"params": {"batch_size": 64}}},
        "seeds": [0, 1],
        "training": {"max_epochs": 2, "device": "cpu"},
        "evaluation": {"metrics": ["rmse_average", "pearson_delta", "rmse_rank_average"]},
    }
    config.update(changes)
    return config


_RUNS: dict[str, Any] = {}


def small_run(root: Path) -> Any:
    """Run :func:`small_config` once per session (under ``root``) and return the result."""
    if "small" not in _RUNS:
        from pertbench.benchmark.config import parse_config
        from pertbench.benchmark.runner import run_benchmark

        config = parse_config(small_config(), base_dir=root)
        _RUNS["small"] = run_benchmark(config, out=root / "small", workers=1, log=lambda m: None)
    return _RUNS["small"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m pertbench`` subprocesses: this checkout first."""
    env = dict(os.environ)
    parts = [str(SRC_DIR), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


PYTHON = sys.executable


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` -> its start time (to tell a reused pid apart)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        fields = _proc_stat(child)
        if fields is not None and fields[0] != "Z":
            out[child] = fields[19]
            todo.extend(children.get(child, []))
    return out


def still_running(processes: dict[int, str]) -> list[int]:
    """The pids of ``processes`` (from :func:`descendants`) that are still alive (not zombies)."""
    alive = []
    for pid, started in processes.items():
        fields = _proc_stat(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == started:
            alive.append(pid)
    return alive
