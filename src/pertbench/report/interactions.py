"""Report section: genetic-interaction metrics of combination predictions, by subgroup.

Reads the ``gi_<metric>[<subgroup>]`` rows that benchmark cells add to the results
(:mod:`pertbench.benchmark.combinations`), draws two tables per (dataset, task) of the full
scenario, models as rows, and says whether any model beats the additive baseline
(``perturbation_mean``, and ``additive_within`` when present) and the additive prediction
from the observed singles on the interacting combinations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from pertbench.benchmark.config import FULL_SCENARIO
from pertbench.metrics.interactions import gi_higher_is_better, gi_metric_name

#: Additive baselines the verdict compares with, when the run has them: the sum of the singles'
#: mean deltas over training covariates, and the same within each covariate.
ADDITIVE_BASELINES = ("perturbation_mean", "additive_within")
#: The additive prediction from the observed singles of the same covariates (GI_pred = 0):
#: its gi_rmse is the RMS of the observed GI, carried by every cell as gi_rmse_additive.
ADDITIVE_REFERENCE = "additive (observed singles)"
#: (subgroup, metric) columns of the two tables.
BY_LABEL = (
    ("interacting", "gi_rmse"),
    ("interacting", "gi_pearson"),
    ("interacting", "gi_cosine"),
    ("additive", "gi_rmse"),
    ("all", "precision"),
    ("all", "recall"),
    ("all", "roc_auc"),
)
BY_SEEN = tuple(
    (subgroup, metric)
    for subgroup in ("seen0", "seen1", "seen2", "seen_in_other_covariate", "never_seen")
    for metric in ("gi_rmse", "gi_pearson")
)
#: The comparison behind the verdict: metric on the interacting combinations.
VERDICT_METRICS = ("gi_rmse", "gi_pearson")


def _baselines() -> tuple[str, ...]:
    from pertbench.models.registry import BASELINE_MODELS

    return tuple(BASELINE_MODELS)


def _is_gi(metric: str) -> bool:
    return gi_higher_is_better(metric) is not None and "[" in metric


def interaction_section(
    page: Any, results: pd.DataFrame, summary: pd.DataFrame, models: Sequence[str]
) -> None:
    """Add the genetic-interaction section to the report ``page`` (when the run has GI rows)."""
    from pertbench.report.html import esc

    gi = summary[(summary["scenario"] == FULL_SCENARIO) & summary["metric"].map(_is_gi)]
    if gi.empty:
        return
    rows = results[(results["scenario"] == FULL_SCENARIO) & results["metric"].map(_is_gi)]
    sizes = rows.groupby(["dataset", "task", "metric"])["n_groups"].max()
    page.section("interactions", "Genetic interactions (combinations)")
    page.add(
        '<p class="note">For each held-out combination AB, the genetic interaction GI = '
        "delta(AB) - delta(A) - delta(B) (observed: the observed combination and singles of the "
        "same covariates; predicted: the model's combination and the observed singles). "
        "gi_rmse is the RMSE of the combination's delta (lower is better), gi_pearson / gi_cosine "
        "the agreement of predicted with observed GI; precision / recall / ROC-AUC score calling "
        "non-additive pairs (the simulator's classes when known, else the observed GI beyond its "
        "sampling noise). Subgroups: the label (interacting / additive), how many singles were "
        "in training (seen0-2, as in GEARS), and whether the combination trains in another "
        "covariate. Mean ± sd over seeds; n = combinations per seed. See docs/metrics.md.</p>"
    )
    for (dataset, task), block in gi.groupby(["dataset", "task"], sort=False):
        present = [m for m in models if m in set(block["model"])]
        page.add(f"<h3>{esc(dataset)} / {esc(task)}</h3>")
        page.add(_verdict(block, present))
        n = sizes.loc[(dataset, task)] if (dataset, task) in sizes.index else pd.Series(dtype=float)
        page.add(_table(block, n, BY_LABEL, present, f"gi-label-{dataset}-{task}"))
        if any(gi_metric_name(m, s) in set(block["metric"]) for s, m in BY_SEEN):
            page.add(_table(block, n, BY_SEEN, present, f"gi-seen-{dataset}-{task}"))


def _stat(block: pd.DataFrame, model: str, name: str) -> pd.Series | None:
    hit = block[(block["model"] == model) & (block["metric"] == name)]
    return None if hit.empty else hit.iloc[0]


def _references(block: pd.DataFrame, name: str) -> list[tuple[str, float]]:
    """What a model must beat on one GI metric of the interacting combinations.

    ``gi_rmse``: the additive baselines present and the additive prediction from the
    observed singles. ``gi_pearson`` / ``gi_cosine``: every baseline present, because no
    baseline knows an interaction and their values are the floor set by the observed singles'
    noise that predicted and observed GI share (docs/metrics.md).
    """
    rmse = _is_rmse(name)
    candidates = ADDITIVE_BASELINES if rmse else _baselines()
    refs = []
    for baseline in candidates:
        row = _stat(block, baseline, name)
        if row is not None and math.isfinite(row["mean"]):
            refs.append((baseline, float(row["mean"])))
    if rmse:
        additive = block[block["metric"] == name.replace("gi_rmse[", "gi_rmse_additive[")]
        if len(additive) and math.isfinite(additive["mean"].iloc[0]):
            refs.append((ADDITIVE_REFERENCE, float(additive["mean"].iloc[0])))
    return refs


def _is_rmse(name: str) -> bool:
    return name.startswith("gi_rmse[")


def _verdict(block: pd.DataFrame, models: Sequence[str]) -> str:
    """Which trained models beat the references (:func:`_references`) on the interacting
    combinations: a model does when its whole 95% interval (averaged over seeds) lies on the
    better side of every reference's mean.
    """
    from pertbench.report.html import _fmt, esc

    trained = [m for m in models if m not in _baselines() and m != "ceiling"]
    lines = []
    for metric in VERDICT_METRICS:
        name = gi_metric_name(metric, "interacting")
        refs = _references(block, name)
        if not refs:
            continue
        higher = bool(gi_higher_is_better(name))
        target = max(v for _, v in refs) if higher else min(v for _, v in refs)
        winners, best = [], None
        for model in trained:
            row = _stat(block, model, name)
            if row is None or not math.isfinite(row["mean"]):
                continue
            if best is None or (row["mean"] > best[1] if higher else row["mean"] < best[1]):
                best = (model, row["mean"])
            bound = row["ci_low"] if higher else row["ci_high"]
            if math.isfinite(bound) and (bound > target if higher else bound < target):
                winners.append(f"{model} ({_fmt(row['mean'], 3)})")
        best_ref = max(refs, key=lambda r: r[1]) if higher else min(refs, key=lambda r: r[1])
        against = (
            " and ".join(f"{esc(r)} ({_fmt(v, 3)})" for r, v in refs)
            if _is_rmse(name)
            else f"every baseline (best: {esc(best_ref[0])}, {_fmt(best_ref[1], 3)})"
        )
        if winners:
            lines.append(f"<b>{esc(metric)}</b>: {esc(', '.join(winners))} beat {against}")
        elif best is not None:
            lines.append(
                f"<b>{esc(metric)}</b>: no model beats {against} beyond its interval; best "
                f"{esc(best[0])} ({_fmt(best[1], 3)})"
            )
    if not lines:
        return ""
    return '<p class="verdict">Interacting combinations: ' + "; ".join(lines) + ".</p>"


def _table(
    block: pd.DataFrame, sizes: pd.Series, columns, models: Sequence[str], table_id: str
) -> str:
    """Models x (subgroup, metric) cells of mean ± sd; ``sizes``: combinations per metric."""
    from pertbench.report.html import _fmt, esc

    present = [(s, m) for s, m in columns if gi_metric_name(m, s) in set(block["metric"])]
    subgroups = list(dict.fromkeys(s for s, _ in present))
    top = ['<th class="label" rowspan="2">model</th>']
    for subgroup in subgroups:
        span = sum(1 for s, _ in present if s == subgroup)
        n = sizes[[m for m in sizes.index if str(m).endswith(f"[{subgroup}]")]]
        label = (
            f"{subgroup} (n = {int(n.max())})" if len(n) and math.isfinite(n.max()) else subgroup
        )
        top.append(f'<th colspan="{span}">{esc(label)}</th>')
    second = []
    for _, metric in present:
        arrow = "↑" if gi_higher_is_better(metric) else "↓"
        second.append(f"<th>{esc(metric.removeprefix('gi_'))} {arrow}</th>")
    body = []
    reference = []  # the additive prediction from the observed singles: gi_rmse only
    for subgroup, metric in present:
        hit = block[block["metric"] == gi_metric_name("gi_rmse_additive", subgroup)]
        if metric == "gi_rmse" and len(hit) and math.isfinite(hit["mean"].iloc[0]):
            reference.append(f"<td>{_fmt(hit['mean'].iloc[0], 3)}</td>")
        else:
            reference.append("<td>–</td>")
    if any(cell != "<td>–</td>" for cell in reference):
        body.append(
            f'<tr class="baseline"><td class="label">{esc(ADDITIVE_REFERENCE)}</td>'
            f"{''.join(reference)}</tr>"
        )
    for model in models:
        cells = []
        for subgroup, metric in present:
            row = _stat(block, model, gi_metric_name(metric, subgroup))
            if row is None or not math.isfinite(row["mean"]):
                cells.append("<td>–</td>")
                continue
            sd = f" ± {_fmt(row['sd'], 2)}" if math.isfinite(row["sd"]) else ""
            cells.append(f"<td>{_fmt(row['mean'], 3)}{sd}</td>")
        cls = ' class="baseline"' if model in _baselines() else ""
        body.append(f'<tr{cls}><td class="label">{esc(model)}</td>{"".join(cells)}</tr>')
    return (
        f'<table id="{esc(table_id)}"><thead><tr>{"".join(top)}</tr><tr>{"".join(second)}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table>"
    )
