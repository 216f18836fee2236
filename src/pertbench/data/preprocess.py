"""Preprocessing to the PerturBench feature set (appendix D.3).

From raw counts: normalise every cell to 1e4 total and log1p; keep the union of

* the top ``n_top_genes`` (4000) highly variable genes, seurat_v3 flavour on counts,
  batch-aware over the covariate combinations (scanpy's ``batch_key`` ranking; or, with
  ``hvg_mode='union'``, the union of each batch's own top genes);
* the top ``n_de_genes`` (25) differentially expressed genes of every perturbation against
  the controls of its covariate combination (scanpy ``rank_genes_groups``, default method
  ``t-test`` as in PerturBench's "default parameters", ranked by absolute score);
* the perturbed genes themselves when they are genes of the data (genetic screens).

Counts are kept in ``layers['counts']``. Data that is already log-normalised and has no
counts is accepted: it is only gene-subset, with HVGs from the ``seurat`` flavour on the
log values (seurat_v3 needs counts). What was done is recorded in
``uns['pertbench_preprocess']``.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.loading import DataWarning, normalize_log1p, scan_values, validate_obs
from pertbench.errors import ConfigError, DataValidationError, require

PREPROCESS_KEY = "pertbench_preprocess"
_BATCH_COLUMN = "_pertbench_batch"


def highly_variable_genes(
    adata: ad.AnnData,
    *,
    batch: np.ndarray | None,
    n_top_genes: int = 4000,
    mode: Literal["batch", "union"] = "batch",
    counts: Any = None,
) -> pd.DataFrame:
    """Highly variable genes with scanpy, seurat_v3 on counts (``seurat`` on log X without).

    Parameters
    ----------
    adata
        Data whose X is log-normalised.
    batch
        Per-cell batch label (covariate combination) or ``None``.
    n_top_genes
        Genes to select (per batch with ``mode='union'``).
    mode
        ``batch``: scanpy's batch-aware ranking, ``n_top_genes`` in total (PerturBench's
        choice). ``union``: the top genes of every batch, united.
    counts
        Raw count matrix aligned with ``adata`` (enables seurat_v3).

    Returns
    -------
    DataFrame
        Indexed by gene: ``highly_variable`` (bool) and ``highly_variable_rank`` (float,
        NaN for genes not selected).
    """
    import scanpy as sc

    if mode not in ("batch", "union"):
        raise ConfigError(f"hvg mode must be 'batch' or 'union', not {mode!r}")
    flavor = "seurat_v3" if counts is not None else "seurat"
    if flavor == "seurat_v3":
        require("skmisc", "test", "seurat_v3 highly variable genes (scanpy)")
    X = counts if counts is not None else adata.X
    tmp = ad.AnnData(X=X, obs=pd.DataFrame(index=adata.obs_names.astype(str)))
    tmp.var_names = adata.var_names.astype(str)
    if batch is not None:
        tmp.obs[_BATCH_COLUMN] = pd.Categorical(np.asarray(batch, dtype=str))
    if flavor == "seurat":
        tmp.uns["log1p"] = {"base": None}

    def run(sub: ad.AnnData, batch_key: str | None) -> pd.DataFrame:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return sc.pp.highly_variable_genes(
                    sub,
                    flavor=flavor,
                    n_top_genes=int(min(n_top_genes, sub.n_vars)),
                    batch_key=batch_key,
                    inplace=False,
                )
            except ValueError as exc:
                raise DataValidationError(
                    f"highly variable gene selection failed ({exc}); batches may be too small: "
                    "try hvg_mode='union' or fewer covariates"
                ) from exc

    n_batches = 0 if batch is None else tmp.obs[_BATCH_COLUMN].nunique()
    if mode == "union" and n_batches > 1:
        selected = np.zeros(tmp.n_vars, dtype=bool)
        best_rank = np.full(tmp.n_vars, np.inf)
        for label in tmp.obs[_BATCH_COLUMN].cat.categories:
            sub = tmp[(tmp.obs[_BATCH_COLUMN] == label).to_numpy()]
            res = run(sub, None)
            hv = res["highly_variable"].to_numpy()
            selected |= hv
            if "highly_variable_rank" in res:
                rank = res["highly_variable_rank"].to_numpy(dtype=float)
                best_rank = np.fmin(best_rank, np.where(hv, rank, np.inf))
        rank = np.where(np.isfinite(best_rank), best_rank, np.nan)
    else:
        res = run(tmp, _BATCH_COLUMN if n_batches > 1 else None)
        selected = res["highly_variable"].to_numpy(dtype=bool)
        if "highly_variable_rank" in res:
            rank = res["highly_variable_rank"].to_numpy(dtype=float)
        else:  # seurat flavour: rank by normalised dispersion
            disp = res["dispersions_norm"].to_numpy(dtype=float)
            order = np.argsort(-np.nan_to_num(disp, nan=-np.inf), kind="stable")
            rank = np.empty(len(disp))
            rank[order] = np.arange(len(disp))
        rank = np.where(selected, rank, np.nan)
    return pd.DataFrame(
        {"highly_variable": selected, "highly_variable_rank": rank},
        index=tmp.var_names,
    )


def top_de_genes(
    adata: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    n_genes: int = 25,
    method: str = "t-test",
    rankby_abs: bool = True,
    min_cells: int = 2,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top DE genes of every perturbation vs the controls of its covariate combination.

    Runs scanpy's ``rank_genes_groups`` once per covariate combination on log X.

    Returns
    -------
    (de, skipped)
        ``de``: long table (covariate label, perturbation, rank, gene);
        ``skipped``: groups not tested (fewer than ``min_cells`` cells, or no controls),
        with the reason.
    """
    import scanpy as sc

    keys = keys if keys is not None else PerturbationKeys()
    if n_genes < 1:
        raise ConfigError("n_de_genes must be at least 1")
    g = group_cells(adata.obs, keys)
    cov_labels = g.covariates["label"].astype(str).to_numpy()
    pert_col = keys.perturbation_key
    records: list[tuple[str, str, int, str]] = []
    skipped: list[tuple[str, str, str]] = []
    groups = g.groups
    for c in range(len(cov_labels)):
        members = groups[groups["covariate_code"] == c]
        ctrl = members[members["is_control"]]
        perts = members[~members["is_control"]]
        if not len(perts):
            continue
        if not len(ctrl) or int(ctrl["n_cells"].iloc[0]) < min_cells:
            skipped.extend(
                (cov_labels[c], str(p), f"fewer than {min_cells} control cells")
                for p in perts[pert_col]
            )
            continue
        small = perts["n_cells"] < min_cells
        skipped.extend(
            (cov_labels[c], str(p), f"fewer than {min_cells} cells")
            for p in perts.loc[small, pert_col]
        )
        tested = [str(p) for p in perts.loc[~small, pert_col]]
        if not tested:
            continue
        mask = g.covariate_codes == c
        sub = ad.AnnData(
            X=adata.X[mask],
            obs=pd.DataFrame(
                {"_group": pd.Categorical(adata.obs[pert_col].astype(str).to_numpy()[mask])},
                index=adata.obs_names[mask].astype(str),
            ),
        )
        sub.var_names = adata.var_names.astype(str)
        sub.uns["log1p"] = {"base": None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.tl.rank_genes_groups(
                sub,
                groupby="_group",
                groups=tested,
                reference=keys.control,
                method=method,
                n_genes=int(min(n_genes, sub.n_vars)),
                rankby_abs=rankby_abs,
            )
        names = sub.uns["rank_genes_groups"]["names"]
        for p in tested:
            for r, gene in enumerate(names[p]):
                records.append((cov_labels[c], p, r, str(gene)))
    de = pd.DataFrame(records, columns=["covariates", pert_col, "rank", "gene"])
    skipped_df = pd.DataFrame(skipped, columns=["covariates", pert_col, "reason"])
    return de, skipped_df


def perturbed_genes(labels, var_names, keys: PerturbationKeys) -> list[str]:
    """Parts of the perturbation labels that are gene names of the data."""
    parts = {
        p for label in pd.unique(np.asarray(labels, dtype=str)) for p in keys.components(label)
    }
    genes = set(map(str, var_names))
    return sorted(parts & genes)


def preprocess(
    adata: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    n_top_genes: int = 4000,
    n_de_genes: int = 25,
    hvg_mode: Literal["batch", "union"] = "batch",
    de_method: str = "t-test",
    rankby_abs: bool = True,
    include_perturbed_genes: bool = True,
    counts_layer: str = "counts",
    target_sum: float = 1e4,
) -> ad.AnnData:
    """Normalise (when given counts) and subset genes to HVGs + DE genes + perturbed genes.

    Parameters
    ----------
    adata
        Raw counts in ``X``, or log-normalised ``X`` (with or without counts in
        ``layers[counts_layer]``). The input is not modified.
    keys
        Perturbation/covariate columns; covariate combinations are the HVG batches and
        the DE contexts.
    n_top_genes
        Highly variable genes (``0`` skips HVG selection; more than the genes: keep all).
    n_de_genes
        DE genes per perturbation and covariate combination (``0`` skips DE).
    hvg_mode
        ``batch`` (scanpy batch-aware ranking, PerturBench) or ``union`` (per-batch top
        genes united).
    de_method
        scanpy ``rank_genes_groups`` method (default ``t-test``, scanpy's default).
    rankby_abs
        Rank DE genes by absolute score (down-regulated genes count too).
    include_perturbed_genes
        Keep perturbed genes present in the data.
    counts_layer, target_sum
        Where counts are kept, and the per-cell total after normalisation.

    Returns
    -------
    AnnData
        A new object: log1p-normalised CSR float32 ``X``, counts (when available) in
        ``layers[counts_layer]``, var flags ``highly_variable``, ``highly_variable_rank``,
        ``de_gene``, ``perturbed_gene`` and ``uns['pertbench_preprocess']``.
    """
    keys = keys if keys is not None else PerturbationKeys()
    if n_top_genes < 0 or n_de_genes < 0:
        raise ConfigError("n_top_genes and n_de_genes must be >= 0")
    validate_obs(adata.obs, keys=keys)
    var_names = pd.Index(adata.var_names.astype(str))
    if not var_names.is_unique:
        dup = var_names[var_names.duplicated()].unique()[:5]
        raise DataValidationError(
            f"gene names are duplicated ({', '.join(dup)}); run adata.var_names_make_unique() first"
        )
    work = ad.AnnData(X=adata.X, obs=adata.obs.copy(), var=adata.var.copy())
    for name, layer in adata.layers.items():
        work.layers[name] = layer
    stats = scan_values(work.X)
    if stats.n_nan or stats.n_posinf or stats.n_neginf or stats.n_negative:
        raise DataValidationError(
            "X has NaN, infinite or negative values; fix the input before preprocessing"
        )
    if stats.value_type == "counts":
        source = "counts"
        if sp.issparse(work.X):
            work.X = sp.csr_matrix(work.X, dtype=np.float32)
        else:
            work.X = sp.csr_matrix(np.asarray(work.X, dtype=np.float32))
        normalize_log1p(work, target_sum=target_sum, counts_layer=counts_layer)
    else:
        source = "log"
        if stats.value_type != "log":
            warnings.warn(
                f"X values look {stats.value_type}, not log-normalised; used as they are",
                DataWarning,
                stacklevel=2,
            )
        if not sp.issparse(work.X):
            work.X = sp.csr_matrix(np.asarray(work.X, dtype=np.float32))
        else:
            work.X = sp.csr_matrix(work.X, dtype=np.float32)
    counts = work.layers[counts_layer] if counts_layer in work.layers else None
    if counts is not None:
        cstats = scan_values(counts)
        if not cstats.all_integer or cstats.n_negative:
            warnings.warn(
                f"layers['{counts_layer}'] is not integer counts; HVGs use the seurat flavour",
                DataWarning,
                stacklevel=2,
            )
            counts = None
    g = group_cells(work.obs, keys)
    batch = g.covariates["label"].astype(str).to_numpy()[g.covariate_codes]
    n_vars = work.n_vars
    if n_top_genes == 0:
        hvg = pd.DataFrame(
            {"highly_variable": False, "highly_variable_rank": np.nan}, index=var_names
        )
    elif n_top_genes >= n_vars:
        hvg = pd.DataFrame(
            {"highly_variable": True, "highly_variable_rank": np.arange(n_vars, dtype=float)},
            index=var_names,
        )
    else:
        hvg = highly_variable_genes(
            work, batch=batch, n_top_genes=n_top_genes, mode=hvg_mode, counts=counts
        )
    if n_de_genes:
        de, skipped = top_de_genes(
            work, keys=keys, n_genes=n_de_genes, method=de_method, rankby_abs=rankby_abs
        )
    else:
        de = pd.DataFrame(columns=["covariates", keys.perturbation_key, "rank", "gene"])
        skipped = pd.DataFrame(columns=["covariates", keys.perturbation_key, "reason"])
    perturbed = (
        perturbed_genes(work.obs[keys.perturbation_key], var_names, keys)
        if include_perturbed_genes
        else []
    )
    is_de = var_names.isin(de["gene"].unique())
    is_pert = var_names.isin(perturbed)
    keep = hvg["highly_variable"].to_numpy() | is_de | is_pert
    if n_top_genes == 0 and not n_de_genes and not perturbed:
        keep[:] = True
    out = work[:, keep].copy()
    out.var["highly_variable"] = hvg["highly_variable"].to_numpy()[keep]
    out.var["highly_variable_rank"] = hvg["highly_variable_rank"].to_numpy()[keep]
    out.var["de_gene"] = is_de[keep]
    out.var["perturbed_gene"] = is_pert[keep]
    out.uns["log1p"] = {"base": None}
    out.uns[PREPROCESS_KEY] = {
        "input": source,
        "hvg_flavor": "seurat_v3" if counts is not None else "seurat",
        "hvg_mode": hvg_mode,
        "n_top_genes": int(n_top_genes),
        "n_de_genes": int(n_de_genes),
        "de_method": de_method,
        "rankby_abs": bool(rankby_abs),
        "target_sum": float(target_sum),
        "n_genes_in": int(n_vars),
        "n_genes_out": int(keep.sum()),
        "n_hvg": int(hvg["highly_variable"].sum()),
        "n_de": int(is_de.sum()),
        "n_perturbed": int(is_pert.sum()),
        "de_genes": de.astype({"rank": np.int64}).reset_index(drop=True),
        "de_skipped": skipped.reset_index(drop=True),
    }
    return out
