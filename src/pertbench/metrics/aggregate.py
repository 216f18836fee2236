"""Stage 2 of the evaluator: the statistics of every side of a covariate block.

For one :class:`~pertbench.metrics.plan.Block` the observed cells are read once, in
chunks of groups of bounded size (:meth:`Block.chunks`), together with the block's
control cells (read once per block). From each chunk come, for the observed truth and
for every *source* of predicted cells (the model, each baseline, each ceiling
replicate), the same statistics per group: mean, variance, cell count, Wilcoxon z and
FDR against the observed controls, and the values of the metrics that need cells
(in the block's PCA space). They are collected in :class:`SideStats` (one row per group
of the block); the scoring stage (:mod:`pertbench.metrics.score`) works on nothing else.

A source is any object with ``name`` and ``cells(chunk) -> list of (pred, truth)``
:class:`Cells` pairs (``truth`` ``None`` = the observed cells): predictions of a model,
of a baseline and a ceiling replicate are the same kind of object here. A source that
*folds* (``folds`` true, e.g. the bootstrap noise ceiling with its many replicates)
instead gets every chunk through ``fold(view)`` (a :class:`ChunkView`: the chunk, the
observed statistics of its groups, and how to measure more cells like any side) and
keeps only the summaries it needs, so its replicates never accumulate per block.

Every statistic of a group depends only on that group's cells (and the controls), never
on the other groups of the chunk (see :func:`~pertbench.metrics.aggregations.group_stats`
and :func:`~pertbench.metrics.de.wilcoxon_scores`), so the chunking does not change a bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.ondisk import RowReader
from pertbench.errors import DataValidationError, EvaluationError
from pertbench.metrics.aggregations import aggregate, group_stats
from pertbench.metrics.catalog import MetricSpec
from pertbench.metrics.de import wilcoxon_scores
from pertbench.metrics.distribution import pca_basis, pca_rows, project, subsample
from pertbench.metrics.plan import Block

#: Cells x genes (observed, predicted and generated together) of one chunk of a block's
#: groups held in memory at once: 20 million = 10,000 cells of 2,000 genes.
DEFAULT_CHUNK_ELEMENTS = 20_000_000


@dataclass
class BlockSettings:
    """What every block needs to know about the evaluation (the same in every worker)."""

    specs: list[MetricSpec]
    top_k: int = 100
    fdr: float = 0.05
    n_pcs: int = 30
    max_cells: int | None = 2000
    seed: int = 0
    tie_correct: bool = True
    n_jobs: int = 1
    keep_aggregates: bool = False
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    @property
    def need_de(self) -> bool:
        return any(s.needs == "de" or s.aggregation == "logp" for s in self.specs)

    @property
    def cell_specs(self) -> list[MetricSpec]:
        return [s for s in self.specs if s.needs == "cells"]

    @property
    def need_all_groups(self) -> bool:
        return any(s.all_groups for s in self.specs)


@dataclass
class Cells:
    """One side of a chunk of groups: a matrix and the chunk-local group of each row.

    ``shared`` marks a prediction that is the same for several groups (a baseline that
    ignores the perturbation): its rows belong to every group listed there, and its
    statistics are computed once.
    """

    X: Any
    codes: np.ndarray
    shared: np.ndarray | None = None

    def positions(self, n_groups: int) -> list[np.ndarray]:
        """Row positions of each chunk group (ascending)."""
        if self.shared is not None:
            out = [np.zeros(0, dtype=np.int64)] * n_groups
            every = np.arange(self.X.shape[0])
            for g in self.shared:
                out[int(g)] = every
            return out
        order = np.argsort(self.codes, kind="stable")
        bounds = np.searchsorted(self.codes[order], np.arange(n_groups + 1))
        return [order[bounds[g] : bounds[g + 1]] for g in range(n_groups)]


@dataclass
class SideStats:
    """Per-group statistics of one side (observed or predicted) of a block."""

    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    z: np.ndarray | None = None
    fdr: np.ndarray | None = None
    cell_values: dict[str, np.ndarray] = field(default_factory=dict)
    single: int = 0  # groups with fewer than 2 cells on a side of a cell metric

    @classmethod
    def empty(cls, n_groups: int, n_genes: int, *, de: bool, cell_names=()) -> SideStats:
        return cls(
            mean=np.full((n_groups, n_genes), np.nan),
            var=np.full((n_groups, n_genes), np.nan),
            n=np.zeros(n_groups, dtype=np.int64),
            z=np.zeros((n_groups, n_genes)) if de else None,
            fdr=np.ones((n_groups, n_genes)) if de else None,
            cell_values={name: np.full(n_groups, np.nan) for name in cell_names},
        )

    @property
    def present(self) -> np.ndarray:
        return self.n > 0


def profile(side: SideStats, rows: np.ndarray, control_mean: np.ndarray, aggregation: str):
    """One aggregation (``average``, ``delta``, ...) of a side's groups ``rows``:
    (len(rows), genes), against the block's control mean."""
    return aggregate(
        side.mean[rows],
        side.var[rows],
        control_mean[None, :],
        aggregations=(aggregation,),
        de_scores=None if side.z is None else side.z[rows],
    )[aggregation]


