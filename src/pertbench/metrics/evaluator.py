"""The Evaluator: score any model's predictions against observed cells.

``Evaluator(truth, pred, ...).run()`` computes, for every (covariates, perturbation)
group present in both, the selected metrics (see :mod:`pertbench.metrics.catalog`),
their means over groups with bootstrap 95% intervals, and optionally the calibration
references: the three analytic baselines fitted on the training split, the noise ceiling
(the expected score of a perfect model, :mod:`pertbench.metrics.ceiling`), the split-half
replicate agreement and normalised scores.

The work is done in stages, one module each:

1. plan (:mod:`~pertbench.metrics.plan`): align genes, index the evaluated groups and
   cut them into covariate blocks (obs and var only);
2. aggregate (:mod:`~pertbench.metrics.aggregate`): per block, read the observed,
   predicted and reference cells chunk by chunk and compute the statistics of every
   side once (means, variances, counts, DE tests, cell-level metrics);
3. score (:mod:`~pertbench.metrics.score`): every metric spec as a function of those
   statistics, N x N distances shared by the rank metrics;
4. calibrate and write (:mod:`~pertbench.metrics.results`): merge the blocks, bootstrap
   intervals, normalised scores, tables and files.

Given .h5ad paths, both files are opened backed (on disk) and only one chunk of a block
is in memory at a time, so memory depends on the largest block, not on the number of
cells; AnnData objects in memory work the same way. ``backend="ray"`` scores the blocks
as Ray tasks that each read the files themselves; the tables are identical.
"""

from __future__ import annotations

import os
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.keys import PerturbationKeys
from pertbench.data.ondisk import OnDiskData, RowReader, open_h5ad
from pertbench.data.splits import SPLIT_NAMES
from pertbench.errors import ConfigError, EvaluationError
from pertbench.metrics.aggregate import DEFAULT_CHUNK_ELEMENTS, BlockSettings, aggregate_block
from pertbench.metrics.catalog import resolve_metrics
from pertbench.metrics.ceiling import DEFAULT_REPLICATES
from pertbench.metrics.distribution import DEFAULT_MAX_CELLS, DEFAULT_N_PCS
from pertbench.metrics.plan import Block, EvaluationPlan, build_plan, read_split_for
from pertbench.metrics.references import (
    BASELINE_CELL_BUDGET,
    BASELINES,
    CEILING,
    COMBINATION_BASELINES,
    REFERENCE_CACHE,
    REPLICATE_AGREEMENT,
    BootstrapCeiling,
    CeilingEstimator,
    CeilingSource,
    PredictionSource,
    SplitHalfCeiling,
    fit_baselines,
)
from pertbench.metrics.results import (
    CALIBRATION_FILE,
    INFO_FILE,
    NORMALIZED,
    PER_COVARIATE_FILE,
    PER_GROUP_FILE,
    SUMMARY_FILE,
    EvaluationResult,
    MergedScores,
    assemble,
    merge_blocks,
)
from pertbench.metrics.score import SourceScores, score_block

__all__ = [
    "BASELINES",
    "BASELINE_CELL_BUDGET",
    "CALIBRATION_FILE",
    "CEILING",
    "INFO_FILE",
    "NORMALIZED",
    "PER_COVARIATE_FILE",
    "PER_GROUP_FILE",
    "REPLICATE_AGREEMENT",
    "SUMMARY_FILE",
    "EvaluationResult",
    "Evaluator",
    "evaluate",
]

BACKENDS = ("local", "ray")


