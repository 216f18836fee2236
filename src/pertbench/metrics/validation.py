"""The metric validation study: which metric detects which known failure of a prediction?

From one simulated truth (the simulator knows the generative model), a *fresh replicate* of
the same experiment (same design and true profiles, new cells: ``simulate(cell_seed=...)``;
``cells_factor`` times as many cells) is a perfect prediction: it differs from the truth by
sampling noise only. Every failure mode is that replicate with each perturbed group's
cells shifted by one vector, so that only the group means change in a known way (``m`` the
replicate's group mean, ``c`` its covariates' control mean, ``d = m - c``):

==================  ========================================================================
``perfect``         the replicate itself
``collapsed``       every group of a covariate predicted as the covariate's mean perturbed
                    profile, ``c + mean_q d(q)`` (mode collapse; PerturBench's "Decoder (Cov)")
``shrunk``          ``c + shrink * d`` (effects shrunk towards control, 50% by default)
``wrong_sign``      ``c - d`` (the right genes, the wrong direction)
``noise``           ``m + e``, ``e ~ N(0, tau^2)`` independently per group and gene
``additive``        interacting combinations predicted as ``c + sum of their parts' d``
                    (a model that cannot learn interactions; other groups perfect)
``systematic``      ``m + s``, one ``s ~ N(0, tau^2)`` shared by every group: right about
                    every perturbation, off by a shared bias (e.g. a batch effect)
==================  ========================================================================

``tau`` is ``noise_scale`` times the root mean square of the true deltas ``d`` over all
groups and genes, so noise and bias are as large as a typical effect. Every metric of the
catalogue (:func:`pertbench.metrics.evaluate` with ``metrics="all"``) and the
genetic-interaction metrics (:mod:`pertbench.metrics.interactions`, on the interacting
combinations) score every mode. A metric **detects** a failure when the failure's score is
worse than the perfect prediction's by more than the perfect score's 95% bootstrap interval
(beyond its ``ci_high`` for an error, below its ``ci_low`` for a similarity), and it
**ranks** the failures by how much worse they score (1 = most penalised).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, EvaluationError
from pertbench.utils.io import write_csv_atomic, write_json_atomic

FAILURE_MODES = (
    "perfect",
    "collapsed",
    "shrunk",
    "wrong_sign",
    "noise",
    "additive",
    "systematic",
)
FAILURE_LABELS = {
    "perfect": "perfect (fresh replicate)",
    "collapsed": "collapsed to covariate mean",
    "shrunk": "shrunk 50% to control",
    "wrong_sign": "right genes, wrong sign",
    "noise": "noise added",
    "additive": "additive for interacting pairs",
    "systematic": "systematic shift only",
}
#: The truth the study simulates when none is given (see docs/metric_validation.md): sized
#: like a small screen, with unequal group sizes and many unaffected genes, as in real data.
DEFAULT_STUDY_SIMULATION = {
    "n_covariates": 3,
    "n_perturbations": 24,
    "n_combinations": 16,
    "n_cells_per_group": 40,
    "n_genes": 1000,
    "program_size": 0.02,
    "effect_scale": 0.8,
    "imbalance": 1.0,
    "seed": 0,
}
#: Cells of the perfect prediction per truth cell: 1 = an independent replicate of the
#: experiment; more cells bring its means closer to the true population means.
ORACLE_CELLS_FACTOR = 1
#: GI metrics added to the study (scored on the interacting combinations, AUC on all).
GI_ROWS = (
    ("gi_pearson", "interacting"),
    ("gi_cosine", "interacting"),
    ("gi_rmse", "interacting"),
    ("roc_auc", "all"),
)
SCORES_FILE = "scores.csv"
DETECTION_FILE = "detection.csv"
STUDY_FILE = "study.json"
HEATMAP_FILE = "heatmap.png"


@dataclass
class ValidationStudy:
    """What :func:`validate_metrics` returns.

    Attributes
    ----------
    scores
        One row per (metric, failure): ``metric``, ``family``, ``failure``, ``value``,
        ``ci_low``, ``ci_high``, ``higher_is_better``.
    detection
        One row per (metric, failure other than ``perfect``): ``degradation`` (how much
        worse than perfect, in the metric's units, positive = worse), ``intervals`` (the
        degradation in half-widths of the perfect score's 95% interval on the worse side),
        ``detected`` (``intervals > 1``; NaN when the perfect score has no interval) and
        ``rank`` (1 = most penalised failure).
    settings
        How the study was made (simulation, seeds, scales).
    """

    scores: pd.DataFrame
    detection: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def detected(self, metric: str, failure: str) -> bool:
        """Whether ``metric`` detects ``failure``."""
        row = self.detection[
            (self.detection["metric"] == metric) & (self.detection["failure"] == failure)
        ]
        if row.empty:
            raise KeyError(f"no detection of '{failure}' by '{metric}'")
        return bool(row["detected"].iloc[0])

    def write(self, out_dir: str | os.PathLike, *, figure: bool = True) -> Path:
        """Write ``scores.csv``, ``detection.csv``, ``study.json`` and ``heatmap.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / SCORES_FILE, self.scores)
        write_csv_atomic(out / DETECTION_FILE, self.detection)
        write_json_atomic(out / STUDY_FILE, self.settings)
        if figure:
            from pertbench.pl.png import figure_png
            from pertbench.pl.validation import failure_heatmap
            from pertbench.utils.io import write_bytes_atomic

            write_bytes_atomic(out / HEATMAP_FILE, figure_png(failure_heatmap(self.detection)))
        return out


