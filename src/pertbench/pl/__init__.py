"""Figures (matplotlib), in scanpy's ``pl`` style: data first, options by keyword."""

from pertbench.pl.evaluation import mean_scatter, rank_bars, similarity_heatmaps

__all__ = ["mean_scatter", "rank_bars", "similarity_heatmaps"]
