"""Hyperparameter search spaces as plain data.

Each model class has ``search_space: dict[str, dict]`` mapping a hyperparameter name to a
distribution, e.g. (PerturBench appendix D.6)::

    {
        "n_layers": {"type": "int", "low": 1, "high": 7, "step": 2},
        "lr": {"type": "float", "low": 5e-6, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.8, "step": 0.1},
        "n_latent": {"type": "categorical", "choices": [64, 128, 192, 256, 512]},
    }

:func:`suggest_params` turns one into Optuna suggestions; spaces stay data so they can be
overridden from a YAML config and shown by ``pertbench models``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pertbench.errors import ConfigError

_ALLOWED = {
    "int": {"type", "low", "high", "step", "log"},
    "float": {"type", "low", "high", "step", "log"},
    "categorical": {"type", "choices"},
}


def validate_space(
    space: Mapping[str, Mapping[str, Any]], *, valid_params: set[str] | None = None
) -> None:
    """Raise :class:`ConfigError` if a distribution is malformed or names an unknown parameter."""
    for name, spec in space.items():
        if valid_params is not None and name not in valid_params:
            raise ConfigError(f"search space names unknown hyperparameter '{name}'")
        kind = spec.get("type")
        if kind not in _ALLOWED:
            raise ConfigError(
                f"search space '{name}': type must be int, float or categorical, got {kind!r}"
            )
        extra = set(spec) - _ALLOWED[kind]
        if extra:
            raise ConfigError(
                f"search space '{name}': unexpected field(s) {', '.join(sorted(extra))}"
            )
        if kind == "categorical":
            if not spec.get("choices"):
                raise ConfigError(f"search space '{name}': categorical needs non-empty 'choices'")
            continue
        if "low" not in spec or "high" not in spec or spec["low"] > spec["high"]:
            raise ConfigError(f"search space '{name}': needs low <= high")
        if spec.get("log") and spec.get("step") is not None and kind == "float":
            raise ConfigError(f"search space '{name}': a float cannot have both log and step")
        if spec.get("log") and spec["low"] <= 0:
            raise ConfigError(f"search space '{name}': log scale needs low > 0")


def suggest_params(trial: Any, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sample one configuration from ``space`` with an Optuna trial."""
    validate_space(space)
    params: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec["choices"]))
        elif kind == "int":
            params[name] = trial.suggest_int(
                name,
                int(spec["low"]),
                int(spec["high"]),
                step=int(spec.get("step", 1)),
                log=bool(spec.get("log", False)),
            )
        else:
            params[name] = trial.suggest_float(
                name,
                float(spec["low"]),
                float(spec["high"]),
                step=spec.get("step"),
                log=bool(spec.get("log", False)),
            )
    return params
