"""Figures (matplotlib), in scanpy's ``pl`` style: data first, options by keyword."""

from pertbench.pl.celltype import (
    attention_heatmap,
    condition_pca,
    de_dotplot,
    de_violins,
    edistance_heatmap,
    edistance_matrix,
    metric_bars,
    sensitivity_bars,
    top_de_genes,
)
from pertbench.pl.evaluation import distinct_colors, mean_scatter, rank_bars, similarity_heatmaps

__all__ = [
    "attention_heatmap",
    "condition_pca",
    "de_dotplot",
    "de_violins",
    "distinct_colors",
    "edistance_heatmap",
    "edistance_matrix",
    "mean_scatter",
    "metric_bars",
    "rank_bars",
    "sensitivity_bars",
    "similarity_heatmaps",
    "top_de_genes",
]
