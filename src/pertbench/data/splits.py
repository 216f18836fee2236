"""Train/val/test splits of cells.

A split is a ``pandas.Series`` of strings indexed by obs names, with values ``"train"``,
``"val"``, ``"test"`` or ``""`` (cell left out of the task). On disk it is a CSV with the
header ``obs_name,split`` that reads back identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.data.groups import Grouping, group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, InputFileError, SplitError, shown
from pertbench.utils.io import write_csv_atomic

SPLIT_NAMES = ("train", "val", "test")
LEFT_OUT = ""
SPLIT_COLUMNS = ("obs_name", "split")


def make_split(
    obs_names: pd.Index | list[str], values: np.ndarray | list[str] | str = LEFT_OUT
) -> pd.Series:
    """Build a split Series over ``obs_names`` (all cells left out unless ``values`` given)."""
    index = pd.Index(obs_names, dtype=object, name="obs_name")
    if isinstance(values, str):
        values = np.full(len(index), values, dtype=object)
    series = pd.Series(np.asarray(values, dtype=object), index=index, name="split")
    check_split_values(series)
    return series


def check_split_values(split: pd.Series) -> None:
    """Raise :class:`SplitError` if a value is not train/val/test/empty or a name repeats."""
    allowed = {*SPLIT_NAMES, LEFT_OUT}
    bad = pd.unique(split[~split.isin(allowed)].astype(str))
    if len(bad):
        raise SplitError(
            f"split values must be train, val, test or empty; found {', '.join(map(shown, bad[:5]))}"
        )
    if not split.index.is_unique:
        dup = split.index[split.index.duplicated()][:3]
        raise SplitError(f"split lists obs names more than once: {', '.join(map(shown, dup))}")


def write_split(split: pd.Series, path: str | os.PathLike) -> Path:
    """Write a split as CSV (``obs_name,split``) atomically."""
    check_split_values(split)
    frame = pd.DataFrame(
        {"obs_name": split.index.astype(str), "split": split.to_numpy(dtype=object)}
    )
    return write_csv_atomic(path, frame)


def read_split(path: str | os.PathLike, obs_names: pd.Index | None = None) -> pd.Series:
    """Read a split CSV written by :func:`write_split` (or by hand).

    Parameters
    ----------
    path
        CSV with columns ``obs_name`` and ``split``.
    obs_names
        If given, the split is aligned to these cells: every listed cell must exist in
        ``obs_names``; cells absent from the file are left out (``""``).
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(
            f"split file '{path}' does not exist; create one with 'pertbench split'"
        )
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    except Exception as exc:  # malformed CSV of any kind
        raise InputFileError(f"cannot read split file '{path}': {exc}") from exc
    if list(frame.columns[:2]) != list(SPLIT_COLUMNS):
        # The first line is not quoted: the path may point at any file (never echo it).
        raise SplitError(
            f"split file '{path}' does not start with the header 'obs_name,split'; is it a "
            "split CSV from 'pertbench split'?"
        )
    split = pd.Series(
        frame["split"].str.strip().to_numpy(dtype=object),
        index=pd.Index(frame["obs_name"], dtype=object, name="obs_name"),
        name="split",
    )
    check_split_values(split)
    if obs_names is not None:
        obs_names = pd.Index(obs_names, dtype=object)
        unknown = split.index.difference(obs_names)
        if len(unknown):
            raise SplitError(
                f"split file '{path}' names {len(unknown)} cell(s) not in the data "
                f"(e.g. {shown(unknown[0])}); was it made for another dataset?"
            )
        split = split.reindex(obs_names, fill_value=LEFT_OUT)
        split.index.name = "obs_name"
    return split


# ---------------------------------------------------------------------------------------
# Task splitters
# ---------------------------------------------------------------------------------------

TASKS = ("transfer", "combo", "combo_inverse", "celltype", "unseen", "fewshot", "custom")
_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2, LEFT_OUT: 3}
UNPLACED_COLUMNS = ("n_cells", "reason")


