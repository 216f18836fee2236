"""Evaluation suite: aggregations, fit, rank, distribution and DE metrics, calibration."""
