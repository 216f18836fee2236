"""The model zoo behind one train/predict/save/load API."""

from pertbench.models.base import PerturbationModel, build_counterfactuals
from pertbench.models.registry import available_models, create_model, get_model_class

__all__ = [
    "PerturbationModel",
    "available_models",
    "build_counterfactuals",
    "create_model",
    "get_model_class",
]
