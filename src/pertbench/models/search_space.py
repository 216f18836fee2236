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

from collections.abc import Collection, Mapping
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


# ---------------------------------------------------------------------------------------
# Sizing a space for the data and the machine
# ---------------------------------------------------------------------------------------
#: Hyperparameters that set a hidden layer's width, and patterns of those that set a depth.
WIDTH_PARAMS = frozenset(
    {
        "encoder_width",
        "hidden_dim",
        "hidden_dim_x",
        "hidden_dim_cond",
        "n_hidden",
        "hidden_size",
        "adv_classifier_hidden_dim",
    }
)
CPU_MAX_WIDTH = 1024
MAX_DEPTH_SMALL_DATA = 3
#: Fewer training cells than this, or a CPU, caps the depth at :data:`MAX_DEPTH_SMALL_DATA`.
SMALL_DATA_CELLS = 50_000


def is_depth_param(name: str) -> bool:
    """``n_layers``, ``n_layers_encoder``, ``adv_classifier_n_layers``, ``num_go_gnn_layers``..."""
    return name.startswith("n_layers") or name.endswith("_layers")


def space_limits(*, n_genes: int, n_train_cells: int, device: str) -> dict[str, int]:
    """Largest width and depth worth searching for this data on this device.

    The rule (docs/benchmark.md): a hidden layer wider than twice the number of genes adds
    parameters, not information, so widths stop at ``2 x n_genes`` (and at 1,024 on a CPU;
    at least 64, and never below the lowest width of the model's own range);
    more than 3 hidden layers only pays off with at least 50,000 training cells on a GPU.
    PerturBench's own ranges (widths up to 5,376, 7 layers) were chosen for GPU runs on
    screens of 10^5+ cells.
    """
    width = max(64, 2 * int(n_genes))
    if device == "cpu":
        width = min(width, CPU_MAX_WIDTH)
    small = device == "cpu" or int(n_train_cells) < SMALL_DATA_CELLS
    return {"width": width, "depth": MAX_DEPTH_SMALL_DATA if small else 10**9}


def _cap_entry(spec: Mapping[str, Any], cap: int) -> dict[str, Any] | None:
    """``spec`` without its values above ``cap`` (never below its own lowest value);
    ``None`` if nothing was above it."""
    if spec["type"] == "categorical":
        numeric = [c for c in spec["choices"] if isinstance(c, (int, float))]
        if len(numeric) != len(spec["choices"]) or max(numeric) <= cap:
            return None
        kept = [c for c in spec["choices"] if c <= cap] or [min(numeric)]
        return {"type": "categorical", "choices": kept}
    if spec["high"] <= cap:
        return None
    low = spec["low"]
    if low >= cap:
        return {"type": "categorical", "choices": [low]}
    step = spec.get("step")
    if step is not None and not spec.get("log") and low + step <= cap:
        high = low + step * ((cap - low) // step)
        return {**spec, "high": high}
    # The grid is too coarse below the cap: search the remaining range on a log scale.
    return {"type": spec["type"], "low": low, "high": cap, "log": True}


def _largest(spec: Mapping[str, Any]) -> Any:
    return max(spec["choices"]) if spec["type"] == "categorical" else spec["high"]


def size_space(
    space: Mapping[str, Mapping[str, Any]],
    *,
    n_genes: int,
    n_train_cells: int,
    device: str,
    keep: Collection[str] = (),
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Cap the widths and depths of ``space`` by :func:`space_limits`.

    Parameters
    ----------
    space
        A search space (a distribution per hyperparameter).
    n_genes, n_train_cells
        Size of the data the search trains on.
    device
        The resolved device (``"cpu"`` or ``"cuda"``).
    keep
        Parameters left as they are (those the user's own ``--space`` set).

    Returns
    -------
    (space, changes)
        The sized space and one entry per changed parameter (``"encoder_width <= 1000"``:
        its new largest value; a range never shrinks below its own lowest value).
    """
    limits = space_limits(n_genes=n_genes, n_train_cells=n_train_cells, device=device)
    sized: dict[str, dict[str, Any]] = {}
    changes: list[str] = []
    for name, spec in space.items():
        cap = None
        if name not in keep and name in WIDTH_PARAMS:
            cap = limits["width"]
        elif name not in keep and is_depth_param(name) and spec["type"] == "int":
            cap = limits["depth"]
        capped = _cap_entry(spec, cap) if cap is not None else None
        sized[name] = capped if capped is not None else dict(spec)
        if capped is not None:
            changes.append(f"{name} <= {_largest(capped)}")
    return sized, changes
