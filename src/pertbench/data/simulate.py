"""Count simulator with known ground truth that scales to millions of cells.

Model (natural-log scale; see ``docs/data.md`` for the full description)::

    log rho[c, g]        = base[g] + celltype[c, g]                       (then normalised)
    effect[p, c, g]      = beta[p, g] * a[p, c] * exp(eps[p, c, g])       on p's program genes
    effect[A+B, c, g]    = effect[A, c, g] + effect[B, c, g] + a[AB, c] * gamma[AB, g]
    log rho[c, p, g]     = log rho[c, g] + h(dose) * effect[p, c, g] + shift[study, g]
    rho                  = softmax over genes (expression proportions)
    mu[i, g]             = size[i] * rho[unit(i), g],   size[i] ~ library_size * LogNormal(0, library_sd)
    counts[i, g]         ~ NegativeBinomial(mean mu[i, g], inverse dispersion theta[g])
    X                    = log1p(counts / total * 1e4)                 (CSR float32)

Cells are generated in fixed-size chunks, each with its own random stream derived from the
seed, so no dense cells x genes matrix is ever built and the result does not depend on
the number of threads. :func:`simulate` returns an in-memory AnnData whose ``X`` and
``layers['counts']`` share one index array; :func:`simulate_to_h5ad` streams the chunks
straight into an ``.h5ad`` file for outputs larger than memory.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.errors import ConfigError
from pertbench.utils.io import atomic_path

SIMULATION_KEY = "simulation"
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
    interaction_scale: float = 0.5
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
        for name in ("program_size", "interaction_size", "missing_fraction"):
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
            "celltype_sd",
            "base_sd",
            "library_sd",
            "imbalance",
            "study_shift_sd",
            "target_knockdown",
        ):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
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


@dataclass
class _Plan:
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


def _make_plan(p: SimulationParams) -> _Plan:
    p.check()
    ss = np.random.SeedSequence(int(p.seed))
    rng_design, rng_truth, rng_cells = (np.random.default_rng(s) for s in ss.spawn(3))
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
    combo_effect = np.zeros((len(pairs), C, G))
    interaction = np.zeros((len(pairs), G))
    k_int = round(p.interaction_size * k) if k else 0
    for j, (a, b) in enumerate(pairs):
        if k_int:
            genes = rng_truth.choice(G, size=k_int, replace=False)
            interaction[j, genes] = rng_truth.normal(0.0, p.interaction_scale, size=k_int)
        a_int = np.exp(rng_truth.normal(0.0, p.modulation_sd, size=C))
        combo_effect[j] = single_effect[a] + single_effect[b] + a_int[:, None] * interaction[j]
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
    return _Plan(
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


def _chunk_bounds(plan: _Plan) -> list[tuple[int, int]]:
    step = int(plan.params.chunk_size)
    return [(s, min(s + step, plan.n_cells)) for s in range(0, plan.n_cells, step)]


def _draw_chunk(plan: _Plan, seed: np.random.SeedSequence, start: int, stop: int):
    """Counts of cells start..stop as CSR pieces (indptr from 0, int32 indices, float32)."""
    rng = np.random.default_rng(seed)
    mu = np.exp(plan.log_rho[plan.cell_unit[start:stop]]) * plan.size[start:stop, None]
    theta = plan.theta[None, :]
    lam = rng.gamma(theta, mu / theta)
    del mu
    counts = rng.poisson(lam).astype(np.float32)
    del lam
    rows, cols = np.nonzero(counts)
    data = counts[rows, cols]
    indptr = np.zeros(stop - start + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=stop - start), out=indptr[1:])
    totals = counts.sum(axis=1, dtype=np.float64)
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    logx = np.log1p(data * np.repeat(scale, np.diff(indptr)).astype(np.float32))
    return indptr, cols.astype(np.int32), data, logx.astype(np.float32)


def _iter_chunks(plan: _Plan) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    bounds = _chunk_bounds(plan)
    seeds = np.random.SeedSequence([int(plan.params.seed), 0x5EED]).spawn(len(bounds))
    n_jobs = max(1, int(plan.params.n_jobs))
    if n_jobs == 1:
        for (a, b), s in zip(bounds, seeds, strict=True):
            yield _draw_chunk(plan, s, a, b)
        return
    # numpy's generators release the GIL while drawing; keep at most 2*n_jobs chunks in flight
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        pending = []
        for (a, b), s in zip(bounds, seeds, strict=True):
            pending.append(pool.submit(_draw_chunk, plan, s, a, b))
            if len(pending) >= 2 * n_jobs:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


def _obs(plan: _Plan) -> pd.DataFrame:
    p = plan.params
    g = plan.groups
    unit_group = plan.unit_group[plan.cell_unit]
    width = len(str(max(plan.n_cells - 1, 0)))
    index = pd.Index([f"cell{i:0{width}d}" for i in range(plan.n_cells)], dtype=object)
    cov = pd.Categorical.from_codes(g["_cov"].to_numpy()[unit_group], categories=plan.covariates)
    pert_labels = [p.control, *plan.perturbations]
    pert = pd.Categorical.from_codes(g["_pert"].to_numpy()[unit_group] + 1, categories=pert_labels)
    obs = pd.DataFrame({p.perturbation_key: pert, p.covariate_key: cov}, index=index)
    if p.doses is not None:
        doses = [float(d) for d in p.doses]
        pert_code = g["_pert"].to_numpy()[unit_group]
        n_parts = np.array([0] + [len(lab.split(p.delimiter)) for lab in plan.perturbations])
        dose_idx = plan.unit_dose[plan.cell_unit]
        # one code per (dose, number of parts); controls get dose 0
        key = np.where(pert_code < 0, -1, dose_idx * 16 + n_parts[pert_code + 1])
        uniq, inv = np.unique(key, return_inverse=True)
        labels = [
            "0" if k < 0 else p.delimiter.join([f"{doses[k // 16]:g}"] * int(k % 16)) for k in uniq
        ]
        obs[p.dose_key] = pd.Categorical(np.asarray(labels, dtype=object)[inv])
    if p.n_studies > 1:
        studies = [f"study{s}" for s in range(p.n_studies)]
        obs[p.study_key] = pd.Categorical.from_codes(
            plan.unit_study[plan.cell_unit], categories=studies
        )
    return obs


def _uns(plan: _Plan) -> dict[str, Any]:
    p = plan.params
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()}
    params = {k: v for k, v in params.items() if v is not None}
    groups = plan.groups.drop(columns=["_cov", "_pert"]).reset_index(drop=True)
    groups.index = groups.index.astype(str)
    return {SIMULATION_KEY: {"params": params, "groups": groups, **plan.truth}}


def _var(plan: _Plan) -> pd.DataFrame:
    var = pd.DataFrame(index=pd.Index(plan.gene_names, dtype=object))
    var["theta"] = plan.theta.astype(np.float32)
    return var


def simulate(**kwargs: Any) -> ad.AnnData:
    """Simulate perturbation count data with known per-group effects.

    Parameters
    ----------
    n_covariates
        Number of cell types / lines (obs ``cell_type``: ``CT0``, ``CT1``...).
    n_perturbations
        Single perturbations. ``genetic`` ones are named after (and knock down) a gene.
    n_combinations
        Random pairs of singles measured as combinations (``A+B``), additive plus a
        sparse interaction.
    n_cells_per_group, n_control_cells
        Cells per (covariate, perturbation) group (scaled by ``imbalance``) and control
        cells per covariate (default twice ``n_cells_per_group``).
    n_genes
        Genes (``G000``...).
    program_size
        Fraction of genes in each perturbation's program (effect sparsity).
    effect_scale, modulation_sd, gene_modulation_sd
        Size of program effects; per (perturbation, covariate) amplitude and per-gene
        modulation (log-normal sd), i.e. covariate-specific effects.
    interaction_scale, interaction_size
        Interaction effect sd and size (fraction of the program size) of combinations.
    target_knockdown
        Log-scale knock-down of a genetic perturbation's target gene.
    celltype_sd, base_sd
        Spread of cell-type-specific and baseline log expression.
    library_size, library_sd
        Mean counts per cell and its log-normal sd (controls data sparsity).
    dispersion
        Negative binomial dispersion (1/theta), varied per gene.
    imbalance
        Log-normal sd of group sizes (0 = balanced).
    missing_fraction
        Share of (covariate, perturbation) groups not measured.
    doses
        Optional dose levels; each perturbed cell gets one at random; effects follow a
        Hill curve (``hill``) with a per-perturbation EC50. obs ``dose`` (``dose_key``).
    n_studies, study_shift_sd
        Studies with a gene-wise batch shift (obs ``study``, when ``n_studies > 1``).
    perturbation_type
        ``genetic`` (default) or ``chemical`` (``DRUG0``...).
    perturbation_key, covariate_key, control, delimiter, dose_key, study_key
        Names used in obs.
    chunk_size, n_jobs
        Cells generated per chunk and threads drawing chunks (results do not depend on
        ``n_jobs``).
    seed
        Random seed.

    Returns
    -------
    AnnData
        ``X`` log1p(1e4-normalised) CSR float32, ``layers['counts']`` CSR float32 sharing
        X's index arrays, obs perturbation/covariate (+dose, study), and the truth in
        ``uns['simulation']``: ``groups`` (one row per (covariate, perturbation)),
        ``true_effect`` (groups x genes, natural-log shift of expression proportions
        before renormalisation), ``true_log_fold_change`` (log proportion vs the
        covariate's controls after renormalisation), ``true_log_expression`` (log1p of
        expected 1e4-normalised expression), ``program``, ``interaction``, ``theta``,
        ``params`` (+ ``study_shift``, ``doses``/``ec50``/``dose_scale``, ``target_genes``).
    """
    params = _params(kwargs)
    plan = _make_plan(params)
    n_genes = len(plan.gene_names)
    indptr = np.zeros(plan.n_cells + 1, dtype=np.int64)
    buffers = _Buffers()
    for start, (chunk_ptr, idx, cnt, logx) in zip(
        (a for a, _ in _chunk_bounds(plan)), _iter_chunks(plan), strict=True
    ):
        n = len(chunk_ptr) - 1
        indptr[start + 1 : start + n + 1] = chunk_ptr[1:] + buffers.size
        if buffers.capacity == 0:
            # Reserve for the whole matrix from the first chunk's density, with slack: the
            # arrays are memory-mapped by the allocator and pages never written cost nothing.
            per_cell = max(idx.size / max(n, 1), 1.0)
            estimate = per_cell * plan.n_cells * 1.5 + n * n_genes
            buffers.reserve(int(min(estimate, plan.n_cells * n_genes)))
        buffers.append(idx, cnt, logx)
    nnz = buffers.size
    indices, counts_data, log_data = buffers.finish()
    if nnz < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    else:  # scipy needs one index dtype for indices and indptr
        indices = indices.astype(np.int64)
    shape = (plan.n_cells, n_genes)
    X = sp.csr_matrix((log_data, indices, indptr), shape=shape, copy=False)
    counts = sp.csr_matrix((counts_data, indices, indptr), shape=shape, copy=False)
    adata = ad.AnnData(X=X, obs=_obs(plan), var=_var(plan), uns=_uns(plan))
    adata.layers["counts"] = counts
    adata.uns["log1p"] = {"base": None}
    return adata


class _Buffers:
    """Growable column-index / count / log-value arrays filled chunk by chunk.

    Chunks are copied straight into large preallocated arrays rather than kept as a list
    of small pieces and concatenated: small freed pieces stay in the C heap, so a final
    concatenation would hold the data twice. Untouched reserved pages cost no memory, and
    the arrays are trimmed in place at the end (a view of a much larger array would make
    scipy copy it).
    """

    def __init__(self) -> None:
        self.size = 0
        self.capacity = 0
        self.arrays = [np.empty(0, np.int32), np.empty(0, np.float32), np.empty(0, np.float32)]

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        grown = []
        for old in self.arrays:
            # np.empty: pages are only committed when written (resize would zero-fill them)
            new = np.empty(capacity, dtype=old.dtype)
            new[: self.size] = old[: self.size]
            grown.append(new)
        self.arrays = grown  # the old (memory-mapped) arrays are released here
        self.capacity = capacity

    def append(self, *parts: np.ndarray) -> None:
        n = parts[0].size
        if self.size + n > self.capacity:
            self.reserve(max(int(self.capacity * 1.25), self.size + n))
        for arr, part in zip(self.arrays, parts, strict=True):
            arr[self.size : self.size + n] = part
        self.size += n

    def finish(self) -> list[np.ndarray]:
        """Trim the arrays to their filled size in place (realloc) and hand them over."""
        for arr in self.arrays:
            arr.resize(self.size, refcheck=False)  # shrinking: no copy, no fill
        self.capacity = self.size
        return self.arrays


def _params(kwargs: dict[str, Any]) -> SimulationParams:
    valid = set(SimulationParams.__dataclass_fields__)
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ConfigError(
            f"simulate() has no option {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    if kwargs.get("doses") is not None:
        kwargs = {**kwargs, "doses": tuple(float(d) for d in kwargs["doses"])}
    return SimulationParams(**kwargs)


def simulate_to_h5ad(path: str | os.PathLike, **kwargs: Any) -> Path:
    """Simulate like :func:`simulate` but stream the chunks straight into ``path``.

    Memory stays at a few chunks whatever the number of cells. The file is written
    atomically (a temporary file renamed on success) and reads back identical to
    :func:`simulate` with the same options.
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem

    params = _params(kwargs)
    plan = _make_plan(params)
    shape_genes = len(plan.gene_names)
    with atomic_path(path, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", _obs(plan))
        write_elem(f, "var", _var(plan))
        uns = _uns(plan)
        uns["log1p"] = {"base": None}
        write_elem(f, "uns", uns)
        for name in ("obsm", "varm", "obsp", "varp"):
            write_elem(f, name, {})
        layers = f.create_group("layers")
        layers.attrs["encoding-type"] = "dict"
        layers.attrs["encoding-version"] = "0.1.0"
        started = False
        for indptr, idx, cnt, logx in _iter_chunks(plan):
            n = len(indptr) - 1
            ip = indptr.astype(np.int64)
            x_chunk = sp.csr_matrix((logx, idx, ip), shape=(n, shape_genes))
            c_chunk = sp.csr_matrix((cnt, idx, ip), shape=(n, shape_genes))
            if not started:
                write_elem(f, "X", x_chunk)
                write_elem(layers, "counts", c_chunk)
                x_ds = sparse_dataset(f["X"])
                c_ds = sparse_dataset(layers["counts"])
                started = True
            else:
                x_ds.append(x_chunk)
                c_ds.append(c_chunk)
    return Path(path)


def simulation_groups(adata: ad.AnnData) -> pd.DataFrame:
    """The ground-truth group table of a simulated dataset (row i = row i of the truth arrays)."""
    try:
        return adata.uns[SIMULATION_KEY]["groups"]
    except KeyError as exc:
        raise ConfigError("this AnnData was not made by pertbench.data.simulate") from exc


def true_effects_frame(adata: ad.AnnData, what: str = "true_log_fold_change") -> pd.DataFrame:
    """One ground-truth array as a DataFrame (index ``covariate/perturbation``, columns genes)."""
    sim = adata.uns.get(SIMULATION_KEY)
    if sim is None or what not in sim:
        raise ConfigError(f"no '{what}' in uns['{SIMULATION_KEY}']")
    groups = sim["groups"]
    p = sim["params"]
    index = groups[p["covariate_key"]].astype(str) + "/" + groups[p["perturbation_key"]].astype(str)
    return pd.DataFrame(np.asarray(sim[what]), index=index.to_numpy(), columns=adata.var_names)


def _keyword_signature(func, *, leading: tuple[inspect.Parameter, ...] = ()):
    """Show the knobs of :class:`SimulationParams` as keyword-only parameters of ``func``."""
    params = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in fields(SimulationParams)
    ]
    func.__signature__ = inspect.Signature([*leading, *params])
    return func


_keyword_signature(simulate)
_keyword_signature(
    simulate_to_h5ad,
    leading=(inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD),),
)


__all__: Sequence[str] = (
    "SimulationParams",
    "simulate",
    "simulate_to_h5ad",
    "simulation_groups",
    "true_effects_frame",
)