class Evaluator:
    """Score predicted cells against observed cells.

    Parameters
    ----------
    truth
        Observed cells (AnnData, backed AnnData or .h5ad path): log-normalised ``X``,
        obs with the perturbation and covariate keys, control cells. May be the whole
        dataset. A path is opened on disk and read block by block.
    pred
        Predicted cells (AnnData or path) with the same obs keys; any number of rows per
        group. Genes matched by name.
    keys
        Obs columns of perturbation and covariates.
    metrics
        A selection (see :mod:`pertbench.metrics.catalog`): a profile (``"default"``:
        fit + rank + DE; ``"all"``), families or metric names, comma-separated or a list.
    profile
        A named metric profile (``default``, ``all`` or one registered with
        :func:`~pertbench.metrics.catalog.register_profile`); with ``metrics`` the two
        selections are combined.
    split
        Split Series (indexed by truth obs names) or CSV path: restricts the observed
        cells to ``on`` and is needed for the ``perturbation_mean`` and
        ``covariate_mean`` baselines (trained on its ``train`` cells).
    on
        Which split holds the evaluated groups (``test`` by default).
    baselines
        ``True`` for every baseline of :data:`BASELINES` (``additive_within`` only when
        combinations are evaluated), a list of names, or ``False``.
    ceiling
        Also estimate the noise ceiling: the expected score of a perfect model (one
        predicting each group's population profile) against the observed cells; ``True``
        for :class:`~pertbench.metrics.references.BootstrapCeiling` (the rules of
        :mod:`pertbench.metrics.ceiling`), or any
        :class:`~pertbench.metrics.references.CeilingEstimator`.
    ceiling_replicates
        Bootstrap replicates (and posterior draws) per group for the ceiling.
    replicate_agreement
        Also score one random half of each group's observed cells against the other
        half (reference ``replicate_agreement``: how two half-size replicates of the
        experiment agree; not a ceiling and not used for normalised scores).
    skip_missing
        Skip (and report) groups missing on one side instead of failing.
    seed
        Seeds every random choice (bootstrap, subsampling, ceiling replicates, halves).
    top_k, fdr
        DE metric settings: top-k genes and the significance level.
    n_pcs, max_cells
        Distribution metrics: PCA dimensions and the per-side cell cap.
    n_bootstrap
        Bootstrap resamples for the 95% intervals (0 disables them).
    tie_correct
        Tie correction of the Wilcoxon test.
    genes
        Restrict the evaluation to these genes (default: all genes of ``truth``).
    normalize_by
        Baseline of the normalised score.
    model_name
        Name of the scored model in tables with several models.
    keep_aggregates
        Keep the pred/truth average and logfc profiles in the result (for figures).
    n_jobs
        Threads for the Wilcoxon tests (default: the CPUs available, at most 8). The
        numbers do not depend on it.
    backend
        ``local`` (blocks one after the other in this process) or ``ray`` (one Ray task
        per covariate block; truth and pred must be files every worker can read).
    workers, ray_address
        Ray: CPUs of a local cluster started here, or the address of a running cluster.
    chunk_elements
        Cells x genes of one chunk of a block held in memory at once (observed,
        predicted and generated cells together); bounds memory, not the numbers.
    reuse_references
        Reuse the noise ceiling of a block computed by an earlier evaluation in this
        process from the same observed cells, settings and seed
        (:class:`~pertbench.metrics.references.ReferenceCache`): the same numbers, computed
        once when many models are scored on one split (a benchmark). Local backend and
        in-memory truth only.
    """

    def __init__(
        self,
        truth: ad.AnnData | str | os.PathLike,
        pred: ad.AnnData | str | os.PathLike,
        *,
        keys: PerturbationKeys | None = None,
        metrics: str | list[str] | None = None,
        profile: str | None = None,
        split: pd.Series | str | os.PathLike | None = None,
        on: str = "test",
        baselines: bool | list[str] | tuple[str, ...] = False,
        ceiling: bool | CeilingEstimator = False,
        ceiling_replicates: int = DEFAULT_REPLICATES,
        replicate_agreement: bool = False,
        skip_missing: bool = False,
        seed: int = 0,
        top_k: int = 100,
        fdr: float = 0.05,
        n_pcs: int = DEFAULT_N_PCS,
        max_cells: int | None = DEFAULT_MAX_CELLS,
        n_bootstrap: int = 1000,
        tie_correct: bool = True,
        genes: list[str] | pd.Index | None = None,
        normalize_by: str = "no_change",
        model_name: str = "model",
        keep_aggregates: bool = True,
        n_jobs: int | None = None,
        backend: str = "local",
        workers: int | None = None,
        ray_address: str | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        reuse_references: bool = False,
    ) -> None:
        self.keys = keys if keys is not None else PerturbationKeys()
        self.truth_arg, self.pred_arg = truth, pred
        self.truth = _open(truth, "truth", self.keys)
        self.pred = _open(pred, "pred", self.keys)
        if metrics is None:
            selection: Any = "default" if profile is None else profile
        elif profile is None:
            selection = metrics
        else:
            selection = [profile, *(metrics.split(",") if isinstance(metrics, str) else metrics)]
        self.metric_selection = selection
        if on not in SPLIT_NAMES:
            raise ConfigError(f"on must be one of {', '.join(SPLIT_NAMES)}, got '{on}'")
        self.on = on
        self.split_arg = split
        self._every_baseline = baselines is True
        if baselines is True:
            self.baselines = list(BASELINES)
        elif baselines is False or baselines is None:
            self.baselines = []
        else:
            names = [baselines] if isinstance(baselines, str) else list(baselines)
            unknown = [b for b in names if b not in BASELINES]
            if unknown:
                raise ConfigError(
                    f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}"
                )
            self.baselines = [b for b in BASELINES if b in names]
        if int(ceiling_replicates) < 1:
            raise ConfigError(f"ceiling_replicates must be at least 1, got {ceiling_replicates}")
        self.ceiling_replicates = int(ceiling_replicates)
        if isinstance(ceiling, CeilingEstimator):
            self.ceiling_estimator: CeilingEstimator | None = ceiling
        else:
            self.ceiling_estimator = (
                BootstrapCeiling(n_replicates=self.ceiling_replicates) if ceiling else None
            )
        self.ceiling = self.ceiling_estimator is not None
        self.replicate_agreement = bool(replicate_agreement)
        self.skip_missing = bool(skip_missing)
        self.seed = int(seed)
        if int(top_k) < 1:
            raise ConfigError(f"top_k must be at least 1, got {top_k}")
        self.top_k = int(top_k)
        if not 0.0 < float(fdr) < 1.0:
            raise ConfigError(f"fdr must be between 0 and 1, got {fdr}")
        self.fdr = float(fdr)
        self.n_pcs = int(n_pcs)
        self.max_cells = None if max_cells is None else int(max_cells)
        self.n_bootstrap = int(n_bootstrap)
        self.tie_correct = bool(tie_correct)
        self.genes_arg = genes
        if normalize_by not in BASELINES:
            raise ConfigError(
                f"normalize_by must be one of {', '.join(BASELINES)}, got '{normalize_by}'"
            )
        self.normalize_by = normalize_by
        self.model_name = str(model_name)
        # scoring the no_change model with the no_change baseline is legitimate: keep the
        # tables unambiguous by labelling the model's rows and column distinctly
        taken = {*self.baselines, CEILING, REPLICATE_AGREEMENT, NORMALIZED}
        self.model_label = (
            f"{self.model_name} (model)" if self.model_name in taken else self.model_name
        )
        self.keep_aggregates = bool(keep_aggregates)
        self.n_jobs = _available_cpus() if n_jobs is None else max(1, int(n_jobs))
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        self.backend = backend
        self.workers = workers
        self.ray_address = ray_address
        if int(chunk_elements) < 1:
            raise ConfigError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = int(chunk_elements)
        self.reuse_references = bool(reuse_references)

    def _baselines_for(self, plan: EvaluationPlan) -> list[str]:
        """The baselines of this run: with ``baselines=True``, additive_within only when
        some evaluated group is a combination (on single perturbations it is
        perturbation_mean measured in the same covariates, or that baseline itself)."""
        if not self._every_baseline:
            return list(self.baselines)
        labels = plan.groups[self.keys.perturbation_key].astype(str)
        if any(self.keys.is_combination(p) for p in pd.unique(labels)):
            return list(self.baselines)
        return [b for b in self.baselines if b not in COMBINATION_BASELINES]

    # -- public ------------------------------------------------------------------------
    def run(self) -> EvaluationResult:
        """Compute everything; see :class:`EvaluationResult`."""
        specs = resolve_metrics(self.metric_selection, top_k=self.top_k)
        if self.split_arg is None:
            needs = [b for b in self.baselines if b != "no_change"]
            if needs:
                raise ConfigError(
                    f"the {' and '.join(needs)} baseline(s) learn from training cells; "
                    "pass the split (split=... or --split SPLIT.csv)"
                )
        if self.backend == "ray":  # refuse in-memory data before any work
            files = (_file_of(self.truth, "truth"), _file_of(self.pred, "pred"))
        split = read_split_for(self.truth, self.split_arg)
        plan = build_plan(
            self.truth,
            self.pred,
            keys=self.keys,
            split=split,
            on=self.on,
            genes=self.genes_arg,
            skip_missing=self.skip_missing,
        )
        baseline_names = self._baselines_for(plan)
        settings = BlockSettings(
            specs=specs,
            top_k=self.top_k,
            fdr=self.fdr,
            n_pcs=self.n_pcs,
            max_cells=self.max_cells,
            seed=self.seed,
            tie_correct=self.tie_correct,
            n_jobs=self.n_jobs,
            keep_aggregates=self.keep_aggregates,
            chunk_elements=self.chunk_elements,
        )
        fit_notes: dict[str, list[str]] = {}
        baselines = []
        for name in baseline_names:
            fit_notes[name] = []
            baselines += fit_baselines(
                [name], self.truth, plan, seed=self.seed, notes=fit_notes[name]
            )
        sources: list[Any] = list(baselines)
        reference_notes: dict[str, list[str]] = {}
        for estimator in self._replicate_estimators():
            notes = estimator.prepare(plan, seed=self.seed) + estimator.describe(specs)
            reference_notes[estimator.name] = notes
            replicates = {b.index: estimator.replicates(b) for b in plan.blocks}
            sources.append(CeilingSource(estimator, replicates))
        if self.backend == "ray":
            blocks = self._run_ray(plan, sources, settings, files)
        else:
            blocks = self._run_local(plan, sources, settings)
        return self._assemble(plan, specs, blocks, baselines, fit_notes, reference_notes)

    def _replicate_estimators(self) -> list[CeilingEstimator]:
        """The references made of observed cells: the ceiling, then replicate agreement."""
        out = [] if self.ceiling_estimator is None else [self.ceiling_estimator]
        if self.replicate_agreement:
            out.append(SplitHalfCeiling(REPLICATE_AGREEMENT))
        return out

    # -- running the blocks ------------------------------------------------------------
    def _block_job(
        self, plan: EvaluationPlan, block: Block, sources, settings, labels: list[str]
    ) -> dict:
        return {
            "block": block,
            "sources": [s.for_block(block.index) for s in sources],
            "settings": settings,
            "labels": {int(g): labels[g] for g in block.groups},
            "model": self.model_label,
            "truth_columns": plan.truth_columns,
            "pred_columns": plan.pred_columns,
            "all_groups": plan.all_groups(block) if settings.need_all_groups else None,
            "reuse_references": self.reuse_references and self.backend == "local",
        }

    def _run_local(self, plan, sources, settings) -> list[dict[str, SourceScores]]:
        truth = RowReader(self.truth.X, columns=plan.truth_columns)
        pred = RowReader(self.pred.X, columns=plan.pred_columns)
        labels = plan.group_labels()
        return [
            evaluate_block(self._block_job(plan, block, sources, settings, labels), truth, pred)
            for block in plan.blocks
        ]

    def _run_ray(self, plan, sources, settings, files) -> list[dict[str, SourceScores]]:
        from dataclasses import replace

        from pertbench.benchmark.backends import RayBackend

        # a task has one CPU: its DE tests run in one thread (the numbers do not change)
        settings = replace(settings, n_jobs=1)
        labels = plan.group_labels()
        backend = RayBackend(self.workers or _available_cpus(), self.ray_address)
        try:
            handles = []
            for block in plan.blocks:
                job = self._block_job(plan, block, sources, settings, labels)
                job["files"] = files
                handles.append(backend.submit(evaluate_block_job, job))
            return [backend.result(h) for h in handles]
        finally:
            backend.shutdown()

    # -- assembling ----------------------------------------------------------------------
    def _assemble(self, plan, specs, blocks, baselines, fit_notes, reference_notes):
        notes = list(plan.notes)
        model = merge_blocks(plan, specs, blocks, self.model_label)
        names = {s.name for s in specs}
        single = [
            b.label
            for b, result in zip(plan.blocks, blocks, strict=True)
            if result[self.model_label].n_perturbations < 2
        ]
        if single and any(s.needs in ("distances", "covariate") for s in specs):
            notes.append(
                "rank metrics and matrix_distance are undefined (NaN) where a covariate "
                f"combination has fewer than 2 evaluated perturbations: {', '.join(single[:10])}"
            )
        k = self.top_k
        if model.n_no_significant and names & {f"overlap_top{k}", "direction_agreement"}:
            notes.append(
                f"overlap_top{k} and direction_agreement are undefined (NaN) for "
                f"{model.n_no_significant} group(s) without any truth gene at FDR < {self.fdr}"
            )
        _single_cell_note(model, notes)
        refs: dict[str, MergedScores] = {}
        fitted = {b.name for b in baselines}
        for name in fit_notes:  # the baselines of this run, in order
            notes.extend(fit_notes[name])
            if name in fitted:
                refs[name] = merge_blocks(plan, specs, blocks, name)
                _single_cell_note(refs[name], notes)
        for name, own_notes in reference_notes.items():
            notes.extend(own_notes)
            refs[name] = merge_blocks(plan, specs, blocks, name)
            _single_cell_note(refs[name], notes)
        return assemble(
            plan,
            specs,
            self.model_label,
            model,
            refs,
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
            normalize_by=self.normalize_by,
            keep_aggregates=self.keep_aggregates,
            settings=self._settings(plan, specs, list(fit_notes)),
            notes=notes,
        )

    def _settings(self, plan: EvaluationPlan, specs, baselines: list[str]) -> dict[str, Any]:
        split = self.split_arg
        return {
            "metrics": [s.name for s in specs],
            "keys": self.keys.to_dict(),
            "on": self.on if split is not None else None,
            "split": str(split)
            if isinstance(split, (str, os.PathLike))
            else ("given" if split is not None else None),
            "baselines": baselines,
            "ceiling": self.ceiling,
            "ceiling_replicates": self.ceiling_replicates,
            "replicate_agreement": self.replicate_agreement,
            "normalize_by": self.normalize_by,
            "seed": self.seed,
            "top_k": self.top_k,
            "fdr": self.fdr,
            "n_pcs": self.n_pcs,
            "max_cells": self.max_cells,
            "n_bootstrap": self.n_bootstrap,
            "tie_correct": self.tie_correct,
            "n_genes": len(plan.genes),
            "n_groups": plan.n_groups,
            "model_name": self.model_name,
        }


