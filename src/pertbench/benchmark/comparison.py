"""Every model of a benchmark against every simple baseline, per metric.

A benchmark runs each simple baseline (:data:`pertbench.models.registry.BASELINE_MODELS`:
no_change, perturbation_mean, covariate_mean, additive_within, linear_embedding,
nearest_perturbation) as a cell of its own on the same split, seed and groups. This
module pairs each cell's per-group scores with those of the baseline cells of the same
(dataset, task, scenario, seed) and, through
:func:`pertbench.metrics.calibration.compare_with_baselines`, fills three columns of the
results table:

- ``normalized_best``: the normalised score with the best baseline of that metric as the
  floor (the ceiling per group comes from the ``no_change`` cell, like the ``ceiling``
  rows);
- ``best_baseline``: that baseline's name;
- ``beats_baselines``: 1.0 when the model's advantage over EVERY baseline has a paired
  95% bootstrap interval (over groups) above 0, 0.0 when not, NaN when undecidable.

Baselines that did not run for a task (skipped as not applicable, or failed) are not part
of the comparison; per-covariate metrics (one value per covariate combination, e.g.
``matrix_distance``) are compared on those values when the per-group table lacks them, so
they stay NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.benchmark import paths

#: Columns this module adds to the results table.
COMPARISON_COLUMNS = ["normalized_best", "best_baseline", "beats_baselines"]


def _read_per_group(directory: Path) -> pd.DataFrame | None:
    """A cell's per_group.csv, or None when it has none."""
    file = directory / paths.PER_GROUP_FILE
    if not file.is_file():
        return None
    return pd.read_csv(file, keep_default_na=False, na_values=["", "nan", "NaN"])


def _group_scores(table: pd.DataFrame | None, label: str, id_cols: list[str]):
    """Per-group scores of ``label``'s rows of a per-group table (index: group ids)."""
    if table is None:
        return None
    if "model" in table.columns:
        table = table[table["model"].astype(str) == label]
    if table.empty or any(c not in table.columns for c in id_cols):
        return None
    table = table.drop_duplicates(id_cols, keep="first")  # a model named like a baseline
    index = pd.MultiIndex.from_frame(table[id_cols].astype(str))
    values = table.drop(columns=[c for c in ("model", *id_cols) if c in table.columns])
    values.index = index
    # numeric columns are left as read (converting them again is the slow part)
    text = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if text:
        values[text] = values[text].apply(pd.to_numeric, errors="coerce")
    return values


def _aligned(table: pd.DataFrame, index: pd.Index) -> dict[str, np.ndarray]:
    """``{metric: values}`` of a per-group score table reordered to the groups ``index``
    (NaN for the groups it lacks)."""
    values = table.reindex(index).to_numpy(dtype=float)
    return {str(c): values[:, i] for i, c in enumerate(table.columns)}


def add_baseline_comparison(
    results: pd.DataFrame,
    jobs: Mapping[str, Any],
    *,
    baselines: tuple[str, ...] | None = None,
    n_bootstrap: int = 1000,
) -> pd.DataFrame:
    """Fill ``normalized_best``, ``best_baseline`` and ``beats_baselines`` of ``results``.

    Parameters
    ----------
    results
        The collected results table (one row per cell x metric).
    jobs
        The benchmark's jobs (cells give the folders and perturbation keys).
    baselines
        Baseline labels (default: the registry's ``BASELINE_MODELS``).
    n_bootstrap
        Resamples of the paired interval (seeded by the cell's seed).
    """
    from pertbench.benchmark.jobs import CEILING, CEILING_SOURCE, CellJob
    from pertbench.data.keys import PerturbationKeys
    from pertbench.metrics.calibration import compare_with_baselines
    from pertbench.metrics.catalog import metric_spec
    from pertbench.models.registry import BASELINE_MODELS

    baselines = tuple(baselines or BASELINE_MODELS)
    results = results.copy()
    for column in COMPARISON_COLUMNS:
        if column not in results:
            results[column] = np.nan
    results["best_baseline"] = results["best_baseline"].fillna("").astype(object)
    ok_cells = {
        (j.dataset, j.task, j.scenario, j.seed, j.model_label): j
        for j in jobs.values()
        if isinstance(j, CellJob) and (j.directory / paths.DONE_FILE).is_file()
    }
    experiments: dict[tuple, list[CellJob]] = {}
    for key, job in ok_cells.items():
        experiments.setdefault(key[:4], []).append(job)
    lookup = {
        key: i
        for i, key in enumerate(
            zip(
                results["dataset"].astype(str),
                results["task"].astype(str),
                results["scenario"].astype(str),
                results["seed"].astype(int),
                results["model"].astype(str),
                results["metric"].astype(str),
                strict=True,
            )
        )
    }
    directions: dict[str, bool | None] = {}

    def direction(metric: str) -> bool | None:
        """The metric's direction; None for diagnostics and metrics outside the catalogue."""
        if metric not in directions:
            spec = metric_spec(metric)
            directions[metric] = None if spec is None or spec.diagnostic else spec.higher_is_better
        return directions[metric]

    rows, best, floors, beats = [], [], [], []
    for (dataset, task, scenario, seed), cells in experiments.items():
        keys = PerturbationKeys.from_dict(cells[0].keys)
        id_cols = [*keys.covariate_keys, keys.perturbation_key]
        tables = {job.model_label: _read_per_group(job.directory) for job in cells}
        scores = {label: _group_scores(t, label, id_cols) for label, t in tables.items()}
        # the ceiling rows are in the no_change cell's table (read above, not again)
        ceiling = _group_scores(tables.get(CEILING_SOURCE), CEILING, id_cols)
        base = {b: scores[b] for b in baselines if scores.get(b) is not None}
        if not base:
            continue
        for label, table in scores.items():
            if table is None:
                continue
            # every reference aligned to this model's groups once, not once per metric
            own = _aligned(table, table.index)
            aligned = {b: _aligned(t, table.index) for b, t in base.items()}
            ceilings = _aligned(ceiling, table.index) if ceiling is not None else {}
            for metric in own:
                hib = direction(metric)
                row = lookup.get((dataset, task, scenario, int(seed), label, metric))
                if hib is None or row is None:
                    continue
                others = {b: t[metric] for b, t in aligned.items() if metric in t}
                if not others:
                    continue
                cmp = compare_with_baselines(
                    own[metric],
                    others,
                    ceilings.get(metric),
                    higher_is_better=hib,
                    n_bootstrap=n_bootstrap,
                    seed=int(seed),
                )
                rows.append(row)
                best.append(cmp.normalized_best)
                floors.append(cmp.best or "")
                beats.append(np.nan if cmp.beats_all is None else float(cmp.beats_all))
    if rows:
        index = results.index[rows]
        results.loc[index, "normalized_best"] = best
        results.loc[index, "best_baseline"] = floors
        results.loc[index, "beats_baselines"] = beats
    return results
