"""scGen on the Kang PBMCs restricted to 2,000 highly variable genes: does it beat no_change?

The fair head-to-head of scGen implementations uses ONE file, the Kang subset restricted
to the 2,000 seurat highly variable genes (``sc.pp.highly_variable_genes(adata,
flavor="seurat", n_top_genes=2000)`` on its log1p values), built here in a temporary
folder (never written into the repository). On it this script runs the held-out cell-type
workflow (``pertbench.workflows.celltype_transfer``, every one of the 7 types, default
models scgen and scpram with their default hyperparameters, the no_change and
perturbation_mean baselines, seed 0 unless ``--seed``) and prints per held-out type the
plain R^2 of the gene means over the 2,000 genes (``r2`` of metrics.csv, recomputed here
from the saved ``runs/<type>/<model>_pred.h5ad`` as a check), the epochs and the
training time.

It ends with the two verdicts of the target: scGen above no_change on EVERY type, and
CD4T at least 0.905 (pertpy's scGen reached 0.925 on the same file and cells: 0.02 below
that is the tolerance).

Usage::

    python benchmarks/scgen_hvg_kang.py [--data PATH] [--keep DIR] [--models scgen,scpram]
        [--cell-types all] [--seed 0] [--figures]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

N_TOP_GENES = 2000
CD4T_TARGET = 0.905
PERTPY_CD4T = 0.925
DEFAULT_DATA = (
    Path(__file__).resolve().parents[1].parent / "shared/data/kang2018_pbmc_ifnb_subset.h5ad"
)


def hvg_subset(path: Path, out: Path, n_top_genes: int = N_TOP_GENES):
    """The Kang file restricted to its seurat highly variable genes, written to ``out``."""
    import scanpy as sc

    from pertbench.data.loading import read_h5ad

    adata = read_h5ad(path)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=n_top_genes)
    subset = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    subset.write_h5ad(out)
    return subset


def plain_r2_from_predictions(adata, out: Path, table):
    """Per row of ``table``: R^2 of gene means recomputed from the saved predicted cells."""
    import anndata as ad
    import numpy as np

    from pertbench.metrics.fit import r2
    from pertbench.workflows.celltype_transfer import prediction_file_name, safe_name

    obs = adata.obs
    values = []
    for model, cell_type in zip(table["model"], table["cell_type"], strict=True):
        truth = adata[
            ((obs["cell_type"] == cell_type) & (obs["condition"] != "control")).to_numpy()
        ]
        pred = ad.read_h5ad(out / "runs" / safe_name(cell_type) / prediction_file_name(model))
        pred = pred[:, truth.var_names]
        truth_mean = np.asarray(truth.X.mean(axis=0), dtype=np.float64).ravel()
        pred_mean = np.asarray(pred.X.mean(axis=0), dtype=np.float64).ravel()
        values.append(float(r2(pred_mean, truth_mean)))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--keep", type=Path, default=None, help="write the run here (kept)")
    parser.add_argument("--models", default="scgen,scpram", help="models besides the baselines")
    parser.add_argument("--cell-types", default="all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the models")
    parser.add_argument("--figures", action="store_true", help="also draw the figures")
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"Kang subset not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    import pandas as pd
    import torch

    from pertbench.workflows import TransferOptions, celltype_transfer

    work = Path(tempfile.mkdtemp(prefix="kang_hvg_"))
    adata = hvg_subset(args.data, work / f"kang_hvg{N_TOP_GENES}.h5ad")
    print(f"HVG file: {adata.n_obs} cells x {adata.n_vars} genes (seurat, log1p), in {work}")
    out = args.keep or work / "run"
    options = TransferOptions(
        models=tuple(m for m in args.models.split(",") if m),
        seed=args.seed,
        figures=args.figures,
    )
    start = time.perf_counter()
    table = celltype_transfer(
        adata,
        out_dir=out,
        cell_types=args.cell_types,
        options=options,
        resume=args.keep is not None,
        log=lambda line: print(line, flush=True),
    )
    wall = time.perf_counter() - start
    table["r2_from_pred_file"] = plain_r2_from_predictions(adata, out, table)
    wide = table.pivot(index="cell_type", columns="model", values="r2")
    models = [m for m in (*options.models, *options.baselines) if m in wide.columns]
    wide = wide[models]
    train = table.pivot(index="cell_type", columns="model", values="train_seconds")
    epochs = table.pivot(index="cell_type", columns="model", values="epochs")
    for name in options.models:
        wide[f"{name}-no_change"] = wide[name] - wide["no_change"]
        wide[f"{name} epochs"] = epochs[name].astype(int)
        wide[f"{name} train s"] = train[name]
    print(
        f"\nPlain R^2 of gene means over the {N_TOP_GENES} HVGs, per held-out type (seed {args.seed}):"
    )
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(wide.round(3).to_string())
        print("\nmean over types:")
        print(wide[models].mean().round(3).to_string())
    gap = (table["r2"] - table["r2_from_pred_file"]).abs().max()
    print(f"\nr2 recomputed from the saved predictions: largest difference {gap:.2e}")
    print(f"torch threads: {torch.get_num_threads()}; total wall time {wall:.1f} s")
    if "scgen" in wide.columns:
        above = wide["scgen"] > wide["no_change"]
        print(
            f"scGen above no_change on {int(above.sum())} of {len(above)} held-out types: "
            + ("yes, every type" if above.all() else "NO: " + ", ".join(above.index[~above]))
        )
        if "CD4T" in wide.index:
            cd4t = float(wide.loc["CD4T", "scgen"])
            print(
                f"CD4T: scGen R^2 {cd4t:.3f}, target >= {CD4T_TARGET} (pertpy's scGen: "
                f"{PERTPY_CD4T}): {'met' if cd4t >= CD4T_TARGET else 'NOT met'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