def _single_cell_note(scores: MergedScores, notes: list[str]) -> None:
    if scores.single_cells:
        notes.append(
            f"{scores.single_cells} group(s) have a single observed or predicted cell: their "
            "edistance/mmd within-set term is defined as that of a lone point (0 / k(x,x)=1)"
        )


# ---------------------------------------------------------------------------------------
# One block (in this process or in a worker)
# ---------------------------------------------------------------------------------------
def evaluate_block(job: dict, truth: RowReader, pred: RowReader) -> dict[str, SourceScores]:
    """Aggregate and score one covariate block with every source of ``job``."""
    block: Block = job["block"]
    settings: BlockSettings = job["settings"]
    labels = job["labels"]
    extra = np.zeros(block.n_groups, dtype=np.int64)
    for source in job["sources"]:
        extra += source.generated_cells(block)
    # references computed by an earlier evaluation of the same cells are not recomputed;
    # the chunks stay those of the full set of sources
    reused: dict[str, SourceScores] = {}
    new_keys: dict[str, tuple] = {}
    active = []
    for source in job["sources"]:
        key = None
        if job.get("reuse_references") and isinstance(source, CeilingSource):
            max_cells = max(1, int(settings.chunk_elements) // max(truth.shape[1], 1))
            chunks = block.chunks(max_cells, extra)
            key = REFERENCE_CACHE.key(source, block, settings, truth, chunks)
        hit = REFERENCE_CACHE.get(key)
        if hit is not None:
            reused[source.name] = hit
            continue
        if key is not None:
            new_keys[source.name] = key
        active.append(source)
    stats = aggregate_block(
        block,
        truth,
        [PredictionSource(job["model"], pred), *active],
        settings,
        labels=_LabelLookup(labels),
        extra_cells=extra,
        all_groups=job["all_groups"],
    )
    ceilings = {s.name: s for s in active if isinstance(s, CeilingSource)}
    scores = score_block(stats, settings, model=job["model"], ceilings=ceilings)
    for name, key in new_keys.items():
        REFERENCE_CACHE.put(key, scores[name])
    return {**scores, **reused}


def evaluate_block_job(job: dict) -> dict[str, SourceScores]:
    """A Ray task: open both files itself (backed, nothing copied through the driver)
    and score one block."""
    truth_path, pred_path = job["files"]
    with (
        open_h5ad(truth_path, validate=False) as truth,
        open_h5ad(pred_path, validate=False) as pred,
    ):
        return evaluate_block(
            job,
            RowReader(truth.X, columns=job["truth_columns"]),
            RowReader(pred.X, columns=job["pred_columns"]),
        )


class _LabelLookup:
    """Group labels of one block, indexed by global group (for error messages)."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.labels = labels

    def __getitem__(self, g) -> str:
        return self.labels[int(g)]


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def evaluate(truth, pred, **options: Any) -> EvaluationResult:
    """Shortcut for ``Evaluator(truth, pred, **options).run()``."""
    return Evaluator(truth, pred, **options).run()


def _open(value, label: str, keys: PerturbationKeys) -> ad.AnnData | OnDiskData:
    """An AnnData in memory as given; a path (or a backed AnnData) opened by rows: obs and
    var in memory, X on disk (:func:`~pertbench.data.ondisk.open_h5ad`). A file's truth
    is checked against the data contract, scanning X chunk by chunk; predictions only get
    the evaluator's own checks. A file holding raw counts, or a column-compressed X (which
    cannot be read by rows), is read into memory (counts normalised), as before."""
    from pertbench.data.loading import read_h5ad
    from pertbench.data.ondisk import ColumnCompressedError, validate_on_disk

    if isinstance(value, OnDiskData):
        return value
    if isinstance(value, ad.AnnData):
        if not value.isbacked:
            return value
        try:
            return open_h5ad(value, validate=False)
        except ColumnCompressedError:
            return value.to_memory()
    if not isinstance(value, (str, os.PathLike)):
        raise EvaluationError(
            f"{label} must be an AnnData or an .h5ad path, got {type(value).__name__}"
        )
    try:
        data = open_h5ad(value, keys=keys, validate=False)
    except ColumnCompressedError:
        return read_h5ad(value, keys=keys, validate=label == "truth")
    try:
        report = validate_on_disk(data, keys=keys, expect="any", raise_errors=label == "truth")
    except BaseException:
        data.close()
        raise
    if report.value_type == "counts":
        data.close()
        return read_h5ad(value, keys=keys, validate=label == "truth")
    return data


def _file_of(data, label: str) -> str:
    if isinstance(data, OnDiskData) and data.path is not None:
        return str(data.path)
    raise ConfigError(
        f"backend='ray' reads the files in every worker: give {label} as an .h5ad path "
        "(or an AnnData opened with backed='r')"
    )


def _available_cpus() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, 8))
