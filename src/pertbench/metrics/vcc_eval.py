"""Score a prediction AnnData with the cell-eval / Virtual Cell Challenge metrics.

:func:`vcc_metrics` aligns a prediction with the observed data, refuses input on the
wrong expression scale (:func:`check_log1p_scale`), computes cell-eval's DE for both
sides (:func:`pertbench.metrics.vcc_de.cell_eval_de`) and the metrics of
:mod:`pertbench.metrics.vcc` per covariate block (cell-eval scores one cell type at a
time, like its ``--celltype-col``), and, given a baseline prediction, the VCC score.
:func:`vcc_mean_baseline` builds cell-eval's mean baseline.

Deliberate differences from running cell-eval on a prediction file:

- Controls are ALWAYS the observed control cells of ``truth`` (same covariates);
  predicted control rows are ignored. cell-eval takes the controls of the prediction
  file for the prediction's DE and effects, so a prediction file with altered controls
  changes its DE score and PDS (its issues #183 and #196). The numbers here equal
  cell-eval's run on a prediction file whose controls are the truth's.
- Input on another scale than log1p, or mixing scales between cells, is refused
  instead of being normalised or scored (cell-eval #204).
- PDS ties count half (see :func:`pertbench.metrics.vcc.discrimination_score`); block
  means leave out undefined values (:func:`pertbench.metrics.vcc.aggregate`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import COVARIATE_LABEL_SEP, group_cells, group_mean
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import DataValidationError, EvaluationError
from pertbench.metrics import vcc
from pertbench.metrics.vcc_de import CellEvalDE, cell_eval_de

#: Non-integer expression at or above this is not log1p-normalised (cell-eval's bound;
#: log1p of 1e6 counts per cell is 13.8).
LOG1P_MAX = 15.0
#: A value within this of an integer counts as integer-valued.
INTEGER_TOLERANCE = 1e-6
_SCAN_ELEMENTS = 4_000_000
#: Columns of :attr:`VCCResult.ties` after the group's covariates and perturbation.
TIE_COLUMNS = ["metric", "side", "tied_genes", "places", "k"]

# per-cell scale codes of :func:`cell_scales`
EMPTY, LOG1P, COUNTS, NEGATIVE, TOO_LARGE, NON_FINITE = range(6)
SCALE_NAMES = ("empty", "log1p", "counts", "negative", "too_large", "non_finite")


# ---------------------------------------------------------------------------------------
# Expression scale
# ---------------------------------------------------------------------------------------
def cell_scales(X, rows: np.ndarray | None = None) -> np.ndarray:
    """Scale of every cell (row) of ``X``, from its non-zero values.

    ``non_finite`` (any NaN/inf), else ``negative`` (any value < 0), else ``counts``
    (every value integer-valued), else ``too_large`` (any value >= 15), else ``log1p``;
    ``empty`` for a row without non-zero values. The rule is per cell because that is
    how scales get mixed: log1p of normalised counts is almost never integer-valued
    (a cell would need every one of its non-zero values within 1e-6 of an integer),
    while counts always are, whatever their maximum.

    Parameters
    ----------
    X
        (n_cells, n_genes) expression, dense or sparse.
    rows
        Only these rows (default: all), read a chunk at a time.

    Returns
    -------
    numpy.ndarray
        One int8 code per (selected) row, see :data:`SCALE_NAMES`.
    """
    rows = np.arange(X.shape[0]) if rows is None else np.asarray(rows)
    out = np.empty(rows.size, dtype=np.int8)
    step = max(1, _SCAN_ELEMENTS // max(X.shape[1], 1))
    for lo in range(0, rows.size, step):
        chunk = rows[lo : lo + step]
        out[lo : lo + chunk.size] = _classify(*_row_flags(X[chunk], chunk.size))
    return out


def _row_flags(block, n_rows: int):
    """Per row: any non-zero, any non-finite, any negative, any non-integer, any >= 15."""
    if sp.issparse(block):
        block = sp.csr_matrix(block)
        values = block.data
        rows = np.repeat(np.arange(n_rows), np.diff(block.indptr))

        def per_row(mask):
            return np.bincount(rows[mask], minlength=n_rows) > 0

    else:
        values = np.asarray(block)

        def per_row(mask):
            return mask.any(axis=1)

    with np.errstate(invalid="ignore"):
        finite = np.isfinite(values)
        safe = np.where(finite, values, 0.0)
        fractional = np.abs(safe - np.rint(safe)) > INTEGER_TOLERANCE
        return (
            per_row(values != 0),
            per_row(~finite),
            per_row(safe < 0),
            per_row(fractional),
            per_row(safe >= LOG1P_MAX),
        )


def _classify(nonzero, nonfinite, negative, fractional, large) -> np.ndarray:
    return np.select(
        [nonfinite, negative, nonzero & ~fractional, large, nonzero],
        [NON_FINITE, NEGATIVE, COUNTS, TOO_LARGE, LOG1P],
        EMPTY,
    ).astype(np.int8)


_FIX = "normalise counts with sc.pp.normalize_total and sc.pp.log1p"


def check_log1p_scale(
    truth_X,
    pred_X,
    *,
    truth_rows: np.ndarray | None = None,
    pred_rows: np.ndarray | None = None,
    pred_labels: np.ndarray | None = None,
) -> None:
    """Refuse truth or prediction that is not log1p-normalised, or that mixes scales.

    Every cell of both matrices must be ``log1p`` or ``empty`` (see
    :func:`cell_scales`). cell-eval normalises integer-valued input and treats any
    matrix with a fractional value as log1p, so a prediction mixing count cells into
    log1p ones games its DE score (cell-eval #204); here it is an error.

    Parameters
    ----------
    truth_X, pred_X
        Observed cells (controls included) and predicted cells.
    truth_rows, pred_rows
        The rows that will be scored (default: all).
    pred_labels
        Group label of each (selected) predicted row, to name an example in the message.

    Raises
    ------
    DataValidationError
        Truth is not log1p-normalised.
    EvaluationError
        The prediction is on another scale, mixes scales, or holds NaN/inf.
    """
    check_truth_scale(truth_X, truth_rows)
    check_prediction_scale(pred_X, pred_rows, labels=pred_labels)


def check_truth_scale(X, rows: np.ndarray | None = None) -> None:
    """The truth half of :func:`check_log1p_scale` (raises :class:`DataValidationError`)."""
    codes = cell_scales(X, rows)
    counts = np.bincount(codes, minlength=len(SCALE_NAMES))
    bad = {SCALE_NAMES[i]: int(counts[i]) for i in (COUNTS, NEGATIVE, TOO_LARGE, NON_FINITE)}
    if any(bad.values()):
        found = ", ".join(f"{n} {name}" for name, n in bad.items() if n)
        raise DataValidationError(
            f"truth is not log1p-normalised ({found} cell(s) of {codes.size}); "
            f"the VCC metrics need log1p expression: {_FIX}"
        )


def check_prediction_scale(
    X, rows: np.ndarray | None = None, *, labels: np.ndarray | None = None, what: str = "prediction"
) -> None:
    """The prediction half of :func:`check_log1p_scale` (raises :class:`EvaluationError`)."""
    codes = cell_scales(X, rows)
    counts = np.bincount(codes, minlength=len(SCALE_NAMES))

    def example(code: int) -> str:
        if labels is None:
            return ""
        return f", e.g. group {labels[np.flatnonzero(codes == code)[0]]}"

    n_log, n_counts = int(counts[LOG1P]), int(counts[COUNTS])
    if counts[NON_FINITE]:
        raise EvaluationError(
            f"the {what} has NaN or inf in {counts[NON_FINITE]} cell(s)"
            f"{example(NON_FINITE)}; fix the model output before scoring"
        )
    if counts[NEGATIVE]:
        raise EvaluationError(
            f"the {what} has negative values in {counts[NEGATIVE]} cell(s)"
            f"{example(NEGATIVE)}; log1p expression is >= 0: clip the prediction at 0"
        )
    if n_counts and n_log:
        raise EvaluationError(
            f"the {what} mixes scales: {n_counts} cell(s) hold integer counts"
            f"{example(COUNTS)} and {n_log} log1p values; put every predicted cell on "
            f"truth's log1p scale ({_FIX} on the count cells)"
        )
    if n_counts:
        raise EvaluationError(
            f"the {what} is on the count scale (all {n_counts} non-empty predicted "
            f"cells are integer-valued) but truth is log1p; {_FIX} on the prediction"
        )
    if counts[TOO_LARGE]:
        raise EvaluationError(
            f"the {what} has values >= {LOG1P_MAX:g} in {counts[TOO_LARGE]} cell(s)"
            f"{example(TOO_LARGE)}, beyond log1p-normalised expression; predict on "
            "truth's log1p scale"
        )


# ---------------------------------------------------------------------------------------
# Scoring a prediction
# ---------------------------------------------------------------------------------------
@dataclass
class VCCResult:
    """What :func:`vcc_metrics` computed.

    Attributes
    ----------
    per_group
        One row per scored group: covariates, perturbation, one column per metric
        (cell-eval's ``results.csv`` columns; ``de_spearman_sig`` is per block, repeated).
    per_covariate
        One row per covariate block: covariates, ``label``, ``n_perturbations`` and the
        mean of each metric over the block's groups (cell-eval's ``agg_results`` mean).
    baseline_per_group, baseline_per_covariate
        The same for the baseline prediction, when one was given.
    scores
        Per covariate block, the VCC metrics normalised against the baseline and their
        average ``avg_score`` (cell-eval's ``score``), when a baseline was given.
    ties
        Every top-k cut of an overlap/precision metric that falls inside a run of DE
        genes with equal |fold change| (covariates, perturbation, ``metric``, ``side``
        truth/pred, ``tied_genes``, ``places`` they got, ``k``): pertbench takes the
        tied genes in gene order, cell-eval in the order of polars' unstable sort
        (which changes with polars' number of threads), so there the two can differ
        by up to min(places, tied_genes - places) / k per side.
    baseline_ties
        The same for the baseline prediction.
    notes
        What was ignored (predicted controls, extra genes).
    """

    per_group: pd.DataFrame
    per_covariate: pd.DataFrame
    baseline_per_group: pd.DataFrame | None = None
    baseline_per_covariate: pd.DataFrame | None = None
    scores: pd.DataFrame | None = None
    ties: pd.DataFrame | None = None
    baseline_ties: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def metric_names() -> list[str]:
    """The metrics :func:`vcc_metrics` reports, in cell-eval's names."""
    de = [f"{m}_at_{k}" for m in ("overlap", "precision") for k in ("N", *vcc.FIXED_K)]
    de += [
        "de_spearman_sig",
        "de_direction_match",
        "de_spearman_lfc_sig",
        "de_sig_genes_recall",
        "de_nsig_counts_real",
        "de_nsig_counts_pred",
    ]
    means = ["pearson_delta", "mse", "mae", "mse_delta", "mae_delta"]
    return de + means + [f"discrimination_score_{d}" for d in vcc.PDS_DISTANCES]


def vcc_metrics(
    truth,
    pred,
    *,
    keys: PerturbationKeys | None = None,
    baseline=None,
    fdr_threshold: float = vcc.DEFAULT_FDR,
    n_jobs: int = 1,
) -> VCCResult:
    """cell-eval's metrics (and with a baseline, the VCC score) of a prediction.

    Parameters
    ----------
    truth
        Observed cells (AnnData or .h5ad path), log1p-normalised; may be the whole
        dataset: the scored groups are the prediction's, each needs observed cells and
        its covariates need observed controls.
    pred
        Predicted cells (AnnData or path): obs columns named by ``keys``, log1p
        expression for at least truth's genes (matched by name); predicted control rows
        are ignored.
    keys
        Perturbation and covariate columns (default :class:`PerturbationKeys`); each
        combination of covariate values is one block, scored on its own.
    baseline
        Optional baseline prediction scored the same way (e.g.
        :func:`vcc_mean_baseline`); gives ``baseline_per_covariate`` and ``scores``.
    fdr_threshold
        DE significance threshold (cell-eval: 0.05).
    n_jobs
        Threads of the rank-sum test.

    Returns
    -------
    VCCResult
    """
    keys = keys or PerturbationKeys()
    truth = _read(truth, "truth")
    pred = _read(pred, "pred")
    aligned = _Aligned(truth, pred, keys)
    per_group, per_cov, ties = aligned.score(
        aligned.pred_X, aligned.pred_codes, fdr_threshold, n_jobs
    )
    result = VCCResult(per_group=per_group, per_covariate=per_cov, ties=ties, notes=aligned.notes)
    if baseline is not None:
        base_X, base_codes = aligned.other_prediction(_read(baseline, "baseline"), "baseline")
        base_group, base_cov, base_ties = aligned.score(base_X, base_codes, fdr_threshold, n_jobs)
        result.baseline_per_group = base_group
        result.baseline_per_covariate = base_cov
        result.baseline_ties = base_ties
        rows = []
        for (_, model_row), (_, base_row) in zip(
            per_cov.iterrows(), base_cov.iterrows(), strict=True
        ):
            rows.append(vcc.vcc_score(model_row.to_dict(), base_row.to_dict()))
        scores = pd.DataFrame(rows)
        result.scores = pd.concat(
            [per_cov[aligned.block_columns].reset_index(drop=True), scores], axis=1
        )
    return result


def vcc_mean_baseline(
    reference,
    *,
    like,
    keys: PerturbationKeys | None = None,
    include_control: bool = True,
) -> ad.AnnData:
    """cell-eval's mean baseline (``cell-eval baseline``) as a prediction AnnData.

    Every perturbation of a covariate block is predicted as the same profile: the mean,
    over the block's groups in ``reference``, of each group's mean expression. cell-eval
    averages all groups of the file including the control group
    (``include_control=True``, its definition); ``include_control=False`` averages the
    perturbed groups only. Each group of ``like`` gets as many rows as it has cells.

    Parameters
    ----------
    reference
        Cells to average (AnnData or path), e.g. the training data or the truth.
    like
        AnnData (or path) whose non-control groups and cell counts the baseline
        reproduces, e.g. the truth or the prediction to compare with.
    keys
        Perturbation and covariate columns.
    include_control
        Whether the control group's mean is one of the averaged means.

    Returns
    -------
    anndata.AnnData
        Dense ``X`` in ``reference``'s dtype, obs with the covariate and perturbation
        columns, ``reference``'s genes. No control rows (controls come from truth).
    """
    keys = keys or PerturbationKeys()
    reference = _read(reference, "reference")
    like = _read(like, "like")
    ref_groups = group_cells(reference.obs, keys)
    means = group_mean(reference.X, ref_groups.group_codes, ref_groups.n_groups)
    like_groups = group_cells(like.obs, keys).groups
    like_groups = like_groups[~like_groups["is_control"]].reset_index(drop=True)
    cov_keys = list(keys.covariate_keys)
    wanted = np.ones(ref_groups.n_groups, dtype=bool)
    if not include_control:
        wanted &= ~ref_groups.groups["is_control"].to_numpy()
    ref_blocks = _covariate_labels(ref_groups.groups, cov_keys)
    like_blocks = _covariate_labels(like_groups, cov_keys)
    profile_of = np.empty((len(like_groups), reference.n_vars), dtype=np.float64)
    for label in pd.unique(like_blocks):
        members = np.flatnonzero((ref_blocks == label) & wanted)
        if members.size == 0:
            raise EvaluationError(
                f"reference has no cells for covariates '{label}'; the mean baseline "
                "averages the reference's groups of the same covariates"
            )
        profile_of[like_blocks == label] = means[members].mean(axis=0)
    n_cells = like_groups["n_cells"].to_numpy()
    dtype = _float_dtype(reference.X)
    X = np.repeat(profile_of, n_cells, axis=0).astype(dtype)
    obs = like_groups.loc[np.repeat(np.arange(len(like_groups)), n_cells), cov_keys].astype(str)
    obs[keys.perturbation_key] = np.repeat(
        like_groups[keys.perturbation_key].astype(str).to_numpy(), n_cells
    )
    obs.index = [f"baseline{i}" for i in range(len(obs))]
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=reference.var_names.astype(str)))


# ---------------------------------------------------------------------------------------
# Alignment and per-block scoring
# ---------------------------------------------------------------------------------------
class _Aligned:
    """Genes, scored groups, covariate blocks and their observed controls."""

    def __init__(self, truth: ad.AnnData, pred: ad.AnnData, keys: PerturbationKeys) -> None:
        self.keys = keys
        self.notes: list[str] = []
        self.genes = pd.Index(truth.var_names.astype(str))
        if not self.genes.is_unique:
            raise DataValidationError("truth has duplicated gene names; make var_names unique")
        self.truth_X = _float_matrix(truth.X)
        cov_keys = list(keys.covariate_keys)
        self.id_cols = [*cov_keys, keys.perturbation_key]
        self.block_columns = [*cov_keys, "label"]
        t = group_cells(truth.obs, keys)
        t_index = pd.MultiIndex.from_frame(t.groups[self.id_cols].astype(str))
        pred_X, p = self._prediction(pred, "pred")
        p_table = p.groups.loc[~p.groups["is_control"], self.id_cols].astype(str)
        missing = pd.MultiIndex.from_frame(p_table).difference(t_index)
        if len(missing):
            shown = ", ".join(":".join(m) for m in missing[:5])
            raise EvaluationError(
                f"{len(missing)} predicted group(s) have no observed cells in truth, e.g. "
                f"{shown}; predict only groups that were observed"
            )
        if p_table.empty:
            raise EvaluationError("the prediction has no perturbed group to score")
        groups = p_table.sort_values(self.id_cols).reset_index(drop=True)
        self.groups = groups
        self.index = pd.MultiIndex.from_frame(groups)
        # one block per covariate label, in the groups' (sorted) order
        group_labels = _covariate_labels(groups, cov_keys)
        labels, first = np.unique(group_labels, return_index=True)
        order = np.argsort(first)
        self.blocks = groups.iloc[first[order]][cov_keys].reset_index(drop=True)
        self.blocks["label"] = labels[order]
        self.block_of_group = pd.Index(self.blocks["label"]).get_indexer(group_labels)
        self.truth_codes = self._codes(t, t_index, ~t.is_control)
        self.control_rows = self._control_rows(t)
        # the gene named exactly like the perturbation is its target (cell-eval's rule)
        self.targets = self.genes.get_indexer(groups[keys.perturbation_key])
        used_truth = np.flatnonzero(self.truth_codes >= 0)
        check_truth_scale(self.truth_X, np.union1d(used_truth, np.concatenate(self.control_rows)))
        self.pred_X, self.pred_codes = self.other_prediction(pred, "pred", (pred_X, p))

    # -- inputs ----------------------------------------------------------------------------
    def _prediction(self, adata: ad.AnnData, label: str):
        names = pd.Index(adata.var_names.astype(str))
        if not names.is_unique:
            raise EvaluationError(f"{label} has duplicated gene names; make var_names unique")
        idx = names.get_indexer(self.genes)
        if (idx < 0).any():
            missing = self.genes[idx < 0]
            raise EvaluationError(
                f"{len(missing)} gene(s) of truth are missing from {label}, e.g. "
                f"{', '.join(missing[:5])}; predict every gene of truth"
            )
        if len(names) > len(self.genes):
            self.notes.append(f"{len(names) - len(self.genes)} extra gene(s) of {label} ignored")
        X = _float_matrix(adata.X)
        if not np.array_equal(idx, np.arange(len(names))):
            X = (sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X))[:, idx]
        return X, group_cells(adata.obs, self.keys)

    def other_prediction(self, adata: ad.AnnData, label: str, prepared=None):
        """Rows and group codes of a prediction for the scored groups (all required)."""
        X, grouping = prepared if prepared is not None else self._prediction(adata, label)
        index = pd.MultiIndex.from_frame(grouping.groups[self.id_cols].astype(str))
        codes = self._codes(grouping, index, ~grouping.is_control)
        absent = np.setdiff1d(np.arange(len(self.groups)), codes)
        if absent.size:
            raise EvaluationError(
                f"{label} has no cells for {absent.size} scored group(s), e.g. "
                f"{self._labels()[absent[0]]}; predict every group of the prediction"
            )
        scored = np.flatnonzero(codes >= 0)
        what = "prediction" if label == "pred" else label
        check_prediction_scale(X, scored, labels=self._labels()[codes[scored]], what=what)
        if grouping.is_control.any():
            self.notes.append(
                f"{int(grouping.is_control.sum())} control row(s) of {label} ignored: "
                "controls always come from truth"
            )
        return X, codes

    def _codes(self, grouping, index: pd.MultiIndex, eligible: np.ndarray) -> np.ndarray:
        group_of = self.index.get_indexer(index)
        codes = group_of[grouping.group_codes]
        return np.where(eligible, codes, -1).astype(np.int64)

    def _control_rows(self, t) -> list[np.ndarray]:
        cov_labels = _covariate_labels(t.covariates, list(self.keys.covariate_keys))
        block_of_cell = pd.Index(self.blocks["label"]).get_indexer(cov_labels)[t.covariate_codes]
        rows = []
        for b, label in enumerate(self.blocks["label"]):
            found = np.flatnonzero(t.is_control & (block_of_cell == b))
            if found.size == 0:
                raise EvaluationError(
                    f"truth has no control cells (label '{self.keys.control}') for "
                    f"covariates '{label}'; the VCC metrics compare with them"
                )
            rows.append(found)
        return rows

    def _labels(self) -> np.ndarray:
        return np.array([":".join(map(str, g)) for g in self.index], dtype=object)

    # -- scoring ---------------------------------------------------------------------------
    def score(self, pred_X, pred_codes, fdr_threshold: float, n_jobs: int):
        """Per-group metrics and per-block means of one prediction."""
        names = metric_names()
        values = np.full((len(self.groups), len(names)), np.nan)
        block_rows, tie_rows = [], []
        for b in range(len(self.blocks)):
            members = np.flatnonzero(self.block_of_group == b)
            local = np.full(len(self.groups), -1, dtype=np.int64)
            local[members] = np.arange(members.size)
            ties: list = []
            block = self._block(b, members, local, pred_X, pred_codes, fdr_threshold, n_jobs, ties)
            values[members] = np.column_stack([block[n] for n in names])
            agg = vcc.aggregate({n: block[n] for n in names})
            block_rows.append({"n_perturbations": members.size, **agg})
            tie_rows += [(members[row], *rest) for row, *rest in ties]
        per_group = pd.concat(
            [self.groups, pd.DataFrame(values, columns=names)], axis=1
        ).reset_index(drop=True)
        per_cov = pd.concat([self.blocks.reset_index(drop=True), pd.DataFrame(block_rows)], axis=1)
        tie_frame = pd.DataFrame(tie_rows, columns=["group", *TIE_COLUMNS])
        ties = pd.concat(
            [
                self.groups.iloc[tie_frame["group"].to_numpy()].reset_index(drop=True),
                tie_frame.drop(columns="group"),
            ],
            axis=1,
        )
        return per_group, per_cov, ties

    def _block(self, b, members, local, pred_X, pred_codes, fdr_threshold, n_jobs, ties):
        controls = self.control_rows[b]
        t_cells = np.flatnonzero(np.isin(self.truth_codes, members))
        t_rows = np.union1d(controls, t_cells)  # truth order, as in a cell-eval real file
        t_block = self.truth_X[t_rows]
        t_codes = np.where(self.truth_codes[t_rows] >= 0, local[self.truth_codes[t_rows]], -1)
        p_rows = np.flatnonzero(np.isin(pred_codes, members))
        p_block = pred_X[p_rows]
        p_codes = local[pred_codes[p_rows]]
        n = members.size
        truth_de = cell_eval_de(
            t_block, t_codes, np.isin(t_rows, controls), n_groups=n, n_jobs=n_jobs
        )
        control_X = self.truth_X[controls]
        pred_de = cell_eval_de(p_block, p_codes, control_X, n_groups=n, n_jobs=n_jobs)
        # means in each file's precision: truth's, and the prediction file's (predicted
        # cells + truth's controls), as cell-eval's polars means are
        t_dtype = self.truth_X.dtype
        p_dtype = np.result_type(pred_X.dtype, t_dtype)
        t_means = group_mean(t_block, t_codes, n).astype(t_dtype)
        p_means = group_mean(p_block, p_codes, n).astype(p_dtype)
        c_mean = group_mean(control_X, np.zeros(controls.size, dtype=np.int64), 1)[0]
        return _block_metrics(
            truth_de,
            pred_de,
            t_means,
            p_means,
            c_mean.astype(t_dtype),
            c_mean.astype(p_dtype),
            self.targets[members],
            fdr_threshold,
            ties,
        )


