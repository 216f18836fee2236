"""The noise ceiling: the expected score of a PERFECT model against the observed truth.

A perfect model predicts each group's true population profile. Scored against the
observed group of ``n`` cells it is still not flawless: the observed profile carries the
sampling noise of ``n`` cells. The ceiling estimates, per group and without knowing the
truth, the score such a model would get. ``docs/metrics.md`` ("Noise ceiling") gives the
derivations and the validation against the simulator's known truth
(``benchmarks/ceiling_validation.py``).

Everything starts from bootstrap replicates of each group: ``b``, its ``n`` cells drawn
with replacement (:func:`bootstrap_rows`, as row indices into the observed cells), and
``bb``, ``b``'s cells drawn again. ``b - t`` has about the distribution of the observed
profile's sampling error ``t - mu``, which is what a perfect model's error is. Two
corrections make that precise for the small groups of single-cell data:

- the iterated bootstrap (Hall and Martin 1988): the bootstrap's own bias, estimated one
  level down by ``bb`` against ``b``, is removed: ``2 L(b, t) - L(bb, b)``;
- weight balancing (:func:`weight_balance`): the resampling multiplicities make every
  gene's deviation of one replicate larger or smaller together; each deviation is
  rescaled to the expected weight spread (a control variate), which keeps its expected
  square and removes most of the Monte-Carlo noise.

Two small-sample corrections (:mod:`pertbench.metrics.ceiling_corrections`) apply to the
fit rules: Good-Turing pseudo-detections of the genes no cell of a group detected (the
replicates are then scored against the smoothed population they are drawn from), and the
exact unbiased noise energy of the within-group variance as the scale of the ``var``
errors.

Rule per family:

- **Fit metrics** (:class:`FitCeiling`): rmse and mae are scored on the replicates,
  iterated. mse, r2, cosine, pearson and spearman follow from the iterated noise energy
  S of the profile (centred for pearson, of centred ranks for spearman): mse = S / G,
  r2 = 1 - S / SST, similarity = sqrt(1 - S / |t|^2) (a perfect profile is the observed
  one minus its noise); spearman of average and var: the replicates' own rank
  correlation with their population (:data:`DIRECT_SPEARMAN`, iterated for var).
  ``logp`` has no population value (it grows without bound with the number of cells),
  so its ceiling is that of an independent replicate of the measured size
  (:data:`INDEPENDENT`); its spearman comes from split halves, Spearman-Brown corrected
  (:data:`SPLIT_HALF_SPEARMAN`).
- **Rank metrics** (:func:`replicate_rank_scores`): a perfect model mis-ranks a
  perturbation when the truth's noise brings it closer to another perturbation. The
  observed profile ``t_i`` plays the prediction of ``i`` against the observed ``t_j``
  (their noises are independent), compared with where an independent replicate of ``j``
  would be found, matched to the pair's noise.
- **DE metrics** (:func:`de_ceiling`): a perfect model ranks genes by their population
  effect. The truth's z-scores are modelled as z = zeta + noise (the group's own share
  of the Wilcoxon variance; the controls' share is common to both sides); the
  distribution of zeta over genes is estimated per group by nonparametric maximum
  likelihood (Kiefer-Wolfowitz, EM on a grid) and posterior draws of zeta play the
  perfect prediction.
- **Distribution metrics**: edistance and MMD are unbiased U-statistics, so a model
  drawing cells from the population scores exactly 0 in expectation
  (:data:`ZERO_CEILING`); ``mean_var_kde`` and ``matrix_distance`` are scored on whole
  replicate sides, iterated (:data:`ON_SIDES`).

Groups with fewer than :data:`MIN_CELLS` observed cells have no ceiling (NaN, noted by
the evaluator): one cell says nothing about its own sampling noise.

The evaluator applies these rules block by block and chunk by chunk
(:class:`pertbench.metrics.references.BootstrapCeiling`). Every random draw comes from one
seeded stream per kind (:func:`stream_at`) read at the position of the group it is for,
so a group's draws depend on the seed and on the groups before it, never on how the
groups are cut into blocks and chunks or in which order those are processed.
"""

from __future__ import annotations

import copy

import numpy as np

from pertbench.metrics.calibration import halves_by_key
from pertbench.metrics.de import direction_agreement, jaccard_top_k, overlap_top_k
from pertbench.metrics.fit import HIGHER_IS_BETTER, fit_metrics, rank_rows
from pertbench.metrics.rank import distance_matrix

