"""Sources of predicted cells: the model, the calibration baselines and the ceiling.

A *source* yields, for every chunk of a block's groups, (predicted, observed) cell pairs
(:class:`~pertbench.metrics.aggregate.Cells`); the aggregate and score stages treat all
sources alike, so calibration is bookkeeping:

- :class:`PredictionSource`: the scored model's cells, read from the prediction file.
- :class:`BaselineSource`: an analytic baseline (``no_change``, ``perturbation_mean``,
  ``covariate_mean``), fitted once on the truth's training cells read chunk by chunk
  (:func:`fit_baselines`, ``PerturbationModel.fit_from_reader``) and asked to predict each
  chunk's groups from the block's control cells with ``PerturbationModel.predict``.
- :class:`CeilingSource`: the replicates of a :class:`CeilingEstimator`. A replicate is
  made of observed cells only: row indices into the truth (repeats allowed, e.g.
  bootstrap draws) taken as the "prediction" of each group, and optionally the rows it is
  scored against (default: the whole observed group). The estimator merges the scores
  of its replicates per metric (:meth:`CeilingEstimator.combine`: average, then a
  per-metric :meth:`~CeilingEstimator.correct` hook), or computes the block's ceiling
  itself (:meth:`CeilingEstimator.score_block`), or *folds* its replicates chunk by chunk
  (:attr:`CeilingEstimator.folds`: it makes them from each chunk's observed cells and
  keeps only the sums its rules need, so nothing accumulates per replicate).
- :class:`BootstrapCeiling` is the noise ceiling (the default): the validated rules of
  :mod:`pertbench.metrics.ceiling`, folded chunk by chunk
  (:class:`~pertbench.metrics.ceiling_fold.BlockCeiling`).
  :class:`SplitHalfCeiling` (one replicate: half A scored as the prediction of half B)
  is the ``replicate_agreement`` reference, never the ceiling.

Every random choice is derived from the evaluation seed and the identity of the cells
(the obs table), never from the order in which blocks are processed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.ondisk import RowReader
from pertbench.errors import ConfigError, EvaluationError, ModelError
from pertbench.metrics import calibration as cal
from pertbench.metrics.aggregate import Cells, Chunk
from pertbench.metrics.catalog import MetricSpec
from pertbench.metrics.ceiling import DEFAULT_REPLICATES, MIN_CELLS
from pertbench.metrics.distribution import subsample
from pertbench.metrics.plan import Block, EvaluationPlan

BASELINES = ("no_change", "perturbation_mean", "covariate_mean", "additive_within")
#: Baselines that only differ from the others on combinations (left out of ``True``,
#: "every baseline", when no evaluated group is a combination).
COMBINATION_BASELINES = ("additive_within",)
CEILING = "ceiling"
#: Split-half agreement of the observed cells: a reference, never the ceiling.
REPLICATE_AGREEMENT = "replicate_agreement"
#: Baselines whose prediction ignores the perturbation: one prediction per block serves
#: all its groups (their statistics are computed once per block).
PERTURBATION_FREE = frozenset({"no_change", "covariate_mean"})
#: Baselines predict from all evaluation controls unless that exceeds this many cells
#: (or the number of predicted cells, if larger).
BASELINE_CELL_BUDGET = 200_000


def _chunk_rows(codes: np.ndarray, groups: slice) -> np.ndarray:
    return (codes >= groups.start) & (codes < groups.stop)


class PredictionSource:
    """The scored model's predicted cells (read from the prediction AnnData or file)."""

    check_finite = True

    def __init__(self, name: str, reader: RowReader) -> None:
        self.name = name
        self.reader = reader

    def cells(self, chunk: Chunk) -> list[tuple[Cells, None]]:
        block = chunk.block
        inside = _chunk_rows(block.pred_codes, chunk.groups)
        X = self.reader.read(block.pred_rows[inside])
        return [(Cells(X, block.pred_codes[inside] - chunk.groups.start), None)]


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------
@dataclass
class BaselineSource:
    """A fitted analytic baseline predicting the evaluated groups of each block.

    ``controls[b]`` are positions (into ``block.control_rows``) of the control cells it
    predicts from and ``control_obs[b]`` their obs; ``can`` marks, per evaluated group,
    whether it can predict it.
    """

    name: str
    model: object
    keys: object
    genes: pd.Index
    can: np.ndarray
    requests: pd.DataFrame
    controls: dict[int, np.ndarray]
    control_obs: dict[int, pd.DataFrame]
    seed: int = 0
    _made: tuple[int, object] | None = field(default=None, repr=False)

    @property
    def shared(self) -> bool:
        return self.name in PERTURBATION_FREE

    def for_block(self, b: int) -> BaselineSource:
        """A copy holding only what block ``b`` needs (for shipping to a worker)."""
        return BaselineSource(
            self.name,
            self.model,
            self.keys,
            self.genes,
            self.can,
            self.requests,
            {b: self.controls[b]},
            {b: self.control_obs[b]},
            self.seed,
        )

    def generated_cells(self, block: Block) -> np.ndarray:
        """Cells this baseline generates per group of ``block`` (0 when shared)."""
        if self.shared:
            return np.zeros(block.n_groups, dtype=np.int64)
        return np.where(self.can[block.groups], self.controls[block.index].size, 0)

    def cells(self, chunk: Chunk) -> list[tuple[Cells, None]]:
        from pertbench.models.base import build_counterfactuals

        block = chunk.block
        targets = np.flatnonzero(self.can[block.groups[chunk.groups]])
        pos = self.controls[block.index]
        if targets.size == 0:
            empty = chunk.controls[:0]
            return [(Cells(empty, np.zeros(0, dtype=np.int64)), None)]
        if self.shared and self._made is not None and self._made[0] == block.index:
            X = self._made[1]  # the same prediction as for the block's previous chunks
            return [(Cells(X, np.zeros(X.shape[0], dtype=np.int64), shared=targets), None)]
        asked = targets[:1] if self.shared else targets
        ctrl = ad.AnnData(
            X=chunk.controls[pos],
            obs=self.control_obs[block.index],
            var=pd.DataFrame(index=self.genes),
        )
        requests = self.requests.iloc[block.groups[chunk.groups][asked]].reset_index(drop=True)
        cf = build_counterfactuals(ctrl, requests, self.keys)
        X = self.model.predict(cf, seed=self.seed).X
        if self.shared:
            self._made = (block.index, X)
            return [(Cells(X, np.zeros(X.shape[0], dtype=np.int64), shared=targets), None)]
        return [(Cells(X, np.repeat(targets, pos.size)), None)]  # rows come request by request


