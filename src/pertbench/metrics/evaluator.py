"""The Evaluator: score any model's predictions against observed cells.

``Evaluator(truth, pred, ...).run()`` computes, for every (covariates, perturbation)
group present in both, the selected metrics (see :mod:`pertbench.metrics.catalog`),
their means over groups with bootstrap 95% intervals, and optionally the calibration
references: the three analytic baselines fitted on the training split, the noise ceiling
(the expected score of a perfect model, :mod:`pertbench.metrics.ceiling`) and normalised
scores.

Which cells are compared:

- Groups: without a split, the groups present in ``pred`` (``truth`` may be the whole
  dataset); a predicted group absent from ``truth`` is an error. With ``split``, the
  groups of the ``on`` split of ``truth``; a group missing from ``pred`` (or a predicted
  group outside that split) is an error. ``skip_missing=True`` turns these errors into
  reported skips.
- Observed cells of a group: all its truth cells, or those in the ``on`` split.
- Controls: ALWAYS observed controls from ``truth`` with the same covariates (for the
  predicted and the observed side alike; predicted control rows are ignored). With a
  split, the covariates' controls in the ``on`` split when there are any, else all of
  them (as :meth:`~pertbench.models.base.PerturbationModel.predict_split` does).
- Genes: ``truth``'s genes (or ``genes=``), matched by name in ``pred``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import COVARIATE_LABEL_SEP, group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import SPLIT_NAMES, read_split
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    EvaluationError,
    ModelError,
)
from pertbench.metrics import calibration as cal
from pertbench.metrics import ceiling as ceil
from pertbench.metrics.aggregations import aggregate, group_stats
from pertbench.metrics.catalog import MetricSpec, resolve_metrics
from pertbench.metrics.de import direction_agreement, jaccard_top_k, overlap_top_k, wilcoxon_scores
from pertbench.metrics.distribution import (
    DEFAULT_MAX_CELLS,
    DEFAULT_N_PCS,
    edistance,
    mean_var_kde,
    mmd,
    pca_basis,
    project,
    subsample,
)
from pertbench.metrics.fit import fit_metrics, rank_rows
from pertbench.metrics.rank import matrix_distance, rank_metrics
from pertbench.utils.io import write_csv_atomic, write_json_atomic

BASELINES = ("no_change", "perturbation_mean", "covariate_mean")
CEILING = "ceiling"
#: Split-half agreement of the observed cells: a reference, never the ceiling.
REPLICATE_AGREEMENT = "replicate_agreement"
NORMALIZED = "normalized"
SUMMARY_FILE = "summary.csv"
PER_GROUP_FILE = "per_group.csv"
PER_COVARIATE_FILE = "per_covariate.csv"
CALIBRATION_FILE = "calibration.csv"
INFO_FILE = "evaluation.json"
_ROW_CHUNK = 4_000_000
#: Baselines predict from all evaluation controls unless that exceeds this many cells
#: (or the number of predicted cells, if larger).
BASELINE_CELL_BUDGET = 200_000


# ---------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------
@dataclass
class EvaluationResult:
    """What :meth:`Evaluator.run` returns.

    Attributes
    ----------
    summary
        Columns ``metric``, ``value``, ``ci_low``, ``ci_high``: the mean over groups of
        each metric for the model (bare metric names), then, when calibration was asked
        for, ``<reference>/<metric>`` rows for each baseline and the ceiling and
        ``normalized/<metric>`` rows.
    per_group
        One row per evaluated group: the covariate columns, the perturbation column,
        then one column per metric (``matrix_distance`` is in ``per_covariate``). With
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


# ---------------------------------------------------------------------------------------
# Internal structures
# ---------------------------------------------------------------------------------------
@dataclass
class _Context:
    """Everything shared by the model, baseline and ceiling scoring."""

    keys: PerturbationKeys
    genes: pd.Index
    groups: pd.DataFrame  # evaluated groups: covariate cols, perturbation col, cov_index
    covariates: pd.DataFrame  # evaluated covariate combinations: cols + label
    cov_of_group: np.ndarray
    truth_X: Any
    truth_codes: np.ndarray  # per truth row: evaluated group or -1
    control_rows: list[np.ndarray]  # per covariate combination: truth rows of its controls
    control_mean: np.ndarray  # (n_cov, n_genes)
    specs: list[MetricSpec]
    aggregations: tuple[str, ...]
    need_de: bool
    need_distribution: bool
    top_k: int
    fdr: float
    n_pcs: int
    max_cells: int | None
    seed: int
    tie_correct: bool
    _pca: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    truth_de: dict[int, tuple] = field(default_factory=dict)  # see Evaluator._truth_block

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def groups_of(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.cov_of_group == c)

    def group_labels(self) -> list[str]:
        cov = self.covariates["label"].to_numpy()[self.cov_of_group]
        pert = self.groups[self.keys.perturbation_key].to_numpy()
        return [f"{c}:{p}" for c, p in zip(cov, pert, strict=True)]


@dataclass
class _Side:
    """One set of cells assigned to the evaluated groups, with its statistics."""

    X: Any
    codes: np.ndarray  # per row: evaluated group index or -1
    mean: np.ndarray
    var: np.ndarray
    n: np.ndarray
    z: np.ndarray | None = None
    fdr: np.ndarray | None = None

    @property
    def present(self) -> np.ndarray:
        return self.n > 0

    def rows_by_group(self) -> list[np.ndarray]:
        order = np.argsort(self.codes, kind="stable")
        sorted_codes = self.codes[order]
        bounds = np.searchsorted(sorted_codes, np.arange(len(self.n) + 1))
        return [order[bounds[g] : bounds[g + 1]] for g in range(len(self.n))]


