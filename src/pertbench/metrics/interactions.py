"""Genetic-interaction (GI) metrics: does a model predict how a combination departs from the
sum of its singles?

For a combination ``AB`` (any number of parts) measured in covariate combination ``c``,
with deltas taken against the observed controls of ``c``::

    GI_obs(AB)  = delta_obs(AB)  - sum_k delta_obs(k)
    GI_pred(AB) = delta_pred(AB) - sum_k delta_obs(k)     the model's combination, OBSERVED singles

so an additive prediction built from the observed singles has GI_pred = 0, and
``GI_pred - GI_obs = delta_pred(AB) - delta_obs(AB)`` (the ``gi_rmse`` below is the RMSE of
the combination's delta). Per combination:

- ``gi_pearson``, ``gi_cosine``: agreement of GI_pred with GI_obs over genes
  (:mod:`pertbench.metrics.fit` conventions: a zero or constant vector scores 0, or 1 when
  both are);
- ``z_obs`` / ``z_pred``: how far the squared GI norm lies beyond its sampling noise,
  ``z = (sum_g GI_g^2 - sum_g v_g) / sqrt(2 sum_g v_g^2)`` with ``v_g`` the sampling
  variance of GI_obs for gene g estimated from the cells (the squared standard errors of
  the combination's, each single's and (k-1)^2 times the controls' means). Under
  additivity (independent, roughly normal gene means) z is about standard normal. A
  combination is *called* non-additive when z exceeds the one-sided ``1 - alpha`` normal
  quantile; a prediction with the same threshold on its own GI.

Over combinations: precision and recall of the predicted calls and the ROC-AUC of
``z_pred`` against the true labels: the simulator's interaction classes when the truth
carries them (``uns['simulation']``), else the observed calls. Every summary is also given
per subgroup: ``interacting`` / ``additive`` (by the label), ``seen0`` / ``seen1`` /
``seen2`` (how many of the combination's singles have training cells in any covariate, as
in GEARS), ``seen_in_other_covariate`` / ``never_seen`` (whether the combination itself has
training cells in another covariate) and ``class:<name>``.

The array functions take what a registered metric spec will receive from the evaluator's
block aggregates: group means, their squared standard errors and the control means of one
covariate block, and the rows of each combination's parts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import EvaluationError
from pertbench.metrics.aggregations import group_stats
from pertbench.metrics.calibration import CI_LEVEL, bootstrap_means, bootstrap_weights
from pertbench.metrics.fit import fit_metrics
from pertbench.utils.io import write_csv_atomic

#: GI metric -> higher is better.
GI_METRICS = {
    "gi_pearson": True,
    "gi_cosine": True,
    "gi_rmse": False,
    "gi_rmse_additive": False,
    "precision": True,
    "recall": True,
    "roc_auc": True,
}
PER_COMBINATION_FILE = "interactions_per_combination.csv"
SUMMARY_FILE = "interactions_summary.csv"
INTERACTING, ADDITIVE = "interacting", "additive"
SEEN_ELSEWHERE, NEVER_SEEN = "seen_in_other_covariate", "never_seen"


def gi_metric_name(metric: str, subgroup: str) -> str:
    """Name of one GI summary in a results table, e.g. ``gi_roc_auc[interacting]``."""
    base = metric if metric.startswith("gi_") else f"gi_{metric}"
    return f"{base}[{subgroup}]"


def gi_higher_is_better(name: str) -> bool | None:
    """Direction of a GI results-table name (``None`` if ``name`` is not one)."""
    base = name.split("[", 1)[0]
    for metric, higher in GI_METRICS.items():
        if base in (metric, f"gi_{metric}"):
            return higher
    return None


# ---------------------------------------------------------------------------------------
# Array functions (one row per combination)
# ---------------------------------------------------------------------------------------
def genetic_interactions(
    combination_delta: np.ndarray, part_deltas: np.ndarray, part_mask: np.ndarray
) -> np.ndarray:
    """GI = delta(AB) - sum of the parts' deltas.

    Parameters
    ----------
    combination_delta
        (n, G) combination means minus their covariates' control means.
    part_deltas
        (n, k, G) the parts' deltas (any value where ``part_mask`` is False).
    part_mask
        (n, k) True for real parts (combinations with fewer than k parts are padded).
    """
    parts = np.where(part_mask[:, :, None], part_deltas, 0.0).sum(axis=1)
    return np.asarray(combination_delta, dtype=np.float64) - parts


def gi_sampling_variance(
    combination_se2: np.ndarray,
    part_se2: np.ndarray,
    part_mask: np.ndarray,
    control_se2: np.ndarray,
) -> np.ndarray:
    """(n, G) sampling variance of the observed GI from squared standard errors of means.

    GI = m(AB) - sum_k m(k) + (k - 1) m(control), the terms independent (different cells).
    """
    k = part_mask.sum(axis=1).astype(np.float64)
    parts = np.where(part_mask[:, :, None], part_se2, 0.0).sum(axis=1)
    return combination_se2 + parts + ((k - 1.0) ** 2)[:, None] * control_se2


def non_additivity_z(gi: np.ndarray, noise_var: np.ndarray) -> np.ndarray:
    """(n,) excess of the squared GI norm over its sampling noise, in null standard deviations.

    NaN where the noise is unknown (a group of one cell) or zero (all genes constant).
    """
    total = np.sum(noise_var, axis=1)
    spread = np.sqrt(2.0 * np.sum(noise_var**2, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.sum(gi**2, axis=1) - total) / spread
    return np.where(np.isfinite(z) & (spread > 0), z, np.nan)


def gi_agreement(pred_gi: np.ndarray, obs_gi: np.ndarray) -> dict[str, np.ndarray]:
    """``gi_pearson``, ``gi_cosine`` and ``gi_rmse`` of predicted vs observed GI, per row."""
    values = fit_metrics(pred_gi, obs_gi, ("pearson", "cosine", "rmse"))
    return {f"gi_{name}": values[name] for name in ("pearson", "cosine", "rmse")}


def _auc_matrix(scores: np.ndarray) -> np.ndarray:
    """M[i, j] = 1 if score i > score j, 0.5 if equal, else 0."""
    diff = scores[:, None] - scores[None, :]
    return (diff > 0) + 0.5 * (diff == 0)


def classification_scores(
    labels: np.ndarray,
    calls: np.ndarray,
    scores: np.ndarray,
    weights: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Precision and recall of ``calls`` and ROC-AUC of ``scores`` against ``labels``.

    ``weights`` (B, n): multiplicities of each combination in B resamples (default one
    resample with every combination once); returns arrays of B values. Precision is NaN
    without a positive call, recall without a positive label, the AUC without both
    classes. The AUC counts tied scores half (Mann-Whitney).
    """
    labels = np.asarray(labels, dtype=bool)
    calls = np.asarray(calls, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    W = np.ones((1, labels.size)) if weights is None else np.asarray(weights, dtype=np.float64)
    tp = W @ (labels & calls)
    predicted = W @ calls
    positives = W @ labels
    negatives = W @ ~labels
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1), np.nan)
        recall = np.where(positives > 0, tp / np.where(positives > 0, positives, 1), np.nan)
        pairs = ((W * labels) @ _auc_matrix(scores) * (W * ~labels)).sum(axis=1)
        both = (positives > 0) & (negatives > 0)
        auc = np.where(both, pairs / np.where(both, positives * negatives, 1), np.nan)
    return {"precision": precision, "recall": recall, "roc_auc": auc}