def fit_baselines(
    names: list[str],
    truth: ad.AnnData,
    plan: EvaluationPlan,
    *,
    seed: int,
    notes: list[str],
) -> list[BaselineSource]:
    """Fit the baselines on the truth's training cells, read in chunks (never all at once).

    A baseline that cannot be fitted or cannot predict any evaluated group is left out
    with a note; groups it cannot predict stay NaN (noted).
    """
    from pertbench.models.registry import create_model

    keys = plan.keys
    shell = ad.AnnData(obs=truth.obs, var=pd.DataFrame(index=plan.genes))
    reader = RowReader(truth.X, columns=plan.truth_columns)
    requests = plan.requests()
    labels = plan.group_labels()
    pred_counts = plan.pred_counts()
    out = []
    for name in names:
        model = create_model(name, keys=keys)
        try:
            model.fit_from_reader(shell, plan.split, reader, seed=seed)
        except ModelError as exc:
            notes.append(f"baseline {name} could not be fitted: {exc}")
            continue
        can = np.asarray(model.can_predict(requests[keys.perturbation_key].astype(str)), dtype=bool)
        if not can.any():
            notes.append(f"baseline {name} cannot predict any evaluated group")
            continue
        if not can.all():
            shown = [labels[g] for g in np.flatnonzero(~can)[:5]]
            notes.append(
                f"baseline {name} cannot predict {int((~can).sum())} group(s) (a perturbation "
                f"without training data), e.g. {', '.join(shown)}: left NaN"
            )
        controls = _baseline_controls(plan, can, pred_counts, seed=seed, notes=notes)
        obs = {b.index: truth.obs.iloc[b.control_rows[controls[b.index]]] for b in plan.blocks}
        out.append(
            BaselineSource(name, model, keys, plan.genes, can, requests, controls, obs, seed)
        )
    return out