def fresh_replicate(truth: ad.AnnData, *, seed: int = 0, cells_factor: int = 1) -> ad.AnnData:
    """A new draw of the cells of a simulated experiment: same design and truth, new cells.

    ``cells_factor`` multiplies the cells of every group (and the controls): with many cells
    the replicate's group means are close to the true population means.
    """
    from pertbench.data.simulate import SIMULATION_KEY, simulate

    sim = truth.uns.get(SIMULATION_KEY)
    if not isinstance(sim, dict) or "params" not in sim:
        raise ConfigError(
            "the metric validation study needs a truth made by pertbench's simulator "
            "(uns['simulation']); run 'pertbench simulate' or leave the data out"
        )
    params = dict(sim["params"])
    # any cell seed differs from the seed-derived cell streams of the truth itself
    base = int(params.get("cell_seed", -1))
    params["cell_seed"] = base + 1 + 1000 * (int(seed) + 1)
    factor = int(cells_factor)
    if factor < 1:
        raise ConfigError(f"cells_factor must be at least 1, got {cells_factor}")
    if factor > 1:  # group sizes scale with n_cells_per_group (the same design draws)
        n_cells = int(params["n_cells_per_group"])
        n_controls = params.get("n_control_cells")
        params["n_cells_per_group"] = n_cells * factor
        params["n_control_cells"] = (int(n_controls) if n_controls else 2 * n_cells) * factor
    return simulate(**params)


def failure_predictions(
    truth: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    failures: tuple[str, ...] = FAILURE_MODES,
    shrink: float = 0.5,
    noise_scale: float = 1.0,
    cells_factor: int = ORACLE_CELLS_FACTOR,
    seed: int = 0,
) -> Iterator[tuple[str, ad.AnnData]]:
    """The predictions of every failure mode (see the module docstring), one at a time.

    Yields ``(failure, AnnData)``: the perturbed cells of a fresh replicate with
    ``cells_factor`` times the truth's cells, each group shifted by its failure's vector.
    """
    unknown = [f for f in failures if f not in FAILURE_MODES]
    if unknown:
        raise ConfigError(
            f"unknown failure mode(s) {', '.join(unknown)}; choose from {', '.join(FAILURE_MODES)}"
        )
    from pertbench.metrics.aggregations import group_stats

    keys = keys if keys is not None else _simulation_keys(truth)
    fresh = fresh_replicate(truth, seed=seed, cells_factor=cells_factor)
    grouping = group_cells(fresh.obs, keys)
    perturbed = ~grouping.is_control
    X = fresh.X[perturbed]
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)
    codes = grouping.group_codes[perturbed]
    mean, _, _ = group_stats(
        fresh.X, np.where(perturbed, grouping.group_codes, -1), grouping.n_groups
    )
    ctrl_codes = np.where(grouping.is_control, grouping.covariate_codes, -1)
    control, _, _ = group_stats(fresh.X, ctrl_codes, len(grouping.covariates))
    groups = grouping.groups
    cov = groups["covariate_code"].to_numpy()
    is_pert = ~groups["is_control"].to_numpy()
    delta = np.where(is_pert[:, None], mean - control[cov], 0.0)
    tau = noise_scale * float(np.sqrt(np.mean(delta[is_pert] ** 2)))
    rng = np.random.default_rng([int(seed), 7])
    noise = rng.normal(0.0, tau, size=delta.shape)
    shared = rng.normal(0.0, tau, size=delta.shape[1])
    obs = fresh.obs[perturbed].copy()
    var = fresh.var[[]].copy()
    del fresh
    for failure in failures:
        shift = np.zeros_like(delta)
        if failure == "collapsed":
            centroid = np.zeros_like(control)
            for c in range(len(control)):  # loops over covariates
                members = is_pert & (cov == c)
                centroid[c] = delta[members].mean(axis=0) if members.any() else 0.0
            shift = centroid[cov] - delta
        elif failure == "shrunk":
            shift = -(1.0 - shrink) * delta
        elif failure == "wrong_sign":
            shift = -2.0 * delta
        elif failure == "noise":
            shift = noise
        elif failure == "systematic":
            shift = np.broadcast_to(shared, delta.shape).copy()
        elif failure == "additive":
            shift = _additive_shift(truth, groups, delta, keys)
        shift = np.where(is_pert[:, None], shift, 0.0).astype(np.float32)
        yield failure, ad.AnnData(X=X + shift[codes], obs=obs, var=var)


