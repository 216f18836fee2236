"""Hyperparameter search with Optuna, called directly: TPE, pruning, resumable storage,
parallel workers, stability seeds and parameter importances.

The search runs one trial at a time per worker (``study.optimize(n_trials=1)`` in a loop), so
the stopping rule sees every other worker's progress and a resumed run continues the count
where the killed one stopped. Outputs (all written atomically in ``DIR``):

- ``study.db``: the Optuna study (default storage; see :mod:`pertbench.tuning.storage`)
- ``trials.csv``: one row per trial (state, value, parameters, validation metrics, errors)
- ``best_params.json``: the best configuration (tuned and full parameter set)
- ``importances.csv``: fANOVA parameter importances
- ``stability.csv`` / ``stability_summary.csv``: the best configuration retrained with extra
  seeds, every metric on val and test, and mean +/- sd over those seeds
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, ModelError, PertbenchError
from pertbench.metrics.objective import Objective
from pertbench.tuning.storage import (
    _quiet_optuna,
    default_storage_url,
    is_owned_storage,
    make_storage,
    recover_interrupted_trials,
    redact_url,
    run_lock,
    study_progress,
)
from pertbench.utils.io import write_csv_atomic, write_json_atomic

STABILITY_DIR = "stability"
PRUNERS = ("median", "halving", "none")
#: Abort when this many trials in a row fail with the same message: the cause is systematic.
SYSTEMATIC_FAILURES = 3


@dataclass
class TuneSettings:
    """What to search and how long.

    Attributes
    ----------
    model
        Model name (``pertbench models``) or ``package.module:Class``.
    n_trials
        Trials to finish in total (complete + pruned + failed), across resumptions and workers.
    timeout
        Stop starting new trials after this many seconds of this command (a running trial
        is allowed to finish).
    seed
        Seeds the sampler and every trial's training (the same seed for all trials, so
        trials differ only by their hyperparameters).
    objective, direction
        Objective expression over validation metrics (see :mod:`pertbench.metrics.objective`).
    stability_seeds
        Extra seeds the best configuration is retrained with (0 to skip).
    fixed_params
        Hyperparameters held fixed (not searched).
    search_space
        Overrides/extends the model's own ``search_space`` (a distribution per parameter;
        ``null`` removes a parameter from the search).
    max_epochs, device
        Training settings of every fit.
    pruner
        ``median`` (default), ``halving`` (successive halving) or ``none``.
    study_name
        Name of the study in the storage (default ``pertbench-<model>``).
    workers
        Local worker processes sharing the storage.
    storage
        SQLAlchemy URL; default ``sqlite:///DIR/study.db``.
    report_metrics
        Metrics reported for the stability seeds (``None``: the evaluator's default set).
    """

    model: str
    n_trials: int = 60
    timeout: float | None = None
    seed: int = 0
    objective: str | None = None
    direction: str = "minimize"
    stability_seeds: int = 4
    fixed_params: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, Any] | None = None
    max_epochs: int | None = None
    device: str = "auto"
    pruner: str = "median"
    study_name: str | None = None
    workers: int = 1
    storage: str | None = None
    report_metrics: tuple[str, ...] | None = None

    def validate(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"--n-trials must be at least 1, got {self.n_trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive seconds, got {self.timeout}")
        if self.stability_seeds < 0:
            raise ConfigError(f"--stability-seeds must be >= 0, got {self.stability_seeds}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ConfigError(f"--max-epochs must be at least 1, got {self.max_epochs}")


@dataclass
class TuneResult:
    """Where the outputs are, and the headline numbers."""

    out_dir: Path
    study_name: str
    storage: str
    best_value: float | None
    best_params: dict[str, Any] | None
    trials: pd.DataFrame
    importances: pd.DataFrame
    stability: pd.DataFrame
    stability_summary: pd.DataFrame


# ---------------------------------------------------------------------------------------
# Search space and study identity
# ---------------------------------------------------------------------------------------
def effective_search_space(
    model_class: Any,
    override: Mapping[str, Any] | None = None,
    fixed_params: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The model's search space, updated by ``override``, minus the fixed parameters."""
    from pertbench.models.search_space import validate_space

    space = {k: dict(v) for k, v in (getattr(model_class, "search_space", None) or {}).items()}
    for name, spec in (override or {}).items():
        if spec is None:
            space.pop(name, None)
        elif not isinstance(spec, Mapping):
            raise ConfigError(
                f"search space entry '{name}' must be a mapping like {{type: float, low: 0, high: 1}}"
            )
        else:
            space[name] = dict(spec)
    for name in fixed_params or {}:
        space.pop(name, None)
    valid = {f.name for f in dataclasses.fields(model_class.Params)}
    validate_space(space, valid_params=valid)
    return space


def _fingerprint(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_signature(adata: ad.AnnData, split: pd.Series) -> dict[str, Any]:
    """Identity of the data and split a study was run on (names, shape and the split)."""
    h_obs = hashlib.sha256("\n".join(map(str, adata.obs_names)).encode()).hexdigest()[:16]
    h_var = hashlib.sha256("\n".join(map(str, adata.var_names)).encode()).hexdigest()[:16]
    h_split = hashlib.sha256("\n".join(f"{i},{v}" for i, v in split.items()).encode()).hexdigest()[
        :16
    ]
    return {"shape": list(adata.shape), "obs": h_obs, "var": h_var, "split": h_split}


def _study_identity(
    settings: TuneSettings,
    objective: Objective,
    space: Mapping[str, Any],
    keys: PerturbationKeys,
    signature: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "model": settings.model,
        "objective": objective.expression,
        "direction": objective.direction,
        "search_space": space,
        "fixed_params": settings.fixed_params,
        "max_epochs": settings.max_epochs,
        "seed": settings.seed,
        "keys": keys.to_dict(),
        "data": dict(signature),
    }


def _open_study(
    storage_url: str, study_name: str, identity: Mapping[str, Any], pruner: Any, direction: str
) -> Any:
    import optuna

    storage = make_storage(storage_url)
    with _quiet_optuna():
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            direction=direction,
            pruner=pruner,
            load_if_exists=True,
        )
    stored = study.user_attrs.get("pertbench")
    identity = json.loads(json.dumps(identity, default=str))
    if stored is None:
        study.set_user_attr("pertbench", identity)
    elif stored != identity:
        differing = sorted(
            k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
        )
        raise ConfigError(
            f"study '{study_name}' in {redact_url(storage_url)} was run with a different "
            f"{', '.join(differing)}; resume with the same settings or choose another --out/--study-name"
        )
    return study


def make_pruner(kind: str) -> Any:
    """The pruner for validation-loss curves (see docs/benchmark.md for the choice)."""
    import optuna

    if kind == "median":
        # A trial is stopped when its val loss is worse than the median of earlier trials at
        # the same epoch, once 5 trials completed and after 3 warm-up epochs.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3, interval_steps=1)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.NopPruner()


def make_sampler(seed: int, n_existing: int, worker: int, n_trials: int) -> Any:
    """A TPE sampler seeded from (seed, trials so far, worker).

    Re-seeding per trial makes trial k depend only on the seed and trials 0..k-1, so a
    resumed run continues the same sequence instead of replaying its first suggestions.
    """
    import optuna

    state = np.random.SeedSequence([int(seed), int(n_existing), int(worker)]).generate_state(1)[0]
    with _quiet_optuna():
        return optuna.samplers.TPESampler(
            seed=int(state),
            n_startup_trials=max(2, min(10, n_trials // 3)),
            multivariate=True,
            constant_liar=True,
        )


# ---------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------
class _TrialFailed(Exception):
    """This configuration failed (diverged, invalid combination, out of memory)."""


@dataclass
class _SearchContext:
    adata: ad.AnnData
    split: pd.Series
    keys: PerturbationKeys
    settings: TuneSettings
    objective: Objective
    space: dict[str, Any]
    storage_url: str
    study_name: str
    identity: dict[str, Any]
    out_dir: Path
    log: Callable[[str], None]


def _trial_function(ctx: _SearchContext, current: dict[str, int]) -> Callable[[Any], float]:
    """The Optuna objective; it records the number of the trial it runs in ``current``."""
    import optuna

    from pertbench.models.search_space import suggest_params
    from pertbench.tuning.fitting import fit_and_evaluate, is_trial_failure

    settings = ctx.settings

    def objective(trial: optuna.Trial) -> float:
        current["number"] = trial.number
        if trial.user_attrs.get("error"):
            # A re-queued trial inherits the user attributes of the run that died.
            trial.set_user_attr("error", "")
        params = {**settings.fixed_params, **suggest_params(trial, ctx.space)}

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            loss = metrics.get("val_loss")
            if loss is not None and math.isfinite(loss):
                trial.report(float(loss), int(epoch))
                if trial.should_prune():
                    raise optuna.TrialPruned(f"val_loss {loss:.4g} at epoch {epoch}")

        try:
            outcome = fit_and_evaluate(
                ctx.adata,
                ctx.split,
                model=settings.model,
                params=params,
                keys=ctx.keys,
                seed=settings.seed,
                on=("val",),
                metrics=ctx.objective.metrics,
                device=settings.device,
                max_epochs=settings.max_epochs,
                epoch_callback=on_epoch,
            )
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            if isinstance(exc, PertbenchError) or is_trial_failure(exc):
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                trial.set_user_attr("error", message)
                raise _TrialFailed(message) from exc
            raise
        values = outcome.values["val"]
        for name in ctx.objective.metrics:
            trial.set_user_attr(f"val_{name}", values.get(name, math.nan))
        trial.set_user_attr("fit_seconds", round(outcome.fit_seconds, 3))
        value = ctx.objective.evaluate(values)
        if not math.isfinite(value):
            missing = [
                m for m in ctx.objective.metrics if not math.isfinite(values.get(m, math.nan))
            ]
            message = f"objective is not finite: {', '.join(missing) or '?'} undefined on val"
            if any("_rank_" in m for m in missing):
                message += (
                    " (rank metrics need at least 2 validation perturbations per covariate;"
                    " use a split with more, or another --objective)"
                )
            trial.set_user_attr("error", message)
            raise _TrialFailed(message)
        return value

    return objective


def _search(ctx: _SearchContext, *, worker: int, deadline: float | None) -> None:
    """One worker's loop: run trials until the study has ``n_trials`` finished ones."""

    settings = ctx.settings
    study = _open_study(
        ctx.storage_url,
        ctx.study_name,
        ctx.identity,
        make_pruner(settings.pruner),
        ctx.objective.direction,
    )
    current: dict[str, int] = {}
    objective = _trial_function(ctx, current)
    recent_errors: list[str] = []
    while True:
        if deadline is not None and time.time() >= deadline:
            ctx.log(f"worker {worker}: timeout reached; no new trials")
            break
        progress = study_progress(study)
        if progress.waiting == 0 and progress.finished + progress.running >= settings.n_trials:
            break
        study.sampler = make_sampler(
            settings.seed, len(study.get_trials(deepcopy=False)), worker, settings.n_trials
        )
        current.clear()
        with _quiet_optuna():
            study.optimize(objective, n_trials=1, catch=(_TrialFailed,), gc_after_trial=True)
        write_trials_csv(study, ctx.out_dir)
        last = _trial_by_number(study, current.get("number"))
        if last is not None:
            ctx.log(_describe_trial(last, study, settings.n_trials))
            error = last.user_attrs.get("error")
            recent_errors = [*recent_errors, error][-SYSTEMATIC_FAILURES:] if error else []
            if len(recent_errors) == SYSTEMATIC_FAILURES and len(set(recent_errors)) == 1:
                raise ModelError(
                    f"{SYSTEMATIC_FAILURES} trials in a row failed with: {recent_errors[0]}"
                )


def _trial_by_number(study: Any, number: int | None) -> Any:
    if number is None:
        return None
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            return trial
    return None


def _describe_trial(trial: Any, study: Any, n_trials: int) -> str:
    progress = study_progress(study)
    state = trial.state.name.lower()
    value = f" value={trial.value:.5g}" if trial.value is not None and state == "complete" else ""
    error = f" ({trial.user_attrs['error']})" if trial.user_attrs.get("error") else ""
    try:
        best = f" best={study.best_value:.5g}"
    except ValueError:
        best = ""
    return f"trial {trial.number} {state}{value}{error} [{progress.finished}/{n_trials}]{best}"


def write_trials_csv(study: Any, out_dir: Path) -> pd.DataFrame:
    """Write ``trials.csv``: one row per trial, parameters and validation metrics as columns."""
    frame = trials_table(study)
    write_csv_atomic(Path(out_dir) / "trials.csv", frame)
    return frame


def trials_table(study: Any) -> pd.DataFrame:
    """All trials as a flat table (``params_*``, ``user_attrs_*``, ``retry_of``)."""
    trials = study.get_trials(deepcopy=False)
    columns = ["number", "state", "value", "datetime_start", "datetime_complete", "duration_s"]
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.values is not None else math.nan,
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else "",
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else "",
            "duration_s": (
                (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_start and t.datetime_complete
                else math.nan
            ),
            "retry_of": t.system_attrs.get("failed_trial", ""),
            "last_epoch": max(t.intermediate_values) if t.intermediate_values else "",
        }
        row.update({f"params_{k}": v for k, v in t.params.items()})
        row.update({f"user_attrs_{k}": v for k, v in t.user_attrs.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=[*columns, "retry_of", "last_epoch"])
    return frame.sort_values("number").reset_index(drop=True)


def _run_workers(
    ctx: _SearchContext, data_path: Path, split_path: Path, deadline: float | None
) -> None:
    """Start ``settings.workers`` spawned processes on the same storage and wait for them."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    spec = {
        "data_path": str(data_path),
        "split_path": str(split_path),
        "keys": ctx.keys.to_dict(),
        "settings": dataclasses.asdict(ctx.settings),
        "storage_url": ctx.storage_url,
        "study_name": ctx.study_name,
        "identity": ctx.identity,
        "space": ctx.space,
        "out_dir": str(ctx.out_dir),
        "deadline": deadline,
        "threads": max(1, (os.cpu_count() or 1) // ctx.settings.workers),
    }
    processes = [
        spawn.Process(target=_worker_entry, args=(spec, i), name=f"pertbench-tune-{i}")
        for i in range(ctx.settings.workers)
    ]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except BaseException:
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join()
        raise
    failed = [(i, p.exitcode) for i, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        ctx.log(
            "worker(s) "
            + ", ".join(f"{i} (exit code {code})" for i, code in failed)
            + " stopped early; their messages are above"
        )


def _worker_entry(spec: dict[str, Any], worker: int) -> None:
    """Entry point of a spawned tuning worker (top level, so it pickles)."""
    import torch

    from pertbench.tuning.fitting import load_dataset, load_split

    torch.set_num_threads(int(spec["threads"]))
    keys = PerturbationKeys.from_dict(spec["keys"])
    settings_dict = dict(spec["settings"])
    if settings_dict.get("report_metrics") is not None:
        settings_dict["report_metrics"] = tuple(settings_dict["report_metrics"])
    settings = TuneSettings(**settings_dict)
    adata = load_dataset(spec["data_path"], keys=keys)
    split = load_split(spec["split_path"], adata)
    ctx = _SearchContext(
        adata=adata,
        split=split,
        keys=keys,
        settings=settings,
        objective=Objective.parse(settings.objective, direction=settings.direction),
        space=spec["space"],
        storage_url=spec["storage_url"],
        study_name=spec["study_name"],
        identity=spec["identity"],
        out_dir=Path(spec["out_dir"]),
        log=lambda msg: print(f"[worker {worker}] {msg}", file=sys.stderr, flush=True),
    )
    try:
        _search(ctx, worker=worker, deadline=spec["deadline"])
    except PertbenchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# ---------------------------------------------------------------------------------------
# After the search: best configuration, importances, stability
# ---------------------------------------------------------------------------------------
def best_configuration(
    study: Any, model_class: Any, settings: TuneSettings
) -> dict[str, Any] | None:
    """The best complete trial as a JSON-able dict (``None`` if no trial completed)."""
    from optuna.trial import TrialState

    from pertbench.tuning.fitting import resolve_params

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    tuned = dict(best.params)
    full = resolve_params(model_class, {**settings.fixed_params, **tuned})
    return {
        "model": settings.model,
        "objective": study.user_attrs.get("pertbench", {}).get("objective"),
        "direction": study.direction.name.lower(),
        "value": best.value,
        "trial": best.number,
        "n_complete": len(complete),
        "params": tuned,
        "fixed_params": dict(settings.fixed_params),
        "all_params": json.loads(json.dumps(full, default=list)),
        "validation_metrics": {
            k[len("val_") :]: v for k, v in best.user_attrs.items() if k.startswith("val_")
        },
    }


def parameter_importances(study: Any, *, seed: int = 0) -> pd.DataFrame:
    """fANOVA importances of the tuned parameters (empty table when they cannot be computed).

    They need at least two complete trials and a parameter that varied; otherwise the table
    is empty and ``note`` says why.
    """
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    columns = ["param", "importance", "evaluator", "n_trials", "note"]
    varied = {
        name
        for name in {p for t in complete for p in t.params}
        if len({json.dumps(t.params.get(name), default=str) for t in complete}) > 1
    }
    if len(complete) < 2 or not varied:
        note = "needs at least 2 complete trials with varying parameters"
        return pd.DataFrame(
            [
                {
                    "param": "",
                    "importance": math.nan,
                    "evaluator": "fanova",
                    "n_trials": len(complete),
                    "note": note,
                }
            ],
            columns=columns,
        )
    try:
        with _quiet_optuna():
            importances = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=int(seed)),
                normalize=True,
            )
    except (RuntimeError, ValueError) as exc:
        return pd.DataFrame(
            [
                {
                    "param": "",
                    "importance": math.nan,
                    "evaluator": "fanova",
                    "n_trials": len(complete),
                    "note": str(exc).splitlines()[0],
                }
            ],
            columns=columns,
        )
    return pd.DataFrame(
        [
            {
                "param": k,
                "importance": float(v),
                "evaluator": "fanova",
                "n_trials": len(complete),
                "note": "",
            }
            for k, v in importances.items()
        ],
        columns=columns,
    )


def stability_seeds(seed: int, n: int) -> list[int]:
    """The extra seeds of the stability stage: ``seed + 1 ... seed + n``."""
    return [int(seed) + i for i in range(1, int(n) + 1)]


def run_stability(
    adata: ad.AnnData,
    split: pd.Series,
    *,
    best: Mapping[str, Any],
    settings: TuneSettings,
    keys: PerturbationKeys,
    out_dir: Path,
    log: Callable[[str], None],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Retrain the best configuration with the stability seeds; resumable per seed.

    Returns
    -------
    (per_seed, summary)
        ``per_seed``: one row per (seed, split, metric); ``summary``: mean, sd (ddof=1) and
        the number of seeds per (split, metric).
    """
    from pertbench.tuning.fitting import fit_and_evaluate

    parts = [p for p in ("val", "test") if (split == p).any()]
    params = dict(best["all_params"])
    params_hash = _fingerprint(
        {"params": params, "model": settings.model, "metrics": settings.report_metrics}
    )
    frames = []
    for seed in stability_seeds(settings.seed, settings.stability_seeds):
        seed_dir = Path(out_dir) / STABILITY_DIR / f"seed_{seed}"
        marker = seed_dir / "done.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("params_hash") == params_hash:
                frames.append(pd.read_csv(seed_dir / "metrics.csv"))
                continue
        log(f"stability: retraining the best configuration with seed {seed}")
        outcome = fit_and_evaluate(
            adata,
            split,
            model=settings.model,
            params=params,
            keys=keys,
            seed=seed,
            on=parts,
            metrics=settings.report_metrics,
            device=settings.device,
            max_epochs=settings.max_epochs,
        )
        rows = [
            {"seed": seed, "split": part, "metric": metric, "value": value}
            for part in parts
            for metric, value in outcome.values[part].items()
        ]
        frame = pd.DataFrame(rows, columns=["seed", "split", "metric", "value"])
        write_csv_atomic(seed_dir / "metrics.csv", frame)
        write_json_atomic(
            marker,
            {"seed": seed, "params_hash": params_hash, "fit_seconds": outcome.fit_seconds},
        )
        frames.append(frame)
    per_seed = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["seed", "split", "metric", "value"])
    )
    summary = summarize_seeds(per_seed)
    return per_seed, summary


def summarize_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample sd (ddof=1; NaN with one seed) and count per (split, metric).

    Uses :func:`pertbench.metrics.summarize_seeds` on each split's per-seed summaries.
    """
    from pertbench.metrics import summarize_seeds as across_seeds

    columns = ["split", "metric", "mean", "sd", "n_seeds"]
    if per_seed.empty:
        return pd.DataFrame(columns=columns)
    frames = []
    for part, rows in per_seed.groupby("split", sort=True):
        summaries = [seed_rows[["metric", "value"]] for _, seed_rows in rows.groupby("seed")]
        frame = across_seeds(summaries).rename(columns={"n": "n_seeds"})
        frames.append(frame.assign(split=part))
    summary = pd.concat(frames, ignore_index=True)
    return summary[columns].sort_values(["split", "metric"]).reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def tune(
    data: str | os.PathLike | ad.AnnData,
    split: str | os.PathLike | pd.Series,
    *,
    out: str | os.PathLike,
    settings: TuneSettings,
    keys: PerturbationKeys | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search hyperparameters of one model on one split; resumable; see the module docstring.

    Parameters
    ----------
    data
        ``.h5ad`` path (or an AnnData; with several workers it is written to ``DIR/inputs``).
    split
        Split CSV path (or a Series aligned to the data); needs train and val cells.
    out
        Output directory (created; an existing study there is resumed).
    settings
        :class:`TuneSettings`.
    keys
        Perturbation/covariate columns.
    log
        Receives one progress line per trial and stage (default: stderr).
    """
    from pertbench.data.splits import write_split
    from pertbench.tuning.fitting import (
        load_dataset,
        load_split,
        require_split_parts,
        resolve_model_class,
        resolve_params,
    )
    from pertbench.utils.io import write_h5ad_atomic

    settings.validate()
    keys = keys or PerturbationKeys()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    objective = Objective.parse(settings.objective, direction=settings.direction)
    model_class = resolve_model_class(settings.model)
    resolve_params(model_class, settings.fixed_params)  # reject unknown/badly typed fixed params
    space = effective_search_space(model_class, settings.search_space, settings.fixed_params)
    if not space:
        raise ConfigError(
            f"model '{settings.model}' has no hyperparameters to search; "
            "give a search space or train it directly with fixed parameters"
        )
    storage_url = settings.storage or default_storage_url(out_dir)
    study_name = settings.study_name or f"pertbench-{settings.model}"
    start = time.time()
    deadline = start + settings.timeout if settings.timeout else None

    with run_lock(out_dir):
        if isinstance(data, ad.AnnData):
            adata = data
            data_path = None
        else:
            data_path = Path(data)
            adata = load_dataset(data_path, keys=keys)
        if isinstance(split, pd.Series):
            from pertbench.models.base import align_split

            split_series = align_split(adata, split)
            split_path = None
        else:
            split_path = Path(split)
            split_series = load_split(split_path, adata)
        require_split_parts(split_series, ["train", "val"], what="tuning")
        identity = _study_identity(
            settings, objective, space, keys, data_signature(adata, split_series)
        )
        ctx = _SearchContext(
            adata=adata,
            split=split_series,
            keys=keys,
            settings=settings,
            objective=objective,
            space=space,
            storage_url=storage_url,
            study_name=study_name,
            identity=identity,
            out_dir=out_dir,
            log=log,
        )
        study = _open_study(
            storage_url, study_name, identity, make_pruner(settings.pruner), objective.direction
        )
        if is_owned_storage(storage_url, out_dir):
            recovered = recover_interrupted_trials(study)
            if recovered:
                log(
                    f"resuming: trial(s) {', '.join(map(str, recovered))} were interrupted and are queued again"
                )
        progress = study_progress(study)
        if progress.finished:
            log(
                f"resuming study '{study_name}': {progress.finished}/{settings.n_trials} trials already finished"
            )

        if settings.workers == 1:
            _search(ctx, worker=0, deadline=deadline)
        else:
            if data_path is None:
                data_path = write_h5ad_atomic(out_dir / "inputs" / "data.h5ad", adata)
            if split_path is None:
                split_path = write_split(split_series, out_dir / "inputs" / "split.csv")
            _run_workers(ctx, data_path, split_path, deadline)

        trials = write_trials_csv(study, out_dir)
        best = best_configuration(study, model_class, settings)
        importances = parameter_importances(study, seed=settings.seed)
        write_csv_atomic(out_dir / "importances.csv", importances)
        if best is None:
            raise ModelError(
                f"no trial of '{settings.model}' completed; see the errors in {out_dir / 'trials.csv'}"
            )
        best["study_name"] = study_name
        best["storage"] = redact_url(storage_url)
        write_json_atomic(out_dir / "best_params.json", best)
        log(f"best trial {best['trial']}: {objective.expression} = {best['value']:.5g}")
        per_seed, summary = run_stability(
            adata, split_series, best=best, settings=settings, keys=keys, out_dir=out_dir, log=log
        )
        write_csv_atomic(out_dir / "stability.csv", per_seed)
        write_csv_atomic(out_dir / "stability_summary.csv", summary)
    return TuneResult(
        out_dir=out_dir,
        study_name=study_name,
        storage=redact_url(storage_url),
        best_value=best["value"],
        best_params=best["all_params"],
        trials=trials,
        importances=importances,
        stability=per_seed,
        stability_summary=summary,
    )
