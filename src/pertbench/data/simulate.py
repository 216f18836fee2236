"""Count simulator with known ground truth that scales to millions of cells.

Model (natural-log scale; see ``docs/data.md`` for the full description)::

    log rho[c, g]        = base[g] + celltype[c, g]                       (then normalised)
    effect[p, c, g]      = beta[p, g] * a[p, c] * exp(eps[p, c, g])       on p's program genes
    effect[A+B, c, g]    = target[A] + target[B] + c1 * program[A, c] + c2 * program[B, c]
                           + novel[AB, c] (+ a[AB, c] * gamma[AB, g])     interaction classes
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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.simulation_plan import (
    TARGET_SUM,
    Plan,
    SimulationParams,
    chunk_root,
    make_plan,
)
from pertbench.errors import ConfigError
from pertbench.utils.io import atomic_path

SIMULATION_KEY = "simulation"


def _chunk_bounds(plan: Plan) -> list[tuple[int, int]]:
    step = int(plan.params.chunk_size)
    return [(s, min(s + step, plan.n_cells)) for s in range(0, plan.n_cells, step)]


def _draw_chunk(plan: Plan, seed: np.random.SeedSequence, start: int, stop: int):
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


def _iter_chunks(plan: Plan) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    bounds = _chunk_bounds(plan)
    seeds = chunk_root(plan.params).spawn(len(bounds))
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


def _obs(plan: Plan) -> pd.DataFrame:
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


def _uns(plan: Plan) -> dict[str, Any]:
    p = plan.params
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(p).items()}
    params = {k: v for k, v in params.items() if v is not None}
    groups = plan.groups.drop(columns=["_cov", "_pert"]).reset_index(drop=True)
    groups.index = groups.index.astype(str)
    return {SIMULATION_KEY: {"params": params, "groups": groups, **plan.truth}}


def _var(plan: Plan) -> pd.DataFrame:
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
        Random pairs of singles measured as combinations (``A+B``).
    interaction_fraction
        Share of the pairs that interact (rounded half up to a count; the rest are
        additive). Default 0.82, after Norman et al. 2019 (see docs/data.md).
    interaction_classes
        Relative weights of the non-additive classes ``synergy``, ``buffering``,
        ``suppression``, ``epistasis``, ``neomorphic`` (default: Norman 2019's counts
        30, 8, 12, 9, 13); see :mod:`pertbench.data.interaction_classes`.
    interaction_strength
        Scale of every departure from additivity (1: comparable to single effects).
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
        A sparse random term added to every pair on top of its class: sd (default 0,
        off) and size (fraction of the program size). ``interaction_fraction=0,
        interaction_scale=0.5`` reproduces the simulator before interaction classes.
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
    cell_seed
        Seeds the cell-level draws (library sizes, doses, studies, counts) instead of
        ``seed``, keeping the design and the truth of ``seed``: a fresh replicate of the
        same experiment (``None``: derived from ``seed``).

    Returns
    -------
    AnnData
        ``X`` log1p(1e4-normalised) CSR float32, ``layers['counts']`` CSR float32 sharing
        X's index arrays, obs perturbation/covariate (+dose, study), and the truth in
        ``uns['simulation']``: ``groups`` (one row per (covariate, perturbation)),
        ``true_effect`` (groups x genes, natural-log shift of expression proportions
        before renormalisation), ``true_log_fold_change`` (log proportion vs the
        covariate's controls after renormalisation), ``true_log_expression`` (log1p of
        expected 1e4-normalised expression), ``program``, ``interaction``
        (combinations x covariates x genes: a combination's effect minus its singles'
        effects), ``interaction_class``, ``interaction_coefficients`` (c1, c2 of each
        combination's two parts, in label order), ``theta``,
        ``params`` (+ ``study_shift``, ``doses``/``ec50``/``dose_scale``, ``target_genes``).
    """
    params = _params(kwargs)
    plan = make_plan(params)
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
    if isinstance(kwargs.get("interaction_classes"), Mapping):  # a plain dict for uns / YAML
        kwargs = {**kwargs, "interaction_classes": dict(kwargs["interaction_classes"])}
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
    plan = make_plan(params)
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