def _block_metrics(
    truth_de: CellEvalDE,
    pred_de: CellEvalDE,
    t_means: np.ndarray,
    p_means: np.ndarray,
    t_control: np.ndarray,
    p_control: np.ndarray,
    targets: np.ndarray,
    fdr_threshold: float,
    ties: list,
) -> dict[str, np.ndarray]:
    """Every metric of :func:`metric_names` for one covariate block; every top-k cut that
    falls inside a tie is appended to ``ties`` as (group row, metric, side, tied genes,
    places, k)."""
    de = (truth_de.log2_fold_change, truth_de.fdr, pred_de.log2_fold_change, pred_de.fdr)
    t_lfc, t_fdr, p_lfc, p_fdr = de
    fdr = {"fdr_threshold": fdr_threshold}
    out: dict[str, np.ndarray] = {}
    for metric, size_from in (("overlap", "truth"), ("precision", "pred")):
        for k in (None, *vcc.FIXED_K):
            name = f"{metric}_at_{'N' if k is None else k}"
            sets = vcc.top_k_sets(*de, k=k, size_from=size_from, **fdr)
            out[name] = sets.shared()
            for side, top in (("truth", sets.truth), ("pred", sets.pred)):
                for row in np.flatnonzero(top.tied):  # a tie crosses the cut
                    ties.append((row, name, side, top.tied[row], top.places[row], sets.k[row]))
    spearman_sig = vcc.de_spearman_sig(t_fdr, p_fdr, **fdr)
    out["de_spearman_sig"] = np.full(t_lfc.shape[0], spearman_sig)  # per block, repeated
    out["de_direction_match"] = vcc.de_direction_match(t_lfc, t_fdr, p_lfc, **fdr)
    out["de_spearman_lfc_sig"] = vcc.de_spearman_lfc_sig(t_lfc, t_fdr, p_lfc, **fdr)
    out["de_sig_genes_recall"] = vcc.de_sig_genes_recall(t_fdr, p_fdr, **fdr)
    counts = vcc.de_nsig_counts(t_fdr, p_fdr, **fdr)
    out["de_nsig_counts_real"], out["de_nsig_counts_pred"] = counts
    out["mse"] = vcc.mse(t_means, p_means)
    out["mae"] = vcc.mae(t_means, p_means)
    out.update(vcc.change_metrics(t_means, p_means, t_control, pred_control_mean=p_control))
    for d in vcc.PDS_DISTANCES:
        out[f"discrimination_score_{d}"] = vcc.discrimination_score(
            t_means,
            p_means,
            t_control,
            pred_control_mean=p_control,
            target_genes=targets,
            distance=d,
        )
    return out


