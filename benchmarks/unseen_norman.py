"""The ``unseen`` task on the shared Norman19 + McFaline-Figueroa23 subset: which models
predict perturbations that no training covariate measured, and how well.

The subset measures 500 genes and only one of its 31 perturbed genes (TMSB4X), so the
perturbed gene's row of the subset's own gene PCA (``perturbation_embedding=gene``, the
paper's default) embeds almost nothing here. The perturbation vectors used instead are a
*cross-dataset gene embedding*: the gene PCA (10 components, pertbench's ``gene_pca``) of
the Kang PBMC subset's (cell type x condition) pseudobulk, written to a TSV file and
passed as ``perturbation_embedding=<file>``. It covers 11 of the 31 perturbed genes, so
the held-out singles are drawn (seeded) from the singles it covers (``candidates``);
combinations are held out as the task does (those containing a held-out single, and a
share of the others). Everything held out goes to test (``val_fraction=0``).

Each model is fitted on the train cells and evaluated with ``pertbench.metrics.evaluate``
(baselines on, the same split) on every subset of the test groups it can predict entirely:
all of them, the unseen singles, and the combinations by GEARS subgroup (seen2/seen1/seen0).
A model that cannot predict a subset says why (one line), which is listed below the table.

Usage::

    python benchmarks/unseen_norman.py [--seed 0] [--epochs 15]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NORMAN_FILE = SHARED / "norman19_mcfaline23_subset.h5ad"
KANG_FILE = SHARED / "kang2018_pbmc_ifnb_subset.h5ad"
METRICS = ["rmse_average", "pearson_delta", "cosine_logfc", "rmse_rank_average"]
SUBSETS = ["all", "single", "seen2", "seen1", "seen0"]


def kang_gene_embedding(path: Path, n_components: int = 10) -> pd.DataFrame:
    """Gene PCA of the Kang PBMC (cell type x condition) pseudobulk, genes as rows."""
    from pertbench.data import PerturbationKeys
    from pertbench.data.loading import read_h5ad
    from pertbench.models.encoding import gene_pca
    from pertbench.models.pseudobulk import training_profiles

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kang = read_h5ad(path, keys=PerturbationKeys())
    profiles = training_profiles(kang, PerturbationKeys())
    vectors = gene_pca(profiles.group_means, n_components)
    return pd.DataFrame(vectors, index=kang.var_names.astype(str)).add_prefix("pc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    for path in (NORMAN_FILE, KANG_FILE):
        if not path.is_file():
            raise SystemExit(f"shared data not found at {path}")

    from pertbench.data import PerturbationKeys, make_task_split
    from pertbench.data.loading import read_h5ad
    from pertbench.errors import NotApplicableError
    from pertbench.metrics import evaluate
    from pertbench.models import create_model

    keys = PerturbationKeys()
    adata = read_h5ad(NORMAN_FILE, keys=keys)
    perturbed = sorted(
        {p for c in adata.obs["condition"].astype(str).unique() for p in keys.components(c)}
    )
    tmp = Path(tempfile.mkdtemp(prefix="pertbench-unseen-"))
    embedding = kang_gene_embedding(KANG_FILE)
    emb_file = tmp / "kang_gene_pca.tsv"
    embedding.to_csv(emb_file, sep="\t")
    covered = [g for g in perturbed if g in embedding.index]
    in_norman = [g for g in perturbed if g in adata.var_names]
    singles = [c for c in adata.obs["condition"].astype(str).unique() if c in covered]
    print(
        f"perturbed genes: {len(perturbed)}; measured in the Norman subset (own gene PCA): "
        f"{len(in_norman)} ({', '.join(in_norman)}); with a Kang gene-PCA vector: "
        f"{len(covered)} ({', '.join(covered)})"
    )
    result = make_task_split(
        adata,
        "unseen",
        keys=keys,
        fraction=0.5,
        combo_fraction=0.3,
        candidates=sorted(singles),
        val_fraction=0.0,
        seed=args.seed,
    )
    split = result.split
    held = result.heldout_pairs()
    print(
        f"held out: {', '.join(sorted(held['condition'].unique()))}; leakage: "
        f"{'none' if result.leakage().empty else 'FOUND'}"
    )
    print(held.groupby("seen").size().rename("test groups").to_string(), "\n")

    small = {"encoder_width": 128, "latent_dim": 32, "n_layers": 1, "max_epochs": args.epochs}
    models = {
        "no_change": ("no_change", {}),
        "covariate_mean": ("covariate_mean", {}),
        "perturbation_mean": ("perturbation_mean", {}),
        "additive_within": ("additive_within", {}),
        "linear_embedding": ("linear_embedding", {"perturbation_embedding": str(emb_file)}),
        "linear_embedding (own gene PCA)": ("linear_embedding", {}),
        "nearest_perturbation": ("nearest_perturbation", {"perturbation_embedding": str(emb_file)}),
        "latent_additive (embedding)": (
            "latent_additive",
            {**small, "perturbation_embedding": str(emb_file)},
        ),
        "latent_additive (one-hot)": ("latent_additive", small),
    }
    subsets = {"all": held}
    for name in SUBSETS[1:]:
        subsets[name] = held[held["seen"] == name]
    rows, reasons = [], []
    start_all = time.perf_counter()
    for label, (name, params) in models.items():
        model = create_model(name, keys=keys, **params)
        start = time.perf_counter()
        try:
            model.fit(adata, split, seed=args.seed, device="cpu", progress=False)
        except NotApplicableError as exc:
            reasons.append((label, "all", str(exc)))
            continue
        fit_s = time.perf_counter() - start
        for subset, groups in subsets.items():
            if groups.empty:
                continue
            reason = model.unpredictable_reason(groups["condition"])
            if reason is not None:
                reasons.append((label, subset, reason))
                continue
            chosen = pd.MultiIndex.from_frame(groups[["cell_type", "condition"]])
            obs_pairs = pd.MultiIndex.from_frame(adata.obs[["cell_type", "condition"]].astype(str))
            is_ctrl = (adata.obs["condition"] == keys.control).to_numpy()
            sub = split.where(obs_pairs.isin(chosen) | is_ctrl, "")
            pred = model.predict_split(adata, sub, on="test")
            res = evaluate(
                adata,
                pred,
                keys=keys,
                split=sub,
                on="test",
                metrics=METRICS,
                baselines=True,
                seed=args.seed,
                n_bootstrap=200,
            )
            rows.append(
                {
                    "model": label,
                    "subset": subset,
                    "n_groups": len(groups),
                    "fit_s": fit_s,
                    **{m: res.value(m) for m in METRICS},
                }
            )
    table = pd.DataFrame(rows)
    table["subset"] = pd.Categorical(table["subset"], SUBSETS, ordered=True)
    table = table.sort_values(["subset", "rmse_average"]).reset_index(drop=True)
    with pd.option_context("display.width", 200, "display.float_format", "{:.4f}".format):
        print(table.to_string(index=False))
    print("\ncannot predict:")
    for label, subset, reason in reasons:
        print(f"  {label} [{subset}]: {reason}")
    print(f"\nmeasured in {time.perf_counter() - start_all:.0f} s (seed {args.seed})")


if __name__ == "__main__":
    main()