def _baseline_controls(
    plan: EvaluationPlan, can: np.ndarray, pred_counts: np.ndarray, *, seed: int, notes
) -> dict[int, np.ndarray]:
    """Positions of the control cells a baseline predicts from, per block.

    Every group of a covariate gets the SAME control cells: the evaluator's own
    controls, so no_change is exactly the control profile. Only when that would make more
    predicted cells than max(predicted cells, BASELINE_CELL_BUDGET) are the controls
    subsampled (seeded) to the size of the largest predicted group. The draws depend on
    the obs table only, so every worker makes the same ones.
    """
    per_group = np.array([plan.control_rows[c].size for c in plan.cov_of_group[can]])
    budget = max(int(pred_counts.sum()), BASELINE_CELL_BUDGET)
    cap = None
    if per_group.sum() > budget:
        cap = int(max(pred_counts.max(), 1))
        notes.append(
            f"baselines were predicted from at most {cap} control cells per covariate "
            "combination (seeded subsample, the same for every group) to bound memory"
        )
    rng = np.random.default_rng([seed, 1])
    return {b: subsample(rows.size, cap, rng) for b, rows in enumerate(plan.control_rows)}


# ---------------------------------------------------------------------------------------
# Ceiling
# ---------------------------------------------------------------------------------------
@dataclass
class Replicate:
    """Observed cells standing in for a perfect prediction of a block's groups.

    ``pred_rows`` are truth rows (repeats allowed) and ``pred_codes`` their block-local
    group; ``truth_rows``/``truth_codes`` the cells they are scored against (``None``:
    the whole observed group, like a model).
    """

    pred_rows: np.ndarray
    pred_codes: np.ndarray
    truth_rows: np.ndarray | None = None
    truth_codes: np.ndarray | None = None


class CeilingEstimator:
    """How the ceiling is estimated: replicates of observed cells, merged per metric.

    :meth:`prepare` and :meth:`replicates` run where the evaluation is planned (they see
    obs only); :meth:`combine`, :meth:`correct` and :meth:`score_block` run where a block
    is scored (possibly a worker), so keep the state they need small.

    Two ways to turn replicates into a ceiling: by default each replicate is scored like a
    prediction and :meth:`combine` merges the values of each metric; an estimator with
    its own rules (e.g. corrections computed on profiles rather than on scores) overrides
    :meth:`score_block`, which receives every replicate's statistics for the block.
    """

    name = CEILING
    #: True for an estimator that makes its replicates chunk by chunk itself
    #: (:meth:`start_block`) instead of listing them (:meth:`replicates`).
    folds = False

    @property
    def scores_itself(self) -> bool:
        """True when the estimator overrides :meth:`score_block`."""
        return type(self).score_block is not CeilingEstimator.score_block

    def score_block(self, view):
        """The ceiling's values for one block from a
        :class:`~pertbench.metrics.score.CeilingView` (returns a ``SourceScores``)."""
        raise NotImplementedError

    def prepare(self, plan: EvaluationPlan, *, seed: int) -> list[str]:
        """Look at the plan once before any block; return notes."""
        return []

    def describe(self, specs: list[MetricSpec]) -> list[str]:
        """Notes about the selected metrics (e.g. those it has no rule for)."""
        return []

    def replicates(self, block: Block) -> list[Replicate]:
        raise NotImplementedError

    def start_block(self, block: Block, settings):
        """A folding estimator's accumulator for one block: ``fold(chunk_view)`` per chunk,
        then ``finish(ceiling_view)`` returns the block's ``SourceScores``."""
        raise NotImplementedError

    def generated_cells(self, block: Block) -> np.ndarray:
        """Replicate cells a folding estimator holds at once per group (bounds chunks)."""
        return np.zeros(block.n_groups, dtype=np.int64)

    def block_identity(self, block: Block) -> tuple | None:
        """Everything besides the observed cells and the evaluation settings that this
        estimator's scores of ``block`` depend on, or ``None`` when they may depend on
        more (then they are never reused, see :class:`ReferenceCache`)."""
        return None

    def correct(self, spec: MetricSpec, value: np.ndarray) -> np.ndarray:
        """Per-metric correction of the averaged replicate scores (identity here)."""
        return value

    def combine(self, spec: MetricSpec, values: list) -> np.ndarray:
        """Merge the replicates' values of one metric: average, then :meth:`correct`."""
        stacked = np.asarray(values, dtype=np.float64)
        mean = stacked[0] if len(values) == 1 else stacked.mean(axis=0)
        return self.correct(spec, mean)


