"""Stages 4 and 5 of the evaluator: calibrate (summaries, intervals, normalised scores)
and write.

Block results (:class:`~pertbench.metrics.score.SourceScores` of every source, from any
process) are merged into whole-evaluation tables first; the bootstrap intervals and the
normalised scores are computed once, on the merged tables, so the numbers do not depend
on how the blocks were split across workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.metrics import calibration as cal
from pertbench.metrics.catalog import MetricSpec
from pertbench.metrics.plan import EvaluationPlan
from pertbench.metrics.score import SourceScores
from pertbench.utils.io import write_csv_atomic, write_json_atomic

NORMALIZED = "normalized"
SUMMARY_FILE = "summary.csv"
PER_GROUP_FILE = "per_group.csv"
PER_COVARIATE_FILE = "per_covariate.csv"
CALIBRATION_FILE = "calibration.csv"
INFO_FILE = "evaluation.json"


@dataclass
class EvaluationResult:
    """What :meth:`~pertbench.metrics.Evaluator.run` returns.

    Attributes
    ----------
    summary
        Columns ``metric``, ``value``, ``ci_low``, ``ci_high``: the mean over groups of
        each metric for the model (bare metric names), then, when calibration was asked
        for, ``<reference>/<metric>`` rows for each baseline and the ceiling and
        ``normalized/<metric>`` rows.
    per_group
        One row per evaluated group: the covariate columns, the perturbation column,
        then one column per metric (per-covariate metrics are in ``per_covariate``). With
        baselines or a ceiling, a ``model`` column (the model's name, a baseline name or
        ``ceiling``) comes first and each reference adds its own rows.
    per_covariate
        One row per covariate combination: covariate columns, ``n_perturbations`` and the
        per-covariate metrics (``matrix_distance``), with a ``model`` column like above.
    calibration
        With baselines/ceiling: one row per metric with the model's value, each
        reference's value, and the normalised score with its interval; else ``None``.
    skipped
        Groups left out (``skip_missing``), with the reason.
    notes
        Plain-language explanations of every missing value and of choices made.
    settings
        The options used.
    aggregates
        ``{"<side>_<aggregation>": DataFrame}`` (rows: group labels, columns: genes) for
        side in pred/truth and aggregation in average/logfc: what the figures draw.
    """

    summary: pd.DataFrame
    per_group: pd.DataFrame
    per_covariate: pd.DataFrame
    calibration: pd.DataFrame | None = None
    skipped: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    aggregates: dict[str, pd.DataFrame] = field(default_factory=dict)

    def value(self, metric: str) -> float:
        """Summary value of one metric (e.g. ``"rmse_average"``, ``"normalized/rmse_average"``)."""
        row = self.summary.loc[self.summary["metric"] == metric, "value"]
        if row.empty:
            raise KeyError(f"no metric '{metric}' in this result")
        return float(row.iloc[0])

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Write the tables to ``out_dir`` atomically; returns the folder.

        Files: ``summary.csv`` (``metric,value,ci_low,ci_high``), ``per_group.csv``,
        ``per_covariate.csv``, ``calibration.csv`` (when present) and ``evaluation.json``
        (settings, notes, skipped groups).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / SUMMARY_FILE, self.summary)
        write_csv_atomic(out / PER_GROUP_FILE, self.per_group)
        write_csv_atomic(out / PER_COVARIATE_FILE, self.per_covariate)
        if self.calibration is not None:
            write_csv_atomic(out / CALIBRATION_FILE, self.calibration)
        info = {
            "settings": self.settings,
            "notes": self.notes,
            "skipped": self.skipped.to_dict(orient="records"),
            "n_groups": int(self.per_group.shape[0]),
        }
        write_json_atomic(out / INFO_FILE, info)
        return out


@dataclass
class MergedScores:
    """One source's scores over the whole evaluation (all blocks merged)."""

    per_group: pd.DataFrame  # index: evaluated group; columns: per-group metrics
    per_covariate: pd.DataFrame  # index: covariate block; n_perturbations + per-cov metrics
    n_no_significant: int = 0
    single_cells: int = 0
    aggregates: dict[str, np.ndarray] = field(default_factory=dict)


