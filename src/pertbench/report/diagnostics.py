"""Report parts for the model diagnostics: collapse badges, collapse statistics, probe.

They read the run's ``collapse.csv`` and ``probe.csv`` (collected by
:mod:`pertbench.benchmark.diagnostics`) and use the full scenario of each (dataset, task),
averaged over seeds, like the summary table.

Badges in the summary table:

- **collapsed**: the mean over seeds of the spread ratio (how much the predictions differ
  between the perturbations of a covariate combination, relative to the observations) is
  below :data:`pertbench.metrics.collapse.SPREAD_THRESHOLD`;
- **ranks ≈ chance**: every rank metric of the run has the rank of a collapsed model,
  the mean over groups of (N - 1) / (2N), inside its 95% interval (averaged over seeds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pertbench.benchmark.config import FULL_SCENARIO
from pertbench.benchmark.diagnostics import read_diagnostics
from pertbench.metrics.collapse import SPREAD_THRESHOLD
from pertbench.report.html import CEILING, _fmt, _simple_table, esc

PROBE_TABLE_ID = "probe-table"
COLLAPSE_TABLE_ID = "collapse-table"
BADGE_CLASS = "badge"
#: Tolerance when checking that chance lies inside an interval (exact ties of a
#: collapsed model give intervals of zero width at exactly the chance rank).
_TOLERANCE = 1e-9

BadgeKey = tuple[str, str, str]  # (dataset, task, model)


def _full(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["scenario"] == FULL_SCENARIO]


def _is_collapsed(spread_ratio: float) -> bool:
    return math.isfinite(spread_ratio) and spread_ratio < SPREAD_THRESHOLD


def _badge(kind: str, text: str, title: str) -> str:
    return f'<span class="{BADGE_CLASS} {kind}" title="{esc(title)}">{esc(text)}</span>'


def collapse_badges(out: Path, summary: pd.DataFrame) -> dict[BadgeKey, str]:
    """HTML badges per (dataset, task, model) of the full scenario (see module docstring)."""
    collapse = _full(read_diagnostics(out)["collapse"])
    if collapse.empty:
        return {}
    per_model = collapse.groupby(["dataset", "task", "model"], sort=False).agg(
        spread_ratio=("spread_ratio", "mean"), rank_chance=("rank_chance", "mean")
    )
    chance = collapse.groupby(["dataset", "task"], sort=False)["rank_chance"].mean()
    ranks = _full(summary)
    ranks = ranks[ranks["metric"].astype(str).str.contains("_rank_") & (ranks["model"] != CEILING)]
    badges: dict[BadgeKey, list[str]] = {}
    for (dataset, task, model), row in per_model.iterrows():
        if _is_collapsed(row["spread_ratio"]):
            badges.setdefault((dataset, task, model), []).append(
                _badge(
                    "collapsed",
                    "collapsed",
                    f"spread ratio {row['spread_ratio']:.3f} < {SPREAD_THRESHOLD}: predictions for "
                    "different perturbations of a covariate are nearly identical",
                )
            )
    for (dataset, task, model), block in ranks.groupby(["dataset", "task", "model"], sort=False):
        level = chance.get((dataset, task), math.nan)
        intervals = block[["ci_low", "ci_high"]].to_numpy(dtype=float)
        if not math.isfinite(level) or not len(intervals) or not (intervals == intervals).all():
            continue
        inside = (intervals[:, 0] - _TOLERANCE <= level) & (level <= intervals[:, 1] + _TOLERANCE)
        if inside.all():
            badges.setdefault((dataset, task, model), []).append(
                _badge(
                    "chance",
                    "ranks ≈ chance",
                    f"every rank metric's 95% interval contains {level:.3f}, the rank of a "
                    "model that predicts one profile for every perturbation",
                )
            )
    return {key: " ".join(parts) for key, parts in badges.items()}


def badge_legend() -> str:
    return (
        f'<p class="note">{_badge("collapsed", "collapsed", "")}: the predictions for different '
        "perturbations of a covariate differ by less than "
        f"{SPREAD_THRESHOLD:g} times as much as the observations do (spread ratio, see Collapse "
        f"statistics). {_badge('chance', 'ranks ≈ chance', '')}: every rank metric's interval "
        "contains the rank of a model that predicts the same profile for every perturbation.</p>"
    )


COLLAPSE_NOTE = (
    "Per model (mean over seeds): <strong>spread ratio</strong> = root of the summed squared "
    "distances of the predicted group means from their covariate's mean prediction, over the "
    "same for the observed means (0: one prediction for every perturbation, 1: as diverse as "
    f"the data); flagged collapsed below {SPREAD_THRESHOLD:g}. <strong>Pairwise cosine</strong> "
    "of the predicted deltas between perturbations of a covariate (observed: the same for the "
    "observed deltas). <strong>Rank chance</strong>: the rank metric of a collapsed model."
)
PROBE_NOTE = (
    "A fresh logistic-regression classifier, cross-validated (5 folds) on the basal latent of "
    "the held-out (val + test) cells, predicts each target within the values of the other "
    "targets (the perturbation within each covariate, a covariate within each perturbation). "
    "<strong>Chance</strong>: the majority rate; <strong>reference</strong>: the same probe on "
    "expression PCA of the same cells. A latent that removed the information scores near "
    "chance (<strong>removed</strong> = (reference − accuracy) / (reference − chance) near 1); "
    "one that keeps it scores near the reference (removed near 0). Mean ± sd over seeds."
)


def diagnostic_sections(page: Any, out: Path, models: Sequence[str]) -> None:
    """The "Collapse statistics" and "Disentanglement probe" sections, when there is data."""
    tables = read_diagnostics(out)
    order = {m: i for i, m in enumerate(models)}
    for anchor, title, note, frame, rows, table_id in (
        (
            "collapse-stats",
            "Collapse statistics",
            COLLAPSE_NOTE,
            tables["collapse"],
            _collapse_rows,
            COLLAPSE_TABLE_ID,
        ),
        (
            "probe",
            "Disentanglement probe",
            PROBE_NOTE,
            tables["probe"],
            _probe_rows,
            PROBE_TABLE_ID,
        ),
    ):
        frame = _full(frame)
        if frame.empty:
            continue
        page.section(anchor, title)
        page.add(f'<p class="note">{note}</p>')
        page.add(_simple_table(rows(frame, order), table_id=table_id, digits=3))


def _mean_sd(values: pd.Series) -> str:
    values = values.astype(float).dropna()
    if values.empty:
        return "–"
    sd = f" ± {_fmt(values.std(ddof=1), 2)}" if len(values) > 1 else ""
    return f"{_fmt(values.mean(), 3)}{sd}"


def _sorted(frame: pd.DataFrame, order: Mapping[str, int]) -> pd.DataFrame:
    rank = frame["model"].map(lambda m: order.get(m, len(order)))
    return frame.assign(_order=rank).sort_values(["dataset", "task", "_order"], kind="stable")


def _collapse_rows(collapse: pd.DataFrame, order: Mapping[str, int]) -> pd.DataFrame:
    rows = []
    for (dataset, task, model), block in collapse.groupby(["dataset", "task", "model"], sort=False):
        spread = block["spread_ratio"].astype(float).mean()
        rows.append(
            {
                "dataset": dataset,
                "task": task,
                "model": model,
                "spread ratio": _mean_sd(block["spread_ratio"]),
                "pairwise cosine": _mean_sd(block["mean_pairwise_cosine"]),
                "observed cosine": _mean_sd(block["true_mean_pairwise_cosine"]),
                "rank chance": _mean_sd(block["rank_chance"]),
                "collapsed": "yes" if _is_collapsed(spread) else "no",
            }
        )
    return _sorted(pd.DataFrame(rows), order).drop(columns="_order")


def _probe_rows(probe: pd.DataFrame, order: Mapping[str, int]) -> pd.DataFrame:
    rows = []
    keys = ["dataset", "task", "model", "target"]
    for (dataset, task, model, target), block in probe.groupby(keys, sort=False):
        accuracy, chance = block["accuracy"].mean(), block["chance"].mean()
        reference = block["reference_accuracy"].mean()
        removed = (
            (reference - accuracy) / (reference - chance)
            if math.isfinite(reference - chance) and reference - chance > 0
            else math.nan
        )
        rows.append(
            {
                "dataset": dataset,
                "task": task,
                "model": model,
                "target": target,
                "accuracy": _mean_sd(block["accuracy"]),
                "chance": _mean_sd(block["chance"]),
                "reference": _mean_sd(block["reference_accuracy"]),
                "removed": float(removed),
                "cells": int(block["n_cells"].iloc[0]),
            }
        )
    return _sorted(pd.DataFrame(rows), order).drop(columns="_order")