@dataclass
class _Scores:
    per_group: pd.DataFrame  # index: evaluated group index; columns: metric names
    per_covariate: pd.DataFrame  # index: covariate index; columns: per-covariate metrics
    aggregates: dict[str, np.ndarray] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# The evaluator
# ---------------------------------------------------------------------------------------
class Evaluator:
    """Score predicted cells against observed cells.

    Parameters
    ----------
    truth
        Observed cells (AnnData or .h5ad path): log-normalised ``X``, obs with the
        perturbation and covariate keys, control cells. May be the whole dataset.
    pred
        Predicted cells (AnnData or path) with the same obs keys; any number of rows per
        group. Genes matched by name.
    keys
        Obs columns of perturbation and covariates.
    metrics
        ``"default"`` (fit + rank + DE), ``"all"`` (adds logp and distribution metrics) or
        a comma list of families / metric names (see :mod:`pertbench.metrics.catalog`).
    split
        Split Series (indexed by truth obs names) or CSV path: restricts the observed
        cells to ``on`` and is needed for the ``perturbation_mean`` and
        ``covariate_mean`` baselines (trained on its ``train`` cells).
    on
        Which split holds the evaluated groups (``test`` by default).
    baselines
        ``True`` for all three baselines, a list of names, or ``False``.
    ceiling
        Also estimate the noise ceiling: the expected score of a perfect model (one
        predicting each group's population profile) against the observed cells
        (:mod:`pertbench.metrics.ceiling`).
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
    """

    def __init__(
        self,
        truth: ad.AnnData | str | os.PathLike,
        pred: ad.AnnData | str | os.PathLike,
        *,
        keys: PerturbationKeys | None = None,
        metrics: str | list[str] = "default",
        split: pd.Series | str | os.PathLike | None = None,
        on: str = "test",
        baselines: bool | list[str] | tuple[str, ...] = False,
        ceiling: bool = False,
        ceiling_replicates: int = ceil.DEFAULT_REPLICATES,
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
    ) -> None:
        self.keys = keys if keys is not None else PerturbationKeys()
        self.truth = _read(truth, "truth", self.keys)
        self.pred = _read(pred, "pred", self.keys)
        self.metric_selection = metrics
        if on not in SPLIT_NAMES:
            raise ConfigError(f"on must be one of {', '.join(SPLIT_NAMES)}, got '{on}'")
        self.on = on
        self.split_arg = split
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
        self.ceiling = bool(ceiling)
        if int(ceiling_replicates) < 1:
            raise ConfigError(f"ceiling_replicates must be at least 1, got {ceiling_replicates}")
        self.ceiling_replicates = int(ceiling_replicates)
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
        self.notes: list[str] = []

    # -- public ------------------------------------------------------------------------
    def run(self) -> EvaluationResult:
        """Compute everything; see :class:`EvaluationResult`."""
        self.notes = []
        specs = resolve_metrics(self.metric_selection, top_k=self.top_k)
        truth_X, pred_X, genes = self._align_genes()
        split = self._read_split()
        ctx, truth_codes, pred_codes, skipped = self._groups(truth_X, genes, split, specs)
        self._check_finite(pred_X, pred_codes, ctx, "predictions")
        truth_rows = truth_codes.copy()
        for rows in ctx.control_rows:
            truth_rows[rows] = 0
        self._check_finite(truth_X, truth_rows, ctx, "truth")

        truth_side = self._side(ctx, truth_X, truth_codes)
        pred_side = self._side(ctx, pred_X, pred_codes)
        model_scores = self._score(ctx, truth_side, pred_side, label="model")

        references: dict[str, _Scores] = {}
        for name in self.baselines:
            side = self._baseline_side(ctx, name, split, pred_side)
            if side is not None:
                references[name] = self._score(ctx, truth_side, side, label=name)
        if self.ceiling:
            references[CEILING] = self._ceiling_scores(ctx, truth_X, truth_side)
        if self.replicate_agreement:
            references[REPLICATE_AGREEMENT] = self._replicate_agreement(ctx, truth_X, truth_side)

        return self._result(ctx, specs, model_scores, references, skipped)

    # -- inputs --------------------------------------------------------------------------
    def _align_genes(self):
        truth_names = pd.Index(self.truth.var_names.astype(str))
        pred_names = pd.Index(self.pred.var_names.astype(str))
        for label, names in (("truth", truth_names), ("pred", pred_names)):
            if not names.is_unique:
                dup = names[names.duplicated()][:3]
                raise DataValidationError(
                    f"{label} has duplicated gene names ({', '.join(dup)}); make var_names unique"
                )
        if self.genes_arg is not None:
            genes = pd.Index([str(g) for g in self.genes_arg])
            missing = genes.difference(truth_names)
            if len(missing):
                raise EvaluationError(
                    f"{len(missing)} selected gene(s) are not in truth, e.g. {', '.join(missing[:5])}"
                )
        else:
            genes = truth_names
        if genes.empty:
            raise EvaluationError("no genes to evaluate")
        idx = pred_names.get_indexer(genes)
        if (idx < 0).any():
            missing = genes[idx < 0]
            raise EvaluationError(
                f"{len(missing)} gene(s) of truth are missing from pred, e.g. "
                f"{', '.join(missing[:5])}; predict all genes or pass genes= to evaluate a subset"
            )
        extra = len(pred_names) - len(genes)
        if extra > 0:
            self.notes.append(f"{extra} gene(s) of pred not in the evaluated gene set were ignored")
        pred_X = _take_columns(self.pred.X, idx, len(pred_names))
        truth_X = _take_columns(self.truth.X, truth_names.get_indexer(genes), len(truth_names))
        return truth_X, pred_X, genes

    def _read_split(self) -> pd.Series | None:
        if self.split_arg is None:
            needs = [b for b in self.baselines if b != "no_change"]
            if needs:
                raise ConfigError(
                    f"the {' and '.join(needs)} baseline(s) learn from training cells; "
                    "pass the split (split=... or --split SPLIT.csv)"
                )
            return None
        if isinstance(self.split_arg, pd.Series):
            from pertbench.models.base import align_split

            return align_split(self.truth, self.split_arg)
        return read_split(self.split_arg, self.truth.obs_names)

    def _groups(self, truth_X, genes, split, specs):
        keys = self.keys
        cov_keys = list(keys.covariate_keys)
        id_cols = [*cov_keys, keys.perturbation_key]
        t_group = group_cells(self.truth.obs, keys)
        p_group = group_cells(self.pred.obs, keys)
        eligible = (
            np.ones(self.truth.n_obs, dtype=bool)
            if split is None
            else (split.to_numpy() == self.on)
        )
        t_cells = eligible & ~t_group.is_control
        t_present = np.unique(t_group.group_codes[t_cells])
        t_table = t_group.groups.iloc[t_present][id_cols].astype(str)
        p_table = p_group.groups.loc[~p_group.groups["is_control"], id_cols].astype(str)
        if p_group.is_control.any():
            self.notes.append(
                f"{int(p_group.is_control.sum())} predicted control row(s) were ignored: "
                "controls always come from truth"
            )
        t_index = pd.MultiIndex.from_frame(t_table)
        p_index = pd.MultiIndex.from_frame(p_table)
        skipped_rows = []
        if split is None:
            missing = p_index.difference(t_index)
            reason = "predicted group has no observed cells in truth"
            if len(missing):
                self._missing(missing, reason, skipped_rows)
            evaluated = p_index.intersection(t_index)
        else:
            missing_pred = t_index.difference(p_index)
            if len(missing_pred):
                self._missing(
                    missing_pred, f"group of the '{self.on}' split has no prediction", skipped_rows
                )
            extra = p_index.difference(t_index)
            if len(extra):
                self._missing(
                    extra, f"predicted group is not in the '{self.on}' split of truth", skipped_rows
                )
            evaluated = t_index.intersection(p_index)
        if len(evaluated) == 0:
            raise EvaluationError(
                "no group is present in both pred and truth; check the perturbation/covariate "
                "keys and labels (and the split)"
            )
        groups = evaluated.to_frame(index=False).sort_values(id_cols).reset_index(drop=True)
        evaluated = pd.MultiIndex.from_frame(groups)
        if cov_keys:
            cov_frame = groups[cov_keys].drop_duplicates().reset_index(drop=True)
            cov_index = pd.MultiIndex.from_frame(cov_frame)
            cov_of_group = cov_index.get_indexer(pd.MultiIndex.from_frame(groups[cov_keys]))
            cov_frame["label"] = cov_frame[cov_keys].agg(COVARIATE_LABEL_SEP.join, axis=1)
        else:
            cov_frame = pd.DataFrame({"label": ["all"]})
            cov_index = None
            cov_of_group = np.zeros(len(groups), dtype=np.int64)
        groups["cov_index"] = cov_of_group

        # per-cell codes
        t_map = evaluated.get_indexer(pd.MultiIndex.from_frame(t_group.groups[id_cols].astype(str)))
        truth_codes = np.where(t_cells, t_map[t_group.group_codes], -1)
        p_map = evaluated.get_indexer(pd.MultiIndex.from_frame(p_group.groups[id_cols].astype(str)))
        pred_codes = np.where(~p_group.is_control, p_map[p_group.group_codes], -1)

        # controls of each evaluated covariate combination
        if cov_index is not None:
            t_cov = cov_index.get_indexer(
                pd.MultiIndex.from_frame(t_group.covariates[cov_keys].astype(str))
            )[t_group.covariate_codes]
        else:
            t_cov = np.zeros(self.truth.n_obs, dtype=np.int64)
        control_rows = []
        for c in range(len(cov_frame)):
            ctrl = t_group.is_control & (t_cov == c)
            preferred = ctrl & eligible if split is not None else ctrl
            rows = np.flatnonzero(preferred if preferred.any() else ctrl)
            if rows.size == 0:
                raise EvaluationError(
                    f"truth has no control cells for covariates '{cov_frame.loc[c, 'label']}'; "
                    f"controls (label '{keys.control}') are needed for delta, logfc and DE metrics"
                )
            control_rows.append(rows)
        ctrl_codes = np.full(self.truth.n_obs, -1, dtype=np.int64)
        for c, rows in enumerate(control_rows):
            ctrl_codes[rows] = c
        control_mean, _, _ = group_stats(truth_X, ctrl_codes, len(cov_frame))

        aggregations = tuple(
            dict.fromkeys(
                [s.aggregation for s in specs if s.aggregation is not None]
                + (["average", "logfc"] if self.keep_aggregates else [])
            )
        )
        ctx = _Context(
            keys=keys,
            genes=genes,
            groups=groups,
            covariates=cov_frame,
            cov_of_group=np.asarray(cov_of_group, dtype=np.int64),
            truth_X=truth_X,
            truth_codes=truth_codes,
            control_rows=control_rows,
            control_mean=control_mean,
            specs=specs,
            aggregations=aggregations,
            need_de=any(s.family == "de" or s.aggregation == "logp" for s in specs),
            need_distribution=any(s.family == "distribution" for s in specs),
            top_k=self.top_k,
            fdr=self.fdr,
            n_pcs=self.n_pcs,
            max_cells=self.max_cells,
            seed=self.seed,
            tie_correct=self.tie_correct,
        )
        skipped = pd.DataFrame(skipped_rows, columns=[*id_cols, "reason"])
        return ctx, truth_codes, pred_codes, skipped

    def _missing(self, index: pd.MultiIndex, reason: str, skipped_rows: list) -> None:
        labels = [":".join(map(str, t)) for t in index]
        if not self.skip_missing:
            raise EvaluationError(
                f"{len(labels)} group(s) cannot be scored ({reason}), e.g. {', '.join(labels[:5])}; "
                "pass --skip-missing (skip_missing=True) to skip and report them"
            )
        for t in index:
            skipped_rows.append([*map(str, t), reason])
        self.notes.append(f"skipped {len(labels)} group(s): {reason}")

    def _check_finite(self, X, codes: np.ndarray, ctx: _Context, what: str) -> None:
        rows = np.flatnonzero(codes >= 0)
        bad_rows = []
        step = max(1, _ROW_CHUNK // max(X.shape[1], 1))
        for lo in range(0, rows.size, step):
            chunk = rows[lo : lo + step]
            sub = X[chunk]
            if sp.issparse(sub):
                sub = sp.csr_matrix(sub)
                finite = np.isfinite(sub.data)
                if finite.all():
                    continue
                row_of = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
                bad_rows.append(chunk[np.unique(row_of[~finite])])
            else:
                ok = np.isfinite(np.asarray(sub)).all(axis=1)
                if not ok.all():
                    bad_rows.append(chunk[~ok])
        if bad_rows:
            if what == "truth":
                n_bad = int(sum(r.size for r in bad_rows))
                raise DataValidationError(
                    f"truth contains NaN or inf in {n_bad} cell(s) used for evaluation; "
                    "clean the observed data first"
                )
            bad = np.unique(codes[np.concatenate(bad_rows)])
            labels = [ctx.group_labels()[g] for g in bad[:5]]
            raise EvaluationError(
                f"predictions contain NaN or inf in {bad.size} group(s), e.g. {', '.join(labels)}; "
                "fix the model output before evaluating"
            )

    # -- statistics of one side ----------------------------------------------------------
    def _side(self, ctx: _Context, X, codes: np.ndarray) -> _Side:
        mean, var, n = group_stats(X, codes, ctx.n_groups)
        side = _Side(X=X, codes=codes, mean=mean, var=var, n=n)
        if ctx.need_de:
            is_truth = X is ctx.truth_X
            side.z = np.zeros_like(mean)
            side.fdr = np.ones_like(mean)
            for c in range(len(ctx.covariates)):
                members = ctx.groups_of(c)
                local = np.full(ctx.n_groups, -1, dtype=np.int64)
                local[members] = np.arange(members.size)
                cell_codes = np.full(codes.shape, -1, dtype=np.int64)
                inside = codes >= 0
                cell_codes[inside] = local[codes[inside]]
                if not (cell_codes >= 0).any():
                    continue
                block, block_rows, is_control = self._truth_block(ctx, c)
                if is_truth:  # controls and cells are rows of the same column-major block
                    res = wilcoxon_scores(
                        block,
                        cell_codes[block_rows],
                        is_control,
                        n_groups=members.size,
                        tie_correct=ctx.tie_correct,
                        n_jobs=self.n_jobs,
                    )
                else:
                    res = wilcoxon_scores(
                        X,
                        cell_codes,
                        block[np.flatnonzero(is_control)],
                        n_groups=members.size,
                        tie_correct=ctx.tie_correct,
                        n_jobs=self.n_jobs,
                    )
                side.z[members] = res.scores
                side.fdr[members] = res.pvals_adj
        return side

    def _truth_block(self, ctx: _Context, c: int):
        """Observed rows of covariate combination ``c`` (its controls and evaluated cells),
        column-major when sparse, made once and shared by every Wilcoxon test of ``c``
        (model, baselines, ceiling). Returns (block, its truth rows, control mask)."""
        if c not in ctx.truth_de:
            members = ctx.groups_of(c)
            cells = np.flatnonzero(np.isin(ctx.truth_codes, members))
            rows = np.union1d(ctx.control_rows[c], cells)
            X = ctx.truth_X
            if sp.issparse(X):
                block = sp.csc_matrix(X) if rows.size == X.shape[0] else X[rows].tocsc()
            else:
                block = X if rows.size == X.shape[0] else np.asarray(X[rows])
            ctx.truth_de[c] = (block, rows, np.isin(rows, ctx.control_rows[c]))
        return ctx.truth_de[c]

    # -- scoring -------------------------------------------------------------------------
    def _score(self, ctx: _Context, truth: _Side, pred: _Side, *, label: str) -> _Scores:
        G = ctx.n_groups
        present = truth.present & pred.present
        rows = np.flatnonzero(present)
        columns: dict[str, np.ndarray] = {}
        fit_specs = [s for s in ctx.specs if s.family == "fit"]
        rank_specs = [s for s in ctx.specs if s.family == "rank" and not s.per_covariate]
        want_matrix = any(s.name == "matrix_distance" for s in ctx.specs)
        for s in fit_specs + rank_specs:
            columns[s.name] = np.full(G, np.nan)
        per_cov: dict[str, np.ndarray] = {}
        if want_matrix:
            per_cov["matrix_distance"] = np.full(len(ctx.covariates), np.nan)
        covariates = []  # (index, members) of each covariate combination
        single = []
        for c in range(len(ctx.covariates)):
            members = ctx.groups_of(c)
            members = members[present[members]]
            covariates.append((c, members))
            if members.size < 2 and (rank_specs or want_matrix):
                single.append(ctx.covariates.loc[c, "label"])
        if single and label == "model":
            self.notes.append(
                "rank metrics and matrix_distance are undefined (NaN) where a covariate "
                f"combination has fewer than 2 evaluated perturbations: {', '.join(single[:10])}"
            )
        aggregates = {}
        # one aggregation at a time: only two (groups x genes) profiles are alive at once
        for agg in ctx.aggregations:
            fit_here = [s for s in fit_specs if s.aggregation == agg]
            rank_here = [s for s in rank_specs if s.aggregation == agg]
            keep = self.keep_aggregates and label == "model" and agg in ("average", "logfc")
            matrix_here = want_matrix and agg == "logfc"
            if not (fit_here or rank_here or keep or matrix_here):
                continue
            t_prof, p_prof, _ = _profiles(ctx, truth, pred, agg)
            p_ranks = t_ranks = None
            if any(s.base == "spearman" for s in fit_here + rank_here):
                p_ranks, t_ranks = rank_rows(p_prof), rank_rows(t_prof)  # shared by both
            if fit_here:
                values = fit_metrics(
                    p_prof,
                    t_prof,
                    [s.base for s in fit_here],
                    pred_ranks=p_ranks,
                    truth_ranks=t_ranks,
                )
                for s in fit_here:
                    columns[s.name][rows] = values[s.base]
            position = np.full(G, -1, dtype=np.int64)
            position[rows] = np.arange(rows.size)
            for c, members in covariates:
                if members.size < 2:
                    continue
                at = position[members]
                if rank_here:
                    ranks = rank_metrics(
                        p_prof[at],
                        t_prof[at],
                        [s.base for s in rank_here],
                        pred_ranks=None if p_ranks is None else p_ranks[at],
                        truth_ranks=None if t_ranks is None else t_ranks[at],
                    )
                    for s in rank_here:
                        columns[s.name][members] = ranks[s.base]
                if matrix_here:
                    per_cov["matrix_distance"][c] = matrix_distance(p_prof[at], t_prof[at])
            if keep:
                for side, prof in (("pred", p_prof), ("truth", t_prof)):
                    full = np.full((G, prof.shape[1]), np.nan, dtype=np.float32)
                    full[rows] = prof
                    aggregates[f"{side}_{agg}"] = full
            del t_prof, p_prof, p_ranks, t_ranks
        de_specs = [s for s in ctx.specs if s.family == "de"]
        if de_specs:
            self._de_columns(ctx, truth, pred, rows, columns, de_specs, label)
        dist_specs = [s for s in ctx.specs if s.family == "distribution"]
        if dist_specs:
            self._distribution_columns(ctx, truth, pred, rows, columns, dist_specs)
        order = [s.name for s in ctx.specs if not s.per_covariate]
        per_group = pd.DataFrame({name: columns[name] for name in order})
        n_per_cov = np.array([members.size for _, members in covariates], dtype=np.int64)
        per_covariate = pd.DataFrame({"n_perturbations": n_per_cov, **per_cov})
        return _Scores(per_group=per_group, per_covariate=per_covariate, aggregates=aggregates)

    def _de_columns(self, ctx, truth, pred, rows, columns, specs, label) -> None:
        G = ctx.n_groups
        k = ctx.top_k
        t_delta = truth.mean[rows] - ctx.control_mean[ctx.cov_of_group[rows]]
        p_delta = pred.mean[rows] - ctx.control_mean[ctx.cov_of_group[rows]]
        values = {
            f"jaccard_top{k}": lambda: jaccard_top_k(truth.z[rows], pred.z[rows], k),
            f"jaccard_abs_top{k}": lambda: jaccard_top_k(
                truth.z[rows], pred.z[rows], k, absolute=True
            ),
            f"overlap_top{k}": lambda: overlap_top_k(
                truth.z[rows], truth.fdr[rows], pred.z[rows], k, fdr=ctx.fdr
            ),
            "direction_agreement": lambda: direction_agreement(
                t_delta, truth.fdr[rows], p_delta, fdr=ctx.fdr
            ),
        }
        for s in specs:
            col = np.full(G, np.nan)
            col[rows] = values[s.name]()
            columns[s.name] = col
        if label == "model":
            n_none = int(((truth.fdr[rows] < ctx.fdr).sum(axis=1) == 0).sum())
            if n_none and any(s.name in (f"overlap_top{k}", "direction_agreement") for s in specs):
                self.notes.append(
                    f"overlap_top{k} and direction_agreement are undefined (NaN) for {n_none} "
                    f"group(s) without any truth gene at FDR < {ctx.fdr}"
                )

    def _distribution_columns(self, ctx, truth, pred, rows, columns, specs) -> None:
        G = ctx.n_groups
        names = {s.name for s in specs}
        out = {name: np.full(G, np.nan) for name in names}
        t_rows = truth.rows_by_group()
        p_rows = pred.rows_by_group()
        single = 0
        scored = np.zeros(G, dtype=bool)
        scored[rows] = True
        for c in range(len(ctx.covariates)):
            members = [int(g) for g in ctx.groups_of(c) if scored[g]]
            if not members:
                continue
            if names & {"edistance", "mmd"}:
                mean, comps = self._pca(ctx, c, truth)
            for g in members:
                if names & {"edistance", "mmd"}:
                    rng = np.random.default_rng([ctx.seed, int(g)])
                    tr = t_rows[g][subsample(t_rows[g].size, ctx.max_cells, rng)]
                    pr = p_rows[g][subsample(p_rows[g].size, ctx.max_cells, rng)]
                    T = project(truth.X[tr], mean, comps)
                    P = project(pred.X[pr], mean, comps)
                    single += int(tr.size < 2 or pr.size < 2)
                    if "edistance" in names:
                        out["edistance"][g] = edistance(P, T)
                    if "mmd" in names:
                        out["mmd"][g] = mmd(P, T)
                if "mean_var_kde" in names:
                    out["mean_var_kde"][g] = mean_var_kde(
                        np.column_stack([pred.mean[g], pred.var[g]]),
                        np.column_stack([truth.mean[g], truth.var[g]]),
                    )
        columns.update(out)
        if single:
            self.notes.append(
                f"{single} group(s) have a single observed or predicted cell: their "
                "edistance/mmd within-set term is defined as that of a lone point (0 / k(x,x)=1)"
            )

    def _pca(self, ctx: _Context, c: int, truth: _Side):
        if c not in ctx._pca:
            members = ctx.groups_of(c)
            cells = np.flatnonzero(np.isin(truth.codes, members))
            rows = np.concatenate([ctx.control_rows[c], cells])
            ctx._pca[c] = pca_basis(ctx.truth_X[np.sort(rows)], n_pcs=ctx.n_pcs, seed=ctx.seed)
        return ctx._pca[c]

    # -- calibration references ------------------------------------------------------
    def _baseline_side(self, ctx: _Context, name: str, split, pred_side: _Side) -> _Side | None:
        from pertbench.models.base import build_counterfactuals
        from pertbench.models.registry import create_model

        keys = self.keys
        truth = self.truth
        if self.genes_arg is not None:
            truth = truth[:, list(ctx.genes)]
        model = create_model(name, keys=keys)
        try:
            model.fit(truth, split, seed=self.seed, device="cpu", progress=False)
        except ModelError as exc:
            self.notes.append(f"baseline {name} could not be fitted: {exc}")
            return None
        requests = ctx.groups[[*keys.covariate_keys, keys.perturbation_key]]
        can = _predictable(model, requests, keys)
        if not can.any():
            self.notes.append(f"baseline {name} cannot predict any evaluated group")
            return None
        if not can.all():
            labels = [ctx.group_labels()[g] for g in np.flatnonzero(~can)[:5]]
            self.notes.append(
                f"baseline {name} cannot predict {int((~can).sum())} group(s) (a perturbation "
                f"without training data), e.g. {', '.join(labels)}: left NaN"
            )
        # Every group of a covariate gets the SAME control cells: the evaluator's own
        # controls, so no_change is exactly the control profile. Only when that would make
        # more predicted cells than max(predicted cells, BASELINE_CELL_BUDGET) are the
        # controls subsampled (seeded) to the size of the largest predicted group.
        per_group_ctrl = np.array([ctx.control_rows[c].size for c in ctx.cov_of_group[can]])
        budget = max(int(pred_side.n.sum()), BASELINE_CELL_BUDGET)
        cap = None
        if per_group_ctrl.sum() > budget:
            cap = int(max(pred_side.n.max(), 1))
            self.notes.append(
                f"baselines were predicted from at most {cap} control cells per covariate "
                "combination (seeded subsample, the same for every group) to bound memory"
            )
        rng = np.random.default_rng([self.seed, 1])
        chosen = np.zeros(truth.n_obs, dtype=bool)
        for rows in ctx.control_rows:
            chosen[rows[subsample(rows.size, cap, rng)]] = True
        inputs_split = pd.Series(
            np.where(chosen, "test", ""), index=truth.obs_names.astype(str), dtype=object
        )
        cf = build_counterfactuals(
            truth,
            requests[can].reset_index(drop=True),
            keys,
            control_split=inputs_split,
            prefer_split="test",
        )
        predicted = model.predict(cf, seed=self.seed)
        # counterfactual rows come request by request; map them back to evaluated groups
        req = pd.MultiIndex.from_frame(
            predicted.obs[[*keys.covariate_keys, keys.perturbation_key]].astype(str)
        )
        codes = pd.MultiIndex.from_frame(requests.astype(str)).get_indexer(req)
        return self._side(ctx, predicted.X, codes.astype(np.int64))

    def _ceiling_scores(self, ctx: _Context, truth_X, truth_side: _Side) -> _Scores:
        """Expected scores of a perfect model (rules in :mod:`pertbench.metrics.ceiling`):
        bootstrap replicates of the observed groups (and replicates of those), scored like
        predictions, then each family's rule."""
        n = truth_side.n
        few = int(((n > 0) & (n < ceil.MIN_CELLS)).sum())
        if few:
            self.notes.append(
                f"the ceiling is undefined (NaN) for {few} group(s) with fewer than "
                f"{ceil.MIN_CELLS} observed cells (one cell says nothing about its sampling noise)"
            )
        fit = [s for s in ctx.specs if s.family == "fit"]
        ranks = [s for s in ctx.specs if s.family == "rank" and not s.per_covariate]
        on_sides = [s for s in ctx.specs if s.name in ceil.ON_SIDES]
        profiled = list(dict.fromkeys(s.aggregation for s in fit + ranks))
        rep_ctx = replace(ctx, specs=on_sides, need_de="logp" in profiled)
        accumulators = {agg: ceil.FitCeiling(ctx.n_groups, agg) for agg in profiled}
        side_scores: dict[str, tuple[list, list]] = {s.name: ([], []) for s in on_sides}
        rank_ceiling = ceil.RankCeiling(
            [(s.name, s.base, s.aggregation) for s in ranks], n, ctx.cov_of_group
        )
        rng = np.random.default_rng([self.seed, 0xCE11])
        observed = ceil.observed_rows(truth_side.codes, ctx.n_groups)
        for replicate_index in range(self.ceiling_replicates):
            rows, codes = ceil.bootstrap_rows(truth_side.codes, ctx.n_groups, rng=rng)
            inner, inner_codes = ceil.bootstrap_rows(codes, ctx.n_groups, rng=rng)
            boot = self._side(rep_ctx, truth_X[rows], codes)
            boot2 = self._side(rep_ctx, truth_X[rows[inner]], inner_codes)
            first = ceil.weight_balance(rows, observed, codes, ctx.n_groups)
            second = ceil.weight_balance(rows[inner], rows, inner_codes, ctx.n_groups)
            for agg in profiled:
                t_prof, b_prof, at = _profiles(ctx, truth_side, boot, agg)
                bb_prof = ceil.balanced(b_prof, _profiles(ctx, boot, boot2, agg)[1], second[at])
                parent, b_prof = b_prof, ceil.balanced(t_prof, b_prof, first[at])
                accumulators[agg].add(at, t_prof, b_prof, parent, bb_prof)
                rank_ceiling.add(agg, at, t_prof, b_prof)
            if on_sides and replicate_index < ceil.SIDE_REPLICATES:
                scored = (
                    self._score(rep_ctx, truth_side, boot, label=CEILING),
                    self._score(rep_ctx, boot, boot2, label=CEILING),
                )
                for s in on_sides:
                    unit = "per_covariate" if s.per_covariate else "per_group"
                    for level, scores in enumerate(scored):
                        side_scores[s.name][level].append(getattr(scores, unit)[s.name].to_numpy())
        columns: dict[str, np.ndarray] = {}
        for agg, accumulator in accumulators.items():
            here = [s for s in fit if s.aggregation == agg]
            values = accumulator.ceilings([s.base for s in here])
            columns.update({s.name: values[s.base] for s in here})
        for s in on_sides:
            columns[s.name] = ceil.iterated(*(np.array(v) for v in side_scores[s.name]))
        for agg in rank_ceiling.aggregations:
            t_prof, _, at = _profiles(ctx, truth_side, truth_side, agg)
            columns.update(rank_ceiling.ceilings(agg, at, t_prof))
        de = [s.name for s in ctx.specs if s.family == "de"]
        usable = np.flatnonzero(n >= ceil.MIN_CELLS)
        if de:
            t_delta = truth_side.mean[usable] - ctx.control_mean[ctx.cov_of_group[usable]]
            n_ctrl = np.array([ctx.control_rows[c].size for c in ctx.cov_of_group[usable]])
            values = ceil.de_ceiling(
                truth_side.z[usable],
                truth_side.fdr[usable],
                t_delta,
                ceil.own_noise_sd(n[usable], n_ctrl),
                de,
                top_k=ctx.top_k,
                fdr=ctx.fdr,
                n_draws=self.ceiling_replicates,
                rng=np.random.default_rng([self.seed, 0xDE]),
            )
            for name in de:
                columns[name] = np.full(ctx.n_groups, np.nan)
                columns[name][usable] = values[name]
        for s in ctx.specs:
            if s.name in ceil.ZERO_CEILING:
                columns[s.name] = np.where(n >= ceil.MIN_CELLS, 0.0, np.nan)
        n_per_cov = [
            int(truth_side.present[ctx.groups_of(c)].sum()) for c in range(len(ctx.covariates))
        ]
        return _Scores(
            per_group=pd.DataFrame(
                {s.name: columns[s.name] for s in ctx.specs if not s.per_covariate}
            ),
            per_covariate=pd.DataFrame(
                {
                    "n_perturbations": n_per_cov,
                    **{s.name: columns[s.name] for s in ctx.specs if s.per_covariate},
                }
            ),
        )

    def _replicate_agreement(self, ctx: _Context, truth_X, truth_side: _Side) -> _Scores:
        """One random half of each group's observed cells scored against the other half."""
        half_a, half_b = cal.split_halves(truth_side.codes, ctx.n_groups, seed=self.seed)
        too_small = int((truth_side.n < 2).sum())
        if too_small:
            self.notes.append(
                f"replicate agreement is undefined (NaN) for {too_small} group(s) with fewer "
                "than 2 observed cells (they cannot be split in halves)"
            )
        side_b = self._side(ctx, truth_X, half_b)
        side_a = self._side(ctx, truth_X, half_a)
        return self._score(ctx, side_b, side_a, label=REPLICATE_AGREEMENT)

    # -- assembling ----------------------------------------------------------------------
    def _result(
        self, ctx, specs, model: _Scores, refs: dict[str, _Scores], skipped
    ) -> EvaluationResult:
        keys = ctx.keys
        id_cols = [*keys.covariate_keys, keys.perturbation_key]
        cov_cols = list(keys.covariate_keys)
        group_ids = ctx.groups[id_cols].reset_index(drop=True)
        cov_ids = (
            ctx.covariates[cov_cols].reset_index(drop=True)
            if cov_cols
            else pd.DataFrame(index=range(len(ctx.covariates)))
        )
        group_specs = [s for s in specs if not s.per_covariate]
        cov_specs = [s for s in specs if s.per_covariate]

        def summary_of(scores: _Scores, prefix: str = "") -> pd.DataFrame:
            parts = []
            if group_specs:
                parts.append(
                    cal.bootstrap_means(
                        scores.per_group[[s.name for s in group_specs]],
                        n_bootstrap=self.n_bootstrap,
                        seed=self.seed,
                    )
                )
            if cov_specs:
                parts.append(
                    cal.bootstrap_means(
                        scores.per_covariate[[s.name for s in cov_specs]],
                        n_bootstrap=self.n_bootstrap,
                        seed=self.seed,
                    )
                )
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
            names = [self.model_label, *refs]
            for frame, name in zip(per_group_parts, names, strict=True):
                frame.insert(0, "model", name)
            for frame, name in zip(per_cov_parts, names, strict=True):
                frame.insert(0, "model", name)
            calibration, normalized_rows = self._calibration(specs, model, refs, summary_parts)
            if normalized_rows is not None:
                summary_parts.append(normalized_rows)
        summary = pd.concat(summary_parts, ignore_index=True)
        if self.n_bootstrap <= 0:
            summary = summary[["metric", "value"]]
        per_group = pd.concat(per_group_parts, ignore_index=True)
        per_covariate = pd.concat(per_cov_parts, ignore_index=True)

        aggregates = {}
        if self.keep_aggregates:
            labels = pd.Index(ctx.group_labels(), name="group")
            for key, arr in model.aggregates.items():
                aggregates[key] = pd.DataFrame(
                    arr.astype(np.float32), index=labels, columns=ctx.genes
                )
        settings = {
            "metrics": [s.name for s in specs],
            "keys": keys.to_dict(),
            "on": self.on if self.split_arg is not None else None,
            "split": str(self.split_arg)
            if isinstance(self.split_arg, (str, os.PathLike))
            else ("given" if self.split_arg is not None else None),
            "baselines": list(self.baselines),
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
            "n_genes": len(ctx.genes),
            "n_groups": ctx.n_groups,
            "model_name": self.model_name,
        }
        return EvaluationResult(
            summary=summary,
            per_group=per_group,
            per_covariate=per_covariate,
            calibration=calibration,
            skipped=skipped,
            notes=list(dict.fromkeys(self.notes)),
            settings=settings,
            aggregates=aggregates,
        )

    def _calibration(self, specs, model: _Scores, refs: dict[str, _Scores], summary_parts):
        names = [self.model_label, *refs]
        values = {
            name: frame.set_index(frame["metric"].str.split("/", n=1).str[-1])["value"]
            for name, frame in zip(names, summary_parts, strict=True)
        }
        table = pd.DataFrame({"metric": [s.name for s in specs]})
        for name in names:
            table[name] = table["metric"].map(values[name]).to_numpy()
        base = self.normalize_by
        if base not in refs or CEILING not in refs:
            return table, None
        norm, lows, highs = [], [], []
        undefined = []
        for s in specs:
            unit_frame = "per_covariate" if s.per_covariate else "per_group"
            m = getattr(model, unit_frame)[s.name].to_numpy()
            b = getattr(refs[base], unit_frame)[s.name].to_numpy()
            c = getattr(refs[CEILING], unit_frame)[s.name].to_numpy()
            value, lo, hi, n_units = cal.bootstrap_normalized(
                m,
                b,
                c,
                higher_is_better=s.higher_is_better,
                n_bootstrap=self.n_bootstrap,
                seed=self.seed,
            )
            if n_units and np.isnan(value):
                undefined.append(s.name)
            norm.append(value)
            lows.append(lo)
            highs.append(hi)
        table[NORMALIZED] = norm
        table[f"{NORMALIZED}_ci_low"] = lows
        table[f"{NORMALIZED}_ci_high"] = highs
        if undefined:
            self.notes.append(
                f"normalised score undefined (NaN) where the ceiling is not better than the "
                f"{base} baseline: {', '.join(undefined[:10])}"
                + (f" and {len(undefined) - 10} more" if len(undefined) > 10 else "")
            )
        rows = pd.DataFrame(
            {
                "metric": [f"{NORMALIZED}/{s.name}" for s in specs],
                "value": norm,
                "ci_low": lows,
                "ci_high": highs,
            }
        )
        return table, rows


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def evaluate(truth, pred, **options: Any) -> EvaluationResult:
    """Shortcut for ``Evaluator(truth, pred, **options).run()``."""
    return Evaluator(truth, pred, **options).run()


def _read(value, label: str, keys: PerturbationKeys) -> ad.AnnData:
    """An AnnData as given, or read from a path (truth is checked against the data
    contract; predictions only get the evaluator's own checks)."""
    if isinstance(value, ad.AnnData):
        return value
    if isinstance(value, (str, os.PathLike)):
        from pertbench.data.loading import read_h5ad

        return read_h5ad(value, keys=keys, validate=label == "truth")
    raise EvaluationError(
        f"{label} must be an AnnData or an .h5ad path, got {type(value).__name__}"
    )


def _available_cpus() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    return max(1, min(count, 8))


def _take_columns(X, idx: np.ndarray, n_cols: int):
    """``X`` restricted/reordered to columns ``idx`` (no copy when already in order)."""
    if idx.size == n_cols and np.array_equal(idx, np.arange(n_cols)):
        return X
    if sp.issparse(X):
        return sp.csr_matrix(X)[:, idx]
    return np.asarray(X)[:, idx]


def _profiles(ctx: _Context, truth: _Side, other: _Side, aggregation: str):
    """One aggregation of ``truth`` and ``other`` over the groups both have cells for.

    Returns the two (groups x genes) profiles and the indices of those groups.
    """
    at = np.flatnonzero(truth.present & other.present)
    ctrl = ctx.control_mean[ctx.cov_of_group[at]]
    profiles = [
        aggregate(
            side.mean[at],
            side.var[at],
            ctrl,
            aggregations=(aggregation,),
            de_scores=None if side.z is None else side.z[at],
        )[aggregation]
        for side in (truth, other)
    ]
    return profiles[0], profiles[1], at


def _predictable(model, requests: pd.DataFrame, keys: PerturbationKeys) -> np.ndarray:
    """Which requested groups a fitted baseline can predict."""
    return np.asarray(model.can_predict(requests[keys.perturbation_key].astype(str)), dtype=bool)