def _additive_shift(truth, groups, delta, keys) -> np.ndarray:
    """Move interacting combinations to the sum of their parts' deltas."""
    from pertbench.metrics.interactions import simulated_classes

    classes = simulated_classes(truth, keys) or {}
    shift = np.zeros_like(delta)
    position = {
        (int(c), str(p)): g
        for g, (c, p) in enumerate(
            zip(groups["covariate_code"], groups[keys.perturbation_key], strict=True)
        )
    }
    for g, (c, label) in enumerate(
        zip(groups["covariate_code"], groups[keys.perturbation_key], strict=True)
    ):
        label = str(label)
        if classes.get(label, "additive") == "additive" or not keys.is_combination(label):
            continue
        parts = [position.get((int(c), part)) for part in keys.components(label)]
        if any(p is None for p in parts):
            continue
        shift[g] = delta[parts].sum(axis=0) - delta[g]
    return shift


def _simulation_keys(truth: ad.AnnData) -> PerturbationKeys:
    params = truth.uns.get("simulation", {}).get("params", {})
    return PerturbationKeys(
        perturbation_key=params.get("perturbation_key", "condition"),
        control=params.get("control", "control"),
        delimiter=params.get("delimiter", "+"),
        covariate_keys=params.get("covariate_key", "cell_type"),
    )