# ---------------------------------------------------------------------------------------
# The AnnData entry point
# ---------------------------------------------------------------------------------------
@dataclass
class InteractionEvaluation:
    """What :func:`evaluate_interactions` returns.

    Attributes
    ----------
    per_combination
        One row per evaluated combination: covariate columns, the perturbation column,
        ``n_parts``, ``seen_singles``, ``seen_in_other_covariate``, ``interaction_class``
        (simulated truth only), ``non_additive`` (the label used), ``gi_norm_obs``,
        ``gi_norm_pred``, ``z_obs``, ``z_pred``, ``called_obs``, ``called_pred``,
        ``gi_pearson``, ``gi_cosine``, ``gi_rmse``, ``gi_rmse_additive`` (the ``gi_rmse``
        of the additive prediction from the observed singles, i.e. the RMS of GI_obs: the
        reference a model that learns interactions must beat).
    summary
        Tidy: ``subgroup``, ``metric``, ``value``, ``ci_low``, ``ci_high``,
        ``n_combinations`` (bootstrap intervals over the subgroup's combinations).
    notes
        Explanations of skipped combinations and undefined values.
    settings
        The options used, and where the labels came from.
    """

    per_combination: pd.DataFrame
    summary: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def value(self, subgroup: str, metric: str) -> float:
        """One summary value, e.g. ``value("interacting", "gi_pearson")``."""
        hit = self.summary[
            (self.summary["subgroup"] == subgroup) & (self.summary["metric"] == metric)
        ]
        if hit.empty:
            raise KeyError(f"no {metric} for subgroup '{subgroup}'")
        return float(hit["value"].iloc[0])

    def named(self, selection: list[tuple[str, str]] | None = None) -> pd.DataFrame:
        """The summary with results-table names (:func:`gi_metric_name`) and directions.

        ``selection``: (metric, subgroup) pairs to keep, in that order (default: all).
        """
        frame = self.summary.copy()
        if selection is not None:
            order = {pair: i for i, pair in enumerate(selection)}
            keys = list(zip(frame["metric"], frame["subgroup"], strict=True))
            frame = frame.assign(_order=[order.get(k) for k in keys]).dropna(subset=["_order"])
            frame = frame.sort_values("_order", kind="stable").drop(columns="_order")
        frame.insert(
            0,
            "name",
            [gi_metric_name(m, g) for m, g in zip(frame["metric"], frame["subgroup"], strict=True)],
        )
        frame["higher_is_better"] = frame["metric"].map(GI_METRICS)
        return frame.reset_index(drop=True)

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write both tables atomically to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / PER_COMBINATION_FILE, self.per_combination)
        write_csv_atomic(out / SUMMARY_FILE, self.summary)
        return out