@dataclass
class SplitResult:
    """A task split and what it did.

    Attributes
    ----------
    split
        ``pd.Series`` of ``"train"``/``"val"``/``"test"``/``""`` indexed by obs names.
    summary
        One row per (covariates, perturbation) group: covariate columns, the perturbation
        column, ``train``/``val``/``test``/``left_out`` cell counts and ``role`` (the
        split the group was given, ``control`` for controls).
    unplaced
        Groups that could not be placed (left out of the task), with a ``reason``.
    task, params, seed, keys
        How the split was made.
    heldout_on
        Splits whose (covariates, perturbation) pairs must not appear in train.
    leak_scope
        ``"group"``: a held-out (covariates, perturbation) pair must not be in train;
        ``"perturbation"`` (the ``unseen`` task): a held-out perturbation must not be in
        train in ANY covariate (see :func:`find_leakage`).
    notes
        Non-fatal remarks (quotas not reached, covariates with too few controls, ...).
    """

    split: pd.Series
    summary: pd.DataFrame
    unplaced: pd.DataFrame
    task: str
    params: dict[str, Any]
    seed: int
    keys: PerturbationKeys
    obs: pd.DataFrame = field(repr=False)
    heldout_on: tuple[str, ...] = ("val", "test")
    notes: list[str] = field(default_factory=list)
    leak_scope: str = "group"

    def leakage(self) -> pd.DataFrame:
        """Held-out groups that leak into train (see ``leak_scope``).

        An empty frame means no leakage.
        """
        return find_leakage(
            self.obs, self.split, self.keys, heldout_on=self.heldout_on, scope=self.leak_scope
        )

    def counts(self) -> pd.Series:
        """Cells per split (train, val, test, left out)."""
        values = self.split.replace({LEFT_OUT: "left_out"})
        return values.value_counts().reindex(["train", "val", "test", "left_out"], fill_value=0)

    def heldout_pairs(self, on: str | tuple[str, ...] | None = None) -> pd.DataFrame:
        """The non-control groups whose role is one of ``on`` (default: ``heldout_on``)."""
        on = self.heldout_on if on is None else ((on,) if isinstance(on, str) else on)
        table = self.summary
        return table[table["role"].isin(on)].reset_index(drop=True)

    def write(self, path: str | os.PathLike) -> Path:
        """Write the split CSV (``obs_name,split``) atomically."""
        return write_split(self.split, path)

    def to_text(self, *, max_rows: int = 60) -> str:
        """Readable summary: cells per split, groups per role, unplaced groups, notes."""
        counts = self.counts()
        lines = [
            f"task {self.task} (seed {self.seed}): "
            + ", ".join(f"{k} {v:,} cells" for k, v in counts.items())
        ]
        roles = self.summary["role"].value_counts()
        lines.append(
            "groups: "
            + ", ".join(
                f"{roles.get(r, 0)} {r}" for r in ("train", "val", "test", "control", "left_out")
            )
        )
        shown = self.summary.drop(columns=["role"])
        table = shown.to_string(index=False, max_rows=max_rows)
        lines.append(table)
        if len(self.unplaced):
            lines.append(f"unplaced groups ({len(self.unplaced)}), left out of the task:")
            lines.append(self.unplaced.to_string(index=False, max_rows=max_rows))
        leak = self.leakage()
        lines.append(
            "leakage: none" if leak.empty else f"LEAKAGE: {len(leak)} held-out pair(s) in train"
        )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def find_leakage(
    obs: pd.DataFrame,
    split: pd.Series,
    keys: PerturbationKeys,
    *,
    heldout_on: tuple[str, ...] = ("val", "test"),
    scope: str = "group",
) -> pd.DataFrame:
    """Held-out groups (cells in ``heldout_on``) that leak into train.

    ``scope="group"``: the same (covariates, perturbation) pair has train cells.
    ``scope="perturbation"``: a held-out single is a part of some perturbation with train
    cells in any covariate, or a held-out combination (in any order of its parts) has train
    cells in any covariate. Controls are excluded (they are split per covariate combination
    on purpose). Returns the covariate columns, the perturbation column, ``n_train`` (train
    cells of the pair, or of the perturbations it leaks through) and ``n_heldout``.
    """
    if scope not in ("group", "perturbation"):
        raise ConfigError(f"leak scope must be 'group' or 'perturbation', got '{scope}'")
    grouping = group_cells(obs, keys)
    counts = _split_counts(grouping, split)
    heldout_cols = [_SPLIT_INDEX[s] for s in heldout_on]
    n_train = counts[:, 0]
    n_heldout = counts[:, heldout_cols].sum(axis=1)
    if scope == "perturbation":
        n_train = _train_cells_by_perturbation(grouping, n_train)
    leaking = (n_train > 0) & (n_heldout > 0) & ~grouping.groups["is_control"].to_numpy()
    cols = [*keys.covariate_keys, keys.perturbation_key]
    out = grouping.groups.loc[leaking, cols].reset_index(drop=True)
    out["n_train"] = n_train[leaking]
    out["n_heldout"] = n_heldout[leaking]
    return out