#: Fewest observed cells for which a group gets a ceiling.
MIN_CELLS = 2
#: Bootstrap replicates per group (and posterior draws for the DE metrics).
DEFAULT_REPLICATES = 16
#: Aggregations whose ceiling is an independent replicate of the measured size.
INDEPENDENT = frozenset({"logp"})
#: Aggregations whose spearman ceiling is the replicates' own rank correlation with the
#: smoothed population they are drawn from. A mean or variance profile's ranks are set
#: by the genes' baseline expression, which spreads them far wider than the noise, so the
#: replicates' correlation with their population transfers to the truth's with the
#: perfect model; the small-sample defect is the tie among genes no cell detected, which
#: the Good-Turing pseudo-detections break. Profiles relative to the controls (delta,
#: logfc) are dominated by noise, which the observed profile carries into its own ranks:
#: their rule reads the noise energy against the observed ranks (see
#: :meth:`FitCeiling.ceilings`), as does logp's.
DIRECT_SPEARMAN = frozenset({"average", "var"})
#: Of those, the ones whose direct rule is iterated, ``2 rho(b, t) - rho(bb, b)``: the
#: bootstrap understates the noise of a small sample's variance (its fourth moment is
#: under-shown: 15-20% of the noise energy at 10 cells), the inner level measures by how
#: much; a mean's bootstrap noise is unbiased up to (n - 1) / n, and iterating only adds
#: Monte-Carlo noise there.
ITERATED_SPEARMAN = frozenset({"var"})
#: Aggregations whose spearman ceiling comes from split halves, Spearman-Brown corrected
#: to the measured size: logp's perfect model is an independent replicate, and two
#: halves of the group ARE independent replicates (of n / 2 cells, against the same
#: controls), with the discreteness of sparse genes' z-scores and the genes one half
#: detects and the other does not, which bootstrap replicates do not show (the energy
#: rule on them was 0.82 at n <= 20; see :meth:`FitCeiling.add_split`).
SPLIT_HALF_SPEARMAN = frozenset({"logp"})
#: Random splits per group for :data:`SPLIT_HALF_SPEARMAN`.
SPLITS = 8
#: Metrics whose perfect-model expectation is exactly 0.
ZERO_CEILING = frozenset({"edistance", "mmd"})
#: Metrics scored on whole replicate sides by the evaluator (iterated, see :func:`iterated`).
ON_SIDES = frozenset({"matrix_distance", "mean_var_kde"})
#: Replicates used for :data:`ON_SIDES` (smooth statistics; mean_var_kde is costly).
SIDE_REPLICATES = 4
#: Grid points of the nonparametric prior of the DE effects.
PRIOR_ATOMS = 60
PRIOR_ITERATIONS = 150
_GROUP_CHUNK = 64
_CORRELATIONS = frozenset({"cosine", "pearson", "spearman"})


#: Streams of random draws: bootstrap replicates and posterior draws of the DE effects.
REPLICATE_STREAM = 0xCE11
DE_STREAM = 0xDE
SPLIT_STREAM = 0x5B


def stream_at(seed: int, stream: int, position: int) -> np.random.Generator:
    """The generator of one seeded stream, advanced by ``position`` draws.

    A uniform draw (``Generator.random``) takes exactly one step of the PCG64 bit
    generator, so the ``k``-th draw of a stream is the first draw of
    ``stream_at(seed, stream, k)``: any part of a long sequence of draws is made without
    making the draws before it.
    """
    rng = np.random.default_rng([int(seed), int(stream)])
    if position:
        rng.bit_generator.advance(int(position))
    return rng


