"""Report pieces of the calibrated score: the summary cell, the "beats every baseline"
section and the dataset's systematic variation.

The summary cell leads with the normalised score (0 = the no_change floor, 1 = the noise
ceiling), then the raw value; a star marks a (model, metric) that beat every simple
baseline by more than its 95% interval in every seed (``beats_baselines`` of the results
is 1.0, 0.0 or NaN per seed; the summary holds its mean over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pertbench.benchmark.config import FULL_SCENARIO
from pertbench.benchmark.jobs import CEILING

BEATS_MARK = "★"
BEATS_TITLE = "beats every simple baseline by more than its 95% interval, in every seed"
#: The dataset diagnostic of Systema (a property of the truth, the same for every model).
SYSTEMATIC_VARIATION = "systematic_variation"


def beats_every_baseline(row: pd.Series) -> bool:
    """True when the model beat every baseline in every seed (summary row)."""
    value = row.get("beats_baselines", math.nan)
    return bool(np.isfinite(value) and value >= 1.0)


def calibrated_cell(row: pd.Series, fmt: Any, esc: Any) -> str:
    """Inner HTML of a summary cell: normalised score first, then the raw value."""
    norm = row.get("normalized", math.nan)
    best = row.get("normalized_best", math.nan)
    lead = (
        f'<span class="norm" title="normalised: 0 = no_change, 1 = noise ceiling">{fmt(norm, 2)}</span>'
        if np.isfinite(norm)
        else ""
    )
    mark = (
        f' <span class="beats" title="{esc(BEATS_TITLE)}">{BEATS_MARK}</span>'
        if beats_every_baseline(row)
        else ""
    )
    sd = f" ± {fmt(row['sd'], 2)}" if np.isfinite(row["sd"]) else ""
    raw = f'<span class="raw">{fmt(row["mean"])}{sd}</span>'
    ci = (
        f'<span class="ci">[{fmt(row["ci_low"], 3)}, {fmt(row["ci_high"], 3)}]</span>'
        if np.isfinite(row["ci_low"]) and np.isfinite(row["ci_high"])
        else ""
    )
    floor = str(row.get("best_baseline", "") or "")
    vs_best = (
        f'<span class="ci">vs {esc(floor)}: {fmt(best, 2)}</span>'
        if np.isfinite(best) and floor
        else ""
    )
    if lead:
        return f"{lead}{mark}<br>{raw}{ci}{vs_best}"
    return f"{raw}{mark}{ci}{vs_best}"


def baseline_verdicts(
    summary: pd.DataFrame, metrics: Sequence[str], baselines: Sequence[str]
) -> pd.DataFrame:
    """Per (dataset, task, metric): the models that beat every baseline in every seed.

    Baseline and ceiling rows are not candidates. Columns ``dataset``, ``task``,
    ``metric``, ``best_baseline`` (the floor most models were compared with), ``beaten by``
    (comma-separated, or ``none``) and ``models compared``.
    """
    full = summary[(summary["scenario"] == FULL_SCENARIO) & summary["metric"].isin(metrics)]
    candidates = full[~full["model"].isin([*baselines, CEILING])]
    rows = []
    for (dataset, task, metric), block in candidates.groupby(
        ["dataset", "task", "metric"], sort=False
    ):
        decided = block[np.isfinite(block["beats_baselines"].to_numpy(dtype=float))]
        if decided.empty:
            continue
        winners = decided.loc[decided["beats_baselines"] >= 1, "model"].astype(str).tolist()
        floors = decided["best_baseline"].astype(str)
        floors = floors[floors != ""]
        rows.append(
            {
                "dataset": dataset,
                "task": task,
                "metric": metric,
                "best_baseline": floors.mode().iat[0] if len(floors) else "",
                "beaten by": ", ".join(winners) if winners else "none",
                "models compared": len(decided),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["dataset", "task", "metric", "best_baseline", "beaten by", "models compared"],
    )


def baseline_section(
    page: Any, summary: pd.DataFrame, metrics: Sequence[str], baselines: Sequence[str]
) -> None:
    """Report section: for each (task, metric), does any model beat every baseline?"""
    from pertbench.report.html import _simple_table

    table = baseline_verdicts(summary, metrics, baselines)
    if table.empty:
        return
    page.section("baselines", "Does any model beat every simple baseline?")
    page.add(
        '<p class="note">A model beats a baseline on a metric when its advantage (mean over '
        "perturbations, in the metric's direction) has a paired 95% bootstrap interval above 0; "
        f"{BEATS_MARK} in the summary and the list below need that against EVERY simple baseline "
        "that ran for the task (no_change, perturbation_mean, covariate_mean, additive_within, "
        "linear_embedding, nearest_perturbation; a baseline skipped as not applicable is not "
        "compared) in every seed. best_baseline: the strongest of them on that metric, the "
        "floor of the summary's 'vs' score.</p>"
    )
    page.add(_simple_table(table, table_id="baseline-verdicts"))


def systematic_variation_section(page: Any, results: pd.DataFrame) -> None:
    """Report section: the share of each dataset's effects that is one shared shift."""
    from pertbench.report.html import _simple_table, esc

    ok = results[
        (results["status"] == "ok")
        & (results["metric"].astype(str) == SYSTEMATIC_VARIATION)
        & (results["scenario"] == FULL_SCENARIO)
    ]
    if ok.empty:
        return
    # a property of the truth: take it from one model's cells per (dataset, task, seed)
    first = ok.drop_duplicates(["dataset", "task", "seed"])
    table = (
        first.groupby(["dataset", "task"], sort=False)
        .agg(
            systematic_variation=("value", "mean"),
            ci_low=("ci_low", "mean"),
            ci_high=("ci_high", "mean"),
            seeds=("seed", "nunique"),
        )
        .reset_index()
    )
    page.section("systematic", "Systematic variation of the data")
    page.add(
        '<p class="note">Mean over test perturbations of cos(truth − control, centroid − '
        "control), where the centroid is the mean profile of the covariate's perturbations "
        "(Systema, Viñas Torné et al. 2025). Near 1: most of what looks like a perturbation "
        "effect is a shift shared by all perturbed cells, which control-referenced metrics "
        "(pearson_delta, ...) reward a model for predicting; the <code>*_delta_centroid</code> "
        "metrics and <code>centroid_accuracy</code> measure effects from the centroid instead. "
        f"{esc('95% interval: bootstrap over perturbations, averaged over seeds.')}</p>"
    )
    page.add(_simple_table(table, table_id="systematic-variation", digits=3))