class SplitHalfCeiling(CeilingEstimator):
    """Split-half agreement: a random half of each group's observed cells (floor(n/2)) is
    scored as the prediction of the other half. Groups with fewer than 2 cells get NaN
    (noted).

    How two half-size replicates of the experiment agree: the evaluator's
    ``replicate_agreement`` reference (its default ``name``), not a ceiling (a half has
    twice the noise of the whole group and the other half adds its own).
    """

    def __init__(self, name: str = REPLICATE_AGREEMENT) -> None:
        self.name = name
        self._halves: tuple[np.ndarray, np.ndarray] | None = None

    def prepare(self, plan: EvaluationPlan, *, seed: int) -> list[str]:
        # one random key per evaluated cell, drawn over the whole truth in row order, so
        # a group's halves depend on the seed and the obs table only
        self._halves = cal.split_halves(plan.truth_codes, plan.n_groups, seed=seed)
        too_small = int((plan.truth_counts() < 2).sum())
        if too_small:
            what = "replicate agreement" if self.name == REPLICATE_AGREEMENT else self.name
            return [
                f"{what} is undefined (NaN) for {too_small} group(s) with fewer than 2 "
                "observed cells (they cannot be split in halves)"
            ]
        return []

    def replicates(self, block: Block) -> list[Replicate]:
        half_a, half_b = self._halves
        first = int(block.groups[0])
        a = half_a[block.truth_rows]
        b = half_b[block.truth_rows]
        in_a, in_b = a >= 0, b >= 0
        return [
            Replicate(
                pred_rows=block.truth_rows[in_a],
                pred_codes=a[in_a] - first,
                truth_rows=block.truth_rows[in_b],
                truth_codes=b[in_b] - first,
            )
        ]

    def __getstate__(self) -> dict:
        # workers only combine; the halves travel as replicates
        return {"name": self.name, "_halves": None}


