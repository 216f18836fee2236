"""Train one model configuration, predict a split and score it: the unit of work shared by
tuning trials, stability seeds and benchmark cells."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, ModelError


def load_dataset(path: str | os.PathLike, *, keys: PerturbationKeys) -> ad.AnnData:
    """Read and validate an ``.h5ad`` file against the data contract."""
    from pertbench.data.loading import read_h5ad

    return read_h5ad(path, keys=keys)


def load_split(path: str | os.PathLike, adata: ad.AnnData) -> pd.Series:
    """Read a split CSV aligned to ``adata`` and check it has train and val cells."""
    from pertbench.data.splits import read_split

    split = read_split(path, adata.obs_names)
    return split


def require_split_parts(split: pd.Series, parts: Sequence[str], *, what: str) -> None:
    """Raise :class:`ConfigError` if ``split`` lacks any of ``parts`` (``train``/``val``/``test``)."""
    present = set(pd.unique(split.to_numpy()))
    missing = [p for p in parts if p not in present]
    if missing:
        raise ConfigError(
            f"{what} needs {', '.join(repr(p) for p in missing)} cells but the split has none; "
            "make a split with a validation and a test fraction"
        )


def resolve_model_class(name: str):
    """The model class for a registry name (``linear``) or an import path (``pkg.mod:Class``)."""
    from pertbench.models.registry import get_model_class

    return get_model_class(name)


def resolve_params(model_class: Any, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of ``model_class`` updated with ``params`` (validated and type-coerced)."""
    import dataclasses

    checked = model_class.make_params(dict(params or {}))
    return dataclasses.asdict(checked)


def heldout_labels(
    adata: ad.AnnData, split: pd.Series, keys: PerturbationKeys, on: Sequence[str]
) -> list[str]:
    """Distinct perturbation labels of the non-control cells in the splits ``on``."""
    labels = adata.obs[keys.perturbation_key].astype(str).to_numpy()
    mask = np.isin(split.to_numpy(), list(on)) & (labels != keys.control)
    return sorted(pd.unique(labels[mask]).tolist())


def check_applicable(
    model: Any, adata: ad.AnnData, split: pd.Series, *, keys: PerturbationKeys, on: Sequence[str]
) -> None:
    """Raise :class:`~pertbench.errors.UnseenPerturbationError` before any training when
    ``model`` encodes perturbations one-hot and a held-out perturbation of ``on`` has a
    part without training cells (the ``unseen`` task). A trained model's own
    :meth:`~pertbench.models.base.PerturbationModel.check_predictable` is the exact test."""
    from pertbench.errors import UnseenPerturbationError
    from pertbench.models.base import align_split

    if model.predicts_unseen_perturbations:
        return
    split = align_split(adata, split)
    trained = {
        part
        for label in heldout_labels(adata, split, keys, ("train",))
        for part in keys.components(label)
    }
    unseen = [
        label
        for label in heldout_labels(adata, split, keys, on)
        if any(part not in trained for part in keys.components(label))
    ]
    if unseen:
        raise UnseenPerturbationError(model.cannot_predict_message(unseen))


@dataclass
class FitOutcome:
    """A trained model, its predictions and the metric values computed from them."""

    model: Any
    predictions: dict[str, ad.AnnData] = field(default_factory=dict)
    evaluations: dict[str, Any] = field(default_factory=dict)
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    fit_seconds: float = 0.0
    predict_seconds: float = 0.0
    evaluate_seconds: float = 0.0


