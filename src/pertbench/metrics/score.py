"""Stage 3 of the evaluator: metric values of a covariate block, from its statistics.

Every metric spec of the registry is a function of block aggregates; this module builds
those aggregates from :class:`~pertbench.metrics.aggregate.BlockStats` and calls the
specs. One aggregation at a time (so only a few (groups x genes) profiles are alive),
the observed profile and its per-row operands (norms, unit rows, ranks) are computed
ONCE per truth and shared by every prediction compared with it: the model and every
baseline share the observed truth, a ceiling replicate may bring its own. Rank-type
specs of one aggregation share one pass of N x N distance computations
(:func:`~pertbench.metrics.rank.rank_family`).

The result of a block, :class:`SourceScores` per source, holds plain arrays: merging
blocks computed anywhere (another process, a Ray task) is concatenation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pertbench.metrics.aggregate import BlockSettings, BlockStats, SideStats, profile
from pertbench.metrics.de import DEPair
from pertbench.metrics.fit import ProfilePair
from pertbench.metrics.rank import ProfileOperands, rank_family

#: Aggregations kept for figures when ``keep_aggregates`` is set (model only).
KEPT_AGGREGATIONS = ("average", "logfc")


@dataclass
class SourceScores:
    """Metric values of one source (model, baseline or ceiling) on one block."""

    per_group: dict[str, np.ndarray]  # metric -> (n_groups,), NaN where not scored
    per_covariate: dict[str, float]
    n_perturbations: int
    n_no_significant: int = 0  # scored groups whose truth has no significant gene
    single_cells: int = 0  # groups with one cell on a side of a cell metric
    aggregates: dict[str, np.ndarray] = field(default_factory=dict)


def _aggregations(settings: BlockSettings) -> tuple[str, ...]:
    listed = [
        s.aggregation
        for s in settings.specs
        if s.aggregation is not None and s.needs in ("profiles", "distances", "covariate")
    ]
    if settings.keep_aggregates:
        listed += list(KEPT_AGGREGATIONS)
    return tuple(dict.fromkeys(listed))


@dataclass
class BlockView:
    """What a ``needs="block"`` metric sees: one source's scored groups of a block.

    ``rows`` are the block-local indices of the scored groups (present on both sides);
    ``truth`` and ``pred`` their :class:`~pertbench.metrics.aggregate.SideStats` (index
    them with ``rows``); ``all_groups`` the observed aggregates of every group of the
    covariate block, whatever its split (with ``all_groups=True`` on the spec).
    """

    block: object
    rows: np.ndarray
    truth: SideStats
    pred: SideStats
    control_mean: np.ndarray
    all_groups: object
    settings: BlockSettings


@dataclass
class _Pair:
    name: str
    truth: SideStats
    pred: SideStats
    keep: bool
    rows: np.ndarray = field(init=False)
    scores: SourceScores = field(init=False)

    def __post_init__(self) -> None:
        self.rows = np.flatnonzero(self.truth.present & self.pred.present)


def score_block(
    stats: BlockStats,
    settings: BlockSettings,
    *,
    model: str,
    ceilings: dict[str, Any] | None = None,
) -> dict[str, SourceScores]:
    """Score every source of a block.

    Parameters
    ----------
    stats
        The block's statistics (:func:`~pertbench.metrics.aggregate.aggregate_block`).
    settings
        Metric specs and options.
    model
        Name of the scored model's source (its aggregates are kept when asked for).
    ceilings
        ``{source name: CeilingSource}``: sources made of replicates. Their estimator
        merges the replicates' scores (``estimator.combine(spec, values)``), or computes
        the block's ceiling itself from a :class:`CeilingView`
        (``estimator.score_block(view)``), or, when it folds its replicates chunk by
        chunk, finishes the block's accumulator (``source.finish(view)``).
    """
    ceilings = ceilings or {}
    own_rule = {
        name: source
        for name, source in ceilings.items()
        if source.estimator.scores_itself or source.estimator.folds
    }
    pairs: list[_Pair] = []
    for name, replicates in stats.sides.items():
        if name in own_rule:
            continue
        for pred, alt in replicates:
            pairs.append(_Pair(name, stats.truth if alt is None else alt, pred, name == model))
    _score_pairs(stats, pairs, settings)
    out = _merge_replicates(pairs, settings.specs, {n: s.estimator for n, s in ceilings.items()})
    for name, source in own_rule.items():
        view = CeilingView(
            block=stats.block,
            truth=stats.truth,
            sides=stats.sides.get(name, []),
            replicates=source.replicates.get(stats.block.index, []),
            control_mean=stats.control_mean,
            settings=settings,
            stats=stats,
        )
        out[name] = source.finish(view) if source.folds else source.estimator.score_block(view)
    return out


@dataclass
class CeilingView:
    """What a ceiling estimator with its own rule sees of one block.

    ``sides[r]`` are the statistics of replicate r (its "prediction" and the cells it is
    scored against, ``None`` = the observed groups) and ``replicates[r]`` its rows (both
    empty for an estimator that folds its replicates chunk by chunk); :meth:`score`
    scores any pair of sides with the standard path, :meth:`profile` gives a side's
    aggregation.
    """

    block: object
    truth: SideStats
    sides: list[tuple[SideStats, SideStats | None]]
    replicates: list
    control_mean: np.ndarray
    settings: BlockSettings
    stats: BlockStats

    def score(
        self, pred: SideStats, truth: SideStats | None = None, specs: list | None = None
    ) -> SourceScores:
        """Metric values of ``pred`` against ``truth`` (default: the observed groups)."""
        from dataclasses import replace

        settings = self.settings if specs is None else replace(self.settings, specs=list(specs))
        pair = _Pair("ceiling", self.truth if truth is None else truth, pred, False)
        _score_pairs(self.stats, [pair], settings)
        return pair.scores

    def profile(self, side: SideStats, rows: np.ndarray, aggregation: str) -> np.ndarray:
        """One aggregation of a side's groups ``rows`` (block-local)."""
        return profile(side, rows, self.control_mean, aggregation)