@dataclass
class Chunk:
    """What a source sees of one chunk of a block's groups."""

    block: Block
    groups: slice  # block-local group range
    truth: Cells  # observed cells of these groups
    truth_rows: np.ndarray  # their rows in the truth file (ascending)
    controls: Any  # the block's control cells (matrix, rows = block.control_rows)

    @property
    def n_groups(self) -> int:
        return self.groups.stop - self.groups.start

    def truth_cells(self, rows: np.ndarray, codes: np.ndarray) -> Cells:
        """Cells made of given truth rows (repeats allowed) with chunk-local codes."""
        at = np.searchsorted(self.truth_rows, rows)
        if at.size and (at.max() >= self.truth_rows.size or (self.truth_rows[at] != rows).any()):
            raise EvaluationError("replicate rows must be observed cells of the chunk's groups")
        return Cells(self.truth.X[at], np.asarray(codes, dtype=np.int64))


@dataclass
class ChunkView:
    """What a folding source sees of one chunk (rows of every side: the chunk's groups).

    ``truth`` holds the observed statistics of the chunk's groups; :meth:`measure` gives
    any other cells of these groups the same statistics as every side (Wilcoxon tests
    against the block's controls only with ``de``), :meth:`profile` their aggregations.
    """

    chunk: Chunk
    truth: SideStats
    control_mean: np.ndarray
    reference: Any  # the block's controls, as the Wilcoxon tests take them
    settings: BlockSettings
    #: (n_genes,) detection rate of each gene over the block's cells, when a source asks
    #: for it (``wants_detection``; :func:`block_detection`)
    detection: np.ndarray | None = None

    def measure(self, cells: Cells, *, de: bool) -> SideStats:
        parts = _measure(
            cells.X, cells.codes, self.chunk.n_groups, self.reference, self.settings, de=de
        )
        return SideStats(*parts)

    def profile(self, side: SideStats, rows: np.ndarray, aggregation: str) -> np.ndarray:
        return profile(side, rows, self.control_mean, aggregation)


@dataclass
class AllGroups:
    """Observed aggregates of every group of a covariate block, whatever its split.

    ``table`` has the perturbation column, ``split``, ``n_cells`` and ``evaluated`` (the
    block-local index of the evaluated group these cells are, else -1); ``mean`` and
    ``var`` have one row per table row. Controls are included (per split).
    """

    table: pd.DataFrame
    mean: np.ndarray
    var: np.ndarray


@dataclass
class BlockStats:
    """Everything the scoring stage needs about one block."""

    block: Block
    control_mean: np.ndarray  # (n_genes,)
    truth: SideStats
    sides: dict[str, list[tuple[SideStats, SideStats | None]]]
    all_groups: AllGroups | None = None


def check_finite(X, what: str, labels=None, codes: np.ndarray | None = None) -> None:
    """Refuse NaN/inf in cells used for evaluation (naming the groups of predictions)."""
    if sp.issparse(X):
        data = sp.csr_matrix(X)
        finite = np.isfinite(data.data)
        if finite.all():
            return
        bad_rows = np.unique(np.repeat(np.arange(data.shape[0]), np.diff(data.indptr))[~finite])
    else:
        ok = np.isfinite(np.asarray(X)).all(axis=1)
        if ok.all():
            return
        bad_rows = np.flatnonzero(~ok)
    if what == "truth":
        raise DataValidationError(
            f"truth contains NaN or inf in {bad_rows.size} cell(s) used for evaluation; "
            "clean the observed data first"
        )
    bad = np.unique(codes[bad_rows])
    shown = [labels[g] for g in bad[:5]]
    raise EvaluationError(
        f"predictions contain NaN or inf in {bad.size} group(s), e.g. {', '.join(shown)}; "
        "fix the model output before evaluating"
    )


