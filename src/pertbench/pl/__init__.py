"""Figures (matplotlib), in scanpy's ``pl`` style: data first, options by keyword."""
