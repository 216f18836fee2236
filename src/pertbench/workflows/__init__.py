"""End-to-end workflows built from data, models and metrics."""