def _score_pairs(stats: BlockStats, pairs: list[_Pair], settings: BlockSettings) -> None:
    """Fill ``pair.scores`` of every (truth, prediction) pair of a block."""
    G = stats.block.n_groups
    specs = settings.specs
    for pair in pairs:
        columns = {s.name: np.full(G, np.nan) for s in specs if not s.per_covariate}
        per_cov = {s.name: float("nan") for s in specs if s.per_covariate}
        pair.scores = SourceScores(columns, per_cov, int(pair.rows.size))

    ctrl = stats.control_mean
    for agg in _aggregations(settings):
        here = [s for s in specs if s.aggregation == agg and s.needs != "de"]
        ranked = {s.distance for s in here if s.needs == "distances"}
        need_ranks = "spearman" in ranked or any(
            s.base == "spearman" and s.needs == "profiles" for s in here
        )
        # one observed profile per truth, shared by every source compared with it
        truths: dict[int, tuple[np.ndarray, ProfileOperands]] = {}
        for pair in pairs:
            rows = pair.rows
            keep = pair.keep and settings.keep_aggregates and agg in KEPT_AGGREGATIONS
            if not (here or keep) or rows.size == 0:
                continue
            key = id(pair.truth)
            if key not in truths:
                t_rows = np.flatnonzero(pair.truth.present)
                t_ops = ProfileOperands(profile(pair.truth, t_rows, ctrl, agg))
                if need_ranks:  # row ranks of the truth: once for fit and rank metrics
                    t_ops.get("ranks")
                truths[key] = (t_rows, t_ops)
            t_rows, t_ops = truths[key]
            truth_ops = t_ops.take(np.searchsorted(t_rows, rows))
            p_prof = profile(pair.pred, rows, ctrl, agg)
            profiles = ProfilePair(
                p_prof,
                truth_ops.M,
                truth_ranks=truth_ops.get("ranks") if need_ranks else None,
            )
            cols, per_cov = pair.scores.per_group, pair.scores.per_covariate
            for s in here:
                if s.needs == "profiles":
                    cols[s.name][rows] = s.compute(profiles)
            if ranked and rows.size >= 2:
                ranks = rank_family(
                    p_prof,
                    truth_ops,
                    ranked,
                    pred_ranks=profiles.pred_ranks if "spearman" in ranked else None,
                    n_jobs=settings.n_jobs,
                )
                for s in here:
                    if s.needs == "distances":
                        value = ranks[s.distance]
                        cols[s.name][rows] = value if s.compute is None else s.compute(value)
            for s in here:
                if s.needs == "covariate" and rows.size >= 2:
                    per_cov[s.name] = float(s.compute(profiles))
            if keep:
                for side, prof in (("pred", p_prof), ("truth", truth_ops.M)):
                    full = np.full((G, prof.shape[1]), np.nan, dtype=np.float32)
                    full[rows] = prof
                    pair.scores.aggregates[f"{side}_{agg}"] = full
        del truths

    for pair in pairs:
        _score_groupwise(pair, specs, ctrl, settings)
        block_specs = [s for s in specs if s.needs == "block"]
        if block_specs and pair.rows.size:
            view = BlockView(
                stats.block, pair.rows, pair.truth, pair.pred, ctrl, stats.all_groups, settings
            )
            for s in block_specs:
                pair.scores.per_group[s.name][pair.rows] = s.compute(view)