def _train_cells_by_perturbation(grouping: Grouping, n_train: np.ndarray) -> np.ndarray:
    """Per group: train cells of any perturbation that would reveal the group's perturbation
    (for a single: every perturbation containing it; for a combination: itself, any order)."""
    keys = grouping.keys
    labels = grouping.groups[keys.perturbation_key].astype(str).to_numpy()
    is_ctrl = grouping.groups["is_control"].to_numpy()
    by_part: dict[str, int] = {}
    by_combo: dict[frozenset[str], int] = {}
    for label, n, ctrl in zip(labels, n_train, is_ctrl, strict=True):  # groups, not cells
        if ctrl or n == 0:
            continue
        parts = keys.components(label)
        for part in set(parts):
            by_part[part] = by_part.get(part, 0) + int(n)
        if len(parts) > 1:
            by_combo[frozenset(parts)] = by_combo.get(frozenset(parts), 0) + int(n)
    out = np.zeros(len(labels), dtype=np.int64)
    for g, (label, ctrl) in enumerate(zip(labels, is_ctrl, strict=True)):
        parts = keys.components(label)
        if ctrl:
            continue
        out[g] = by_part.get(parts[0], 0) if len(parts) == 1 else by_combo.get(frozenset(parts), 0)
    return out


def _split_counts(grouping: Grouping, split: pd.Series) -> np.ndarray:
    """(n_groups x 4) cells per group in train, val, test, left out."""
    codes = split.map(_SPLIT_INDEX).to_numpy()
    if pd.isna(codes).any():
        check_split_values(split)
    codes = codes.astype(np.int64)
    flat = grouping.group_codes * 4 + codes
    return np.bincount(flat, minlength=grouping.n_groups * 4).reshape(grouping.n_groups, 4)


def _obs_of(data: Any) -> pd.DataFrame:
    obs = getattr(data, "obs", data)
    if not isinstance(obs, pd.DataFrame):
        raise ConfigError("expected an AnnData or an obs DataFrame")
    return obs


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5 + 1e-9))


