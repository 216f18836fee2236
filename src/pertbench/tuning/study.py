"""Hyperparameter search with Optuna, called directly: TPE, pruning, resumable storage,
parallel workers, stability seeds and parameter importances.

The search runs one trial at a time per worker (``study.optimize(n_trials=1)`` in a loop), so
the stopping rule sees every other worker's progress and a resumed run continues the count
where the killed one stopped. Each trial's configuration is planned by
:mod:`pertbench.tuning.sampling` from the seed, the trial's index and the finished trials
before it, so a killed and resumed run gives exactly the trials of an uninterrupted one. The
model's search space is first sized for the data and the device
(:func:`pertbench.models.search_space.size_space`). Outputs (all written atomically in
``DIR``):

- ``study.db``: the Optuna study (default storage; see :mod:`pertbench.tuning.storage`)
- ``trials.csv``: one row per trial (index, state, value, parameters, validation metrics,
  errors)
- ``best_params.json``: the best configuration (tuned and full parameter set, epochs)
- ``importances.csv``: fANOVA parameter importances
- ``stability.csv`` / ``stability_summary.csv``: the best configuration retrained with extra
  seeds, every metric on val and test, and mean +/- sd over those seeds
"""

from __future__ import annotations

import dataclasses
import fcntl
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
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, ModelError, PertbenchError, shown
from pertbench.metrics.objective import Objective
from pertbench.tuning.results import (
    best_configuration,
    parameter_importances,
    run_stability,
    write_trials_csv,
)
from pertbench.tuning.storage import (
    INTERRUPTED_MESSAGE,
    _quiet_optuna,
    default_storage_url,
    is_owned_storage,
    make_storage,
    recover_interrupted_trials,
    redact_url,
    requeue_trial,
    run_lock,
    study_progress,
)
from pertbench.utils.io import write_csv_atomic, write_json_atomic

PRUNERS = ("median", "halving", "none")
#: Abort when this many trials in a row fail with the same message: the cause is systematic.
SYSTEMATIC_FAILURES = 3
#: Serialises "is the search done? then start a trial" between the local workers of a run.
ASK_LOCK = ".tune-ask.lock"
#: Seconds between two epoch-progress lines of a running trial.
PROGRESS_SECONDS = 10.0


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
        Training settings of every fit (``max_epochs``: the epoch limit of every trial).
    pruner
        ``median`` (default), ``halving`` (successive halving) or ``none``.
    study_name
        Name of the study in the storage (default ``pertbench-<model>``).
    workers
        Local worker processes sharing the storage. Trial *k* sees the finished trials
        ``0 .. k - workers`` (:mod:`pertbench.tuning.sampling`), so the same seed and number
        of workers give the same trials, whether the run was interrupted or not.
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

    valid = {f.name for f in dataclasses.fields(model_class.Params)}
    space = {k: dict(v) for k, v in (getattr(model_class, "search_space", None) or {}).items()}
    for name, spec in (override or {}).items():
        if name not in valid:
            raise ConfigError(
                f"search space names unknown hyperparameter {shown(name)} of "
                f"'{model_class.name}'; see 'pertbench models {model_class.name}'"
            )
        if spec is None:
            space.pop(name, None)
        elif not isinstance(spec, Mapping):
            raise ConfigError(
                f"search space entry {shown(name)} must be a mapping like "
                "{type: float, low: 0, high: 1}"
            )
        else:
            space[name] = dict(spec)
    for name in fixed_params or {}:
        space.pop(name, None)
    validate_space(space, valid_params=valid)
    return space


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