def _covariate_labels(groups: pd.DataFrame, cov_keys: list[str]) -> np.ndarray:
    """Covariate label (values joined by ``/``) of each row of a group table."""
    if not cov_keys:
        return np.full(len(groups), "all", dtype=object)
    return groups[cov_keys].astype(str).agg(COVARIATE_LABEL_SEP.join, axis=1).to_numpy()


def _read(value, label: str) -> ad.AnnData:
    from pertbench.data.loading import NO_CELLS, check_h5ad_file

    if isinstance(value, (str, os.PathLike)):
        # a missing, unreadable or non-AnnData file is refused in one line, not by h5py
        value = ad.read_h5ad(check_h5ad_file(value))
    if not isinstance(value, ad.AnnData):
        raise EvaluationError(
            f"{label} must be an AnnData or an .h5ad path, got {type(value).__name__}"
        )
    if value.n_obs == 0:
        raise DataValidationError(f"{label}: {NO_CELLS}")
    return value


def _float_dtype(X) -> np.dtype:
    dtype = X.dtype
    if dtype == np.float16:  # cell-eval casts float16 to float32
        return np.dtype(np.float32)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _float_matrix(X):
    """X in a float dtype, sparse as CSR (backed or other formats read into memory)."""
    if sp.issparse(X):
        X = sp.csr_matrix(X)
    else:
        X = np.asarray(X)
    dtype = _float_dtype(X)
    return X if X.dtype == dtype else X.astype(dtype)