def _check_fraction(name: str, value: float, *, low_open: bool = False) -> float:
    value = float(value)
    ok = (0 < value if low_open else 0 <= value) and value <= 1
    if not ok:
        raise ConfigError(f"{name} must be between 0 and 1, got {value}")
    return value


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """Independent generators for the steps of a splitter, so steps do not shift each other."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def _val_test_counts(n: int, val_fraction: float) -> tuple[int, int]:
    """Split n held-out groups of one covariate into (n_val, n_test); test gets the rounding."""
    if n == 0:
        return 0, 0
    n_test = _round_half_up(n * (1 - val_fraction))
    if n >= 2 and 0 < val_fraction < 1:
        n_test = min(max(n_test, 1), n - 1)
    return n - n_test, n_test


class _SplitBuilder:
    """Shared machinery: group table, per-group roles, stratified controls, the result."""

    def __init__(self, data: Any, keys: PerturbationKeys | None, task: str, seed: int):
        from pertbench.data.loading import validate_obs

        self.obs = _obs_of(data)
        self.keys = keys if keys is not None else PerturbationKeys()
        validate_obs(self.obs, keys=self.keys)
        self.task = task
        self.seed = int(seed)
        self.grouping = group_cells(self.obs, self.keys)
        self.groups = self.grouping.groups
        n = self.grouping.n_groups
        self.role = np.full(n, LEFT_OUT, dtype=object)
        self.role[self.groups["is_control"].to_numpy()] = "control"
        self.unplaced_rows: list[tuple[int, str]] = []
        self.notes: list[str] = []
        self.cell_split = np.full(self.grouping.n_cells, LEFT_OUT, dtype=object)

    # groups -------------------------------------------------------------------------------
    @property
    def pert_col(self) -> str:
        return self.keys.perturbation_key

    def non_control(self) -> np.ndarray:
        return np.flatnonzero(~self.groups["is_control"].to_numpy())

    def cov_label(self, cov_code: int) -> str:
        return str(self.grouping.covariates["label"].iloc[cov_code])

    def resolve_covariates(self, values: Any) -> list[int]:
        """Covariate codes for labels like ``A172`` or ``A172/drugX`` (several keys)."""
        if isinstance(values, str):
            values = [v.strip() for v in values.split(",") if v.strip()]
        covs = self.grouping.covariates
        labels = covs["label"].astype(str)
        codes = []
        for value in values:
            hits = np.flatnonzero(labels.to_numpy() == str(value))
            if not len(hits) and len(self.keys.covariate_keys) > 1:
                # a value of one covariate key stands for every combination containing it
                match = np.zeros(len(covs), dtype=bool)
                for key in self.keys.covariate_keys:
                    match |= covs[key].astype(str).to_numpy() == str(value)
                hits = np.flatnonzero(match)
            codes.extend(int(h) for h in hits[1:])
            if not len(hits):
                raise ConfigError(
                    f"covariate '{value}' is not in the data; available: "
                    f"{', '.join(labels.tolist()[:20])}"
                )
            codes.append(int(hits[0]))
        return sorted(set(codes))

    def assign_heldout(self, held: np.ndarray, val_fraction: float, rng: np.random.Generator):
        """Give held-out groups val or test, stratified by covariate combination."""
        held = np.asarray(held, dtype=np.int64)
        cov = self.groups["covariate_code"].to_numpy()
        for c in np.unique(cov[held]):
            members = held[cov[held] == c]
            members = members[rng.permutation(len(members))]
            n_val, _ = _val_test_counts(len(members), val_fraction)
            self.role[members[:n_val]] = "val"
            self.role[members[n_val:]] = "test"

    def unplace(self, group: int, reason: str) -> None:
        self.role[group] = LEFT_OUT
        self.unplaced_rows.append((group, reason))

    # cells ---------------------------------------------------------------------------------
    def apply_group_roles(self) -> None:
        roles = np.where(self.role == "control", LEFT_OUT, self.role)
        self.cell_split = roles[self.grouping.group_codes].astype(object)

    def split_controls(
        self,
        control_val_fraction: float,
        control_test_fraction: float,
        rng: np.random.Generator,
        *,
        keep_in_train: set[int] | None = None,
    ) -> None:
        """Split control cells per covariate combination.

        A covariate combination gives controls to val (test) only when it has held-out
        groups in val (test); the rest of its controls, and at least one cell, stay in train.
        """
        cov_of_group = self.groups["covariate_code"].to_numpy()
        needs = {s: set(cov_of_group[self.role == s].tolist()) for s in ("val", "test")}
        is_control = self.grouping.is_control
        cov_codes = self.grouping.covariate_codes
        order = np.argsort(cov_codes[is_control], kind="stable")
        control_cells = np.flatnonzero(is_control)[order]
        bounds = np.searchsorted(
            cov_codes[control_cells], np.arange(len(self.grouping.covariates) + 1)
        )
        for c in range(len(self.grouping.covariates)):
            cells = control_cells[bounds[c] : bounds[c + 1]]
            n = len(cells)
            if n == 0:
                continue
            cells = cells[rng.permutation(n)]
            if keep_in_train and c in keep_in_train:
                self.cell_split[cells] = "train"
                continue
            n_val = _round_half_up(n * control_val_fraction) if c in needs["val"] else 0
            n_test = _round_half_up(n * control_test_fraction) if c in needs["test"] else 0
            if c in needs["val"] and control_val_fraction > 0:
                n_val = max(n_val, 1)
            if c in needs["test"] and control_test_fraction > 0:
                n_test = max(n_test, 1)
            while n_val + n_test > n - 1 and (n_val > 0 or n_test > 0):
                if n_test >= n_val and n_test > 0:
                    n_test -= 1
                else:
                    n_val -= 1
            wanted = [s for s in ("val", "test") if c in needs[s]]
            got = {"val": n_val, "test": n_test}
            short = [s for s in wanted if got[s] == 0]
            if short:
                self.notes.append(
                    f"covariate {self.cov_label(c)} has only {n} control cell(s): none left "
                    f"for {' and '.join(short)} (its controls in train will be used)"
                )
            self.cell_split[cells[:n_val]] = "val"
            self.cell_split[cells[n_val : n_val + n_test]] = "test"
            self.cell_split[cells[n_val + n_test :]] = "train"

    # result -------------------------------------------------------------------------------
    def result(self, params: dict[str, Any], heldout_on=("val", "test")) -> SplitResult:
        if not np.isin(self.role, heldout_on).any():
            self.notes.append(f"no group was held out: {' and '.join(heldout_on)} are empty")
        split = make_split(self.obs.index.astype(str), self.cell_split)
        counts = _split_counts(self.grouping, split)
        cols = [*self.keys.covariate_keys, self.pert_col]
        summary = self.groups[cols].copy()
        for j, name in enumerate(("train", "val", "test", "left_out")):
            summary[name] = counts[:, j]
        summary["role"] = self.role
        if self.unplaced_rows:
            idx = [g for g, _ in self.unplaced_rows]
            unplaced = self.groups.loc[idx, [*cols, "n_cells"]].reset_index(drop=True)
            unplaced["reason"] = [r for _, r in self.unplaced_rows]
        else:
            unplaced = pd.DataFrame(columns=[*cols, *UNPLACED_COLUMNS])
        return SplitResult(
            split=split,
            summary=summary.reset_index(drop=True),
            unplaced=unplaced,
            task=self.task,
            params=params,
            seed=self.seed,
            keys=self.keys,
            obs=self.obs[cols],
            heldout_on=tuple(heldout_on),
            notes=self.notes,
        )


def split_transfer(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    fraction: float = 0.3,
    heldout_covariates: str | list[str] | None = None,
    max_heldout_covariates: int = 1,
    min_train_covariates: int = 1,
    val_fraction: float = 0.5,
    control_val_fraction: float = 0.25,
    control_test_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """Covariate transfer: hold out perturbations in some covariates, train on the rest.

    In each candidate covariate combination (``heldout_covariates``, or all of them) about
    ``fraction`` of its perturbations are held out (rounded half up). A perturbation is held
    out in at most ``max_heldout_covariates`` covariates and stays in train in at least
    ``min_train_covariates`` others, so every held-out perturbation has been seen in
    training. Held-out pairs go to val (``val_fraction``) or test, stratified per covariate.

    Parameters
    ----------
    adata
        AnnData (or its obs DataFrame).
    keys
        Perturbation/covariate columns.
    fraction
        Fraction of each candidate covariate's perturbations to hold out.
    heldout_covariates
        Covariate labels (comma-separated or a list; values of several covariate keys are
        joined by ``/``) in which to hold out perturbations. ``None``: every covariate.
    max_heldout_covariates
        Most covariates any single perturbation is held out in.
    min_train_covariates
        Fewest covariates in which a held-out perturbation stays in train.
    val_fraction
        Share of held-out pairs that go to val (the rest go to test).
    control_val_fraction, control_test_fraction
        Share of a covariate's control cells given to val / test when that covariate has
        held-out groups there.
    seed
        Random seed.
    """
    fraction = _check_fraction("fraction", fraction)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    _check_control_fractions(control_val_fraction, control_test_fraction)
    if max_heldout_covariates < 1:
        raise ConfigError("max_heldout_covariates must be at least 1")
    if min_train_covariates < 1:
        raise ConfigError(
            "min_train_covariates must be at least 1 (held-out perturbations must be seen in training)"
        )
    b = _SplitBuilder(adata, keys, "transfer", seed)
    rng_pick, rng_valtest, rng_ctrl = _rngs(seed, 3)
    groups = b.groups
    cov = groups["covariate_code"].to_numpy()
    pert = groups["perturbation_code"].to_numpy()
    non_control = b.non_control()
    n_cov = len(b.grouping.covariates)
    candidates = (
        b.resolve_covariates(heldout_covariates)
        if heldout_covariates is not None and len(heldout_covariates)
        else list(range(n_cov))
    )
    is_candidate = np.zeros(n_cov, dtype=bool)
    is_candidate[candidates] = True
    perts_per_cov = np.bincount(cov[non_control], minlength=n_cov)
    quota = np.zeros(n_cov, dtype=np.int64)
    quota[candidates] = [_round_half_up(fraction * perts_per_cov[c]) for c in candidates]
    target = quota.copy()
    # groups of each perturbation
    by_pert: dict[int, np.ndarray] = {}
    order = np.argsort(pert[non_control], kind="stable")
    sorted_groups = non_control[order]
    split_at = np.flatnonzero(np.diff(pert[sorted_groups])) + 1
    for chunk in np.split(sorted_groups, split_at) if len(sorted_groups) else []:
        by_pert[int(pert[chunk[0]])] = chunk
    allowed = {
        p: min(max_heldout_covariates, len(gs) - min_train_covariates) for p, gs in by_pert.items()
    }
    held_count = dict.fromkeys(by_pert, 0)
    is_held = np.zeros(len(groups), dtype=bool)
    pert_ids = np.array(sorted(by_pert), dtype=np.int64)
    # Rounds: each perturbation may take one more held-out covariate per round; the
    # covariate with the most remaining quota is preferred, which spreads held-out
    # perturbations evenly across covariates.
    while True:
        assigned = False
        for p in pert_ids[rng_pick.permutation(len(pert_ids))]:
            p = int(p)
            if held_count[p] >= allowed[p]:
                continue
            gs = by_pert[p]
            gs = gs[is_candidate[cov[gs]] & ~is_held[gs] & (quota[cov[gs]] > 0)]
            if not len(gs):
                continue
            best = quota[cov[gs]].max()
            choices = gs[quota[cov[gs]] == best]
            g = int(choices[rng_pick.integers(len(choices))])
            is_held[g] = True
            quota[cov[g]] -= 1
            held_count[p] += 1
            assigned = True
        if not assigned:
            break
    for c in candidates:
        if quota[c] > 0:
            # Name the rule that stopped each remaining perturbation of this covariate.
            reasons = {"support": 0, "capped": 0, "train": 0}
            for g in non_control[(cov[non_control] == c) & ~is_held[non_control]]:
                p = int(pert[g])
                if len(by_pert[p]) - 1 < min_train_covariates:
                    reasons["support"] += 1
                elif held_count[p] >= max_heldout_covariates:
                    reasons["capped"] += 1
                else:
                    reasons["train"] += 1
            causes = []
            if reasons["capped"]:
                causes.append(
                    f"{reasons['capped']} already held out in {max_heldout_covariates} other "
                    f"covariate(s) (max_heldout_covariates={max_heldout_covariates})"
                )
            if reasons["support"]:
                causes.append(
                    f"{reasons['support']} not measured in {min_train_covariates} other "
                    f"covariate(s) (min_train_covariates={min_train_covariates})"
                )
            if reasons["train"]:
                causes.append(
                    f"{reasons['train']} would keep fewer than {min_train_covariates} training "
                    f"covariate(s) (min_train_covariates={min_train_covariates})"
                )
            b.notes.append(
                f"covariate {b.cov_label(c)}: held out {target[c] - quota[c]} of the "
                f"{target[c]} perturbations asked for; of the others, " + "; ".join(causes)
            )
    b.role[non_control] = "train"
    b.assign_heldout(np.flatnonzero(is_held), val_fraction, rng_valtest)
    b.apply_group_roles()
    b.split_controls(control_val_fraction, control_test_fraction, rng_ctrl)
    params = {
        "fraction": fraction,
        "heldout_covariates": [b.cov_label(c) for c in candidates],
        "max_heldout_covariates": int(max_heldout_covariates),
        "min_train_covariates": int(min_train_covariates),
        "val_fraction": val_fraction,
        "control_val_fraction": control_val_fraction,
        "control_test_fraction": control_test_fraction,
    }
    return b.result(params)


def _check_control_fractions(val: float, test: float) -> None:
    _check_fraction("control_val_fraction", val)
    _check_fraction("control_test_fraction", test)
    if val + test >= 1:
        raise ConfigError(
            "control_val_fraction + control_test_fraction must be below 1 (controls are needed in train)"
        )


def _singles_by_covariate(b: _SplitBuilder) -> dict[int, set[str]]:
    groups = b.groups
    out: dict[int, set[str]] = {}
    for c, label, is_ctrl in zip(
        groups["covariate_code"], groups[b.pert_col], groups["is_control"], strict=True
    ):
        if not is_ctrl and not b.keys.is_combination(label):
            out.setdefault(int(c), set()).add(str(label))
    return out


def split_combo(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    fraction: float = 0.7,
    val_fraction: float = 0.5,
    control_val_fraction: float = 0.25,
    control_test_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """Combination prediction: all singles in train, hold out combinations.

    Within each covariate combination, a combination is *eligible* when every one of its
    parts was measured there as a single perturbation (the singles go to train). About
    ``fraction`` of the eligible combinations (rounded half up) are held out to val/test;
    the rest train. Combinations with an unmeasured single cannot be predicted from their
    singles: they are reported in ``unplaced`` and left out of the task.
    """
    fraction = _check_fraction("fraction", fraction)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    _check_control_fractions(control_val_fraction, control_test_fraction)
    b = _SplitBuilder(adata, keys, "combo", seed)
    rng_pick, rng_valtest, rng_ctrl = _rngs(seed, 3)
    singles = _singles_by_covariate(b)
    groups = b.groups
    eligible_by_cov: dict[int, list[int]] = {}
    for g in b.non_control():
        label = str(groups[b.pert_col].iloc[g])
        c = int(groups["covariate_code"].iloc[g])
        if not b.keys.is_combination(label):
            b.role[g] = "train"
            continue
        missing = [p for p in b.keys.components(label) if p not in singles.get(c, set())]
        if missing:
            b.unplace(
                g,
                f"single(s) {', '.join(missing)} not measured in {b.cov_label(c)}; "
                "cannot be predicted from its singles",
            )
        else:
            eligible_by_cov.setdefault(c, []).append(g)
    held: list[int] = []
    for c in sorted(eligible_by_cov):
        members = np.asarray(eligible_by_cov[c], dtype=np.int64)
        n_hold = _round_half_up(fraction * len(members))
        pick = members[rng_pick.permutation(len(members))]
        held.extend(pick[:n_hold].tolist())
        b.role[pick[n_hold:]] = "train"
    if not eligible_by_cov:
        b.notes.append("no combination has all of its singles measured: nothing to hold out")
    b.assign_heldout(np.asarray(held, dtype=np.int64), val_fraction, rng_valtest)
    b.apply_group_roles()
    b.split_controls(control_val_fraction, control_test_fraction, rng_ctrl)
    params = {
        "fraction": fraction,
        "val_fraction": val_fraction,
        "control_val_fraction": control_val_fraction,
        "control_test_fraction": control_test_fraction,
    }
    return b.result(params)


def split_combo_inverse(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    fraction: float = 0.3,
    val_fraction: float = 0.5,
    control_val_fraction: float = 0.25,
    control_test_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """Inverse combination task: predict a single from a combination and its partner.

    Within each covariate combination, a single ``A`` can be held out when some measured
    combination ``A+B`` has all its other parts measured as singles that stay in train.
    About ``fraction`` of the eligible singles (rounded half up) are held out greedily in
    random order; the partners of a held-out single are then kept in train. All
    combinations train.
    """
    fraction = _check_fraction("fraction", fraction)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    _check_control_fractions(control_val_fraction, control_test_fraction)
    b = _SplitBuilder(adata, keys, "combo_inverse", seed)
    rng_pick, rng_valtest, rng_ctrl = _rngs(seed, 3)
    singles = _singles_by_covariate(b)
    groups = b.groups
    b.role[b.non_control()] = "train"
    group_of: dict[tuple[int, str], int] = {
        (int(c), str(p)): i
        for i, (c, p) in enumerate(zip(groups["covariate_code"], groups[b.pert_col], strict=True))
    }
    combos_by_cov: dict[int, list[tuple[str, ...]]] = {}
    for g in b.non_control():
        label = str(groups[b.pert_col].iloc[g])
        if b.keys.is_combination(label):
            c = int(groups["covariate_code"].iloc[g])
            combos_by_cov.setdefault(c, []).append(b.keys.components(label))
    held: list[int] = []
    for c in sorted(combos_by_cov):
        measured = singles.get(c, set())
        combos = [parts for parts in combos_by_cov[c] if all(p in measured for p in parts)]
        eligible = sorted({p for parts in combos for p in parts})
        n_hold = _round_half_up(fraction * len(eligible))
        held_here: set[str] = set()
        locked: set[str] = set()
        for idx in rng_pick.permutation(len(eligible)):
            if len(held_here) >= n_hold:
                break
            single = eligible[idx]
            if single in locked:
                continue
            usable = [
                parts
                for parts in combos
                if single in parts and all(q not in held_here for q in parts if q != single)
            ]
            if not usable:
                continue
            held_here.add(single)
            for parts in usable:
                locked.update(q for q in parts if q != single)
        if len(held_here) < n_hold:
            b.notes.append(
                f"covariate {b.cov_label(c)}: held out {len(held_here)} of {n_hold} singles "
                "asked for (partners must stay in train)"
            )
        held.extend(group_of[(c, s)] for s in sorted(held_here))
    b.assign_heldout(np.asarray(held, dtype=np.int64), val_fraction, rng_valtest)
    b.apply_group_roles()
    b.split_controls(control_val_fraction, control_test_fraction, rng_ctrl)
    params = {
        "fraction": fraction,
        "val_fraction": val_fraction,
        "control_val_fraction": control_val_fraction,
        "control_test_fraction": control_test_fraction,
    }
    return b.result(params)


def split_celltype(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    heldout: str,
    covariate_key: str | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> SplitResult:
    """Held-out cell type (the scGen/scPRAM task).

    Every non-control cell whose ``covariate_key`` value is ``heldout`` goes to test; that
    cell type's controls stay in train (they are the input of the prediction). In every
    other (covariates, perturbation) group a random ``val_fraction`` of the cells goes to
    val for early stopping (cell-level, so val groups are also training groups); the rest
    trains. Leakage is checked on test only.

    Parameters
    ----------
    heldout
        Value of ``covariate_key`` to hold out, e.g. ``"CD4T"``.
    covariate_key
        obs column holding ``heldout``; default: the first covariate key.
    val_fraction
        Share of each training group's cells used for validation.
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    if val_fraction >= 1:
        raise ConfigError("val_fraction must be below 1 (cells are needed in train)")
    b = _SplitBuilder(adata, keys, "celltype", seed)
    if covariate_key is None:
        if not b.keys.covariate_keys:
            raise ConfigError(
                "the celltype task needs a covariate key (e.g. --covariates cell_type)"
            )
        covariate_key = b.keys.covariate_keys[0]
    if covariate_key not in b.keys.covariate_keys:
        raise ConfigError(
            f"covariate key '{covariate_key}' is not one of the covariates "
            f"({', '.join(b.keys.covariate_keys)})"
        )
    values = b.grouping.covariates[covariate_key].astype(str)
    if str(heldout) not in set(values):
        raise ConfigError(
            f"'{heldout}' is not a value of '{covariate_key}'; available: "
            f"{', '.join(sorted(set(values))[:20])}"
        )
    (rng_val,) = _rngs(seed, 1)
    groups = b.groups
    held_cov = set(np.flatnonzero(values.to_numpy() == str(heldout)).tolist())
    in_held = groups["covariate_code"].isin(held_cov).to_numpy()
    is_ctrl = groups["is_control"].to_numpy()
    b.role[in_held & ~is_ctrl] = "test"
    b.role[~in_held & ~is_ctrl] = "train"
    b.apply_group_roles()
    # cell-level validation sample inside each training group (controls included)
    train_groups = np.flatnonzero(~(in_held & ~is_ctrl))
    codes = b.grouping.group_codes
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(b.grouping.n_groups + 1))
    for g in train_groups:
        cells = order[bounds[g] : bounds[g + 1]]
        if in_held[g]:  # the held-out type's controls: all train
            b.cell_split[cells] = "train"
            continue
        n = len(cells)
        n_val = min(_round_half_up(n * val_fraction), n - 1) if n > 1 else 0
        cells = cells[rng_val.permutation(n)]
        b.cell_split[cells[:n_val]] = "val"
        b.cell_split[cells[n_val:]] = "train"
    held_perts = set(groups.loc[in_held & ~is_ctrl, b.pert_col].astype(str))
    seen = set(groups.loc[~in_held & ~is_ctrl, b.pert_col].astype(str))
    unseen = sorted(held_perts - seen)
    if unseen:
        b.notes.append(
            f"perturbation(s) {', '.join(unseen[:10])} of {heldout} are not measured in any "
            "other cell type: they cannot be learned"
        )
    params = {"heldout": str(heldout), "covariate_key": covariate_key, "val_fraction": val_fraction}
    return b.result(params, heldout_on=("test",))