def fit_and_evaluate(
    adata: ad.AnnData,
    split: pd.Series,
    *,
    model: str,
    params: Mapping[str, Any] | None,
    keys: PerturbationKeys,
    seed: int,
    on: Sequence[str] = ("val",),
    metrics: Sequence[str] | None = None,
    device: str = "auto",
    max_epochs: int | None = None,
    epoch_callback: Any = None,
    log_dir: str | Path | None = None,
    baselines: Sequence[str] | None = None,
    ceiling: bool = False,
    model_name: str | None = None,
    reuse_references: bool = False,
) -> FitOutcome:
    """Fit ``model`` with ``params`` on the train cells and score its predictions.

    Parameters
    ----------
    adata, split
        Dataset and its split (aligned to ``adata.obs_names``).
    model, params
        Model name (or import path) and hyperparameters (defaults for the rest).
    keys
        Perturbation/covariate columns.
    seed
        Seeds training and the evaluation's random draws.
    on
        Splits to predict and score, e.g. ``("val",)`` for tuning or ``("test",)``.
    metrics
        Metric names to compute (``None``: the evaluator's default set).
    baselines, ceiling
        Passed to the evaluator for calibrated (normalised) scores.
    reuse_references
        Reuse the ceiling computed by an earlier evaluation of the same cells in this
        process (:class:`~pertbench.metrics.references.ReferenceCache`; same numbers).

    Returns
    -------
    FitOutcome
        ``values[on][metric]`` holds each summary value.
    """
    from pertbench.models.registry import create_model

    instance = create_model(model, keys=keys, **dict(params or {}))
    check_applicable(instance, adata, split, keys=keys, on=on)
    start = time.perf_counter()
    instance.fit(
        adata,
        split,
        seed=seed,
        device=device,
        max_epochs=max_epochs,
        progress=False,
        log_dir=log_dir,
        epoch_callback=epoch_callback,
    )
    outcome = FitOutcome(model=instance, fit_seconds=time.perf_counter() - start)
    for part in on:
        start = time.perf_counter()
        pred = instance.predict_split(adata, split, on=part)
        outcome.predict_seconds += time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_prediction(
            adata,
            pred,
            split,
            keys=keys,
            on=part,
            metrics=metrics,
            seed=seed,
            baselines=baselines,
            ceiling=ceiling,
            model_name=model_name or model,
            reuse_references=reuse_references,
        )
        outcome.evaluate_seconds += time.perf_counter() - start
        outcome.predictions[part] = pred
        outcome.evaluations[part] = result
        outcome.values[part] = summary_values(result)
    return outcome


def evaluate_prediction(
    adata: ad.AnnData,
    pred: ad.AnnData,
    split: pd.Series,
    *,
    keys: PerturbationKeys,
    on: str,
    metrics: Sequence[str] | None = None,
    seed: int = 0,
    baselines: Sequence[str] | None = None,
    ceiling: bool = False,
    model_name: str = "model",
    reuse_references: bool = False,
) -> Any:
    """Score ``pred`` against the observed ``on`` cells with :class:`pertbench.metrics.Evaluator`."""
    from pertbench.metrics import Evaluator

    return Evaluator(
        adata,
        pred,
        keys=keys,
        metrics=list(metrics) if metrics is not None else "default",
        split=split,
        on=on,
        baselines=list(baselines or []),
        ceiling=bool(ceiling),
        seed=seed,
        model_name=model_name,
        keep_aggregates=False,
        reuse_references=reuse_references,
    ).run()


def summary_values(result: Any) -> dict[str, float]:
    """``{metric: value}`` of the scored model from an evaluation result's summary table.

    Reference rows (``no_change/...``, ``ceiling/...``, ``normalized/...``) are left out.
    """
    summary = result.summary
    own = summary[~summary["metric"].astype(str).str.contains("/", regex=False)]
    return {str(m): float(v) for m, v in zip(own["metric"], own["value"], strict=True)}


def is_trial_failure(exc: BaseException) -> bool:
    """True for errors that mean *this configuration* failed (not a bug or bad input)."""
    if isinstance(exc, (ModelError, FloatingPointError)):
        return True
    # Out of memory on a large configuration is a property of the configuration.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def finite_or_nan(value: float) -> float:
    value = float(value)
    return value if np.isfinite(value) else float("nan")