def evaluate_interactions(
    truth: ad.AnnData,
    pred: ad.AnnData,
    *,
    split: pd.Series | str | os.PathLike | None,
    keys: PerturbationKeys | None = None,
    on: str = "test",
    labels: str = "auto",
    alpha: float = 0.05,
    n_bootstrap: int = 1000,
    seed: int = 0,
    skip_missing: bool = False,
) -> InteractionEvaluation:
    """Score a model's combinations by their genetic interactions (see the module docstring).

    Parameters
    ----------
    truth
        Observed cells (whole dataset: the singles are read from every split).
    pred
        Predicted cells; only its combination groups are used. Genes matched by name.
    split
        Split Series or CSV: the evaluated combinations are those of the ``on`` split, and
        its ``train`` cells define the seen subgroups. ``None``: every combination of
        ``pred`` observed in ``truth``, without seen subgroups.
    labels
        ``"simulation"`` (the simulator's classes), ``"observed"`` (the observed calls) or
        ``"auto"`` (the first available).
    alpha
        One-sided level of the non-additivity calls.
    skip_missing
        Skip (and note) evaluated combinations without prediction instead of failing.
    """
    from statistics import NormalDist  # scipy.stats would cost seconds to import

    keys = keys if keys is not None else PerturbationKeys()
    if not 0.0 < float(alpha) < 1.0:
        raise EvaluationError(f"alpha must be between 0 and 1, got {alpha}")
    if labels not in ("auto", "simulation", "observed"):
        raise EvaluationError(f"labels must be auto, simulation or observed, got '{labels}'")
    notes: list[str] = []
    pred_X = _pred_matrix(truth, pred)
    split_values = _split_values(truth, split)
    groupings = (group_cells(truth.obs, keys), group_cells(pred.obs, keys))
    table = _combination_table(groupings, keys, split_values, on, skip_missing, notes)
    classes = simulated_classes(truth, keys)
    if labels == "simulation" and classes is None:
        raise EvaluationError("labels='simulation' needs a truth made by pertbench's simulator")
    source = "simulation" if labels != "observed" and classes is not None else "observed"
    critical = float(NormalDist().inv_cdf(1.0 - float(alpha)))

    stats = _block_statistics(truth, pred_X, keys, groupings, table, split_values, on)
    obs_gi = genetic_interactions(stats["obs_delta"], stats["part_delta"], stats["part_mask"])
    pred_gi = genetic_interactions(stats["pred_delta"], stats["part_delta"], stats["part_mask"])
    noise = gi_sampling_variance(
        stats["combo_se2"], stats["part_se2"], stats["part_mask"], stats["control_se2"]
    )
    defined = stats["part_mask"].sum(axis=1) == stats["n_parts"]
    if (~defined).any():
        missing = table.loc[~defined, "label"].tolist()
        notes.append(
            f"GI undefined (NaN) for {len(missing)} combination(s) with a single not measured "
            f"in the same covariates, e.g. {', '.join(missing[:5])}"
        )
    z_obs = np.where(defined, non_additivity_z(obs_gi, noise), np.nan)
    z_pred = np.where(defined, non_additivity_z(pred_gi, noise), np.nan)
    agreement = gi_agreement(pred_gi, obs_gi)

    out = table.drop(columns=["label", "group", "pred_group", "parts"]).copy()
    if classes is not None:
        out["interaction_class"] = out[keys.perturbation_key].map(classes).fillna("")
    if source == "simulation":
        out["non_additive"] = out["interaction_class"].ne("additive") & out["interaction_class"].ne(
            ""
        )
    else:
        out["non_additive"] = z_obs > critical
    out["gi_norm_obs"] = np.where(defined, np.linalg.norm(obs_gi, axis=1), np.nan)
    out["gi_norm_pred"] = np.where(defined, np.linalg.norm(pred_gi, axis=1), np.nan)
    out["z_obs"], out["z_pred"] = z_obs, z_pred
    out["called_obs"], out["called_pred"] = z_obs > critical, z_pred > critical
    for name, values in agreement.items():
        out[name] = np.where(defined, values, np.nan)
    # what the additive prediction from the observed singles (GI_pred = 0) would score
    out["gi_rmse_additive"] = np.where(defined, np.sqrt(np.mean(obs_gi**2, axis=1)), np.nan)
    summary = summarize_interactions(out, n_bootstrap=n_bootstrap, seed=seed)
    settings = {
        "on": on if split is not None else None,
        "labels": source,
        "alpha": float(alpha),
        "critical_z": critical,
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "n_combinations": len(out),
    }
    return InteractionEvaluation(out.reset_index(drop=True), summary, notes, settings)