class BootstrapCeiling(CeilingEstimator):
    """The noise ceiling: the expected score of a perfect model (rules and validation in
    :mod:`pertbench.metrics.ceiling`), from ``n_replicates`` bootstrap replicates of each
    group (and replicates of those) and as many posterior draws of its DE effects.

    It folds: each chunk's replicates are drawn from the chunk's observed cells, measured
    and reduced to the sums of the rules at once
    (:class:`~pertbench.metrics.ceiling_fold.BlockCeiling`), so a block holds at most two
    replicates of a chunk at a time. Every draw is read from one seeded stream per kind at
    the position of the group it is for (:func:`~pertbench.metrics.ceiling.stream_at`):
    the replicates of replicate ``r`` of all groups come one after the other, group by
    group, so a group's draws do not depend on how the groups are cut into blocks and
    chunks, nor on the order in which those are processed.

    Parameters
    ----------
    n_replicates
        Bootstrap replicates per group (and posterior draws of the DE effects).
    """

    folds = True
    uses_detection = True  # the unseen-gene correction's prior (ceiling_corrections)

    def __init__(self, n_replicates: int = DEFAULT_REPLICATES) -> None:
        if int(n_replicates) < 1:
            raise ConfigError(f"ceiling_replicates must be at least 1, got {n_replicates}")
        self.n_replicates = int(n_replicates)
        self.seed = 0
        self._layout: dict[str, np.ndarray | int] | None = None

    def prepare(self, plan: EvaluationPlan, *, seed: int) -> list[str]:
        self.seed = int(seed)
        counts = plan.truth_counts()
        eligible = counts >= MIN_CELLS
        drawn = np.where(eligible, counts, 0)
        # where each group's draws start in a replicate's run of draws, and its rank
        # among the groups with a ceiling (the order of the DE posterior draws)
        self._layout = {
            "offset": np.concatenate([[0], np.cumsum(drawn)[:-1]]).astype(np.int64),
            "n_drawn": int(drawn.sum()),
            "usable_index": np.where(eligible, np.cumsum(eligible) - 1, -1).astype(np.int64),
            "n_usable": int(eligible.sum()),
        }
        few = int(((counts > 0) & (counts < MIN_CELLS)).sum())
        if few:
            return [
                f"the ceiling is undefined (NaN) for {few} group(s) with fewer than "
                f"{MIN_CELLS} observed cells (one cell says nothing about its sampling noise)"
            ]
        return []

    def describe(self, specs: list[MetricSpec]) -> list[str]:
        from pertbench.metrics.ceiling_fold import without_rule

        missing = without_rule(specs)
        if missing:
            return [
                f"the ceiling has no rule for {', '.join(missing[:10])}"
                + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                + ": left NaN (no normalised score)"
            ]
        return []

    def replicates(self, block: Block) -> list[Replicate]:
        return []  # made chunk by chunk (start_block)

    def start_block(self, block: Block, settings):
        from pertbench.metrics.ceiling_fold import BlockCeiling

        if self._layout is None:
            raise EvaluationError("BootstrapCeiling.prepare(plan, seed=...) must run first")
        at = block.groups
        return BlockCeiling(
            block,
            settings,
            n_replicates=self.n_replicates,
            seed=self.seed,
            offset=self._layout["offset"][at],
            n_drawn=self._layout["n_drawn"],
            usable_index=self._layout["usable_index"][at],
            n_usable=self._layout["n_usable"],
        )

    def generated_cells(self, block: Block) -> np.ndarray:
        counts = block.truth_counts()
        return np.where(counts >= MIN_CELLS, 2 * counts, 0)  # a replicate and its inner one

    def block_identity(self, block: Block) -> tuple | None:
        # the draws of a block's groups are read at their positions in the plan's streams
        if self._layout is None:
            return None
        at = block.groups
        layout = self._layout
        return (
            type(self).__qualname__,
            self.n_replicates,
            self.seed,
            _digest(layout["offset"][at], layout["usable_index"][at]),
            int(layout["n_drawn"]),
            int(layout["n_usable"]),
        )