def merge_blocks(
    plan: EvaluationPlan,
    specs: list[MetricSpec],
    blocks: list[dict[str, SourceScores]],
    name: str,
) -> MergedScores:
    """Concatenate the block results of one source into whole-evaluation tables."""
    G, n_cov = plan.n_groups, len(plan.covariates)
    group_names = [s.name for s in specs if not s.per_covariate]
    cov_names = [s.name for s in specs if s.per_covariate]
    columns = {n: np.full(G, np.nan) for n in group_names}
    per_cov = {n: np.full(n_cov, np.nan) for n in cov_names}
    n_perturbations = np.zeros(n_cov, dtype=np.int64)
    merged = MergedScores(pd.DataFrame(), pd.DataFrame())
    for block, result in zip(plan.blocks, blocks, strict=True):
        scores = result.get(name)
        if scores is None:
            continue
        for n in group_names:
            columns[n][block.groups] = scores.per_group[n]
        for n in cov_names:
            per_cov[n][block.index] = scores.per_covariate[n]
        n_perturbations[block.index] = scores.n_perturbations
        merged.n_no_significant += scores.n_no_significant
        merged.single_cells += scores.single_cells
        for key, arr in scores.aggregates.items():
            if key not in merged.aggregates:
                merged.aggregates[key] = np.full((G, arr.shape[1]), np.nan, dtype=np.float32)
            merged.aggregates[key][block.groups] = arr
    merged.per_group = pd.DataFrame({n: columns[n] for n in group_names})
    merged.per_covariate = pd.DataFrame({"n_perturbations": n_perturbations, **per_cov})
    return merged


def assemble(
    plan: EvaluationPlan,
    specs: list[MetricSpec],
    model_label: str,
    model: MergedScores,
    refs: dict[str, MergedScores],
    *,
    n_bootstrap: int,
    seed: int,
    normalize_by: str,
    keep_aggregates: bool,
    settings: dict[str, Any],
    notes: list[str],
) -> EvaluationResult:
    """Build the result tables, intervals and the calibration table."""
    keys = plan.keys
    id_cols = [*keys.covariate_keys, keys.perturbation_key]
    cov_cols = list(keys.covariate_keys)
    group_ids = plan.groups[id_cols].reset_index(drop=True)
    cov_ids = (
        plan.covariates[cov_cols].reset_index(drop=True)
        if cov_cols
        else pd.DataFrame(index=range(len(plan.covariates)))
    )
    group_specs = [s for s in specs if not s.per_covariate]
    cov_specs = [s for s in specs if s.per_covariate]

    def summary_of(scores: MergedScores, prefix: str = "") -> pd.DataFrame:
        # groups are the bootstrap units of per-group metrics, covariate combinations
        # those of per-covariate metrics
        parts = [
            cal.bootstrap_means(table[[s.name for s in chosen]], n_bootstrap=n_bootstrap, seed=seed)
            for table, chosen in (
                (scores.per_group, group_specs),
                (scores.per_covariate, cov_specs),
            )
            if chosen
        ]
        frame = pd.concat(parts, ignore_index=True)
        order = {s.name: i for i, s in enumerate(specs)}
        frame = frame.sort_values("metric", key=lambda m: m.map(order), kind="stable")
        frame["metric"] = prefix + frame["metric"]
        return frame.reset_index(drop=True)

    summary_parts = [summary_of(model)]
    per_group_parts = [pd.concat([group_ids, model.per_group], axis=1)]
    per_cov_parts = [pd.concat([cov_ids, model.per_covariate], axis=1)]
    for name, scores in refs.items():
        summary_parts.append(summary_of(scores, f"{name}/"))
        per_group_parts.append(pd.concat([group_ids, scores.per_group], axis=1))
        per_cov_parts.append(pd.concat([cov_ids, scores.per_covariate], axis=1))

    calibration = None
    if refs:
        names = [model_label, *refs]
        for frame, name in zip(per_group_parts, names, strict=True):
            frame.insert(0, "model", name)
        for frame, name in zip(per_cov_parts, names, strict=True):
            frame.insert(0, "model", name)
        calibration, normalized_rows = _calibration(
            specs,
            names,
            model,
            refs,
            summary_parts,
            n_bootstrap=n_bootstrap,
            seed=seed,
            normalize_by=normalize_by,
            notes=notes,
        )
        if normalized_rows is not None:
            summary_parts.append(normalized_rows)
    summary = pd.concat(summary_parts, ignore_index=True)
    if n_bootstrap <= 0:
        summary = summary[["metric", "value"]]
    per_group = pd.concat(per_group_parts, ignore_index=True)
    per_covariate = pd.concat(per_cov_parts, ignore_index=True)

    aggregates = {}
    if keep_aggregates:
        labels = pd.Index(plan.group_labels(), name="group")
        for key, arr in model.aggregates.items():
            aggregates[key] = pd.DataFrame(arr.astype(np.float32), index=labels, columns=plan.genes)
    return EvaluationResult(
        summary=summary,
        per_group=per_group,
        per_covariate=per_covariate,
        calibration=calibration,
        skipped=plan.skipped,
        notes=list(dict.fromkeys(notes)),
        settings=settings,
        aggregates=aggregates,
    )