def _score_groupwise(pair: _Pair, specs, ctrl: np.ndarray, settings: BlockSettings) -> None:
    """Metrics that are not profile comparisons: DE, moments, cells."""
    rows, truth, pred = pair.rows, pair.truth, pair.pred
    cols = pair.scores.per_group
    de_specs = [s for s in specs if s.needs == "de"]
    if de_specs and rows.size:
        de = DEPair(
            truth_z=truth.z[rows],
            truth_fdr=truth.fdr[rows],
            pred_z=pred.z[rows],
            truth_delta=truth.mean[rows] - ctrl,
            pred_delta=pred.mean[rows] - ctrl,
            top_k=settings.top_k,
            fdr=settings.fdr,
        )
        for s in de_specs:
            cols[s.name][rows] = s.compute(de)
        pair.scores.n_no_significant = int(((de.truth_fdr < de.fdr).sum(axis=1) == 0).sum())
    for s in specs:
        if s.needs == "moments":
            for g in rows:
                cols[s.name][g] = s.compute(pred.mean[g], pred.var[g], truth.mean[g], truth.var[g])
        elif s.needs == "cells":
            cols[s.name][rows] = pred.cell_values[s.name][rows]
    pair.scores.single_cells = int(pred.single)


def _merge_replicates(pairs: list[_Pair], specs, combine: dict) -> dict[str, SourceScores]:
    by_source: dict[str, list[SourceScores]] = {}
    for pair in pairs:
        by_source.setdefault(pair.name, []).append(pair.scores)
    out = {}
    for name, scores in by_source.items():
        if len(scores) == 1 and name not in combine:
            out[name] = scores[0]
            continue
        estimator = combine[name]
        first = scores[0]
        merged = SourceScores(
            per_group={
                s.name: estimator.combine(s, [sc.per_group[s.name] for sc in scores])
                for s in specs
                if not s.per_covariate
            },
            per_covariate={
                s.name: float(estimator.combine(s, [sc.per_covariate[s.name] for sc in scores]))
                for s in specs
                if s.per_covariate
            },
            n_perturbations=first.n_perturbations,
            n_no_significant=first.n_no_significant,
            single_cells=first.single_cells,
        )
        out[name] = merged
    return out
