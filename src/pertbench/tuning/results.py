"""What a search leaves behind: the trials table, the best configuration, parameter
importances and the stability retraining of the best configuration.

All tables are written atomically; see :mod:`pertbench.tuning.study` for the files.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.tuning.storage import _quiet_optuna
from pertbench.utils.io import write_csv_atomic, write_json_atomic

if TYPE_CHECKING:
    from pertbench.tuning.study import TuneSettings

STABILITY_DIR = "stability"
#: Columns of ``trials.csv`` that record when and where a trial ran, not what it found: they
#: differ between two runs of the same search (compare the other columns).
TIMING_COLUMNS = (
    "number",
    "datetime_start",
    "datetime_complete",
    "duration_s",
    "retry_of",
    "user_attrs_fit_seconds",
)


def write_trials_csv(study: Any, out_dir: Path) -> pd.DataFrame:
    """Write ``trials.csv``: one row per trial, parameters and validation metrics as columns."""
    frame = trials_table(study)
    write_csv_atomic(Path(out_dir) / "trials.csv", frame)
    return frame


def trials_table(study: Any) -> pd.DataFrame:
    """All trials as a flat table (``params_*``, ``user_attrs_*``, ``retry_of``).

    ``index`` is the trial's position in the search (:mod:`pertbench.tuning.sampling`): a
    re-queued trial has the index of the one it repeats, whose row says ``interrupted``.
    The rows that are not interrupted, ordered by ``index``, are the same for a run that
    was killed and resumed as for an uninterrupted one (:data:`TIMING_COLUMNS` aside).
    """
    from pertbench.tuning.sampling import retried_numbers, trial_indices

    trials = study.get_trials(deepcopy=False)
    indices = trial_indices(trials)
    retried = retried_numbers(trials)
    columns = [
        "number",
        "index",
        "interrupted",
        "state",
        "value",
        "datetime_start",
        "datetime_complete",
        "duration_s",
    ]
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "index": indices[t.number],
            "interrupted": t.number in retried,
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


def best_configuration(
    study: Any, model_class: Any, settings: TuneSettings
) -> dict[str, Any] | None:
    """The best complete trial as a JSON-able dict (``None`` if no trial completed).

    ``all_params`` are the hyperparameters the best trial was trained with: with a tuning
    epoch limit (``--max-epochs``) its ``max_epochs`` is that limit, and ``epochs_trained``
    says how many epochs the trial ran (early stopping or pruning may end sooner).
    """
    from optuna.trial import TrialState

    from pertbench.tuning.fitting import resolve_params
    from pertbench.tuning.sampling import trial_indices

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    best = study.best_trial
    tuned = dict(best.params)
    full = resolve_params(model_class, {**settings.fixed_params, **tuned})
    if settings.max_epochs is not None and "max_epochs" in full:
        full["max_epochs"] = int(settings.max_epochs)
    epochs = best.user_attrs.get("epochs_trained")
    if epochs is None and best.intermediate_values:
        epochs = max(best.intermediate_values) + 1
    return {
        "model": settings.model,
        "objective": study.user_attrs.get("pertbench", {}).get("objective"),
        "direction": study.direction.name.lower(),
        "value": best.value,
        "trial": trial_indices(trials)[best.number],
        "number": best.number,
        "n_complete": len(complete),
        "max_epochs": settings.max_epochs
        if settings.max_epochs is not None
        else full.get("max_epochs"),
        "epochs_trained": epochs,
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


def _fingerprint(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
