"""The simulator's plan: its knobs, the design and the ground truth, decided before any cell.

:func:`make_plan` turns :class:`SimulationParams` into everything :mod:`pertbench.data.simulate`
needs to draw cells: which (covariate, perturbation) groups exist with how many cells, each
unit's expected log expression proportions, and the truth stored in ``uns['simulation']``.
Four independent random streams are spawned from the seed: design, truth, cells and
genetic interactions (:mod:`pertbench.data.interaction_classes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pertbench.data.interaction_classes import (
    DEFAULT_INTERACTION_FRACTION,
    class_weights,
    draw_interactions,
    pair_departure,
)
from pertbench.errors import ConfigError

TARGET_SUM = 1e4


@dataclass
class SimulationParams:
    """Knobs of :func:`simulate` (see its docstring)."""

    n_covariates: int = 3
    n_perturbations: int = 20
    n_combinations: int = 10
    n_cells_per_group: int = 50
    n_control_cells: int | None = None
    n_genes: int = 500
    program_size: float = 0.05
    effect_scale: float = 1.0
    modulation_sd: float = 0.3
    gene_modulation_sd: float = 0.2
    interaction_fraction: float = DEFAULT_INTERACTION_FRACTION
    interaction_classes: dict[str, float] | None = None
    interaction_strength: float = 1.0
    interaction_scale: float = 0.0
    interaction_size: float = 0.5
    target_knockdown: float = 2.0
    celltype_sd: float = 0.5
    base_sd: float = 2.0
    library_size: float = 1000.0
    library_sd: float = 0.3
    dispersion: float = 0.2
    imbalance: float = 0.0
    missing_fraction: float = 0.0
    min_cells_per_group: int = 3
    doses: tuple[float, ...] | None = None
    hill: float = 1.5
    n_studies: int = 1
    study_shift_sd: float = 0.3
    perturbation_type: str = "genetic"
    perturbation_key: str = "condition"
    covariate_key: str = "cell_type"
    control: str = "control"
    delimiter: str = "+"
    dose_key: str = "dose"
    study_key: str = "study"
    chunk_size: int = 4096
    n_jobs: int = 1
    seed: int = 0
    cell_seed: int | None = None

    def check(self) -> None:
        positive_ints = (
            "n_covariates",
            "n_cells_per_group",
            "n_genes",
            "chunk_size",
            "n_jobs",
            "n_studies",
            "min_cells_per_group",
        )
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("n_perturbations", "n_combinations"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_control_cells is not None and self.n_control_cells < 1:
            raise ConfigError("n_control_cells must be at least 1 (controls are required)")
        for name in (
            "program_size",
            "interaction_size",
            "missing_fraction",
            "interaction_fraction",
        ):
            value = float(getattr(self, name))
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be between 0 and 1, got {value}")
        if self.missing_fraction >= 1:
            raise ConfigError("missing_fraction must be below 1")
        for name in (
            "effect_scale",
            "modulation_sd",
            "gene_modulation_sd",
            "interaction_scale",
            "interaction_strength",
            "celltype_sd",
            "base_sd",
            "library_sd",
            "imbalance",
            "study_shift_sd",
            "target_knockdown",
        ):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        class_weights(self.interaction_classes)
        if self.library_size <= 0 or self.dispersion <= 0:
            raise ConfigError("library_size and dispersion must be positive")
        max_pairs = self.n_perturbations * (self.n_perturbations - 1) // 2
        if self.n_combinations > max_pairs:
            raise ConfigError(
                f"n_combinations={self.n_combinations} exceeds the {max_pairs} possible pairs "
                f"of {self.n_perturbations} perturbations"
            )
        if self.perturbation_type not in ("genetic", "chemical"):
            raise ConfigError("perturbation_type must be 'genetic' or 'chemical'")
        if self.perturbation_type == "genetic" and self.n_perturbations > self.n_genes:
            raise ConfigError(
                "genetic perturbations target distinct genes: n_perturbations must not exceed "
                "n_genes (or use perturbation_type='chemical')"
            )
        if self.doses is not None:
            doses = tuple(float(d) for d in self.doses)
            if not doses or min(doses) <= 0:
                raise ConfigError("doses must be positive numbers")
        if self.delimiter in self.control:
            raise ConfigError("the control label must not contain the delimiter")
        names = [self.perturbation_key, self.covariate_key]
        if self.doses is not None:
            names.append(self.dose_key)
        if self.n_studies > 1:
            names.append(self.study_key)
        if len(set(names)) != len(names):
            raise ConfigError(f"obs column names must differ: {', '.join(names)}")


def cell_root(p: SimulationParams) -> np.random.SeedSequence:
    """Root of the cell-level streams when ``cell_seed`` is given."""
    return np.random.SeedSequence([int(p.cell_seed), 0xCE11])


def chunk_root(p: SimulationParams) -> np.random.SeedSequence:
    """Parent of the per-chunk count streams (from ``seed``, or ``cell_seed`` when given)."""
    if p.cell_seed is None:
        return np.random.SeedSequence([int(p.seed), 0x5EED])
    return cell_root(p).spawn(2)[1]


@dataclass
class Plan:
    """Everything decided before cells are drawn: design, truth and per-cell units."""

    params: SimulationParams
    gene_names: list[str]
    covariates: list[str]
    perturbations: list[str]  # non-control labels (singles then combinations)
    groups: pd.DataFrame  # covariate, perturbation, n_cells, is_control
    log_rho: np.ndarray  # (n_units, n_genes) float32 log proportions, normalised
    unit_group: np.ndarray  # unit -> group
    unit_dose: np.ndarray  # unit -> dose index (-1 none)
    unit_study: np.ndarray  # unit -> study
    theta: np.ndarray  # (n_genes,) inverse dispersion
    cell_unit: np.ndarray  # (n_cells,) unit of each cell
    size: np.ndarray  # (n_cells,) library size factor
    truth: dict[str, Any] = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.cell_unit.shape[0])


def _softmax_rows(log_w: np.ndarray) -> np.ndarray:
    log_w = log_w - log_w.max(axis=1, keepdims=True)
    w = np.exp(log_w)
    return np.log(w / w.sum(axis=1, keepdims=True))


def make_plan(p: SimulationParams) -> Plan:
    p.check()
    ss = np.random.SeedSequence(int(p.seed))
    # spawn(4)'s first three children are spawn(3)'s: the interaction stream came last, so
    # design, truth and cells draw what they drew before it existed
    streams = ss.spawn(4)
    rng_design, rng_truth, rng_cells, rng_interaction = (np.random.default_rng(s) for s in streams)
    if p.cell_seed is not None:
        rng_cells = np.random.default_rng(cell_root(p).spawn(1)[0])
    G, C, P = int(p.n_genes), int(p.n_covariates), int(p.n_perturbations)
    width = len(str(G - 1))
    gene_names = [f"G{g:0{width}d}" for g in range(G)]
    covariates = [f"CT{c}" for c in range(C)]
    # -- baseline expression -----------------------------------------------------------
    base = rng_truth.normal(0.0, p.base_sd, size=G)
    celltype = rng_truth.normal(0.0, p.celltype_sd, size=(C, G))
    log_ctrl = _softmax_rows(base[None, :] + celltype)  # (C, G)
    theta = 1.0 / (p.dispersion * np.exp(rng_truth.normal(0.0, 0.3, size=G)))
    # -- single perturbations: sparse programs --------------------------------------------
    k = max(1, round(p.program_size * G)) if p.program_size > 0 else 0
    beta = np.zeros((P, G))
    if p.perturbation_type == "genetic":
        targets = np.sort(rng_design.choice(G, size=P, replace=False)) if P else np.array([], int)
        singles = [gene_names[t] for t in targets]
    else:
        targets = np.full(P, -1)
        singles = [f"DRUG{i:0{len(str(max(P - 1, 0)))}d}" for i in range(P)]
    for i in range(P):
        if k:
            genes = rng_truth.choice(G, size=k, replace=False)
            beta[i, genes] = rng_truth.normal(0.0, p.effect_scale, size=k)
        if targets[i] >= 0:
            beta[i, targets[i]] = -p.target_knockdown
    amp = np.exp(rng_truth.normal(0.0, p.modulation_sd, size=(P, C)))
    gene_mod = (
        np.exp(rng_truth.normal(0.0, p.gene_modulation_sd, size=(P, C, G)).astype(np.float32))
        if P
        else np.zeros((0, C, G))
    )
    single_effect = beta[:, None, :] * amp[:, :, None] * gene_mod  # (P, C, G)
    if p.perturbation_type == "genetic":  # the knock-down of the target itself is not modulated
        for i in range(P):
            single_effect[i, :, targets[i]] = -p.target_knockdown
    # -- combinations ---------------------------------------------------------------------
    pairs: list[tuple[int, int]] = []
    if p.n_combinations:
        all_pairs = np.array([(a, b) for a in range(P) for b in range(a + 1, P)])
        pick = rng_design.choice(len(all_pairs), size=p.n_combinations, replace=False)
        pairs = [tuple(map(int, all_pairs[j])) for j in np.sort(pick)]
    drawn = draw_interactions(
        pairs,
        programs=beta != 0,
        n_covariates=C,
        fraction=p.interaction_fraction,
        weights=class_weights(p.interaction_classes),
        strength=p.interaction_strength,
        program_genes=k,
        effect_scale=p.effect_scale,
        modulation_sd=p.modulation_sd,
        gene_modulation_sd=p.gene_modulation_sd,
        rng=rng_interaction,
    )
    combo_effect = np.zeros((len(pairs), C, G))
    interaction = np.zeros((len(pairs), C, G))  # combination minus its singles, per covariate
    residual = np.zeros((len(pairs), G))  # the sparse random term (interaction_scale)
    k_int = round(p.interaction_size * k) if k else 0
    for j, (a, b) in enumerate(pairs):
        # drawn from the truth stream exactly as before the interaction classes existed, so
        # that every later draw (study shifts, EC50s) is unchanged whatever the classes
        if k_int:
            genes = rng_truth.choice(G, size=k_int, replace=False)
            residual[j, genes] = p.interaction_scale * rng_truth.normal(0.0, 1.0, size=k_int)
        a_int = np.exp(rng_truth.normal(0.0, p.modulation_sd, size=C))
        departure = pair_departure(
            single_effect[a],
            single_effect[b],
            int(targets[a]),
            int(targets[b]),
            drawn.coefficients[j],
            drawn.novel[j],
        )
        interaction[j] = departure + a_int[:, None] * residual[j]
        combo_effect[j] = single_effect[a] + single_effect[b] + interaction[j]
    combos = [p.delimiter.join(sorted((singles[a], singles[b]))) for a, b in pairs]
    labels = [*singles, *combos]
    effects = (
        np.concatenate([single_effect, combo_effect], axis=0) if labels else np.zeros((0, C, G))
    )
    del gene_mod
    # -- design: which groups exist and how many cells ------------------------------------
    present = rng_design.random((len(labels), C)) >= p.missing_fraction
    for i in range(len(labels)):  # every perturbation stays measured somewhere
        if not present[i].any():
            present[i, rng_design.integers(C)] = True
    n_ctrl = (
        int(p.n_control_cells) if p.n_control_cells is not None else 2 * int(p.n_cells_per_group)
    )
    rows = []
    for c in range(C):
        rows.append((covariates[c], p.control, n_ctrl, True, c, -1))
        for i in range(len(labels)):
            if present[i, c]:
                w = float(np.exp(rng_design.normal(0.0, p.imbalance))) if p.imbalance else 1.0
                n = max(int(p.min_cells_per_group), round(p.n_cells_per_group * w))
                rows.append((covariates[c], labels[i], n, False, c, i))
    groups = pd.DataFrame(
        rows,
        columns=[p.covariate_key, p.perturbation_key, "n_cells", "is_control", "_cov", "_pert"],
    )
    # -- units (group x dose x study) and their log proportions --------------------------
    doses = tuple(float(d) for d in p.doses) if p.doses is not None else None
    n_dose = len(doses) if doses else 1
    S = int(p.n_studies)
    study_shift = (
        rng_truth.normal(0.0, p.study_shift_sd, size=(S, G)) if S > 1 else np.zeros((1, G))
    )
    if doses:
        ec50 = np.exp(rng_truth.uniform(np.log(min(doses)), np.log(max(doses)), size=len(labels)))
        dmax = max(doses)
        hill = lambda d, e: d**p.hill / (d**p.hill + e**p.hill)  # noqa: E731
        dose_scale = np.array(
            [[hill(d, e) / hill(dmax, e) for d in doses] for e in ec50]
        )  # (labels, doses)
    else:
        ec50 = None
        dose_scale = np.ones((len(labels), 1))
    n_groups = len(groups)
    unit_group = np.repeat(np.arange(n_groups), n_dose * S)
    unit_dose = np.tile(np.repeat(np.arange(n_dose), S), n_groups)
    unit_study = np.tile(np.arange(S), n_groups * n_dose)
    cov_of_group = groups["_cov"].to_numpy()
    pert_of_group = groups["_pert"].to_numpy()
    log_w = np.empty((len(unit_group), G), dtype=np.float64)
    for u in range(len(unit_group)):  # loops over units (groups x doses x studies), not cells
        gi = unit_group[u]
        c, i = cov_of_group[gi], pert_of_group[gi]
        row = log_ctrl[c].copy()
        if i >= 0:
            row += dose_scale[i, unit_dose[u]] * effects[i, c]
        row += study_shift[unit_study[u]]
        log_w[u] = row
    log_rho = _softmax_rows(log_w).astype(np.float32)
    del log_w
    # -- cells ----------------------------------------------------------------------------
    n_cells = groups["n_cells"].to_numpy()
    cell_group = np.repeat(np.arange(n_groups), n_cells)
    n_total = int(cell_group.shape[0])
    dose_idx = rng_cells.integers(n_dose, size=n_total) if n_dose > 1 else np.zeros(n_total, int)
    study_idx = rng_cells.integers(S, size=n_total) if S > 1 else np.zeros(n_total, int)
    cell_unit = (cell_group * n_dose + dose_idx) * S + study_idx
    size = (p.library_size * np.exp(rng_cells.normal(0.0, p.library_sd, size=n_total))).astype(
        np.float32
    )
    # -- ground truth, per (covariate, perturbation) group at the highest dose -----------
    truth_rows = np.zeros((n_groups, G), dtype=np.float64)
    for gi in range(n_groups):
        c, i = cov_of_group[gi], pert_of_group[gi]
        truth_rows[gi] = log_ctrl[c] + (effects[i, c] if i >= 0 else 0.0)
    true_log_prop = _softmax_rows(truth_rows)
    ctrl_of_cov = {int(c): gi for gi, c in enumerate(cov_of_group) if pert_of_group[gi] < 0}
    true_lfc = true_log_prop - true_log_prop[[ctrl_of_cov[int(c)] for c in cov_of_group]]
    true_effect = np.zeros((n_groups, G))
    for gi in range(n_groups):
        if pert_of_group[gi] >= 0:
            true_effect[gi] = effects[pert_of_group[gi], cov_of_group[gi]]
    truth = {
        "true_log_expression": np.log1p(np.exp(true_log_prop) * TARGET_SUM).astype(np.float32),
        "true_log_fold_change": true_lfc.astype(np.float32),
        "true_effect": true_effect.astype(np.float32),
        "program": beta != 0,
        "perturbations": np.array(singles, dtype=object),
        "combinations": np.array(combos, dtype=object),
        "interaction": interaction.astype(np.float32),
        "interaction_class": np.asarray(drawn.classes, dtype=object),
        "interaction_coefficients": drawn.coefficients.astype(np.float32),
        "theta": theta.astype(np.float32),
    }
    if S > 1:
        truth["study_shift"] = study_shift.astype(np.float32)
    if doses:
        truth["doses"] = np.asarray(doses, dtype=np.float64)
        truth["ec50"] = ec50
        truth["dose_scale"] = dose_scale.astype(np.float32)
    if p.perturbation_type == "genetic":
        truth["target_genes"] = np.array(singles, dtype=object)
    return Plan(
        params=p,
        gene_names=gene_names,
        covariates=covariates,
        perturbations=labels,
        groups=groups,
        log_rho=log_rho,
        unit_group=unit_group,
        unit_dose=unit_dose,
        unit_study=unit_study,
        theta=theta.astype(np.float64),
        cell_unit=cell_unit.astype(np.int64),
        size=size,
        truth=truth,
    )
