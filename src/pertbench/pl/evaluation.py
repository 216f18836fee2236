"""Evaluation figures: mean-expression scatter, logfc similarity heatmaps, rank-metric bars.

Every function returns a :class:`matplotlib.figure.Figure` (drawing into ``ax`` when one
is given) and never calls ``show``: figures are built without pyplot's global state, so
they work headless and in reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.errors import EvaluationError


def distinct_colors(n: int) -> list:
    """``n`` colours no two of which are the same (tab10 up to 10, tab20 up to 20, then
    evenly spaced hues), so a bar chart of many models never reuses a colour."""
    import matplotlib as mpl

    if n <= 10:
        return [mpl.colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [mpl.colormaps["tab20"](i) for i in range(n)]
    return [mpl.colormaps["hsv"](i / n) for i in range(n)]


def _new_axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots()


def _cells_and_genes(data, label: str, genes: pd.Index | None):
    """(matrix, gene names) from an AnnData or an array (gene names then from ``genes``)."""
    import anndata as ad

    if isinstance(data, ad.AnnData):
        names = pd.Index(data.var_names.astype(str))
        if genes is not None:
            idx = names.get_indexer(genes)
            if (idx < 0).any():
                missing = genes[idx < 0]
                raise EvaluationError(
                    f"{len(missing)} gene(s) are missing from {label}, e.g. {', '.join(missing[:5])}"
                )
            return data.X[:, idx], genes
        return data.X, names
    X = data if sp.issparse(data) else np.atleast_2d(np.asarray(data, dtype=np.float64))
    if genes is None:
        genes = pd.Index([f"gene{i}" for i in range(X.shape[1])])
    if X.shape[1] != len(genes):
        raise EvaluationError(f"{label} has {X.shape[1]} genes, expected {len(genes)}")
    return X, genes


def _col_mean(X) -> np.ndarray:
    return np.asarray(X.mean(axis=0), dtype=np.float64).ravel()


def mean_scatter(
    truth,
    pred,
    *,
    controls=None,
    gene_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    n_labels: int = 10,
    top_k: int = 100,
    ax=None,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 5.0),
):
    """Predicted vs observed mean expression per gene, with R^2 and labelled top DE genes.

    Parameters
    ----------
    truth, pred
        Observed and predicted cells of ONE group: AnnData (genes matched by name) or
        (cells x genes) arrays over ``gene_names``.
    controls
        Observed controls of the same covariates. When given, the truth's top DE genes
        (Wilcoxon z against the controls, up-regulated) are highlighted: the top
        ``top_k`` in colour with their own R^2, the top ``n_labels`` labelled.
    gene_names
        Gene names for array input.
    labels
        Genes to label instead of the top DE genes.
    ax
        Matplotlib axes to draw into (a new figure otherwise).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from pertbench.metrics.de import top_k_mask, wilcoxon_scores
    from pertbench.metrics.fit import r2

    genes = pd.Index(map(str, gene_names)) if gene_names is not None else None
    T, genes = _cells_and_genes(truth, "truth", genes)
    P, _ = _cells_and_genes(pred, "pred", genes)
    x, y = _col_mean(T), _col_mean(P)
    fig, ax = _new_axes(ax, figsize)
    ax.scatter(x, y, s=6, c="0.6", alpha=0.6, linewidths=0, label="all genes")
    text = [f"$R^2$ all genes = {r2(y, x):.3f}"]
    highlight = np.zeros(x.size, dtype=bool)
    order: np.ndarray = np.array([], dtype=np.int64)
    if controls is not None:
        C, _ = _cells_and_genes(controls, "controls", genes)
        z = wilcoxon_scores(T, np.zeros(T.shape[0], dtype=np.int64), C, n_groups=1).scores[0]
        highlight = top_k_mask(z, top_k)[0]
        ax.scatter(
            x[highlight], y[highlight], s=10, c="tab:red", linewidths=0, label=f"top {top_k} DE"
        )
        text.append(f"$R^2$ top {top_k} DE = {r2(y[highlight], x[highlight]):.3f}")
        order = np.argsort(-z, kind="stable")[:n_labels]
    if labels is not None:
        order = genes.get_indexer(pd.Index(map(str, labels)))
        if (order < 0).any():
            raise EvaluationError(
                f"label gene(s) not found: {', '.join(np.asarray(labels)[order < 0][:5])}"
            )
    for g in order:
        ax.annotate(genes[g], (x[g], y[g]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo = float(min(x.min(initial=0.0), y.min(initial=0.0)))
    hi = float(max(x.max(initial=1.0), y.max(initial=1.0)))
    ax.plot([lo, hi], [lo, hi], ls="--", lw=0.8, c="k")
    ax.set_xlabel("observed mean expression")
    ax.set_ylabel("predicted mean expression")
    ax.text(0.03, 0.97, "\n".join(text), transform=ax.transAxes, va="top", fontsize=8)
    if highlight.any():
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    if title:
        ax.set_title(title)
    return fig


def _logfc_frames(source, truth_logfc) -> tuple[pd.DataFrame, pd.DataFrame]:
    if hasattr(source, "aggregates"):
        aggs = source.aggregates
        if "pred_logfc" not in aggs:
            raise EvaluationError(
                "this evaluation kept no logfc profiles; run the Evaluator with keep_aggregates=True"
            )
        return aggs["pred_logfc"], aggs["truth_logfc"]
    if truth_logfc is None:
        raise EvaluationError("give an EvaluationResult, or both pred and truth logfc profiles")
    pred = pd.DataFrame(source)
    truth = pd.DataFrame(truth_logfc)
    if pred.shape != truth.shape:
        raise EvaluationError(f"pred {pred.shape} and truth {truth.shape} profiles differ in shape")
    return pred, truth


def similarity_heatmaps(
    result,
    truth_logfc=None,
    *,
    covariate: str | None = None,
    cmap: str = "viridis",
    show_labels: bool | None = None,
    figsize: tuple[float, float] = (10.0, 4.8),
):
    """Cosine similarity of logfc profiles between perturbations: predicted | observed.

    PerturBench figure C.1: a model that collapses to one profile per covariate shows
    uniform blocks on the left while the observed matrix has structure.

    Parameters
    ----------
    result
        An :class:`~pertbench.metrics.EvaluationResult` (uses its logfc profiles), or the
        predicted logfc profiles (rows: groups, columns: genes) with ``truth_logfc``.
    covariate
        Only the groups whose label starts with this covariate label (``"<label>:"``).
    show_labels
        Tick labels with group names (default: when at most 40 groups).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    from pertbench.metrics.rank import similarity_matrix

    pred, truth = _logfc_frames(result, truth_logfc)
    if covariate is not None:
        keep = pd.Index(pred.index.astype(str)).str.startswith(f"{covariate}:")
        if not keep.any():
            raise EvaluationError(f"no group of covariates '{covariate}' in these profiles")
        pred, truth = pred[keep], truth[keep]
    s_pred = similarity_matrix(pred.to_numpy())
    s_true = similarity_matrix(truth.to_numpy())
    distance = float(np.linalg.norm(s_pred - s_true))
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, 2)
    show = len(pred) <= 40 if show_labels is None else show_labels
    names = [str(i) for i in pred.index]
    image = None
    for ax, mat, name in zip(axes, (s_pred, s_true), ("predicted", "observed"), strict=True):
        image = ax.imshow(mat, vmin=-1, vmax=1, cmap=cmap, interpolation="nearest")
        ax.set_title(f"{name} logfc similarity")
        if show:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    fig.suptitle(f"matrix distance (Frobenius) = {distance:.3f}", fontsize=10)
    return fig


def _summary_rows(results) -> pd.DataFrame:
    """Long table model, metric, value[, ci_low, ci_high] from the accepted inputs."""
    if isinstance(results, pd.DataFrame):
        if not {"model", "metric", "value"} <= set(results.columns):
            raise EvaluationError("a results table needs the columns model, metric and value")
        return results
    if not isinstance(results, Mapping):
        raise EvaluationError("give a {model: EvaluationResult or summary} mapping or a table")
    frames = []
    for model, res in results.items():
        summary = res.summary if hasattr(res, "summary") else pd.DataFrame(res)
        own = summary[~summary["metric"].str.contains("/", regex=False)]
        frames.append(own.assign(model=str(model)))
    return pd.concat(frames, ignore_index=True)


def rank_bars(
    results: Mapping[str, Any] | pd.DataFrame,
    *,
    metrics: Sequence[str] = ("rmse_rank_average", "cosine_rank_logfc"),
    include_references: bool = True,
    ax=None,
    figsize: tuple[float, float] = (6.0, 3.8),
):
    """Rank metrics per model as grouped bars with 95% intervals (0 is best, 0.5 is random).

    Parameters
    ----------
    results
        ``{model name: EvaluationResult or summary DataFrame}``, or a long table with
        columns ``model``, ``metric``, ``value`` (and optionally ``ci_low``, ``ci_high``).
    metrics
        Rank metrics to show.
    include_references
        Also draw the baselines/ceiling found in a result's summary
        (``<reference>/<metric>`` rows), once.

    Returns
    -------
    matplotlib.figure.Figure
    """
    table = _summary_rows(results)
    if include_references and isinstance(results, Mapping):
        seen = set(table["model"])
        for res in results.values():
            summary = res.summary if hasattr(res, "summary") else pd.DataFrame(res)
            refs = summary[summary["metric"].str.contains("/", regex=False)].copy()
            refs[["model", "metric"]] = refs["metric"].str.split("/", n=1, expand=True)
            refs = refs[
                ~refs["model"].isin(["normalized", "normalized_best"]) & ~refs["model"].isin(seen)
            ]
            seen |= set(refs["model"])
            table = pd.concat([table, refs], ignore_index=True)
    table = table[table["metric"].isin(metrics)]
    if table.empty:
        raise EvaluationError(f"none of the metrics {', '.join(metrics)} is in these results")
    if not np.isfinite(table["value"].to_numpy(dtype=float)).any():
        raise EvaluationError(
            f"every value of {', '.join(metrics)} is undefined (NaN); rank metrics need at "
            "least 2 perturbations per covariate combination"
        )
    models = list(dict.fromkeys(table["model"]))
    present = [m for m in metrics if m in set(table["metric"])]
    fig, ax = _new_axes(ax, figsize)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(present))
    colors = distinct_colors(len(models))
    for i, model in enumerate(models):
        rows = table[table["model"] == model].set_index("metric").reindex(present)
        values = rows["value"].to_numpy(dtype=float)
        err = None
        if {"ci_low", "ci_high"} <= set(rows.columns):
            low = values - rows["ci_low"].to_numpy(dtype=float)
            high = rows["ci_high"].to_numpy(dtype=float) - values
            err = np.nan_to_num(np.vstack([low, high]), nan=0.0)
        ax.bar(
            x + (i - (len(models) - 1) / 2) * width,
            values,
            width,
            yerr=err,
            capsize=2,
            label=model,
            color=colors[i],
        )
    ax.axhline(0.5, ls="--", lw=0.8, c="k")
    ax.text(len(present) - 0.5, 0.5, " random", va="bottom", ha="right", fontsize=7)
    ax.set_xticks(x, present, fontsize=8)
    ax.set_ylabel("rank (0 = best)")
    finite = table["value"].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    ax.set_ylim(0, max(0.6, float(finite.max()) * 1.1 if finite.size else 0.6))
    ax.legend(
        fontsize=7,
        frameon=False,
        ncols=_legend_columns([str(m) for m in models], fig.get_figwidth(), at_most=4),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
    )
    return fig


def _legend_columns(labels: Sequence[str], width_inches: float, *, at_most: int) -> int:
    """Legend columns that fit the figure's width (7-point labels, about 0.06 inch a
    character plus 0.45 inch of handle and padding), so long user-supplied model names wrap
    to more rows instead of squeezing the axes to nothing."""
    widest = max((len(label) for label in labels), default=1) * 0.06 + 0.45
    fitting = int(0.95 * width_inches // widest)
    return max(1, min(len(labels), at_most, fitting))