def split_custom(
    adata: Any, path: str | os.PathLike, *, keys: PerturbationKeys | None = None
) -> SplitResult:
    """Read a split CSV (``obs_name,split``) for ``adata`` and summarise it.

    Cells absent from the file are left out; names not in the data are an error. Leakage
    (a pair in both train and val/test) is reported by :meth:`SplitResult.leakage`.
    """
    b = _SplitBuilder(adata, keys, "custom", 0)
    split = read_split(path, b.obs.index.astype(str))
    b.cell_split = split.to_numpy(dtype=object)
    counts = _split_counts(b.grouping, split)
    is_ctrl = b.groups["is_control"].to_numpy()
    for j, name in ((2, "test"), (1, "val"), (0, "train")):
        b.role[(counts[:, j] > 0) & ~is_ctrl & (b.role == LEFT_OUT)] = name
    result = b.result({"path": str(path)})
    leak = result.leakage()
    if len(leak):
        result.notes.append(
            f"{len(leak)} held-out (covariates, perturbation) pair(s) also have cells in train"
        )
    return result


def make_task_split(
    adata: Any,
    task: str,
    *,
    keys: PerturbationKeys | None = None,
    seed: int = 0,
    **options: Any,
) -> SplitResult:
    """Build the split of a task: ``transfer``, ``combo``, ``combo_inverse``, ``celltype``,
    ``unseen``, ``fewshot`` or ``custom`` (``path=`` the CSV). Options are passed to the
    task's function."""
    from pertbench.data.splits_unseen import split_fewshot, split_unseen

    builders = {
        "transfer": split_transfer,
        "combo": split_combo,
        "combo_inverse": split_combo_inverse,
        "celltype": split_celltype,
        "unseen": split_unseen,
        "fewshot": split_fewshot,
    }
    if task == "custom":
        if "path" not in options:
            raise ConfigError("the custom task needs path=<split CSV>")
        return split_custom(adata, options.pop("path"), keys=keys, **options)
    if task not in builders:
        raise ConfigError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    import inspect

    accepted = set(inspect.signature(builders[task]).parameters) - {"adata"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"task '{task}' has no option {', '.join(unknown)}; valid: "
            f"{', '.join(sorted(accepted - {'keys', 'seed'}))}"
        )
    return builders[task](adata, keys=keys, seed=seed, **options)