def measure(
    cells: Cells, n_groups: int, reference, settings: BlockSettings, cache: dict | None = None
) -> tuple[np.ndarray, ...]:
    """Mean, variance, count (and z, FDR against ``reference``) of each chunk group.

    A shared prediction is measured once: ``cache`` keeps its statistics for the next
    chunks that bring the same matrix.
    """
    if cells.shared is None:
        return _measure(cells.X, cells.codes, n_groups, reference, settings)
    # one prediction for several groups: its statistics are computed once
    cache = {} if cache is None else cache
    if id(cells.X) not in cache:
        one = np.zeros(cells.X.shape[0], dtype=np.int64)
        cache[id(cells.X)] = (cells.X, _measure(cells.X, one, 1, reference, settings))
    mean1, var1, n1, z1, fdr1 = cache[id(cells.X)][1]
    shape = (n_groups, mean1.shape[1])
    mean, var = np.full(shape, np.nan), np.full(shape, np.nan)
    n = np.zeros(n_groups, dtype=np.int64)
    mean[cells.shared], var[cells.shared], n[cells.shared] = mean1[0], var1[0], n1[0]
    z = fdr = None
    if z1 is not None:
        z, fdr = np.zeros(shape), np.ones(shape)
        z[cells.shared], fdr[cells.shared] = z1[0], fdr1[0]
    return mean, var, n, z, fdr


def _measure(X, codes, n_groups, reference, settings: BlockSettings, *, de: bool | None = None):
    mean, var, n = group_stats(X, codes, n_groups)
    z = fdr = None
    need_de = settings.need_de if de is None else de
    if need_de and (codes >= 0).any():
        res = wilcoxon_scores(
            X,
            codes,
            reference,
            n_groups=n_groups,
            tie_correct=settings.tie_correct,
            n_jobs=settings.n_jobs,
        )
        z, fdr = res.scores, res.pvals_adj
    elif need_de:
        z, fdr = np.zeros_like(mean), np.ones_like(mean)
    return mean, var, n, z, fdr


def _store(side: SideStats, groups: slice, parts) -> None:
    mean, var, n, z, fdr = parts
    side.mean[groups], side.var[groups], side.n[groups] = mean, var, n
    if side.z is not None:
        side.z[groups], side.fdr[groups] = z, fdr


def block_pca(block: Block, truth: RowReader, settings: BlockSettings):
    """The block's PCA basis, fitted on its observed controls and evaluated cells."""
    rows = np.sort(np.concatenate([block.control_rows, block.truth_rows]))
    sample = rows[pca_rows(rows.size, seed=settings.seed)]
    return pca_basis(truth.read(sample), n_pcs=settings.n_pcs, seed=settings.seed)


def _cell_metrics(
    side: SideStats,
    pred: Cells,
    truth: Cells,
    chunk: Chunk,
    pca,
    settings: BlockSettings,
) -> None:
    specs = settings.cell_specs
    n = chunk.n_groups
    p_pos, t_pos = pred.positions(n), truth.positions(n)
    mean, comps = pca
    for g in range(n):
        if p_pos[g].size == 0 or t_pos[g].size == 0:
            continue
        group = int(chunk.block.groups[chunk.groups.start + g])
        rng = np.random.default_rng([settings.seed, group])
        tr = t_pos[g][subsample(t_pos[g].size, settings.max_cells, rng)]
        pr = p_pos[g][subsample(p_pos[g].size, settings.max_cells, rng)]
        T = project(truth.X[tr], mean, comps)
        P = project(pred.X[pr], mean, comps)
        side.single += int(tr.size < 2 or pr.size < 2)
        for spec in specs:
            side.cell_values[spec.name][chunk.groups.start + g] = spec.compute(P, T)