def subgroups(per_combination: pd.DataFrame) -> dict[str, np.ndarray]:
    """Masks of every non-empty subgroup of a per-combination table, in report order."""
    table = per_combination
    masks: dict[str, np.ndarray] = {"all": np.ones(len(table), dtype=bool)}
    label = table["non_additive"].to_numpy(dtype=bool)
    masks[INTERACTING], masks[ADDITIVE] = label, ~label
    if "seen_singles" in table and table["seen_singles"].notna().any():
        seen = table["seen_singles"].to_numpy(dtype=np.float64)
        for k in range(int(np.nanmax(seen)) + 1):
            masks[f"seen{k}"] = seen == k
        elsewhere = table[SEEN_ELSEWHERE].to_numpy(dtype=bool)
        masks[SEEN_ELSEWHERE], masks[NEVER_SEEN] = elsewhere, ~elsewhere
    if "interaction_class" in table:
        for name in sorted(set(table["interaction_class"]) - {""}):
            masks[f"class:{name}"] = (table["interaction_class"] == name).to_numpy()
    return {name: mask for name, mask in masks.items() if mask.any()}


def summarize_interactions(
    per_combination: pd.DataFrame, *, n_bootstrap: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Tidy summary by subgroup: means of the per-combination GI metrics and the calls'
    precision / recall / ROC-AUC, each with a bootstrap interval over combinations."""
    rows = []
    agreement = ["gi_pearson", "gi_cosine", "gi_rmse", "gi_rmse_additive"]
    for name, mask in subgroups(per_combination).items():
        part = per_combination.loc[mask]
        n = int(mask.sum())
        means = bootstrap_means(part[agreement], n_bootstrap=n_bootstrap, seed=seed)
        for r in means.itertuples(index=False):
            rows.append((name, r.metric, r.value, r.ci_low, r.ci_high, n))
        ok = part["z_pred"].notna().to_numpy()
        values = part.loc[ok]
        args = (
            values["non_additive"].to_numpy(dtype=bool),
            values["called_pred"].to_numpy(dtype=bool),
            values["z_pred"].to_numpy(dtype=np.float64),
        )
        point = classification_scores(*args)
        lows, highs = _classification_intervals(args, n_bootstrap=n_bootstrap, seed=seed)
        for metric in ("precision", "recall", "roc_auc"):
            rows.append((name, metric, float(point[metric][0]), lows[metric], highs[metric], n))
    return pd.DataFrame(
        rows, columns=["subgroup", "metric", "value", "ci_low", "ci_high", "n_combinations"]
    )


def _classification_intervals(args, *, n_bootstrap: int, seed: int):
    lows = dict.fromkeys(("precision", "recall", "roc_auc"), np.nan)
    highs = dict(lows)
    n = args[0].size
    if n < 2 or n_bootstrap <= 0:
        return lows, highs
    boot = classification_scores(*args, weights=bootstrap_weights(n, n_bootstrap, seed))
    alpha = (1.0 - CI_LEVEL) / 2.0
    for metric, values in boot.items():
        finite = values[np.isfinite(values)]
        if finite.size >= max(2, n_bootstrap // 2):  # most resamples define it
            lows[metric], highs[metric] = np.quantile(finite, [alpha, 1 - alpha])
    return lows, highs


# ---------------------------------------------------------------------------------------
# Helpers of the AnnData entry point
# ---------------------------------------------------------------------------------------
def _pred_matrix(truth: ad.AnnData, pred: ad.AnnData):
    genes = pd.Index(truth.var_names.astype(str))
    idx = pd.Index(pred.var_names.astype(str)).get_indexer(genes)
    if (idx < 0).any():
        missing = genes[idx < 0]
        raise EvaluationError(
            f"{len(missing)} gene(s) of truth are missing from pred, e.g. {', '.join(missing[:5])}"
        )
    if np.array_equal(idx, np.arange(pred.n_vars)):
        return pred.X
    return pred.X[:, idx]


def _split_values(truth: ad.AnnData, split) -> np.ndarray | None:
    if split is None:
        return None
    if isinstance(split, pd.Series):
        from pertbench.models.base import align_split

        return align_split(truth, split).to_numpy()
    from pertbench.data.splits import read_split

    return read_split(split, truth.obs_names).to_numpy()


def simulated_classes(truth: ad.AnnData, keys: PerturbationKeys) -> dict[str, str] | None:
    """Combination label -> simulated interaction class (``None`` without simulated truth)."""
    sim = truth.uns.get("simulation")
    if not isinstance(sim, dict) or "interaction_class" not in sim:
        return None
    classes = {}
    for label, kind in zip(sim["combinations"], sim["interaction_class"], strict=True):
        parts = tuple(str(label).split(sim["params"].get("delimiter", "+")))
        classes[keys.delimiter.join(parts)] = str(kind)
    return classes


def _combination_table(groupings, keys, split_values, on, skip_missing, notes) -> pd.DataFrame:
    """Evaluated combinations with their truth group, predicted group and parts."""
    id_cols = [*keys.covariate_keys, keys.perturbation_key]
    t_group, p_group = groupings
    t_ids = pd.MultiIndex.from_frame(t_group.groups[id_cols].astype(str))
    p_ids = pd.MultiIndex.from_frame(p_group.groups[id_cols].astype(str))
    labels = t_group.groups[keys.perturbation_key].astype(str)
    is_combo = labels.map(keys.is_combination).to_numpy(dtype=bool)
    if split_values is None:
        observed = np.ones(len(labels), dtype=bool)
    else:
        in_on = np.bincount(
            t_group.group_codes, weights=split_values == on, minlength=t_group.n_groups
        )
        observed = in_on > 0
    candidates = np.flatnonzero(is_combo & observed)
    pred_of = p_ids.get_indexer(t_ids[candidates])
    if split_values is None:
        keep = pred_of >= 0
    else:
        keep = np.ones(candidates.size, dtype=bool)
        missing = pred_of < 0
        if missing.any():
            names = [":".join(t_ids[g]) for g in candidates[missing][:5]]
            if not skip_missing:
                raise EvaluationError(
                    f"{int(missing.sum())} combination(s) of the '{on}' split have no prediction, "
                    f"e.g. {', '.join(names)}; predict them or pass skip_missing=True"
                )
            notes.append(f"skipped {int(missing.sum())} combination(s) without prediction")
            keep = ~missing
    candidates, pred_of = candidates[keep], pred_of[keep]
    if candidates.size == 0:
        raise EvaluationError(
            "no combination to evaluate: the split's evaluated groups (or the predictions) "
            f"hold no perturbation with the delimiter '{keys.delimiter}'"
        )
    table = t_group.groups.iloc[candidates][id_cols].astype(str).reset_index(drop=True)
    table["group"], table["pred_group"] = candidates, pred_of
    table["label"] = [":".join(t) for t in t_ids[candidates]]
    table["parts"] = [keys.components(p) for p in table[keys.perturbation_key]]
    table["n_parts"] = table["parts"].map(len)
    if split_values is not None:
        _add_seen(table, t_group, keys, split_values)
    return table


def _add_seen(table: pd.DataFrame, t_group, keys: PerturbationKeys, split_values) -> None:
    """``seen_singles`` and ``seen_in_other_covariate`` from the split's training cells."""
    trained = np.bincount(
        t_group.group_codes, weights=split_values == "train", minlength=t_group.n_groups
    )
    groups = t_group.groups
    trained_groups = groups[(trained > 0) & ~groups["is_control"].to_numpy()]
    seen_perts = set(trained_groups[keys.perturbation_key].astype(str))
    covariate_of = {}  # perturbation -> covariate codes with training cells
    for pert, code in zip(
        trained_groups[keys.perturbation_key].astype(str),
        trained_groups["covariate_code"],
        strict=True,
    ):
        covariate_of.setdefault(pert, set()).add(int(code))
    own_cov = groups["covariate_code"].to_numpy()[table["group"].to_numpy()]
    table["seen_singles"] = [sum(p in seen_perts for p in parts) for parts in table["parts"]]
    table[SEEN_ELSEWHERE] = [
        bool(covariate_of.get(pert, set()) - {int(c)})
        for pert, c in zip(table[keys.perturbation_key], own_cov, strict=True)
    ]


def _block_statistics(truth, pred_X, keys, groupings, table, split_values, on) -> dict:
    """Means, squared standard errors and deltas of the combinations, their parts and controls.

    Singles come from every truth cell (any split), combinations from the ``on`` split,
    controls from the covariates' ``on``-split controls when there are any, else all of them
    (the evaluator's rule). Predicted combinations are the means of all their predicted cells.
    """
    t_group, p_group = groupings
    groups = t_group.groups
    is_combo = groups[keys.perturbation_key].astype(str).map(keys.is_combination).to_numpy()
    in_on = np.ones(truth.n_obs, dtype=bool) if split_values is None else split_values == on
    use = ~t_group.is_control & (~is_combo[t_group.group_codes] | in_on)
    mean, var, n = group_stats(truth.X, np.where(use, t_group.group_codes, -1), t_group.n_groups)
    n_cov = len(t_group.covariates)
    ctrl_codes = np.full(truth.n_obs, -1, dtype=np.int64)
    for c in range(n_cov):  # loops over covariate combinations, not cells
        ctrl = t_group.control_mask_for(c)
        preferred = ctrl & in_on
        ctrl_codes[preferred if preferred.any() else ctrl] = c
    c_mean, c_var, c_n = group_stats(truth.X, ctrl_codes, n_cov)
    rows = table["group"].to_numpy()
    cov = groups["covariate_code"].to_numpy()[rows]
    if (c_n[cov] == 0).any():
        raise EvaluationError(
            "truth has no control cells for covariates with combinations; controls are needed "
            "for the deltas of genetic interactions"
        )
    local = np.full(p_group.n_groups, -1, dtype=np.int64)
    local[table["pred_group"].to_numpy()] = np.arange(len(table))
    p_mean, _, _ = group_stats(pred_X, local[p_group.group_codes], len(table))
    # the parts' truth groups, looked up in the combination's own covariates
    position = {
        (int(c), str(label)): g
        for g, (c, label) in enumerate(
            zip(groups["covariate_code"], groups[keys.perturbation_key], strict=True)
        )
    }
    width = int(table["n_parts"].max())
    part_rows = np.full((len(table), width), -1, dtype=np.int64)
    for i, (c, parts) in enumerate(zip(cov, table["parts"], strict=True)):  # combinations
        for k, part in enumerate(parts):
            part_rows[i, k] = position.get((int(c), part), -1)
    part_mask = part_rows >= 0
    part_mask[part_mask] = n[part_rows[part_mask]] > 0
    safe = np.where(part_mask, part_rows, rows[:, None])
    control = c_mean[cov]
    se2 = _se2(var, n)
    return {
        "obs_delta": mean[rows] - control,
        "pred_delta": p_mean - control,
        "part_delta": mean[safe] - control[:, None, :],
        "part_mask": part_mask,
        "n_parts": table["n_parts"].to_numpy(),
        "combo_se2": se2[rows],
        "part_se2": se2[safe],
        "control_se2": _se2(c_var, c_n)[cov],
    }


def _se2(var: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Squared standard error of a mean from its ddof=0 variance (NaN for one cell)."""
    n = n.astype(np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 1, var / (n - 1.0), np.nan)