# ---------------------------------------------------------------------------------------
# Reuse across evaluations
# ---------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    """A digest of arrays (values, dtype and shape) and sparse matrices (their structure)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=20)
    for part in parts:
        if sp.issparse(part):
            part = sp.csr_matrix(part)
            digest.update(f"csr{part.shape}{part.dtype}".encode())
            for array in (part.data, part.indices, part.indptr):
                digest.update(np.ascontiguousarray(array).tobytes())
        else:
            array = np.ascontiguousarray(part)
            digest.update(f"{array.shape}{array.dtype}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


class ReferenceCache:
    """Block scores of references made of observed cells only, kept across evaluations.

    A benchmark scores every model of a (dataset, task, scenario, seed) against the same
    observed cells with the same seed, and the noise ceiling of a block is made of those
    cells alone: it is the same for every model. Evaluations that opt in
    (``Evaluator(reuse_references=True)``) compute it once per process and reuse it.

    A block's scores are reused only when everything they are computed from is the
    same: the estimator's own identity for the block
    (:meth:`CeilingEstimator.block_identity`: its draws; an estimator without one is
    never reused), every evaluation setting, the block's groups, observed cells and
    controls, how it is cut into chunks, and a digest of the observed values themselves.
    Only an in-memory truth is reused (reading an on-disk block a second time to digest
    it would cost what it saves).
    """

    def __init__(self, size: int = 64) -> None:
        self.size = int(size)
        self._entries: dict[tuple, Any] = {}

    def key(
        self, source: Any, block: Block, settings: Any, truth: RowReader, chunks
    ) -> tuple | None:
        """The identity of ``source``'s scores of ``block``; ``None``: not reusable."""
        import dataclasses

        estimator = getattr(source, "estimator", None)
        identity = None if estimator is None else estimator.block_identity(block)
        if identity is None or truth.on_disk:
            return None
        options = tuple(
            (f.name, tuple(s.name for s in settings.specs) if f.name == "specs" else repr(value))
            for f in dataclasses.fields(settings)
            for value in [getattr(settings, f.name)]
        )
        observed = np.concatenate([block.truth_rows, block.control_rows])
        return (
            source.name,
            identity,
            options,
            tuple((c.start, c.stop) for c in chunks),
            _digest(block.groups, block.truth_rows, block.truth_codes, block.control_rows),
            _digest(truth.read(observed)),
        )

    def get(self, key: tuple | None) -> Any:
        """A copy of the scores stored under ``key`` (``None`` when absent)."""
        import copy

        hit = None if key is None else self._entries.get(key)
        return None if hit is None else copy.deepcopy(hit)

    def put(self, key: tuple | None, scores: Any) -> None:
        import copy

        if key is None:
            return
        self._entries[key] = copy.deepcopy(scores)
        while len(self._entries) > self.size:
            self._entries.pop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()


#: The reference scores of this process (evaluations with ``reuse_references=True``).
REFERENCE_CACHE = ReferenceCache()


class CeilingSource:
    """The replicates of a ceiling estimator for one or more blocks, as a source.

    A folding estimator's replicates are made in :meth:`fold`, chunk by chunk, into one
    accumulator per block; :meth:`finish` turns it into the block's scores.
    """

    def __init__(self, estimator: CeilingEstimator, replicates: dict[int, list[Replicate]]):
        self.estimator = estimator
        self.name = estimator.name
        self.replicates = replicates
        self._folded: dict[int, Any] = {}

    @property
    def folds(self) -> bool:
        return bool(self.estimator.folds)

    def for_block(self, b: int) -> CeilingSource:
        return CeilingSource(self.estimator, {b: self.replicates.get(b, [])})

    @property
    def wants_detection(self) -> bool:
        """Whether the estimator reads each block's detection rates
        (:attr:`~pertbench.metrics.aggregate.ChunkView.detection`)."""
        return self.folds and bool(getattr(self.estimator, "uses_detection", False))

    def fold(self, view) -> None:
        """Fold one chunk (a :class:`~pertbench.metrics.aggregate.ChunkView`)."""
        block = view.chunk.block
        if block.index not in self._folded:
            self._folded[block.index] = self.estimator.start_block(block, view.settings)
        self._folded[block.index].fold(view)

    def finish(self, view):
        """The folded block's scores (``view``: its
        :class:`~pertbench.metrics.score.CeilingView`); the accumulator is dropped."""
        block = view.block
        folded = self._folded.pop(block.index, None)
        if folded is None:  # a block without chunks: nothing was observed
            folded = self.estimator.start_block(block, view.settings)
        return folded.finish(view)

    def cells(self, chunk: Chunk) -> list[tuple[Cells, Cells | None]]:
        lo = chunk.groups.start
        out = []
        for rep in self.replicates[chunk.block.index]:
            inside = _chunk_rows(rep.pred_codes, chunk.groups)
            pred = chunk.truth_cells(rep.pred_rows[inside], rep.pred_codes[inside] - lo)
            truth = None
            if rep.truth_rows is not None:
                keep = _chunk_rows(rep.truth_codes, chunk.groups)
                truth = chunk.truth_cells(rep.truth_rows[keep], rep.truth_codes[keep] - lo)
            out.append((pred, truth))
        return out

    def generated_cells(self, block: Block) -> np.ndarray:
        if self.folds:
            return np.asarray(self.estimator.generated_cells(block), dtype=np.int64)
        reps = self.replicates[block.index]
        total = np.zeros(block.n_groups, dtype=np.int64)
        for rep in reps:
            total += np.bincount(rep.pred_codes, minlength=block.n_groups)
            if rep.truth_codes is not None:
                total += np.bincount(rep.truth_codes, minlength=block.n_groups)
        return total
