"""Hyperparameter optimisation with Optuna."""
