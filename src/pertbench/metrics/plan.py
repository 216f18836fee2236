"""Stage 1 of the evaluator: align genes and build the group index (covariate blocks).

Everything here reads only ``obs`` and ``var`` (never ``X``), so it is cheap for any
number of cells and the same in every worker. The result, an :class:`EvaluationPlan`,
says which cells of the truth and of the prediction make up each evaluated group, which
control cells each covariate combination is compared with, and cuts the groups into
:class:`Block` s, one per covariate combination: the unit of streaming, of the N x N
rank metrics and of parallel (Ray) evaluation.

Which cells are compared (the evaluator's contract, see docs/metrics.md):

- Groups: without a split, the groups present in ``pred`` (``truth`` may be the whole
  dataset); a predicted group absent from ``truth`` is an error. With ``split``, the
  groups of the ``on`` split of ``truth``; a group missing from ``pred`` (or a predicted
  group outside that split) is an error. ``skip_missing`` turns these errors into
  reported skips.
- Observed cells of a group: all its truth cells, or those in the ``on`` split.
- Controls: ALWAYS observed controls from ``truth`` with the same covariates. With a
  split, the covariates' controls in the ``on`` split when there are any, else all of
  them (as :meth:`~pertbench.models.base.PerturbationModel.predict_split` does).
- Genes: ``truth``'s genes (or ``genes=``), matched by name in ``pred``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import COVARIATE_LABEL_SEP, Grouping, group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import read_split
from pertbench.errors import DataValidationError, EvaluationError


@dataclass
class Block:
    """The evaluated groups of one covariate combination and the cells that describe them.

    Row indices are positions in the truth / prediction files, ascending; codes are the
    block-local group index (0 .. n_groups - 1) of each row.
    """

    index: int
    label: str
    groups: np.ndarray  # global indices of the evaluated groups (contiguous, ascending)
    truth_rows: np.ndarray
    truth_codes: np.ndarray
    pred_rows: np.ndarray
    pred_codes: np.ndarray
    control_rows: np.ndarray

    @property
    def n_groups(self) -> int:
        return int(self.groups.size)

    def truth_counts(self) -> np.ndarray:
        return np.bincount(self.truth_codes, minlength=self.n_groups)

    def pred_counts(self) -> np.ndarray:
        return np.bincount(self.pred_codes, minlength=self.n_groups)

    def chunks(self, max_cells: int, extra_per_group: np.ndarray | None = None) -> list[slice]:
        """Consecutive ranges of the block's groups whose cells fit ``max_cells``.

        A group's cost is its observed plus predicted cells (plus ``extra_per_group``,
        e.g. the cells a baseline generates for it); a range holds at least one group.
        """
        cost = self.truth_counts() + self.pred_counts()
        if extra_per_group is not None:
            cost = cost + np.asarray(extra_per_group, dtype=np.int64)
        out, lo, used = [], 0, 0
        for g, c in enumerate(cost):
            if g > lo and used + c > max_cells:
                out.append(slice(lo, g))
                lo, used = g, 0
            used += int(c)
        out.append(slice(lo, self.n_groups))
        return out


@dataclass
class EvaluationPlan:
    """The evaluated groups, covariate blocks, genes and cells of one evaluation."""

    keys: PerturbationKeys
    genes: pd.Index
    truth_columns: np.ndarray  # position of each evaluated gene in truth's var
    pred_columns: np.ndarray  # ... and in pred's var
    groups: pd.DataFrame  # covariate columns, perturbation column, cov_index
    covariates: pd.DataFrame  # covariate columns + label
    cov_of_group: np.ndarray
    truth_codes: np.ndarray  # per truth row: evaluated group or -1
    pred_codes: np.ndarray  # per pred row: evaluated group or -1
    control_rows: list[np.ndarray]  # per covariate combination
    truth_grouping: Grouping
    truth_block: np.ndarray  # per truth row: its covariate block, or -1
    split: pd.Series | None
    on: str
    blocks: list[Block]
    skipped: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def truth_counts(self) -> np.ndarray:
        return np.bincount(self.truth_codes[self.truth_codes >= 0], minlength=self.n_groups)

    def pred_counts(self) -> np.ndarray:
        return np.bincount(self.pred_codes[self.pred_codes >= 0], minlength=self.n_groups)

    def group_labels(self) -> list[str]:
        cov = self.covariates["label"].to_numpy()[self.cov_of_group]
        pert = self.groups[self.keys.perturbation_key].to_numpy()
        return [f"{c}:{p}" for c, p in zip(cov, pert, strict=True)]

    def all_groups(self, block: Block) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """Every group of the block's covariate combination in the truth, whatever its split.

        Returns a table (perturbation column, ``split`` — ``all`` without a split —,
        ``n_cells``, ``is_control``, ``evaluated``: the block-local index of the evaluated group these
        cells are, else -1), the truth rows of the block (controls included, ascending)
        and the table row of each.
        """
        keys = self.keys
        rows = np.flatnonzero(self.truth_block == block.index)
        grouping = self.truth_grouping
        labels = grouping.perturbations.to_numpy()[grouping.perturbation_codes[rows]]
        splits = (
            np.full(rows.size, "all", dtype=object)
            if self.split is None
            else self.split.to_numpy()[rows].astype(str)
        )
        index = pd.MultiIndex.from_arrays([labels.astype(str), splits])
        codes, uniques = pd.factorize(index, sort=True)
        table = uniques.to_frame(index=False, name=[keys.perturbation_key, "split"])
        table["n_cells"] = np.bincount(codes, minlength=len(table))
        table["is_control"] = table[keys.perturbation_key].to_numpy() == keys.control
        local = pd.Index(self.groups[keys.perturbation_key].to_numpy()[block.groups].astype(str))
        position = local.get_indexer(table[keys.perturbation_key])
        scored_split = table["split"].to_numpy() == (self.on if self.split is not None else "all")
        table["evaluated"] = np.where(scored_split & (position >= 0), position, -1)
        return table, rows, codes.astype(np.int64)

    def requests(self) -> pd.DataFrame:
        """(covariates, perturbation) of every evaluated group, as prediction requests."""
        return self.groups[[*self.keys.covariate_keys, self.keys.perturbation_key]]


def read_split_for(truth: ad.AnnData, split) -> pd.Series | None:
    """The split aligned to ``truth.obs_names`` (a Series or an ``obs_name,split`` CSV)."""
    if split is None:
        return None
    if isinstance(split, pd.Series):
        from pertbench.models.base import align_split

        return align_split(truth, split)
    if isinstance(split, (str, os.PathLike)):
        return read_split(split, truth.obs_names)
    raise EvaluationError(f"split must be a Series or a CSV path, got {type(split).__name__}")


def _align_genes(truth: ad.AnnData, pred: ad.AnnData, genes, notes: list[str]):
    truth_names = pd.Index(truth.var_names.astype(str))
    pred_names = pd.Index(pred.var_names.astype(str))
    for label, names in (("truth", truth_names), ("pred", pred_names)):
        if not names.is_unique:
            dup = names[names.duplicated()][:3]
            raise DataValidationError(
                f"{label} has duplicated gene names ({', '.join(dup)}); make var_names unique"
            )
    if genes is not None:
        chosen = pd.Index([str(g) for g in genes])
        missing = chosen.difference(truth_names)
        if len(missing):
            raise EvaluationError(
                f"{len(missing)} selected gene(s) are not in truth, e.g. {', '.join(missing[:5])}"
            )
    else:
        chosen = truth_names
    if chosen.empty:
        raise EvaluationError("no genes to evaluate")
    idx = pred_names.get_indexer(chosen)
    if (idx < 0).any():
        missing = chosen[idx < 0]
        raise EvaluationError(
            f"{len(missing)} gene(s) of truth are missing from pred, e.g. "
            f"{', '.join(missing[:5])}; predict all genes or pass genes= to evaluate a subset"
        )
    extra = len(pred_names) - len(chosen)
    if extra > 0:
        notes.append(f"{extra} gene(s) of pred not in the evaluated gene set were ignored")
    return chosen, truth_names.get_indexer(chosen).astype(np.int64), idx.astype(np.int64)


def build_plan(
    truth: ad.AnnData,
    pred: ad.AnnData,
    *,
    keys: PerturbationKeys,
    split: pd.Series | None = None,
    on: str = "test",
    genes=None,
    skip_missing: bool = False,
) -> EvaluationPlan:
    """Align genes and index the evaluated groups, their cells and their controls.

    ``truth`` and ``pred`` may be in memory or backed: only obs and var are read.
    ``split`` must already be aligned to ``truth.obs_names`` (:func:`read_split_for`).
    """
    notes: list[str] = []
    genes, truth_columns, pred_columns = _align_genes(truth, pred, genes, notes)
    cov_keys = list(keys.covariate_keys)
    id_cols = [*cov_keys, keys.perturbation_key]
    t_group = group_cells(truth.obs, keys)
    p_group = group_cells(pred.obs, keys)
    eligible = np.ones(truth.n_obs, dtype=bool) if split is None else (split.to_numpy() == on)
    t_cells = eligible & ~t_group.is_control
    t_present = np.unique(t_group.group_codes[t_cells])
    t_index = pd.MultiIndex.from_frame(t_group.groups.iloc[t_present][id_cols].astype(str))
    p_table = p_group.groups.loc[~p_group.groups["is_control"], id_cols].astype(str)
    p_index = pd.MultiIndex.from_frame(p_table)
    if p_group.is_control.any():
        notes.append(
            f"{int(p_group.is_control.sum())} predicted control row(s) were ignored: "
            "controls always come from truth"
        )
    skipped_rows: list[list[str]] = []

    def missing(index: pd.MultiIndex, reason: str) -> None:
        if not len(index):
            return
        labels = [":".join(map(str, t)) for t in index]
        if not skip_missing:
            raise EvaluationError(
                f"{len(labels)} group(s) cannot be scored ({reason}), e.g. {', '.join(labels[:5])}; "
                "pass --skip-missing (skip_missing=True) to skip and report them"
            )
        skipped_rows.extend([*map(str, t), reason] for t in index)
        notes.append(f"skipped {len(labels)} group(s): {reason}")

    if split is None:
        missing(p_index.difference(t_index), "predicted group has no observed cells in truth")
        evaluated = p_index.intersection(t_index)
    else:
        missing(t_index.difference(p_index), f"group of the '{on}' split has no prediction")
        missing(p_index.difference(t_index), f"predicted group is not in the '{on}' split of truth")
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
        t_cov = cov_index.get_indexer(
            pd.MultiIndex.from_frame(t_group.covariates[cov_keys].astype(str))
        )[t_group.covariate_codes]
    else:
        cov_frame = pd.DataFrame({"label": ["all"]})
        cov_of_group = np.zeros(len(groups), dtype=np.int64)
        t_cov = np.zeros(truth.n_obs, dtype=np.int64)
    cov_of_group = np.asarray(cov_of_group, dtype=np.int64)
    groups["cov_index"] = cov_of_group

    t_map = evaluated.get_indexer(pd.MultiIndex.from_frame(t_group.groups[id_cols].astype(str)))
    truth_codes = np.where(t_cells, t_map[t_group.group_codes], -1).astype(np.int64)
    p_map = evaluated.get_indexer(pd.MultiIndex.from_frame(p_group.groups[id_cols].astype(str)))
    pred_codes = np.where(~p_group.is_control, p_map[p_group.group_codes], -1).astype(np.int64)

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

    blocks = _blocks(cov_frame, cov_of_group, truth_codes, pred_codes, control_rows)
    return EvaluationPlan(
        keys=keys,
        genes=genes,
        truth_columns=truth_columns,
        pred_columns=pred_columns,
        groups=groups,
        covariates=cov_frame,
        cov_of_group=cov_of_group,
        truth_codes=truth_codes,
        pred_codes=pred_codes,
        control_rows=control_rows,
        truth_grouping=t_group,
        truth_block=np.asarray(t_cov, dtype=np.int64),
        split=split,
        on=on,
        blocks=blocks,
        skipped=pd.DataFrame(skipped_rows, columns=[*id_cols, "reason"]),
        notes=notes,
    )


def _rows_by_block(codes: np.ndarray, cov_of_group: np.ndarray, n_blocks: int):
    """Per block: (ascending rows, their global group codes), vectorised."""
    rows = np.flatnonzero(codes >= 0)
    block_of = cov_of_group[codes[rows]]
    order = np.argsort(block_of, kind="stable")  # stable: rows stay ascending in a block
    rows, block_of = rows[order], block_of[order]
    bounds = np.searchsorted(block_of, np.arange(n_blocks + 1))
    return [
        (rows[bounds[b] : bounds[b + 1]], codes[rows[bounds[b] : bounds[b + 1]]])
        for b in range(n_blocks)
    ]


def _blocks(cov_frame, cov_of_group, truth_codes, pred_codes, control_rows) -> list[Block]:
    n_blocks = len(cov_frame)
    truth_parts = _rows_by_block(truth_codes, cov_of_group, n_blocks)
    pred_parts = _rows_by_block(pred_codes, cov_of_group, n_blocks)
    out = []
    for b in range(n_blocks):
        groups = np.flatnonzero(cov_of_group == b)  # contiguous: groups sort by covariates
        t_rows, t_codes = truth_parts[b]
        p_rows, p_codes = pred_parts[b]
        out.append(
            Block(
                index=b,
                label=str(cov_frame.loc[b, "label"]),
                groups=groups,
                truth_rows=t_rows,
                truth_codes=t_codes - groups[0],
                pred_rows=p_rows,
                pred_codes=p_codes - groups[0],
                control_rows=control_rows[b],
            )
        )
    return out
