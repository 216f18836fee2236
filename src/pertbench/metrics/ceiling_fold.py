"""The noise ceiling of one covariate block, folded chunk by chunk.

:class:`BlockCeiling` applies the rules of :mod:`pertbench.metrics.ceiling` inside the
evaluator's stages: the aggregate stage hands it every chunk of the block's groups
(:meth:`BlockCeiling.fold`, a :class:`~pertbench.metrics.aggregate.ChunkView`: the
chunk's observed cells and statistics); it draws the chunk's bootstrap replicates (and
replicates of those) from its observed cells, measures them like any side, and adds
their profiles to the per-group sums of the fit and rank rules at once, so only two
replicates of one chunk are in memory at a time. The DE rule needs only the chunk's
observed z-scores. The score stage then calls :meth:`BlockCeiling.finish`, which turns
the sums into the block's ceiling (ranks need every group of the block).

Every draw is read at the group's position in one seeded stream per kind
(:func:`~pertbench.metrics.ceiling.stream_at`): replicate ``r`` of all evaluated groups
takes the draws ``r * 2 N`` .. (its ``N`` outer draws, group by group, then its ``N``
inner ones), so a group's replicates do not depend on the blocks and chunks it falls in
nor on their order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pertbench.errors import EvaluationError
from pertbench.metrics import ceiling as ceil
from pertbench.metrics import ceiling_corrections as small
from pertbench.metrics.aggregate import Cells, SideStats, _store
from pertbench.metrics.catalog import MetricSpec

#: Fit bases with a ceiling rule (:class:`~pertbench.metrics.ceiling.FitCeiling`).
FIT_RULES = frozenset({"rmse", "mae", "mse", "r2", "cosine", "pearson", "spearman"})
#: Rank bases with a ceiling rule (:func:`~pertbench.metrics.ceiling.replicate_rank_scores`).
RANK_RULES = frozenset(ceil.SCALABLE) | frozenset(ceil.SIMILARITIES)
_DE_RULES = ("jaccard_top", "jaccard_abs_top", "overlap_top", "direction_agreement")


def _has_rule(spec: MetricSpec) -> bool:
    if spec.name in ceil.ON_SIDES or spec.name in ceil.ZERO_CEILING:
        return True
    if spec.family == "fit":
        return spec.base in FIT_RULES
    if spec.family == "rank" and not spec.per_covariate:
        return spec.base in RANK_RULES
    if spec.family == "de":
        return spec.name.startswith(_DE_RULES)
    return False


def without_rule(specs: list[MetricSpec]) -> list[str]:
    """Names of the selected metrics the ceiling has no rule for (left NaN)."""
    return [s.name for s in specs if not _has_rule(s)]


class BlockCeiling:
    """Accumulates the ceiling of one block over its chunks (see the module docstring).

    Parameters
    ----------
    block
        The covariate block.
    settings
        The evaluation's :class:`~pertbench.metrics.aggregate.BlockSettings`.
    n_replicates
        Bootstrap replicates per group (and posterior draws of the DE effects).
    seed
        The evaluation seed.
    offset, n_drawn
        Per block group, where its draws start in a replicate's run of ``n_drawn`` draws.
    usable_index, n_usable
        Per block group, its rank among the ``n_usable`` evaluated groups with a ceiling
        (-1 without): the order of the DE posterior draws.
    """

    def __init__(
        self,
        block,
        settings,
        *,
        n_replicates: int,
        seed: int,
        offset: np.ndarray,
        n_drawn: int,
        usable_index: np.ndarray,
        n_usable: int,
    ) -> None:
        specs = [s for s in settings.specs if _has_rule(s)]
        self.specs = settings.specs
        self.block = block
        self.n_replicates = int(n_replicates)
        self.seed = int(seed)
        self.offset, self.n_drawn = np.asarray(offset), int(n_drawn)
        self.usable_index, self.n_usable = np.asarray(usable_index), int(n_usable)
        self.top_k, self.fdr = settings.top_k, settings.fdr
        G = block.n_groups
        self.fit = [s for s in specs if s.family == "fit"]
        ranks = [s for s in specs if s.family == "rank" and not s.per_covariate]
        self.on_sides = [s for s in specs if s.name in ceil.ON_SIDES]
        self.de = [s.name for s in specs if s.family == "de"]
        self.profiled = list(dict.fromkeys(s.aggregation for s in self.fit + ranks))
        # the replicates' own z-scores are only needed for the logp aggregation
        self.replicate_de = "logp" in self.profiled
        self.fits = {agg: ceil.FitCeiling(G, agg) for agg in self.profiled}
        # aggregations whose spearman ceiling reads the uncorrected replicates (the energy
        # rule), and those whose comes from split halves
        spearman = {s.aggregation for s in self.fit if s.base == "spearman"}
        self.spearman = spearman - ceil.DIRECT_SPEARMAN - ceil.SPLIT_HALF_SPEARMAN
        self.split_half = sorted(spearman & ceil.SPLIT_HALF_SPEARMAN)
        self.ranks = ceil.RankCeiling(
            [(s.name, s.base, s.aggregation) for s in ranks],
            block.truth_counts(),
            np.zeros(G, dtype=np.int64),
            self.n_replicates,
        )
        self.de_values = {name: np.full(G, np.nan) for name in self.de}
        # whole replicate sides of the first replicates, for the rules on sides
        self.sides: list[tuple[SideStats, SideStats]] = []

    # -- chunks --------------------------------------------------------------------------
    def fold(self, view) -> None:
        """Add one chunk's replicates (a :class:`~pertbench.metrics.aggregate.ChunkView`)."""
        chunk = view.chunk
        lo, n = chunk.groups.start, chunk.n_groups
        X, codes = chunk.truth.X, chunk.truth.codes
        counts = np.bincount(codes, minlength=n)
        at = np.flatnonzero(counts >= ceil.MIN_CELLS)  # chunk groups with a ceiling
        if at.size == 0:
            return
        if self.fits or self.ranks.metrics or self.on_sides:
            self._fold_replicates(view, X, codes, n, lo, at)
        if self.split_half:
            self._fold_splits(view, X, codes, n, lo, at)
        if self.de:
            self._fold_de(view, counts, lo, at)

    def _fold_replicates(self, view, X, codes, n: int, lo: int, at: np.ndarray) -> None:
        observed = ceil.observed_rows(codes, n)
        start = int(self.offset[lo + at[0]])  # the chunk's eligible groups are contiguous
        keep_sides = bool(self.on_sides)
        if view.detection is None:
            raise EvaluationError("the ceiling needs the block's detection rates (wants_detection)")
        group_ids = self.block.groups[lo : lo + n]
        parent_q = small.unseen_rates(
            small.detections(X, codes, n), np.bincount(codes, minlength=n), view.detection
        )
        if "var" in self.fits:
            truth = view.truth
            self.fits["var"].exact_noise[lo + at] = small.variance_noise(
                X, codes, truth.mean, truth.var
            )[at]
        truth_pop = small.population(view.truth, parent_q, X, codes)
        for r in range(self.n_replicates):
            run = r * 2 * self.n_drawn
            rng = ceil.stream_at(self.seed, ceil.REPLICATE_STREAM, run + start)
            rows, rep_codes = ceil.bootstrap_rows(codes, n, rng=rng)
            rng = ceil.stream_at(self.seed, ceil.REPLICATE_STREAM, run + self.n_drawn + start)
            inner, inner_codes = ceil.bootstrap_rows(rep_codes, n, rng=rng)
            X_b = small.add_unseen(
                X[rows],
                rep_codes,
                parent_q,
                group_ids,
                seed=self.seed,
                replicate=r,
                level=0,
            )
            inner_q = small.unseen_rates(
                small.detections(X_b, rep_codes, n),
                np.bincount(rep_codes, minlength=n),
                view.detection,
            )
            X_bb = small.add_unseen(
                X_b[inner],
                inner_codes,
                inner_q,
                group_ids,
                seed=self.seed,
                replicate=r,
                level=1,
            )
            boot = view.measure(Cells(X_b, rep_codes), de=False)
            boot2 = view.measure(Cells(X_bb, inner_codes), de=False)
            # the rank rules, logp's test and the rules on sides read the replicates of the
            # cells as seen (the corrections are the fit rules')
            plain = plain2 = None
            if self.ranks.metrics or self.replicate_de or keep_sides or self.spearman:
                plain = view.measure(Cells(X[rows], rep_codes), de=self.replicate_de)
            if self.replicate_de or keep_sides or self.spearman:
                plain2 = view.measure(Cells(X[rows[inner]], inner_codes), de=self.replicate_de)
            if self.replicate_de:
                boot.z, boot2.z = plain.z, plain2.z
            first = ceil.weight_balance(rows, observed, rep_codes, n)
            second = ceil.weight_balance(rows[inner], rows, inner_codes, n)
            boot_pop = small.population(boot, inner_q, X_b, rep_codes)
            for agg in self.profiled:
                t_prof = view.profile(view.truth, at, agg)
                pop = t_prof if agg == "logp" else view.profile(truth_pop, at, agg)
                raw_b = view.profile(boot, at, agg)
                parent = raw_b if agg == "logp" else view.profile(boot_pop, at, agg)
                raw_bb = view.profile(boot2, at, agg)
                bb_prof = ceil.balanced(parent, raw_bb, second[at])
                b_prof = ceil.balanced(pop, raw_b, first[at])
                rank_sides = seen_b = None
                if plain is not None:
                    seen = view.profile(plain, at, agg)
                    seen_b = ceil.balanced(t_prof, seen, first[at])
                if agg in self.spearman:
                    seen_bb = ceil.balanced(seen, view.profile(plain2, at, agg), second[at])
                    rank_sides = (t_prof, seen_b, seen, seen_bb)
                self.fits[agg].add(
                    lo + at,
                    pop,
                    b_prof,
                    parent,
                    bb_prof,
                    observed=t_prof,
                    rank_sides=rank_sides,
                    unbalanced=(raw_b, raw_bb),
                )
                if seen_b is not None:
                    self.ranks.add(agg, r, lo + at, t_prof, seen_b)
            if keep_sides and r < ceil.SIDE_REPLICATES:
                self._keep_sides(r, chunk_groups=view.chunk.groups, boot=plain, boot2=plain2)
            del boot, boot2, plain, plain2

    def _fold_splits(self, view, X, codes, n: int, lo: int, at: np.ndarray) -> None:
        """Split halves of the chunk's groups, for :data:`~pertbench.metrics.ceiling.
        SPLIT_HALF_SPEARMAN` (each half tested against the block's controls)."""
        start = int(self.offset[lo + at[0]])
        for r in range(ceil.SPLITS):
            rng = ceil.stream_at(self.seed, ceil.SPLIT_STREAM, r * self.n_drawn + start)
            rows_a, codes_a, rows_b, codes_b = ceil.split_rows(codes, n, rng=rng)
            half_a = view.measure(Cells(X[rows_a], codes_a), de=True)
            half_b = view.measure(Cells(X[rows_b], codes_b), de=True)
            for agg in self.split_half:
                self.fits[agg].add_split(
                    lo + at, view.profile(half_a, at, agg), view.profile(half_b, at, agg)
                )

    def _keep_sides(self, r: int, *, chunk_groups: slice, boot: SideStats, boot2: SideStats):
        if len(self.sides) <= r:
            G, genes = self.block.n_groups, boot.mean.shape[1]
            de = boot.z is not None
            self.sides.append((SideStats.empty(G, genes, de=de), SideStats.empty(G, genes, de=de)))
        for side, parts in zip(self.sides[r], (boot, boot2), strict=True):
            _store(side, chunk_groups, (parts.mean, parts.var, parts.n, parts.z, parts.fdr))

    def _fold_de(self, view, counts: np.ndarray, lo: int, at: np.ndarray) -> None:
        truth = view.truth
        n_controls = np.full(at.size, self.block.control_rows.size)
        values = ceil.de_ceiling(
            truth.z[at],
            truth.fdr[at],
            truth.mean[at] - view.control_mean[None, :],
            ceil.own_noise_sd(counts[at], n_controls),
            self.de,
            top_k=self.top_k,
            fdr=self.fdr,
            n_draws=self.n_replicates,
            rng=np.random.default_rng([self.seed, ceil.DE_STREAM]),
            first=int(self.usable_index[lo + at[0]]),
            total=self.n_usable,
        )
        for name in self.de:
            self.de_values[name][lo + at] = values[name]

    # -- the block -----------------------------------------------------------------------
    def finish(self, view) -> Any:
        """The block's ceiling (``view``: its :class:`~pertbench.metrics.score.CeilingView`)."""
        from pertbench.metrics.score import SourceScores

        G = self.block.n_groups
        n = view.truth.n
        columns: dict[str, np.ndarray] = {}
        per_cov: dict[str, float] = {}
        for agg, accumulator in self.fits.items():
            here = [s for s in self.fit if s.aggregation == agg]
            values = accumulator.ceilings([s.base for s in here])
            columns.update({s.name: values[s.base] for s in here})
        if self.sides:
            scored = [
                (
                    view.score(boot, view.truth, self.on_sides),
                    view.score(boot2, boot, self.on_sides),
                )
                for boot, boot2 in self.sides
            ]
            first, inner = zip(*scored, strict=True)  # replicate vs truth, inner vs replicate
            for s in self.on_sides:
                if s.per_covariate:  # one value per block: (replicates, 1)
                    levels = [
                        np.array([[sc.per_covariate[s.name]] for sc in lv]) for lv in (first, inner)
                    ]
                    per_cov[s.name] = float(ceil.iterated(*levels)[0])
                else:
                    levels = [
                        np.array([sc.per_group[s.name] for sc in lv]) for lv in (first, inner)
                    ]
                    columns[s.name] = ceil.iterated(*levels)
        present = np.flatnonzero(view.truth.present)
        if self.ranks.metrics and present.size:
            for agg in self.ranks.aggregations:
                t_prof = view.profile(view.truth, present, agg)
                columns.update(self.ranks.ceilings(agg, present, t_prof))
        columns.update(self.de_values)
        for s in self.specs:
            if s.name in ceil.ZERO_CEILING:
                columns[s.name] = np.where(n >= ceil.MIN_CELLS, 0.0, np.nan)
        nan = np.full(G, np.nan)
        return SourceScores(
            per_group={
                s.name: columns.get(s.name, nan).copy() for s in self.specs if not s.per_covariate
            },
            per_covariate={
                s.name: per_cov.get(s.name, float("nan")) for s in self.specs if s.per_covariate
            },
            n_perturbations=int(present.size),
        )
