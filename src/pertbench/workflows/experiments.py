"""The tutorial's benchmarking experiments around the held-out cell-type task.

- :func:`imbalance_experiment`: the same task on the full data and on data that keeps all
  controls but only a ``fraction`` of the perturbed cells of every cell type; a table of
  balanced vs imbalanced results (both scored on the same, complete truth).
- :func:`sensitivity_experiment`: a small full-factorial grid of hyperparameters (scGen:
  ``n_layers`` x ``dropout``; scPRAM: ``n_latent`` x ``ratio``) through the same workflow,
  and :func:`main_effect_importance`: the share of each metric's variance over the grid
  explained by each parameter's main effect.
- :func:`cross_study_transfer`: train on study A, predict the perturbed state of study B's
  controls (scGen moves them by A's delta; scPRAM attends from B's controls to A's
  reference controls), scored against B's real perturbed cells per cell type.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, DataValidationError
from pertbench.utils.io import write_csv_atomic, write_json_atomic
from pertbench.utils.outputs import merge_table
from pertbench.workflows.celltype_transfer import (
    METRICS_FILE,
    Log,
    TransferOptions,
    _HeldOutTask,
    _load_result,
    _quiet,
    attention_by_type,
    celltype_transfer,
    data_fingerprint,
    resolve_stimulated,
    resolved_params,
    safe_name,
    save_figure,
    two_condition_view,
)

SENSITIVITY_FILE = "sensitivity.csv"
#: Columns identifying one row of ``sensitivity.csv`` / the cross-study ``metrics.csv``
#: (a rerun replaces the rows with these values and keeps the others).
SENSITIVITY_KEY = ("model", "configuration", "cell_type")
CROSS_STUDY_KEY = ("model", "cell_type", "train_study", "test_study")

#: Metrics compared in the summary tables (the tutorial's headline numbers).
HEADLINE_METRICS = ("r2", "mse", "pearson_delta", "edistance", "mean_var_kde", "jaccard_top100")

#: The tutorial's grids (both 3 x 3).
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "scgen": {"n_layers": [1, 2, 3], "dropout": [0.1, 0.2, 0.5]},
    "scpram": {"n_latent": [32, 64, 100], "ratio": [0.01, 0.05, 0.2]},
}


# ---------------------------------------------------------------------------------------
# Imbalance
# ---------------------------------------------------------------------------------------
def imbalance_experiment(
    adata: ad.AnnData,
    *,
    out_dir: str | Path,
    fraction: float = 0.2,
    keys: PerturbationKeys | None = None,
    cell_types: str | Sequence[str] = "all",
    stimulated: str | None = None,
    options: TransferOptions | None = None,
    resume: bool = True,
    log: Log = _quiet,
) -> pd.DataFrame:
    """Run the cell-type task on balanced and on imbalanced data and compare.

    The imbalanced data keep every control and ``fraction`` of the perturbed cells of each
    cell type (:func:`pertbench.data.scenarios.downsample_perturbed`), except the held-out
    type's perturbed cells: they are the truth, kept whole so both scenarios are scored on
    the same cells and differences come from the training data alone.

    Writes ``balanced/`` and ``imbalanced_<fraction>/`` (each a full cell-type run),
    ``imbalance_metrics.csv`` (both tables stacked with a ``scenario`` column) and
    ``imbalance_comparison.csv`` (per model and cell type: each headline metric balanced,
    imbalanced and the difference imbalanced - balanced).

    Returns
    -------
    pandas.DataFrame
        The comparison table.
    """
    options = options if options is not None else TransferOptions()
    out_dir = Path(out_dir)
    tables = []
    for scenario, imbalance in (("balanced", None), (f"imbalanced_{fraction:g}", fraction)):
        log(f"scenario {scenario}")
        run_options = dataclasses.replace(options, imbalance=imbalance)
        table = celltype_transfer(
            adata,
            out_dir=out_dir / scenario,
            keys=keys,
            cell_types=cell_types,
            stimulated=stimulated,
            options=run_options,
            resume=resume,
            log=log,
        )
        tables.append(table.assign(scenario=scenario))
    stacked = pd.concat(tables, ignore_index=True)
    write_csv_atomic(out_dir / "imbalance_metrics.csv", stacked)
    comparison = compare_scenarios(
        stacked, tables[0]["scenario"].iat[0], tables[1]["scenario"].iat[0]
    )
    write_csv_atomic(out_dir / "imbalance_comparison.csv", comparison)
    return comparison


def compare_scenarios(
    stacked: pd.DataFrame, first: str, second: str, *, metrics: Sequence[str] = HEADLINE_METRICS
) -> pd.DataFrame:
    """Side-by-side metrics of two scenarios per (model, cell type), with their difference."""
    metrics = [m for m in metrics if m in stacked.columns]
    index = ["model", "cell_type"]
    a = stacked[stacked["scenario"] == first].set_index(index)[metrics]
    b = stacked[stacked["scenario"] == second].set_index(index)[metrics]
    a, b = a.align(b, join="inner")
    parts = {}
    for m in metrics:
        parts[f"{m}_{first}"] = a[m]
        parts[f"{m}_{second}"] = b[m]
        parts[f"{m}_difference"] = b[m] - a[m]
    return pd.DataFrame(parts).reset_index()


# ---------------------------------------------------------------------------------------
# Hyperparameter sensitivity
# ---------------------------------------------------------------------------------------
def parse_grid(items: Sequence[str] | None, model: str) -> dict[str, list[Any]]:
    """``["n_layers=1,2,3", "dropout=0.1,0.5"]`` -> ``{"n_layers": [...], ...}``.

    Values stay strings (the model coerces them to the parameter's type); with no items
    the tutorial's grid for ``model`` is returned.
    """
    if not items:
        if model not in DEFAULT_GRIDS:
            raise ConfigError(
                f"no default grid for model '{model}'; give one with --grid name=v1,v2"
            )
        return {k: list(v) for k, v in DEFAULT_GRIDS[model].items()}
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid expects name=v1,v2,...; got '{item}'")
        name, values = item.split("=", 1)
        name = name.strip()
        levels = [v.strip() for v in values.split(",") if v.strip()]
        if not name or not levels:
            raise ConfigError(f"--grid expects name=v1,v2,...; got '{item}'")
        if name in grid:
            raise ConfigError(f"--grid names '{name}' twice")
        if len(set(levels)) != len(levels):
            raise ConfigError(f"--grid '{name}' repeats a value")
        grid[name] = levels
    return grid


def grid_configurations(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values (full factorial), in a fixed order."""
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _config_label(config: Mapping[str, Any]) -> str:
    return "_".join(f"{k}-{v}" for k, v in config.items())


def sensitivity_experiment(
    adata: ad.AnnData,
    *,
    out_dir: str | Path,
    model: str,
    grid: Mapping[str, Sequence[Any]] | None = None,
    keys: PerturbationKeys | None = None,
    cell_types: str | Sequence[str] = "all",
    stimulated: str | None = None,
    options: TransferOptions | None = None,
    resume: bool = True,
    log: Log = _quiet,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``model`` over a hyperparameter grid on the cell-type task.

    Each configuration is a full (resumable) cell-type run in ``configs/<label>/`` without
    baselines or figures. Writes ``sensitivity.csv`` (one row per configuration x cell type,
    the parameters as columns; rows of earlier runs into the same folder are kept, those of
    the same model, configuration and cell type replaced), ``sensitivity_importance.csv``
    (see :func:`main_effect_importance`, over this grid) and ``sensitivity.png``.

    Returns
    -------
    (results, importance)
        ``results``: this grid's rows (every cell type run for it so far).
    """
    from pertbench.models.registry import get_model_class

    options = options if options is not None else TransferOptions()
    grid = {k: list(v) for k, v in (grid or DEFAULT_GRIDS.get(model, {})).items()}
    if not grid:
        raise ConfigError(f"no grid for model '{model}'; give one with --grid name=v1,v2")
    cls = get_model_class(model)
    valid = {f.name for f in dataclasses.fields(cls.Params)}
    unknown = sorted(set(grid) - valid)
    if unknown:
        raise ConfigError(
            f"model '{model}' has no hyperparameter {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    fixed = dict(options.model_params.get(model, {}))
    clash = sorted(set(fixed) & set(grid))
    if clash:
        raise ConfigError(f"{', '.join(clash)} is both fixed and in the grid; give it once")
    configs = grid_configurations(grid)
    for config in configs:  # fail fast on a value the model rejects
        cls.make_params({**fixed, **config})
    out_dir = Path(out_dir)
    frames = []
    for i, config in enumerate(configs, start=1):
        label = _config_label(config)
        log(f"configuration {i}/{len(configs)}: {label}")
        run_options = dataclasses.replace(
            options,
            models=(model,),
            baselines=(),
            model_params={model: {**fixed, **config}},
            figures=False,
        )
        table = celltype_transfer(
            adata,
            out_dir=out_dir / "configs" / safe_name(label),
            keys=keys,
            cell_types=cell_types,
            stimulated=stimulated,
            options=run_options,
            resume=resume,
            log=log,
        )
        frames.append(table.assign(**{k: str(v) for k, v in config.items()}, configuration=label))
    results = pd.concat(frames, ignore_index=True)
    # Rows of earlier runs (other cell types, grids or models) stay in the table; the
    # importances are those of this run's grid.
    merged = merge_table(out_dir / SENSITIVITY_FILE, results, key=SENSITIVITY_KEY)
    write_csv_atomic(out_dir / SENSITIVITY_FILE, merged)
    importance = main_effect_importance(results, list(grid))
    write_csv_atomic(out_dir / "sensitivity_importance.csv", importance)
    if options.figures:
        from pertbench.pl.celltype import sensitivity_bars

        save_figure(
            sensitivity_bars(importance, title=f"{model}: variance explained by each parameter"),
            out_dir / "sensitivity.png",
        )
    return results, importance


def main_effect_importance(
    results: pd.DataFrame,
    parameters: Sequence[str],
    *,
    metrics: Sequence[str] = HEADLINE_METRICS,
    block: str | None = "cell_type",
) -> pd.DataFrame:
    """Share of each metric's variance over the grid explained by each parameter's main effect.

    For a metric y over a full factorial grid, the total sum of squares around the grand
    mean splits into one term per parameter (``SS_p = sum over levels of n_level *
    (mean_level - grand mean)^2``) plus the interactions. The table reports ``SS_p /
    SS_total`` (eta squared) per parameter and ``interaction`` = the rest. With ``block``
    (default the held-out cell type), the cell type's own effect is removed first (each
    cell type's mean is subtracted), so a parameter is not credited with the difference
    between easy and hard cell types.

    Returns
    -------
    pandas.DataFrame
        One row per metric: the eta squared of each parameter, ``interaction``,
        ``total_sd`` (sd of the metric over the grid) and ``most_influential``.
    """
    metrics = [m for m in metrics if m in results.columns]
    rows = []
    for metric in metrics:
        y = results[metric].astype(float)
        if block is not None and block in results.columns:
            y = y - y.groupby(results[block]).transform("mean")
        y = y - y.mean()
        total = float((y**2).sum())
        row: dict[str, Any] = {"metric": metric}
        explained = 0.0
        for p in parameters:
            means = y.groupby(results[p]).transform("mean")
            ss = float((means**2).sum())
            row[p] = ss / total if total > 0 else 0.0
            explained += row[p]
        row["interaction"] = max(0.0, 1.0 - explained) if total > 0 else 0.0
        row["total_sd"] = float(np.sqrt(total / max(len(y) - 1, 1)))
        row["most_influential"] = (
            max(parameters, key=lambda q: row[q]) if total > 0 else "none (metric constant)"
        )
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# Cross-study transfer
# ---------------------------------------------------------------------------------------
def cross_study_transfer(
    adata: ad.AnnData,
    *,
    out_dir: str | Path,
    study_key: str,
    train_study: str,
    test_study: str,
    keys: PerturbationKeys | None = None,
    stimulated: str | None = None,
    options: TransferOptions | None = None,
    resume: bool = True,
    log: Log = _quiet,
) -> pd.DataFrame:
    """Train on one study, predict the perturbed state of another study's control cells.

    Every model is trained on all cells of ``train_study`` (the neural models hold out a
    random share for early stopping). For each cell type of ``test_study`` with control
    and perturbed cells, the prediction starts from that study's controls and is scored
    against its real perturbed cells with the tutorial metrics; the baselines are
    ``no_change`` (study B's controls) and ``perturbation_mean`` (B's controls + study A's
    mean delta). Cell types of B absent from A are allowed (scGen and scPRAM do not use
    the cell type as an input).

    Writes ``metrics.csv`` (one row per model x test cell type x study pair; rows of other
    study pairs or models from earlier runs are kept), ``runs/<A>_to_<B>/<model>.json``
    (resumable), figures per model and cell type, and for scPRAM ``attention.csv`` /
    ``attention.png``: mean attention from each of B's cell types to A's reference types.
    """
    from pertbench.models.base import build_counterfactuals
    from pertbench.models.registry import create_model

    keys = keys if keys is not None else PerturbationKeys()
    options = options if options is not None else TransferOptions()
    options.validate()
    if not keys.covariate_keys:
        raise ConfigError("cross-study transfer needs a cell-type column (--cell-type-key)")
    if study_key not in adata.obs.columns:
        raise DataValidationError(
            f"obs has no column '{study_key}'; pass the right --study-key "
            f"(available: {', '.join(map(str, adata.obs.columns[:20]))})"
        )
    if train_study == test_study:
        raise ConfigError("--train-study and --test-study must differ")
    stimulated = resolve_stimulated(adata, keys, stimulated)
    data = two_condition_view(adata, keys, stimulated)
    studies = data.obs[study_key].astype(str).to_numpy()
    for s in (train_study, test_study):
        if not (studies == s).any():
            raise ConfigError(
                f"study '{s}' not found in '{study_key}'; available: {', '.join(sorted(set(studies)))}"
            )
    train = data[studies == train_study]
    test = data[studies == test_study]
    cell_key = keys.covariate_keys[0]
    labels = test.obs[keys.perturbation_key].astype(str).to_numpy()
    cells = test.obs[cell_key].astype(str).to_numpy()
    types = sorted(set(cells[labels == keys.control]) & set(cells[labels == stimulated]))
    if not types:
        raise DataValidationError(
            f"study '{test_study}' has no cell type with both control and '{stimulated}' cells to score"
        )
    train_labels = train.obs[keys.perturbation_key].astype(str).to_numpy()
    if not (train_labels == stimulated).any() or not (train_labels == keys.control).any():
        raise DataValidationError(
            f"study '{train_study}' needs both control and '{stimulated}' cells to train on"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_settings = {
        "data": data_fingerprint(data),
        "keys": keys.to_dict(),
        "study_key": study_key,
        "train_study": train_study,
        "test_study": test_study,
        "stimulated": stimulated,
        "epochs": options.epochs,
        "seed": options.seed,
        "n_bootstrap": options.n_bootstrap,
    }
    split = pd.Series("train", index=train.obs_names.astype(str), dtype=object)
    requests = pd.DataFrame({cell_key: types, keys.perturbation_key: stimulated})
    counterfactual = build_counterfactuals(test, requests, keys)
    tasks = {}
    for t in types:
        truth = test[(cells == t) & (labels == stimulated)]
        controls = test[(cells == t) & (labels == keys.control)]
        tasks[t] = (truth, controls)
    rows, attention_tables = [], []
    pair = f"{safe_name(train_study)}_to_{safe_name(test_study)}"
    for name in (*options.models, *options.baselines):
        params = dict(options.model_params.get(name, {}))
        settings = {**base_settings, "model": name, "params": resolved_params(name, params)}
        path = out_dir / "runs" / pair / f"{safe_name(name)}.json"
        done = _load_result(path, settings) if resume else None
        if done is None:
            log(f"{name}: training on {train_study}, predicting {test_study}")
            done = _cross_study_model(
                name,
                params,
                train,
                split,
                counterfactual,
                tasks,
                keys,
                options,
                out_dir,
                is_baseline=name in options.baselines,
                create_model=create_model,
            )
            write_json_atomic(
                path, {"settings": json.loads(json.dumps(settings, default=str)), **done}
            )
        else:
            log(f"{name}: kept the finished result")
        for row in done["rows"]:
            rows.append({**row, "train_study": train_study, "test_study": test_study})
        if done.get("attention"):
            attention_tables.append(pd.DataFrame(done["attention"]).set_index("query"))
        table = merge_table(out_dir / METRICS_FILE, pd.DataFrame(rows), key=CROSS_STUDY_KEY)
        write_csv_atomic(out_dir / METRICS_FILE, table)
    if attention_tables:
        table = attention_tables[0]
        write_csv_atomic(out_dir / "attention.csv", table.reset_index())
        if options.figures:
            from pertbench.pl.celltype import attention_heatmap

            save_figure(
                attention_heatmap(
                    table, title=f"scPRAM attention: {test_study} -> {train_study} references"
                ),
                out_dir / "attention.png",
            )
    return merge_table(out_dir / METRICS_FILE, pd.DataFrame(rows), key=CROSS_STUDY_KEY)


def _cross_study_model(
    name,
    params,
    train,
    split,
    counterfactual,
    tasks,
    keys,
    options,
    out_dir,
    *,
    is_baseline,
    create_model,
) -> dict[str, Any]:
    from pertbench.metrics.tutorial import tutorial_metrics

    model = create_model(name, keys=keys, **params)
    start = time.perf_counter()
    model.fit(
        train,
        split,
        seed=options.seed,
        device=options.device,
        max_epochs=None if is_baseline else options.epochs,
        progress=options.progress,
    )
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    pred = model.predict(counterfactual)
    predict_seconds = time.perf_counter() - start
    cell_key = keys.covariate_keys[0]
    pred_types = pred.obs[cell_key].astype(str).to_numpy()
    history = getattr(model, "history", None)
    rows = []
    for t, (truth, controls) in tasks.items():
        pred_t = pred[pred_types == t]
        metrics = tutorial_metrics(
            truth, pred_t, controls, n_bootstrap=options.n_bootstrap, seed=options.seed
        )
        rows.append(
            {
                "model": name,
                "cell_type": t,
                "n_train": int(train.n_obs),
                "n_truth": int(truth.n_obs),
                "n_controls": int(controls.n_obs),
                "epochs": len(history) if history is not None else 0,
                "train_seconds": round(train_seconds, 3),
                "predict_seconds": round(predict_seconds, 3),
                **{k: float(v) for k, v in metrics.items()},
            }
        )
        if options.figures and not is_baseline:
            from pertbench.pl.celltype import top_de_genes

            task = _HeldOutTask(
                data=truth,
                keys=keys,
                cell_type=t,
                split=pd.Series(dtype=object),
                truth=truth,
                controls=controls,
                top_genes=top_de_genes(controls, truth, n=10),
            )
            task.figures(name, pred_t, attention_table=None, out_dir=out_dir, seed=options.seed)
    result: dict[str, Any] = {"rows": rows}
    table = attention_by_type(model, keys)
    if table is not None:
        result["attention"] = table.reset_index().to_dict("list")
    return result