def _calibration(
    specs,
    names,
    model: MergedScores,
    refs,
    summary_parts,
    *,
    n_bootstrap,
    seed,
    normalize_by,
    notes,
):
    values = {
        name: frame.set_index(frame["metric"].str.split("/", n=1).str[-1])["value"]
        for name, frame in zip(names, summary_parts, strict=True)
    }
    table = pd.DataFrame({"metric": [s.name for s in specs]})
    for name in names:
        table[name] = table["metric"].map(values[name]).to_numpy()
    from pertbench.metrics.references import BASELINES, CEILING

    rows = []
    if normalize_by in refs and CEILING in refs:
        rows.append(
            _against_floor(table, specs, model, refs, normalize_by, n_bootstrap, seed, notes)
        )
    baselines = [name for name in BASELINES if name in refs]
    if baselines:
        rows.append(_against_best(table, specs, model, refs, baselines, n_bootstrap, seed))
    return table, (pd.concat(rows, ignore_index=True) if rows else None)


#: Summary prefix of the normalised score against the best baseline of each metric.
NORMALIZED_BEST = "normalized_best"


def _against_best(table, specs, model, refs, baselines, n_bootstrap, seed) -> pd.DataFrame:
    """``best_baseline``, ``normalized_best`` (+ interval) and ``beats_baselines`` columns
    of the calibration table, and the ``normalized_best/<metric>`` summary rows."""
    from pertbench.metrics.references import CEILING

    ceiling = refs.get(CEILING)
    best, norm, lows, highs, beats = [], [], [], [], []
    for s in specs:
        if s.diagnostic:
            best.append("")
            norm.append(np.nan)
            lows.append(np.nan)
            highs.append(np.nan)
            beats.append(None)
            continue
        cmp = cal.compare_with_baselines(
            _units(model, s),
            {name: _units(refs[name], s) for name in baselines},
            _units(ceiling, s) if ceiling is not None else None,
            higher_is_better=s.higher_is_better,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        best.append(cmp.best or "")
        norm.append(cmp.normalized_best)
        lows.append(cmp.ci_low)
        highs.append(cmp.ci_high)
        beats.append(cmp.beats_all)
    table["best_baseline"] = best
    table[NORMALIZED_BEST] = norm
    table[f"{NORMALIZED_BEST}_ci_low"] = lows
    table[f"{NORMALIZED_BEST}_ci_high"] = highs
    table["beats_baselines"] = pd.array(beats, dtype="boolean")
    return pd.DataFrame(
        {
            "metric": [f"{NORMALIZED_BEST}/{s.name}" for s in specs],
            "value": norm,
            "ci_low": lows,
            "ci_high": highs,
        }
    )


def _against_floor(table, specs, model, refs, normalize_by, n_bootstrap, seed, notes):
    """``normalized`` (+ interval) columns against ``normalize_by`` and their summary rows."""
    from pertbench.metrics.references import CEILING

    floor = {s.name: _units(refs[normalize_by], s) for s in specs}
    norm, lows, highs = _normalized(
        specs,
        model,
        floor,
        refs[CEILING],
        n_bootstrap=n_bootstrap,
        seed=seed,
        label=f"the {normalize_by} baseline",
        notes=notes,
    )
    table[NORMALIZED] = norm
    table[f"{NORMALIZED}_ci_low"] = lows
    table[f"{NORMALIZED}_ci_high"] = highs
    return pd.DataFrame(
        {
            "metric": [f"{NORMALIZED}/{s.name}" for s in specs],
            "value": norm,
            "ci_low": lows,
            "ci_high": highs,
        }
    )


def _units(scores: MergedScores, spec: MetricSpec) -> np.ndarray:
    """A source's values of one metric per bootstrap unit (group, or covariate block)."""
    frame = scores.per_covariate if spec.per_covariate else scores.per_group
    return frame[spec.name].to_numpy()


def _normalized(
    specs,
    model: MergedScores,
    floor: dict[str, np.ndarray],
    ceiling: MergedScores,
    *,
    n_bootstrap: int,
    seed: int,
    label: str,
    notes: list[str],
) -> tuple[list[float], list[float], list[float]]:
    """Normalised score of every metric against one floor (per-unit values ``floor``
    by metric) and the ceiling, with its paired interval; notes where it is undefined."""
    norm, lows, highs = [], [], []
    undefined = []
    for s in specs:
        if s.diagnostic:  # a property of the data: the same for every source
            norm.append(np.nan)
            lows.append(np.nan)
            highs.append(np.nan)
            continue
        value, lo, hi, n_units = cal.bootstrap_normalized(
            _units(model, s),
            floor[s.name],
            _units(ceiling, s),
            higher_is_better=s.higher_is_better,
            n_bootstrap=n_bootstrap,
            seed=seed,
        )
        if n_units and np.isnan(value):
            undefined.append(s.name)
        norm.append(value)
        lows.append(lo)
        highs.append(hi)
    if undefined:
        notes.append(
            f"normalised score undefined (NaN) where the ceiling is not better than "
            f"{label} by more than the 95% interval of their gap over groups (no room "
            f"to measure progress in): {', '.join(undefined[:10])}"
            + (f" and {len(undefined) - 10} more" if len(undefined) > 10 else "")
        )
    return norm, lows, highs