def block_detection(block: Block, truth: RowReader, controls, max_cells: int, extra_cells):
    """(n_genes,) share of the block's cells (controls and every group) detecting each
    gene, read chunk by chunk like the block itself: it does not depend on chunking."""
    detected = np.asarray((controls != 0).sum(axis=0)).ravel().astype(np.float64)
    for groups in block.chunks(max_cells, extra_cells):
        inside = (block.truth_codes >= groups.start) & (block.truth_codes < groups.stop)
        detected += np.asarray((truth.read(block.truth_rows[inside]) != 0).sum(axis=0)).ravel()
    return detected / max(controls.shape[0] + block.truth_rows.size, 1)


def aggregate_block(
    block: Block,
    truth: RowReader,
    sources: list[Any],
    settings: BlockSettings,
    *,
    labels: list[str] | None = None,
    extra_cells: np.ndarray | None = None,
    all_groups: tuple[pd.DataFrame, np.ndarray, np.ndarray] | None = None,
) -> BlockStats:
    """Read a block chunk by chunk and compute the statistics of every side.

    Parameters
    ----------
    block
        The block (its groups, rows and controls).
    truth
        Reader of the observed cells (evaluated genes).
    sources
        Prediction sources (model first); each yields (pred, truth) :class:`Cells` pairs
        per chunk.
    labels
        Group labels (for error messages), indexed by global group.
    extra_cells
        Cells per block group that sources generate (bounds the chunk size).
    all_groups
        ``EvaluationPlan.all_groups(block)`` when a metric needs them (their aggregates
        are then computed, streamed, in :attr:`BlockStats.all_groups`).
    """
    n_genes = truth.shape[1]
    de = settings.need_de
    cell_names = [s.name for s in settings.cell_specs]
    controls = truth.read(block.control_rows)
    check_finite(controls, "truth")
    control_mean = group_stats(controls, np.zeros(controls.shape[0], dtype=np.int64), 1)[0][0]
    reference = sp.csc_matrix(controls) if sp.issparse(controls) else controls
    pca = block_pca(block, truth, settings) if cell_names else None
    G = block.n_groups
    truth_side = SideStats.empty(G, n_genes, de=de)
    sides: dict[str, list[tuple[SideStats, SideStats | None]]] = {}
    max_cells = max(1, int(settings.chunk_elements) // max(n_genes, 1))
    shared: dict = {}  # statistics of predictions shared by all groups, per matrix
    detection = None
    if any(getattr(s, "wants_detection", False) for s in sources):
        detection = block_detection(block, truth, controls, max_cells, extra_cells)
    for groups in block.chunks(max_cells, extra_cells):
        inside = (block.truth_codes >= groups.start) & (block.truth_codes < groups.stop)
        rows = block.truth_rows[inside]
        observed = Cells(truth.read(rows), block.truth_codes[inside] - groups.start)
        check_finite(observed.X, "truth")
        chunk = Chunk(block, groups, observed, rows, controls)
        n = chunk.n_groups
        parts = measure(observed, n, reference, settings)
        _store(truth_side, groups, parts)
        view = ChunkView(chunk, SideStats(*parts), control_mean, reference, settings, detection)
        for source in sources:
            if getattr(source, "folds", False):
                source.fold(view)
                continue
            pairs = source.cells(chunk)
            slots = sides.setdefault(source.name, [])
            for r, (pred, alt_truth) in enumerate(pairs):
                if len(slots) <= r:
                    slots.append(
                        (
                            SideStats.empty(G, n_genes, de=de, cell_names=cell_names),
                            None if alt_truth is None else SideStats.empty(G, n_genes, de=de),
                        )
                    )
                pred_side, truth_alt_side = slots[r]
                if getattr(source, "check_finite", False):
                    codes = block.groups[groups.start + pred.codes]
                    check_finite(pred.X, "predictions", labels, codes)
                _store(pred_side, groups, measure(pred, n, reference, settings, shared))
                if alt_truth is not None:
                    _store(truth_alt_side, groups, measure(alt_truth, n, reference, settings))
                if cell_names:
                    _cell_metrics(
                        pred_side,
                        pred,
                        observed if alt_truth is None else alt_truth,
                        chunk,
                        pca,
                        settings,
                    )
            del pairs
        del observed, chunk, view
    every = None
    if all_groups is not None:
        table, rows, codes = all_groups
        mean, var, _ = group_stats(truth.subset(rows), codes, len(table))
        every = AllGroups(table=table, mean=mean, var=var)
    return BlockStats(block, control_mean, truth_side, sides, all_groups=every)