def validate_metrics(
    truth: ad.AnnData | str | os.PathLike | None = None,
    *,
    metrics: str | list[str] = "all",
    failures: tuple[str, ...] = FAILURE_MODES,
    shrink: float = 0.5,
    noise_scale: float = 1.0,
    cells_factor: int = ORACLE_CELLS_FACTOR,
    n_bootstrap: int = 1000,
    seed: int = 0,
    log: Any = None,
) -> ValidationStudy:
    """Score every failure mode with every metric and tell which metric detects which.

    Parameters
    ----------
    truth
        A simulated dataset (AnnData or .h5ad made by :func:`pertbench.data.simulate`), or
        ``None`` for :data:`DEFAULT_STUDY_SIMULATION`.
    metrics
        Metric selection of the evaluator (``"all"``: the whole catalogue).
    failures
        Failure modes to build; ``perfect`` is always included (the reference).
    shrink, noise_scale
        Kept share of the effect in ``shrunk``; size of ``noise`` and ``systematic``
        relative to the root mean square true delta.
    cells_factor
        Cells of the perfect prediction per truth cell (its means are then close to the
        true population means, as a perfect model's would be).
    n_bootstrap, seed
        Bootstrap resamples of the intervals; seed of the replicate, the noise and the
        evaluator.
    log
        Receives a progress line per failure mode.
    """
    from pertbench.data.simulate import simulate
    from pertbench.metrics.catalog import resolve_metrics
    from pertbench.metrics.evaluator import evaluate
    from pertbench.metrics.interactions import evaluate_interactions

    if truth is None:
        truth = simulate(**DEFAULT_STUDY_SIMULATION)
    elif not isinstance(truth, ad.AnnData):
        from pertbench.data.loading import read_h5ad

        truth = read_h5ad(truth)
    failures = tuple(dict.fromkeys(("perfect", *failures)))
    specs = {s.name: s for s in resolve_metrics(metrics)}
    keys = _simulation_keys(truth)
    predictions = failure_predictions(
        truth,
        keys=keys,
        failures=failures,
        shrink=shrink,
        noise_scale=noise_scale,
        cells_factor=cells_factor,
        seed=seed,
    )
    has_combinations = any(
        keys.is_combination(str(p)) for p in truth.obs[keys.perturbation_key].unique()
    )
    rows = []
    for failure, pred in predictions:
        if log is not None:
            log(f"scoring {failure}")
        result = evaluate(
            truth,
            pred,
            keys=keys,
            metrics=list(specs),
            seed=seed,
            n_bootstrap=n_bootstrap,
            keep_aggregates=False,
            model_name=failure,
        )
        for r in result.summary.itertuples(index=False):
            spec = specs[r.metric]
            rows.append(
                (
                    r.metric,
                    spec.family,
                    failure,
                    r.value,
                    r.ci_low,
                    r.ci_high,
                    spec.higher_is_better,
                )
            )
        if has_combinations:
            gi = evaluate_interactions(
                truth, pred, split=None, keys=keys, n_bootstrap=n_bootstrap, seed=seed
            )
            for r in gi.named(list(GI_ROWS)).itertuples(index=False):
                rows.append(
                    (r.name, "gi", failure, r.value, r.ci_low, r.ci_high, bool(r.higher_is_better))
                )
    scores = pd.DataFrame(
        rows,
        columns=["metric", "family", "failure", "value", "ci_low", "ci_high", "higher_is_better"],
    )
    detection = detect_failures(scores)
    settings = {
        "simulation": dict(truth.uns["simulation"]["params"]),
        "failures": list(failures),
        "metrics": metrics if isinstance(metrics, str) else list(metrics),
        "shrink": shrink,
        "noise_scale": noise_scale,
        "cells_factor": cells_factor,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "n_groups": int((~group_cells(truth.obs, keys).groups["is_control"]).sum()),
        "rule": "detected: worse than perfect beyond the perfect score's 95% bootstrap interval",
    }
    return ValidationStudy(scores=scores, detection=detection, settings=_plain(settings))


def detect_failures(scores: pd.DataFrame) -> pd.DataFrame:
    """Detection, degradation and rank of every failure for every metric (see the module)."""
    out = []
    for metric, block in scores.groupby("metric", sort=False):
        ref = block[block["failure"] == "perfect"]
        if ref.empty:
            raise EvaluationError("the scores need the 'perfect' reference for every metric")
        ref = ref.iloc[0]
        sign = -1.0 if bool(ref["higher_is_better"]) else 1.0
        others = block[block["failure"] != "perfect"]
        degradation = sign * (others["value"].to_numpy(dtype=float) - float(ref["value"]))
        if sign > 0:
            margin = float(ref["ci_high"]) - float(ref["value"])
        else:
            margin = float(ref["value"]) - float(ref["ci_low"])
        # round-off (float32 predictions) must not count as a difference
        margin = max(margin, 1e-9 * (abs(float(ref["value"])) + 1.0))
        with np.errstate(invalid="ignore", divide="ignore"):
            detected = np.where(np.isfinite(margin), degradation > margin, np.nan)
            intervals = degradation / margin
        detected = np.where(np.isfinite(degradation), detected, np.nan)
        ranks = pd.Series(degradation).rank(ascending=False, method="min").to_numpy()
        for i, failure in enumerate(others["failure"]):
            out.append(
                (
                    metric,
                    ref["family"],
                    failure,
                    degradation[i],
                    intervals[i],
                    detected[i],
                    ranks[i],
                )
            )
    frame = pd.DataFrame(
        out, columns=["metric", "family", "failure", "degradation", "intervals", "detected", "rank"]
    )
    # Python True / False, or NaN where undecidable (no interval)
    frame["detected"] = pd.Series(
        [bool(v) if np.isfinite(v) else np.nan for v in frame["detected"]], dtype=object
    )
    return frame


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays (as read from .h5ad) as plain Python values, for JSON."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj.tolist() if hasattr(obj, "tolist") else obj
