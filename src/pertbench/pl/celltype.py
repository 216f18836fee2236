"""Figures of the held-out cell-type workflow (scGen / scPRAM tutorial).

Each function takes the observed controls, the observed perturbed cells ("real") and the
predicted cells of ONE held-out group (AnnData with matching gene names, or arrays over the
same genes), returns a :class:`matplotlib.figure.Figure` (drawing into ``ax`` when given)
and never calls ``show``. The predicted-vs-real gene-mean regression is
:func:`pertbench.pl.mean_scatter`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.errors import EvaluationError
from pertbench.pl.evaluation import _cells_and_genes, _new_axes, distinct_colors

CONDITION_COLOURS = {"control": "tab:blue", "real": "tab:orange", "predicted": "tab:green"}


def _three(controls, real, predicted, gene_names=None):
    genes = pd.Index(map(str, gene_names)) if gene_names is not None else None
    C, genes = _cells_and_genes(controls, "controls", genes)
    R, _ = _cells_and_genes(real, "real", genes)
    P, _ = _cells_and_genes(predicted, "predicted", genes)
    for label, M in (("controls", C), ("real", R), ("predicted", P)):
        if M.shape[0] == 0:
            raise EvaluationError(f"{label} has no cells to plot")
    return C, R, P, genes


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X, dtype=np.float64)


def top_de_genes(controls, real, *, n: int = 10, gene_names=None) -> list[str]:
    """The ``n`` most up-regulated genes of ``real`` against ``controls`` (Wilcoxon z)."""
    from pertbench.metrics.de import wilcoxon_scores

    C, R, _, genes = _three(controls, real, real, gene_names)
    z = wilcoxon_scores(R, np.zeros(R.shape[0], dtype=np.int64), C, n_groups=1).scores[0]
    return [genes[i] for i in np.argsort(-z, kind="stable")[:n]]


def condition_pca(
    controls,
    real,
    predicted,
    *,
    gene_names: Sequence[str] | None = None,
    max_cells: int | None = 2000,
    seed: int = 0,
    ax=None,
    title: str | None = None,
    figsize: tuple[float, float] = (5.0, 4.5),
):
    """PCA of control, real perturbed and predicted cells.

    The two components are fitted on the observed cells (controls + real) only, so the
    predicted cells are placed in the space of the data, not of the prediction. At most
    ``max_cells`` cells per condition are drawn (seeded subsample).
    """
    from pertbench.metrics.distribution import pca_basis, project, subsample

    C, R, P, _ = _three(controls, real, predicted, gene_names)
    observed = sp.vstack([sp.csr_matrix(C), sp.csr_matrix(R)])
    mean, comps = pca_basis(observed, n_pcs=2, seed=seed)
    rng = np.random.default_rng(seed)
    fig, ax = _new_axes(ax, figsize)
    for label, M in (("control", C), ("real", R), ("predicted", P)):
        rows = subsample(M.shape[0], max_cells, rng)
        xy = project(M[rows], mean, comps)
        ax.scatter(
            xy[:, 0],
            xy[:, 1],
            s=6,
            alpha=0.6,
            c=CONDITION_COLOURS[label],
            label=label,
            linewidths=0,
        )
    ax.set_xlabel("PC1 (observed cells)")
    ax.set_ylabel("PC2 (observed cells)")
    ax.legend(fontsize=7, frameon=False, markerscale=2)
    if title:
        ax.set_title(title)
    return fig


def edistance_matrix(
    controls, real, predicted, *, gene_names=None, n_pcs: int = 30, max_cells: int = 2000, seed=0
) -> pd.DataFrame:
    """3 x 3 energy distances between control, real and predicted cells.

    Computed in a PCA space (``n_pcs``) fitted on the observed cells (controls + real), as
    the tutorial metric; the diagonal is 0.
    """
    from pertbench.metrics.distribution import edistance, pca_basis, project, subsample

    C, R, P, _ = _three(controls, real, predicted, gene_names)
    observed = sp.vstack([sp.csr_matrix(C), sp.csr_matrix(R)])
    mean, comps = pca_basis(observed, n_pcs=n_pcs, seed=seed)
    rng = np.random.default_rng(seed)
    names = ["control", "real", "predicted"]
    points = [project(M[subsample(M.shape[0], max_cells, rng)], mean, comps) for M in (C, R, P)]
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(i + 1, 3):
            out[i, j] = out[j, i] = edistance(points[i], points[j])
    return pd.DataFrame(out, index=names, columns=names)


def edistance_heatmap(
    controls,
    real,
    predicted,
    *,
    gene_names=None,
    n_pcs: int = 30,
    seed: int = 0,
    ax=None,
    title: str | None = None,
    figsize: tuple[float, float] = (4.2, 3.6),
):
    """Heatmap of the 3 x 3 E-distances (see :func:`edistance_matrix`), values annotated.

    A good prediction has a small real-predicted distance, compared with control-real.
    """
    table = edistance_matrix(
        controls, real, predicted, gene_names=gene_names, n_pcs=n_pcs, seed=seed
    )
    fig, ax = _new_axes(ax, figsize)
    image = ax.imshow(table.to_numpy(), cmap="viridis")
    ax.set_xticks(range(3), table.columns)
    ax.set_yticks(range(3), table.index)
    vmax = float(table.to_numpy().max()) or 1.0
    for i in range(3):
        for j in range(3):
            value = table.iat[i, j]
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value < 0.6 * vmax else "black",
            )
    fig.colorbar(image, ax=ax, label="E-distance (PCA space)")
    ax.set_title(title or "E-distance")
    return fig


def _dot_stats(M, cols: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    block = _dense(M[:, cols])
    return block.mean(axis=0), (block > cutoff).mean(axis=0)


def de_dotplot(
    controls,
    real,
    predicted,
    genes: Sequence[str],
    *,
    gene_names=None,
    expression_cutoff: float = 0.0,
    ax=None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
):
    """Dot plot of ``genes``: colour = mean expression, size = share of cells above cutoff.

    Rows are the three conditions (control, real, predicted). ``expression_cutoff`` 0
    counts any positive value, as scanpy does; decoders with a linear output rarely
    predict exact zeros, so the share is informative mainly for control and real cells.
    """
    C, R, P, all_genes = _three(controls, real, predicted, gene_names)
    cols = all_genes.get_indexer(pd.Index(map(str, genes)))
    if (cols < 0).any():
        raise EvaluationError(f"gene(s) not found: {', '.join(np.asarray(genes)[cols < 0][:5])}")
    stats = [_dot_stats(M, cols, expression_cutoff) for M in (C, R, P)]
    means = np.vstack([s[0] for s in stats])
    shares = np.vstack([s[1] for s in stats])
    n = len(cols)
    fig, ax = _new_axes(ax, figsize or (max(4.0, 0.45 * n + 2.0), 2.6))
    xx, yy = np.meshgrid(np.arange(n), np.arange(3))
    dots = ax.scatter(
        xx.ravel(),
        yy.ravel(),
        s=20 + 180 * shares.ravel(),
        c=means.ravel(),
        cmap="Reds",
        edgecolors="0.3",
        linewidths=0.4,
    )
    ax.set_xticks(range(n), [str(g) for g in genes], rotation=90, fontsize=7)
    ax.set_yticks(range(3), ["control", "real", "predicted"])
    ax.set_ylim(-0.6, 2.6)
    ax.set_xlim(-0.6, n - 0.4)
    fig.colorbar(dots, ax=ax, label="mean expression", fraction=0.04)
    ax.set_title(title or f"top DE genes (dot size: share > {expression_cutoff:g})", fontsize=9)
    return fig


def de_violins(
    controls,
    real,
    predicted,
    genes: Sequence[str],
    *,
    gene_names=None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
):
    """Violin plots of ``genes`` in control, real and predicted cells (one panel per gene)."""
    from matplotlib.figure import Figure

    C, R, P, all_genes = _three(controls, real, predicted, gene_names)
    cols = all_genes.get_indexer(pd.Index(map(str, genes)))
    if (cols < 0).any():
        raise EvaluationError(f"gene(s) not found: {', '.join(np.asarray(genes)[cols < 0][:5])}")
    n = len(cols)
    ncols = min(n, 5)
    nrows = int(np.ceil(n / ncols)) if n else 1
    fig = Figure(figsize=figsize or (2.2 * ncols, 2.2 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    blocks = [_dense(M[:, cols]) for M in (C, R, P)]
    for i, gene in enumerate(genes):
        ax = axes[i]
        data = [b[:, i] for b in blocks]
        # a constant column has no density: draw it as a flat line instead of failing
        safe = [d if np.ptp(d) > 0 else d + np.linspace(-1e-6, 1e-6, d.size) for d in data]
        parts = ax.violinplot(safe, showmedians=True, showextrema=False)
        for body, label in zip(parts["bodies"], CONDITION_COLOURS, strict=True):
            body.set_facecolor(CONDITION_COLOURS[label])
            body.set_alpha(0.6)
        ax.set_xticks([1, 2, 3], ["ctrl", "real", "pred"], fontsize=7)
        ax.set_title(str(gene), fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def attention_heatmap(
    table: pd.DataFrame,
    *,
    ax=None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
):
    """Mean attention weight from each query cell type (rows) to each reference type (columns).

    ``table`` is :meth:`pertbench.models.scpram.Attention.by_reference_type` (rows sum
    to 1), or several such rows stacked. Missing values (a type that was not a reference,
    e.g. the held-out type itself) are left blank and marked with a dash.
    """
    values = table.to_numpy(dtype=np.float64)
    if values.size == 0:
        raise EvaluationError("the attention table is empty")
    nr, nc = values.shape
    finite = values[np.isfinite(values)]
    vmax = max(float(finite.max()), 1e-12) if finite.size else 1.0
    fig, ax = _new_axes(ax, figsize or (2.6 + 0.75 * nc, 2.6 + 0.45 * nr))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="magma", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(nc), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(nr), [str(r) for r in table.index])
    for i in range(nr):
        for j in range(nc):
            value = values[i, j]
            ax.text(
                j,
                i,
                "-" if not np.isfinite(value) else f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="0.4"
                if not np.isfinite(value)
                else ("white" if value < 0.6 * vmax else "black"),
            )
    ax.set_xlabel("reference cell type")
    ax.set_ylabel("query (held-out) cell type")
    fig.colorbar(image, ax=ax, label="mean attention weight")
    ax.set_title(title or "scPRAM attention", fontsize=9)
    return fig


def metric_bars(
    metrics: pd.DataFrame,
    metric: str,
    *,
    model_column: str = "model",
    group_column: str = "cell_type",
    ax=None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
):
    """Grouped bars of one metric: one group of bars per cell type, one bar per model."""
    if metric not in metrics.columns:
        raise EvaluationError(f"no column '{metric}' in the metrics table")
    table = metrics.pivot_table(index=group_column, columns=model_column, values=metric)
    n_groups, n_models = table.shape
    fig, ax = _new_axes(ax, figsize or (max(5.0, 0.9 * n_groups * max(n_models, 1) / 2), 3.2))
    width = 0.8 / max(n_models, 1)
    x = np.arange(n_groups)
    colors = distinct_colors(n_models)
    for i, model in enumerate(table.columns):
        offset = (i - (n_models - 1) / 2) * width
        ax.bar(x + offset, table[model].to_numpy(), width, label=model, color=colors[i])
    ax.set_xticks(x, [str(g) for g in table.index], rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title or metric)
    return fig


def sensitivity_bars(
    importance: pd.DataFrame,
    *,
    ax=None,
    figsize: tuple[float, float] | None = None,
    title: str | None = None,
):
    """Stacked bars: per metric, the share of variance explained by each parameter.

    ``importance`` is :func:`pertbench.workflows.experiments.main_effect_importance`.
    """
    skip = {"metric", "total_sd", "most_influential"}
    parts = [c for c in importance.columns if c not in skip]
    if importance.empty or not parts:
        raise EvaluationError("the importance table is empty")
    n = len(importance)
    fig, ax = _new_axes(ax, figsize or (max(4.5, 0.9 * n + 1.5), 3.2))
    bottom = np.zeros(n)
    x = np.arange(n)
    for part in parts:
        values = importance[part].to_numpy(dtype=np.float64)
        ax.bar(
            x,
            values,
            0.7,
            bottom=bottom,
            label=part,
            color="0.75" if part == "interaction" else None,
        )
        bottom += values
    ax.set_xticks(x, importance["metric"].astype(str), rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of variance (eta squared)")
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    ax.set_title(title or "hyperparameter sensitivity", fontsize=9)
    return fig