# ---------------------------------------------------------------------------------------
# Replicate sides
# ---------------------------------------------------------------------------------------
def bootstrap_rows(
    codes: np.ndarray, n_groups: int, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One bootstrap replicate of every group: its cells drawn with replacement.

    Parameters
    ----------
    codes
        Group code per observed cell (-1: not in a group).
    n_groups
        Number of groups.
    rng
        Source of the draws.

    Returns
    -------
    rows, replicate_codes
        Row indices into the observed cells (each group's ``n`` draws) and the group code
        of each drawn row. Groups with fewer than :data:`MIN_CELLS` cells are left out.
    """
    codes = np.asarray(codes, dtype=np.int64)
    cells = np.flatnonzero(codes >= 0)
    order = cells[np.argsort(codes[cells], kind="stable")]
    counts = np.bincount(codes[cells], minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    drawn = np.repeat(np.arange(n_groups), np.where(counts >= MIN_CELLS, counts, 0))
    offsets = np.floor(rng.random(drawn.size) * counts[drawn]).astype(np.int64)
    return order[starts[drawn] + offsets], drawn


def observed_rows(codes: np.ndarray, n_groups: int) -> np.ndarray:
    """The observed cells of every group that gets replicates, group by group: the
    parent multiset of :func:`bootstrap_rows`'s draws."""
    codes = np.asarray(codes, dtype=np.int64)
    cells = np.flatnonzero(codes >= 0)
    counts = np.bincount(codes[cells], minlength=n_groups)
    cells = cells[counts[codes[cells]] >= MIN_CELLS]
    return cells[np.argsort(codes[cells], kind="stable")]


def split_rows(
    codes: np.ndarray, n_groups: int, *, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One random split of every group into two halves (floor(n/2) and the rest).

    One uniform draw per cell, taken in the order of :func:`bootstrap_rows` (groups in
    order, each group's cells in row order), orders each group's cells; groups with fewer
    than :data:`MIN_CELLS` cells are left out (and draw nothing).

    Returns
    -------
    rows_a, codes_a, rows_b, codes_b
        Row indices into the observed cells of each half and their group codes.
    """
    cells = observed_rows(codes, n_groups)  # the cells that draw, in the bootstrap's order
    group = np.asarray(codes, dtype=np.int64)[cells]
    order, in_a, in_b = halves_by_key(group, rng.random(cells.size), n_groups)
    rows, groups = cells[order], group[order]
    return rows[in_a], groups[in_a], rows[in_b], groups[in_b]


def weight_balance(
    drawn: np.ndarray, parent: np.ndarray, codes: np.ndarray, n_groups: int
) -> np.ndarray:
    """Per group, the factor that gives a bootstrap replicate its expected weight spread.

    A replicate drawn from a parent multiset of ``n`` cells (the observed cells, or an
    earlier replicate) deviates from the parent's mean by ``sum_c (M_c - m_c) x_c / n``,
    with ``M_c`` and ``m_c`` the multiplicities of cell ``c`` in the replicate and in the
    parent. The size of that deviation follows ``D = sum_c (M_c - m_c)^2``, which varies
    from draw to draw (relative sd about sqrt(2/n)) for every gene at once, so averaging
    over genes does not remove it. Scaling the deviation by sqrt(E[D] / D), with
    E[D] = n - 1 - sum_c m_c (m_c - 1) / n, keeps its expected square and removes that
    Monte-Carlo noise (a control variate).

    Parameters
    ----------
    drawn, parent
        Cell indices (repeats allowed) of the replicate and of the multiset it was drawn
        from, group by group with the same group sizes.
    codes
        Group code of each entry of ``drawn`` (and of ``parent``, in the same order).

    Returns
    -------
    numpy.ndarray
        (n_groups,) factors (1 where a group has no draws).
    """
    codes = np.asarray(codes, dtype=np.int64)
    n = np.bincount(codes, minlength=n_groups).astype(np.float64)
    cells, where = np.unique(np.concatenate([drawn, parent]), return_inverse=True)
    group_of_cell = np.zeros(cells.size, dtype=np.int64)
    group_of_cell[where] = np.concatenate([codes, codes])
    M = np.bincount(where[: len(drawn)], minlength=cells.size).astype(np.float64)
    m = np.bincount(where[len(drawn) :], minlength=cells.size).astype(np.float64)
    spread = np.bincount(group_of_cell, weights=(M - m) ** 2, minlength=n_groups)
    duplicates = np.bincount(group_of_cell, weights=m * (m - 1.0), minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = n - 1.0 - duplicates / n
        factor = np.sqrt(expected / spread)
    return np.where((n >= MIN_CELLS) & (spread > 0) & (expected > 0), factor, 1.0)


def balanced(observed: np.ndarray, replicate: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``observed + factor * (replicate - observed)``, one factor per row (group)."""
    return observed + np.asarray(factor)[:, None] * (replicate - observed)


def inflation(n_cells: np.ndarray) -> np.ndarray:
    """sqrt(n / (n - 1)) per group: a single bootstrap's deviations are this much too
    small (used where the iterated bootstrap is not: rank metrics).

    A mean of ``n`` draws from the empirical distribution varies by (n-1)/n s^2 / n
    instead of s^2 / n (s^2 the unbiased variance). NaN below :data:`MIN_CELLS`.
    """
    n = np.asarray(n_cells, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n >= MIN_CELLS, np.sqrt(n / np.maximum(n - 1.0, 1.0)), np.nan)


# ---------------------------------------------------------------------------------------
# Fit metrics
# ---------------------------------------------------------------------------------------
class FitCeiling:
    """Accumulates the fit-metric ceilings of one aggregation over replicates.

    Each replicate brings profiles per group: the observed ``t``, a bootstrap replicate
    ``b`` (the group's cells resampled) and ``bb`` (``b``'s cells resampled).
    The bootstrap's error is biased for small ``n`` and non-linear aggregations (logfc,
    var: a sample with no reads of a sparse gene shows no noise for it); the iterated
    bootstrap (Hall and Martin 1988) removes the leading bias: ``2 m(b, t) - m(bb, b)``.
    That is applied to the errors (rmse, mse, mae) and to the noise energy
    ``S = |b - t|^2`` (also centred, and on the ranks of the profiles), from which the
    similarities follow (see :meth:`ceilings`). On :data:`DIRECT_SPEARMAN` aggregations
    spearman is the replicates' own, ``spearman(b, t)``, averaged (iterated on
    :data:`ITERATED_SPEARMAN`).

    Parameters
    ----------
    n_groups
        Number of groups.
    aggregation
        The aggregation; those in :data:`INDEPENDENT` get the ceiling of an independent
        replicate of the measured size.
    """

    def __init__(self, n_groups: int, aggregation: str) -> None:
        self.aggregation = aggregation
        self.sums = {
            key: np.zeros(n_groups)
            for key in ("rmse", "mae", "energy", "centred", "ranks", "spearman")
        }
        self.count = np.zeros(n_groups)
        #: sums and counts of the split halves' spearman (:data:`SPLIT_HALF_SPEARMAN`)
        self.split = np.zeros(n_groups)
        self.split_count = np.zeros(n_groups)
        #: an exact estimate of the noise energy, where one is known (var: see
        #: :func:`~pertbench.metrics.ceiling_corrections.variance_noise`)
        self.exact_noise = np.full(n_groups, np.nan)
        self.norms = {key: np.full(n_groups, np.nan) for key in ("plain", "centred", "ranks")}
        self.n_genes = 1

    def add(
        self,
        at: np.ndarray,
        t: np.ndarray,
        b: np.ndarray,
        parent: np.ndarray,
        bb: np.ndarray,
        *,
        observed: np.ndarray | None = None,
        rank_sides: tuple | None = None,
        unbalanced: tuple | None = None,
    ) -> None:
        """One replicate for groups ``at``: (groups x genes) profiles of the population
        ``t`` the replicate ``b`` was drawn from (the observed groups, smoothed for unseen
        genes: :func:`~pertbench.metrics.ceiling_corrections.population`), of ``b`` (as
        scored against ``t``), and of the inner replicate ``bb`` with the population
        ``parent`` it was drawn from. ``observed``: the observed profiles, whose energy
        the similarities' rule reads the noise against (default ``t``). ``rank_sides``:
        the four profiles spearman's energy rule reads instead; ``unbalanced``: ``b``
        and ``bb`` before :func:`balanced`, for the direct rule (:data:`DIRECT_SPEARMAN`)."""
        first = fit_metrics(b, t, ["rmse", "mae"])
        inner = fit_metrics(bb, parent, ["rmse", "mae"])
        for key in ("rmse", "mae"):
            self.sums[key][at] += 2.0 * first[key] - inner[key]
        pairs = [
            ("energy", (t, b, parent, bb)),
            ("centred", [_centre(x) for x in (t, b, parent, bb)]),
        ]
        direct = self.aggregation in DIRECT_SPEARMAN
        if direct:
            # the replicates as drawn: balancing would give their zeros the population's order
            replicate, inner_replicate = (b, bb) if unbalanced is None else unbalanced
            rho = fit_metrics(replicate, t, ["spearman"])["spearman"]
            if self.aggregation in ITERATED_SPEARMAN:
                rho = 2.0 * rho - fit_metrics(inner_replicate, parent, ["spearman"])["spearman"]
            self.sums["spearman"][at] += rho
        elif self.aggregation not in SPLIT_HALF_SPEARMAN:  # (its rule: :meth:`add_split`)
            # the energy rule reads ``rank_sides`` (observed, b, its parent, bb) when given:
            # the uncorrected replicates (pseudo-detections breaking the ties among zeros
            # make it too pessimistic)
            ranks = [
                _centre(rank_rows(x))
                for x in (rank_sides if rank_sides is not None else (t, b, parent, bb))
            ]
            pairs.append(("ranks", ranks))
            self.norms["ranks"][at] = _energy(ranks[0])
        for key, (x_t, x_b, x_parent, x_bb) in pairs:
            self.sums[key][at] += 2.0 * _energy(x_b - x_t) - _energy(x_bb - x_parent)
        observed = t if observed is None else observed
        self.norms["plain"][at] = _energy(observed)
        self.norms["centred"][at] = _energy(_centre(observed))
        self.count[at] += 1
        self.n_genes = t.shape[1]

    def add_split(self, at: np.ndarray, half_a: np.ndarray, half_b: np.ndarray) -> None:
        """One random split of groups ``at``: the (groups x genes) profiles of its two
        halves, each measured against the same controls. Their spearman r estimates the
        agreement of two independent replicates of n / 2 cells; Spearman-Brown,
        2 r / (1 + r), extrapolates it to two of n cells (:meth:`ceilings`)."""
        rho = fit_metrics(half_a, half_b, ["spearman"])["spearman"]
        ok = np.isfinite(rho)
        self.split[at[ok]] += rho[ok]
        self.split_count[at[ok]] += 1

    def ceilings(self, bases) -> dict[str, np.ndarray]:
        """The ceiling per group of each fit metric in ``bases`` (NaN without replicates).

        With S the (iterated) noise energy of the profile: mse = S / n_genes,
        r2 = 1 - S / SST, cosine = sqrt(1 - S / |t|^2), pearson the same on centred
        profiles, spearman on centred ranks (a perfect model's profile is the observed one
        minus its noise: corr = sqrt(1 - q)), except on :data:`DIRECT_SPEARMAN`
        aggregations: the replicates' mean spearman with their population. An independent
        replicate carries two noise draws: errors x 2 (mse) or x sqrt(2),
        r2 = 1 - 2 S / SST, similarities 1 - q.
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = {
                k: v / np.where(self.count > 0, self.count, np.nan) for k, v in self.sums.items()
            }
        missing = self.count == 0  # no replicate: too few cells
        # an exact noise energy, where known, sets the scale of the errors
        with np.errstate(invalid="ignore", divide="ignore"):
            exact = np.maximum(self.exact_noise, 0.0)
            scale = np.where(np.isfinite(exact) & (mean["energy"] > 0), exact / mean["energy"], 1.0)
        # (the errors only: the similarities' rule reads the noise against the observed
        # profile's energy, which carries the same bootstrap shortfall)
        noise = mean["energy"] * scale
        for key in ("rmse", "mae"):
            mean[key] = mean[key] * np.sqrt(scale)
        independent = self.aggregation in INDEPENDENT
        copies = 2.0 if independent else 1.0
        n_genes = max(self.n_genes, 1)
        out = {}
        for base in bases:
            if base in ("rmse", "mae"):
                out[base] = np.sqrt(copies) * mean[base]
            elif base == "mse":
                out[base] = copies * np.maximum(noise, 0.0) / n_genes
            elif base == "r2":
                out[base] = 1.0 - copies * _ratio(noise, self.norms["centred"])
            elif base == "spearman" and self.aggregation in DIRECT_SPEARMAN:
                out[base] = mean["spearman"]
            elif base == "spearman" and self.aggregation in SPLIT_HALF_SPEARMAN:
                with np.errstate(invalid="ignore", divide="ignore"):
                    r = np.clip(self.split / self.split_count, 0.0, 1.0)
                out[base] = np.where(self.split_count > 0, 2.0 * r / (1.0 + r), np.nan)
            elif base in ("cosine", "pearson", "spearman"):
                key = {"cosine": "plain", "pearson": "centred", "spearman": "ranks"}[base]
                energy = mean["energy" if base == "cosine" else key]
                share = np.clip(1.0 - _ratio(energy, self.norms[key]), 0.0, 1.0)
                out[base] = share if independent else np.sqrt(share)
            else:
                raise ValueError(f"no ceiling rule for fit metric '{base}'")
            out[base] = np.where(missing, np.nan, out[base])
        return out


def _centre(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=1, keepdims=True)


def _energy(x: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", x, x)


def _ratio(noise: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """noise / signal; a signal of 0 (constant truth) gives 0 when there is no noise
    either (a perfect model is then exact) and 1 otherwise, like the fit conventions."""
    with np.errstate(invalid="ignore", divide="ignore"):
        flat = np.where(noise > 0, 1.0, 0.0)
        return np.where(
            signal > 0, np.maximum(noise, 0.0) / np.where(signal > 0, signal, 1.0), flat
        )


def iterated(first: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Iterated-bootstrap estimate ``2 first - inner``, averaged over replicates (rows)
    (NaN where undefined)."""
    return _nanmean_rows(2.0 * np.atleast_2d(first) - np.atleast_2d(inner))


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean over rows (replicates) ignoring NaN, per column.

    The rows are added one after the other, whatever the number of columns (numpy's
    ``sum(axis=0)`` adds a single column pairwise but several columns row by row), so a
    group's value does not depend on how many groups are averaged with it.
    """
    values = np.atleast_2d(values)
    present = ~np.isnan(values)
    total = np.zeros(values.shape[1:])
    for row, ok in zip(values, present, strict=True):
        total += np.where(ok, row, 0.0)
    count = present.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ---------------------------------------------------------------------------------------
# Rank metrics
# ---------------------------------------------------------------------------------------
def row_distances(pred: np.ndarray, truth: np.ndarray, base: str) -> np.ndarray:
    """Distance between row i of ``pred`` and row i of ``truth`` as rank metrics use it
    (the metric for errors, its negative for similarities)."""
    value = fit_metrics(pred, truth, [base])[base]
    return -value if base in HIGHER_IS_BETTER else value


#: Rank distances that scale simply with the size of a deviation (``D(t + c d, t)``):
#: their independent replicate can be matched to each pair's noise.
SCALABLE = {"mse": 1.0, "rmse": 0.5, "mae": 0.5, "r2": 1.0}
#: Rank similarities and the profile space of their noise-to-signal ratio.
SIMILARITIES = {"cosine": "plain", "pearson": "centred", "spearman": "ranks"}


def noise_ratios(t: np.ndarray, b: np.ndarray, factor: np.ndarray) -> dict[str, np.ndarray]:
    """Noise-to-signal ratio q of each observed profile (rows of ``t``) in the spaces of
    :data:`SIMILARITIES`, from one replicate ``b``: q = factor^2 |b - t|^2 / |t|^2 (on
    centred profiles, or centred ranks); ``factor`` per row, :func:`inflation`."""
    spaces = {
        "plain": (t, b),
        "centred": (_centre(t), _centre(b)),
        "ranks": (_centre(rank_rows(t)), _centre(rank_rows(b))),
    }
    out = {}
    for name, (x_t, x_b) in spaces.items():
        out[name] = _ratio(np.asarray(factor) ** 2 * _energy(x_b - x_t), _energy(x_t))
    return out


def replicate_rank_scores(
    truth: np.ndarray,
    base: str,
    *,
    own_distances: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    ratios: np.ndarray | None = None,
) -> np.ndarray:
    """Rank ceiling of the N perturbations of one covariate combination.

    ``D[i, j]`` = distance(observed i, observed j) plays the perfect prediction of i
    against the observed j: its noise is independent of j's. It is compared with the
    distance at which an independent replicate of j would be found, for each pair:

    - metrics in :data:`SCALABLE`: ``own_distances`` (n_replicates, N), the distance
      between j's observed profile and an independent replicate of it (two noise draws),
      rescaled from j's noise (2 S_j) to the pair's (S_i + S_j) with ``noise`` (N,) =
      S. Without it, perturbations noisier than their neighbours would be mis-ranked
      for their noise alone, which a perfect model does not do.
    - similarities (:data:`SIMILARITIES`): ``ratios`` (n_replicates, N) = each
      profile's noise-to-signal ratio q; two independent replicates of the same profile
      with noise q_i and q_j have similarity sqrt((1 - q_i)(1 - q_j)).

    Returns
    -------
    numpy.ndarray
        (N,) mean over replicates of ``(#{i != j: D[i, j] < own} + 0.5 #ties) / N``.
        NaN when N < 2, and for perturbations without replicates.
    """
    T = np.atleast_2d(np.asarray(truth, dtype=np.float64))
    n = T.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    D = distance_matrix(T, T, base)
    off = ~np.eye(n, dtype=bool)
    if base in SIMILARITIES:
        similar = np.sqrt(np.clip(1.0 - np.atleast_2d(ratios), 0.0, 1.0))
        thresholds = [-(s[:, None] * s[None, :]) for s in similar]
        missing = np.isnan(np.atleast_2d(ratios))
    else:
        own = np.atleast_2d(np.asarray(own_distances, dtype=np.float64))
        S = np.asarray(noise, dtype=np.float64) if noise is not None else np.ones(n)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = (S[:, None] + S[None, :]) / (2.0 * S[None, :])  # [i, j]: pair / 2 S_j
        scale = np.where(np.isfinite(ratio), ratio, 1.0) ** SCALABLE[base]
        if base == "r2":  # the distance is sse / sst - 1: scale the sse part
            thresholds = [(o[None, :] + 1.0) * scale - 1.0 for o in own]
        else:
            thresholds = [o[None, :] * scale for o in own]
        missing = np.isnan(own)
    ranks = np.empty(missing.shape)
    for r, threshold in enumerate(thresholds):  # one (N x N) comparison per replicate
        less = ((D < threshold) & off).sum(axis=0)
        equal = ((D == threshold) & off).sum(axis=0)
        ranks[r] = (less + 0.5 * equal) / n
    return _nanmean_rows(np.where(missing, np.nan, ranks))


class RankCeiling:
    """Accumulates the rank-metric ceilings over replicates (:func:`replicate_rank_scores`).

    Replicates may be added for a few groups at a time (:meth:`add`), in any order of
    groups; :meth:`ceilings` then ranks within each covariate combination.

    Parameters
    ----------
    metrics
        (name, base metric, aggregation) of each rank metric.
    n_cells
        (n_groups,) observed cells per group.
    cov_of_group
        (n_groups,) covariate combination of each group (ranks are within one).
    n_replicates
        Replicates per group.
    """

    def __init__(self, metrics, n_cells: np.ndarray, cov_of_group: np.ndarray, n_replicates: int):
        self.metrics = list(metrics)
        self.factor = inflation(n_cells)
        self.cov_of_group = np.asarray(cov_of_group)
        self.n_replicates = int(n_replicates)
        n_groups = self.factor.size
        self.aggregations = list(dict.fromkeys(agg for _, _, agg in self.metrics))
        self.own = {name: np.full((n_replicates, n_groups), np.nan) for name, _, _ in self.metrics}
        self.noise = {agg: np.zeros(n_groups) for agg in self.aggregations}

    def add(
        self, aggregation: str, replicate: int, at: np.ndarray, t: np.ndarray, b: np.ndarray
    ) -> None:
        """Replicate number ``replicate`` ``b`` of the observed profiles ``t`` (rows: groups
        ``at``)."""
        here = [(name, base) for name, base, agg in self.metrics if agg == aggregation]
        if not here:
            return
        factor = self.factor[at]
        self.noise[aggregation][at] += _energy(b - t)
        twice = t + np.sqrt(2.0) * factor[:, None] * (b - t)  # two noise draws around t
        ratios = noise_ratios(t, b, factor)
        for name, base in here:
            if base in SIMILARITIES:
                self.own[name][replicate, at] = ratios[SIMILARITIES[base]]
            else:
                self.own[name][replicate, at] = row_distances(twice, t, base)

    def ceilings(self, aggregation: str, at: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        """Rank ceiling per group of each metric of ``aggregation``; ``t``: the observed
        profiles of every group with cells (rows: groups ``at``)."""
        energy = self.noise[aggregation] * self.factor**2 / max(self.n_replicates, 1)
        out = {}
        for name, base, agg in self.metrics:
            if agg != aggregation:
                continue
            own = self.own[name]
            values = np.full(self.factor.size, np.nan)
            for c in np.unique(self.cov_of_group[at]):
                rows = np.flatnonzero(self.cov_of_group[at] == c)
                members = at[rows]
                similarity = base in SIMILARITIES
                values[members] = replicate_rank_scores(
                    t[rows],
                    base,
                    own_distances=None if similarity else own[:, members],
                    noise=energy[members],
                    ratios=own[:, members] if similarity else None,
                )
            out[name] = values
        return out


# ---------------------------------------------------------------------------------------
# DE metrics
# ---------------------------------------------------------------------------------------
def own_noise_sd(n_cells: np.ndarray, n_controls: np.ndarray) -> np.ndarray:
    """Share of a Wilcoxon z-score's noise sd that comes from the group's own cells.

    var(U) splits into the group's and the controls' parts in proportion 1/n : 1/n_c
    (Hoeffding decomposition); the controls' part is shared with any prediction tested
    against the same controls, so only sqrt(n_c / (n + n_c)) separates a perfect
    prediction's z from the observed one.
    """
    n = np.asarray(n_cells, dtype=np.float64)
    nc = np.asarray(n_controls, dtype=np.float64)
    return np.sqrt(nc / np.maximum(n + nc, 1.0))


def posterior_effect_draws(
    z: np.ndarray,
    noise_sd: np.ndarray,
    *,
    n_draws: int,
    rng: np.random.Generator,
    n_atoms: int = PRIOR_ATOMS,
    n_iterations: int = PRIOR_ITERATIONS,
) -> np.ndarray:
    """Draws of each gene's noise-free effect given its observed z-score, per group.

    Model, per group (row): z_g = zeta_g + N(0, sd^2), zeta_g ~ F with F unknown. F is
    the nonparametric maximum-likelihood estimate on a grid of ``n_atoms`` points
    spanning the observed z-scores (EM, ``n_iterations`` steps); zeta is then drawn from
    its posterior (an atom, then uniformly within the atom's grid cell, so draws do not
    tie). Sparse effects (most genes null) are handled: F puts its mass where the data
    need it.

    Returns
    -------
    numpy.ndarray
        (n_draws, n_groups, n_genes).
    """
    Z = np.atleast_2d(np.asarray(z, dtype=np.float64))
    sd = np.maximum(np.asarray(noise_sd, dtype=np.float64).reshape(-1), 1e-6)
    lo = Z.min(axis=1) - sd
    hi = Z.max(axis=1) + sd
    step = (hi - lo) / (n_atoms - 1)
    atoms = lo[:, None] + step[:, None] * np.arange(n_atoms)[None, :]  # (groups, atoms)
    # log-likelihood of each gene under each atom, shifted per gene for stability
    resid = (Z[:, :, None] - atoms[:, None, :]) / sd[:, None, None]
    loglik = -0.5 * resid * resid
    loglik -= loglik.max(axis=2, keepdims=True)
    lik = np.exp(loglik)
    del resid, loglik
    weights = np.full((Z.shape[0], n_atoms), 1.0 / n_atoms)
    for _ in range(n_iterations):  # EM for the mixing weights (Jiang and Zhang 2009)
        mix = np.einsum("gja,ga->gj", lik, weights)
        weights = weights * np.einsum("gja,gj->ga", lik, 1.0 / mix) / Z.shape[1]
    post = lik * weights[:, None, :]
    post /= post.sum(axis=2, keepdims=True)
    cumulative = np.cumsum(post, axis=2)
    cumulative[:, :, -1] = 1.0
    out = np.empty((n_draws, *Z.shape))
    for d in range(n_draws):
        u = rng.random(Z.shape)
        atom = (cumulative < u[:, :, None]).sum(axis=2)
        jitter = rng.random(Z.shape) - 0.5
        out[d] = lo[:, None] + step[:, None] * (atom + jitter)
    return out


class _RowsOf:
    """Stands in for a generator: each ``random((rows, genes))`` call draws the whole
    ``(n_rows, genes)`` array of a chunk and keeps the rows ``keep``, so a part of a chunk
    gets exactly the numbers it gets when the whole chunk is drawn."""

    def __init__(self, rng: np.random.Generator, n_rows: int, keep: slice) -> None:
        self.rng, self.n_rows, self.keep = rng, n_rows, keep

    def random(self, shape) -> np.ndarray:
        return self.rng.random((self.n_rows, *shape[1:]))[self.keep]


def de_ceiling(
    truth_z: np.ndarray,
    truth_fdr: np.ndarray,
    truth_delta: np.ndarray,
    noise_sd: np.ndarray,
    metrics: list[str],
    *,
    top_k: int,
    fdr: float,
    n_draws: int = DEFAULT_REPLICATES,
    rng: np.random.Generator,
    first: int = 0,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Expected DE metrics of a perfect model, per group (see :func:`posterior_effect_draws`).

    Parameters
    ----------
    truth_z, truth_fdr, truth_delta
        (n_groups, n_genes) observed Wilcoxon z-scores, their FDR and mean differences to
        the controls.
    noise_sd
        (n_groups,) :func:`own_noise_sd`.
    metrics
        Names among ``jaccard_top<k>``, ``jaccard_abs_top<k>``, ``overlap_top<k>``,
        ``direction_agreement``.
    rng
        The stream of draws of all ``total`` groups (not advanced here).
    first, total
        The given groups are numbers ``first`` .. ``first + n_groups - 1`` of ``total``
        (default: all of them). The groups are drawn for in chunks of a fixed size, in
        order; a group's draws depend only on its number, so any contiguous part of the
        groups gets the values it gets among all of them.

    Returns
    -------
    dict
        metric -> (n_groups,) mean over ``n_draws`` posterior draws.
    """
    Z = np.atleast_2d(np.asarray(truth_z, dtype=np.float64))
    n_groups, n_genes = Z.shape
    total = first + n_groups if total is None else int(total)
    functions = {
        f"jaccard_top{top_k}": lambda t, p, f, d: jaccard_top_k(t, p, top_k),
        f"jaccard_abs_top{top_k}": lambda t, p, f, d: jaccard_top_k(t, p, top_k, absolute=True),
        f"overlap_top{top_k}": lambda t, p, f, d: overlap_top_k(t, f, p, top_k, fdr=fdr),
        "direction_agreement": lambda t, p, f, d: direction_agreement(d, f, p, fdr=fdr),
    }
    unknown = [m for m in metrics if m not in functions]
    if unknown:
        raise ValueError(f"no DE ceiling rule for {', '.join(unknown)}")
    out = {m: np.full(n_groups, np.nan) for m in metrics}
    chunk = max(1, _GROUP_CHUNK * 2000 // max(n_genes, 1))  # bounds (groups x genes x atoms)
    # the chunks of all `total` groups that hold some of the given ones
    for lo in range(first - first % chunk, first + n_groups, chunk):
        hi = min(lo + chunk, total)
        a, b = max(lo, first), min(hi, first + n_groups)
        stream = copy.deepcopy(rng)
        stream.bit_generator.advance(2 * n_draws * lo * n_genes)  # the earlier chunks' draws
        rows = slice(a - first, b - first)
        draws = posterior_effect_draws(
            Z[rows],
            noise_sd[rows],
            n_draws=n_draws,
            rng=_RowsOf(stream, hi - lo, slice(a - lo, b - lo)),
        )
        for m in metrics:
            scores = [functions[m](Z[rows], d, truth_fdr[rows], truth_delta[rows]) for d in draws]
            out[m][rows] = _nanmean_rows(np.asarray(scores))
    return out
