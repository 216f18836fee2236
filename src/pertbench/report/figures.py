"""Figures specific to the benchmark report (data first, keyword-only options).

Prediction-level figures (scatter plots, similarity heatmaps, rank bars) come from
:mod:`pertbench.pl`; this module draws what only a benchmark has: metric-versus-scenario
curves, tuning histories, parameter importances and seed stability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def scenario_curves(
    results: pd.DataFrame,
    *,
    metrics: Sequence[str],
    x: pd.Series,
    xlabel: str,
    title: str,
    models: Sequence[str] | None = None,
):
    """Metric (mean over seeds, +/- sd) against a scenario level, one line per model.

    Parameters
    ----------
    results
        Rows of the results table for one (dataset, task) and the scenarios to draw.
    metrics
        One panel per metric.
    x
        Numeric x position of each scenario name (index: scenario, value: level).
    """
    plt = _plt()
    models = list(models) if models is not None else sorted(results["model"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = results[(results["metric"] == metric) & results["scenario"].isin(x.index)]
        stats = rows.groupby(["model", "scenario"])["value"].agg(["mean", "std"]).reset_index()
        stats["x"] = stats["scenario"].map(x)
        for model in models:
            line = stats[stats["model"] == model].sort_values("x")
            if line.empty:
                continue
            ax.errorbar(
                line["x"],
                line["mean"],
                yerr=line["std"].fillna(0.0),
                marker="o",
                capsize=3,
                label=model,
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def tuning_history(trials: pd.DataFrame, *, title: str, direction: str = "minimize"):
    """Objective of every complete trial and the best value so far."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    done = trials[trials["state"] == "COMPLETE"].sort_values("number")
    pruned = trials[trials["state"] == "PRUNED"]
    if len(done):
        ax.scatter(done["number"], done["value"], s=18, label="complete", color="tab:blue")
        best = done["value"].cummin() if direction == "minimize" else done["value"].cummax()
        ax.step(done["number"], best, where="post", color="tab:red", label="best so far")
    if len(pruned):
        ax.scatter(pruned["number"], np.full(len(pruned), np.nan), s=0)  # keeps the x range
        for n in pruned["number"]:
            ax.axvline(n, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("trial (grey lines: pruned)")
    ax.set_ylabel("objective (validation)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def importance_bars(importances: pd.DataFrame, *, title: str):
    """Horizontal bars of fANOVA parameter importances."""
    plt = _plt()
    rows = importances.dropna(subset=["importance"]).sort_values("importance")
    fig, ax = plt.subplots(figsize=(5.0, 0.35 * max(len(rows), 3) + 1.0))
    ax.barh(rows["param"].astype(str), rows["importance"], color="tab:purple")
    ax.set_xlabel("importance (fANOVA, sums to 1)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, max(1.0, float(rows["importance"].max()) if len(rows) else 1.0))
    fig.tight_layout()
    return fig


def seed_stability(
    results: pd.DataFrame, *, metrics: Sequence[str], title: str, models: Sequence[str]
):
    """Each seed's value (dots) and the mean (bar) per model, one panel per metric."""
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(4.2 * len(metrics), 0.3 * len(models) + 2.2), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        rows = results[results["metric"] == metric]
        for i, model in enumerate(models):
            values = rows.loc[rows["model"] == model, "value"].dropna().to_numpy()
            if values.size == 0:
                continue
            ax.barh(i, values.mean(), color="0.85")
            ax.scatter(values, np.full(values.size, i), s=14, color="tab:blue", zorder=3)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(models, fontsize=7)
        ax.set_xlabel(metric)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