def _open_study(ctx: _SearchContext, *, sampler: Any = None, pruner: Any = None) -> Any:
    import optuna

    storage = make_storage(ctx.storage_url)
    with _quiet_optuna():
        study = optuna.create_study(
            study_name=ctx.study_name,
            storage=storage,
            direction=ctx.objective.direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    stored = study.user_attrs.get("pertbench")
    identity = json.loads(json.dumps(ctx.identity, default=str))
    if stored is None:
        study.set_user_attr("pertbench", identity)
    elif stored != identity:
        differing = sorted(
            k for k in set(stored) | set(identity) if stored.get(k) != identity.get(k)
        )
        raise ConfigError(
            f"study '{ctx.study_name}' in {redact_url(ctx.storage_url)} was run with a different "
            f"{', '.join(differing)}; resume with the same settings, pass --overwrite to start "
            "afresh, or choose another --out/--study-name"
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


def n_startup_trials(n_trials: int) -> int:
    """Random trials before TPE models the history: ``clamp(n_trials // 3, 2, 10)``."""
    return max(2, min(10, int(n_trials) // 3))


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

    @property
    def owned(self) -> bool:
        """The study lives in this run's folder (no other command can touch it)."""
        return is_owned_storage(self.storage_url, self.out_dir)

    def plan(self) -> Any:
        from pertbench.tuning.sampling import SearchPlan

        workers = self.settings.workers
        return SearchPlan(
            seed=self.settings.seed,
            space=self.space,
            direction=self.objective.direction,
            n_startup_trials=n_startup_trials(self.settings.n_trials),
            lag=workers,
            wait=workers > 1 and self.owned,
            log=self.log,
        )


class _AskLock:
    """An ``flock`` held from "is the search done?" until the next trial exists, so two
    local workers never start the same position twice (released by the kernel on death)."""

    def __init__(self, out_dir: Path) -> None:
        self._handle = open(Path(out_dir) / ASK_LOCK, "a+")
        self._held = False

    def acquire(self) -> None:
        fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if self._held:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
            self._held = False

    def close(self) -> None:
        self.release()
        self._handle.close()


def _trial_function(ctx: _SearchContext, current: dict[str, int]) -> Callable[[Any], float]:
    """The Optuna objective; it records the number of the trial it runs in ``current``."""
    import optuna

    from pertbench.models.search_space import suggest_params
    from pertbench.tuning.fitting import (
        fit_and_evaluate,
        is_trial_failure,
        resolve_model_class,
        resolve_params,
    )
    from pertbench.tuning.sampling import trial_indices

    settings = ctx.settings
    model_class = resolve_model_class(settings.model)

    def objective(trial: optuna.Trial) -> float:
        current["number"] = trial.number
        index = trial_indices(trial.study.get_trials(deepcopy=False))[trial.number]
        # Every trial has an error column ("" when it did not fail), also a re-queued one
        # that inherited the message of the run that died.
        trial.set_user_attr("error", "")
        params = {**settings.fixed_params, **suggest_params(trial, ctx.space)}
        limit = settings.max_epochs or resolve_params(model_class, params).get("max_epochs")
        seen = {"epochs": 0, "logged": time.monotonic()}

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            seen["epochs"] = int(epoch) + 1
            loss = metrics.get("val_loss")
            now = time.monotonic()
            if epoch == 0 or now - seen["logged"] >= PROGRESS_SECONDS:
                seen["logged"] = now
                of = f"/{limit}" if limit else ""
                value = f" val_loss {loss:.4g}" if loss is not None else ""
                ctx.log(f"trial {index}: epoch {epoch + 1}{of}{value}")
            if loss is not None and math.isfinite(loss):
                trial.report(float(loss), int(epoch))
                if trial.should_prune():
                    trial.set_user_attr("epochs_trained", seen["epochs"])
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
        except (KeyboardInterrupt, SystemExit):
            trial.set_user_attr("error", INTERRUPTED_MESSAGE)  # queued again by _search
            raise
        except Exception as exc:
            if isinstance(exc, PertbenchError) or is_trial_failure(exc):
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                trial.set_user_attr("error", message)
                raise _TrialFailed(message) from exc
            raise
        trial.set_user_attr("epochs_trained", seen["epochs"])
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
    """One worker's loop: run trials until the study has ``n_trials`` positions."""
    from pertbench.tuning.sampling import HistoryPruner, PlannedSampler

    settings = ctx.settings
    plan = ctx.plan()
    ask_lock = _AskLock(ctx.out_dir)
    study = _open_study(
        ctx,
        sampler=PlannedSampler(plan, on_trial_created=ask_lock.release),
        pruner=HistoryPruner(make_pruner(settings.pruner), plan),
    )
    current: dict[str, int] = {}
    objective = _trial_function(ctx, current)
    recent_errors: list[str] = []
    try:
        while True:
            if deadline is not None and time.time() >= deadline:
                ctx.log(f"worker {worker}: timeout reached; no new trials")
                break
            ask_lock.acquire()
            try:
                if study_progress(study).done(settings.n_trials):
                    break
                current.clear()
                with _quiet_optuna():
                    study.optimize(
                        objective, n_trials=1, catch=(_TrialFailed,), gc_after_trial=True
                    )
            except (KeyboardInterrupt, SystemExit):
                # Stopped mid-trial: the trial repeats on resumption, as after a crash.
                stopped = _trial_by_number(study, current.get("number"))
                if stopped is not None:
                    requeue_trial(study, stopped)
                raise
            finally:
                ask_lock.release()
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
    finally:
        ask_lock.close()


def _trial_by_number(study: Any, number: int | None) -> Any:
    if number is None:
        return None
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number:
            return trial
    return None


def _describe_trial(trial: Any, study: Any, n_trials: int) -> str:
    from pertbench.tuning.sampling import trial_indices

    progress = study_progress(study)
    index = trial_indices(study.get_trials(deepcopy=False))[trial.number]
    state = trial.state.name.lower()
    value = f" value={trial.value:.5g}" if trial.value is not None and state == "complete" else ""
    error = f" ({trial.user_attrs['error']})" if trial.user_attrs.get("error") else ""
    try:
        best = f" best={study.best_value:.5g}"
    except ValueError:
        best = ""
    return f"trial {index} {state}{value}{error} [{progress.finished}/{n_trials}]{best}"


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def sized_search_space(
    model_class: Any,
    settings: TuneSettings,
    adata: ad.AnnData,
    split: pd.Series,
    *,
    log: Callable[[str], None],
) -> dict[str, dict[str, Any]]:
    """The search space of a study: the model's (sized for the data and device, see
    :func:`pertbench.models.search_space.size_space`) with ``--space`` and ``--set`` applied."""
    from pertbench.models.search_space import size_space
    from pertbench.utils.random import resolve_device

    space = effective_search_space(model_class, settings.search_space, settings.fixed_params)
    n_train = int((split.to_numpy() == "train").sum())
    device = resolve_device(settings.device)
    sized, changes = size_space(
        space,
        n_genes=adata.n_vars,
        n_train_cells=n_train,
        device=device,
        keep=set(settings.search_space or {}),
    )
    if changes:
        log(
            f"search space sized for {adata.n_vars:,} genes and {n_train:,} training cells on "
            f"{device}: {', '.join(changes)} (give --space to search other ranges)"
        )
    return sized


def _has_trials(out_dir: Path) -> bool:
    """Whether a tuning folder records any trial (results, or failures worth reading)."""
    trials = Path(out_dir) / "trials.csv"
    if not trials.is_file():
        return False
    try:
        return len(pd.read_csv(trials, usecols=["state"])) > 0
    except (ValueError, OSError, pd.errors.ParserError):
        return False


def tune(
    data: str | os.PathLike | ad.AnnData,
    split: str | os.PathLike | pd.Series,
    *,
    out: str | os.PathLike,
    settings: TuneSettings,
    keys: PerturbationKeys | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> TuneResult:
    """Search hyperparameters of one model on one split; resumable; see the module docstring.

    Parameters
    ----------
    data
        ``.h5ad`` path (or an AnnData; with several workers it is written to ``DIR/inputs``).
    split
        Split CSV path (or a Series aligned to the data); needs train and val cells.
    out
        Output directory (created; an existing study there is resumed). A directory created
        by this call is removed again if the search fails before any trial finished.
    settings
        :class:`TuneSettings`.
    keys
        Perturbation/covariate columns.
    log
        Receives one progress line per trial and stage (default: stderr).
    overwrite
        Start a new study in ``out`` (default storage only): the earlier one is set aside
        and deleted once this search finished.
    """
    from pertbench.tuning.fitting import resolve_model_class, resolve_params
    from pertbench.utils.outputs import check_output, results_folder

    settings.validate()
    keys = keys or PerturbationKeys()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out_dir = Path(out)
    inputs = [p for p in (data, split) if isinstance(p, (str, os.PathLike))]
    check_output(out_dir, kind="resumable", inputs=inputs, overwrite=overwrite)
    if overwrite and settings.storage and not is_owned_storage(settings.storage, out_dir):
        raise ConfigError(
            "--overwrite replaces the study of --out's own storage only; for a shared "
            "--storage choose another --study-name"
        )
    objective = Objective.parse(settings.objective, direction=settings.direction)
    model_class = resolve_model_class(settings.model)
    resolve_params(model_class, settings.fixed_params)  # reject unknown/badly typed fixed params
    if not effective_search_space(model_class, settings.search_space, settings.fixed_params):
        raise ConfigError(
            f"model '{settings.model}' has no hyperparameters to search; "
            "give a search space or train it directly with fixed parameters"
        )
    with results_folder(out_dir, overwrite=overwrite, has_results=_has_trials):
        with run_lock(out_dir):
            return _tune_locked(data, split, out_dir, settings, keys, objective, model_class, log)


def _tune_locked(
    data: Any,
    split: Any,
    out_dir: Path,
    settings: TuneSettings,
    keys: PerturbationKeys,
    objective: Objective,
    model_class: Any,
    log: Callable[[str], None],
) -> TuneResult:
    """The search, once ``out_dir`` is locked: load, plan, search, summarise."""
    from pertbench.data.splits import write_split
    from pertbench.tuning.fitting import load_dataset, load_split, require_split_parts
    from pertbench.utils.io import write_h5ad_atomic

    storage_url = settings.storage or default_storage_url(out_dir)
    study_name = settings.study_name or f"pertbench-{settings.model}"
    deadline = time.time() + settings.timeout if settings.timeout else None
    if isinstance(data, ad.AnnData):
        adata, data_path = data, None
    else:
        data_path = Path(data)
        adata = load_dataset(data_path, keys=keys)
    if isinstance(split, pd.Series):
        from pertbench.models.base import align_split

        split_series, split_path = align_split(adata, split), None
    else:
        split_path = Path(split)
        split_series = load_split(split_path, adata)
    require_split_parts(split_series, ["train", "val"], what="tuning")
    space = sized_search_space(model_class, settings, adata, split_series, log=log)
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
    study = _open_study(ctx, pruner=make_pruner(settings.pruner))
    if ctx.owned:
        recovered = recover_interrupted_trials(study)
        if recovered:
            log(
                f"resuming: trial(s) {', '.join(map(str, recovered))} were interrupted and are "
                "queued again"
            )
    progress = study_progress(study)
    if progress.finished:
        log(
            f"resuming study '{study_name}': {progress.finished}/{settings.n_trials} trials "
            "already finished"
        )
    if settings.workers == 1:
        _search(ctx, worker=0, deadline=deadline)
    else:
        if data_path is None:
            data_path = write_h5ad_atomic(out_dir / "inputs" / "data.h5ad", adata)
        if split_path is None:
            split_path = write_split(split_series, out_dir / "inputs" / "split.csv")
        from pertbench.tuning.workers import run_workers

        run_workers(ctx, data_path, split_path, deadline)

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
