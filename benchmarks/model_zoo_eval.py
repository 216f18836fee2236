"""Train every model of the zoo on a covariate-transfer task and score it with the Evaluator.

Tasks:

- ``norman``: the shared Norman19 + McFaline-Figueroa23 subset (5,961 cells x 500 genes).
  Transfer split from ``pertbench.data.splits``: perturbations held out in the glioma
  lines A172, T98G and U87MG (each held-out perturbation stays in training in K562 and
  at least one other line), 60% of each line's perturbations held out, a third of those
  to val and the rest to test, seed 0.
- ``simulated``: the project's simulator (4 cell types x 20 perturbations x 500 genes,
  60 cells per group), half of each cell type's perturbations held out (each in at most
  two cell types), 30% of those to val and the rest to test, seed 0.

Every model is trained with its defaults (``--epochs`` caps the epochs) and the seed, and
predicts the test groups from their cell line's control cells. The Evaluator scores
rmse_average, cosine_logfc and their rank metrics; the three analytic baselines
(no_change, perturbation_mean, covariate_mean) are scored on the same split.

Usage::

    python benchmarks/model_zoo_eval.py --task norman
    python benchmarks/model_zoo_eval.py --task simulated --models linear,latent_additive
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

METRICS = ["rmse_average", "cosine_logfc", "rmse_rank_average", "cosine_rank_logfc"]
NEURAL = ["linear", "latent_additive", "decoder_only", "cpa", "cpa_noadv", "sams_vae", "biolord"]
BASELINES = ["no_change", "perturbation_mean", "covariate_mean"]
NORMAN = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NORMAN_FILE = NORMAN / "norman19_mcfaline23_subset.h5ad"


def load_task(task: str, seed: int):
    from pertbench.data import PerturbationKeys
    from pertbench.data.splits import make_task_split

    keys = PerturbationKeys()
    if task == "norman":
        from pertbench.data.loading import read_h5ad

        if not NORMAN_FILE.is_file():
            raise SystemExit(f"shared data not found at {NORMAN_FILE}")
        adata = read_h5ad(NORMAN_FILE, keys=keys)
        result = make_task_split(
            adata,
            "transfer",
            keys=keys,
            heldout_covariates=["A172", "T98G", "U87MG"],
            fraction=0.6,
            max_heldout_covariates=2,
            val_fraction=0.34,
            seed=seed,
        )
    elif task == "simulated":
        from pertbench.data.simulate import simulate

        adata = simulate(
            n_covariates=4,
            n_perturbations=20,
            n_combinations=0,
            n_cells_per_group=60,
            n_genes=500,
            seed=seed,
        )
        result = make_task_split(
            adata,
            "transfer",
            keys=keys,
            fraction=0.5,
            max_heldout_covariates=2,
            val_fraction=0.3,
            seed=seed,
        )
    else:
        raise SystemExit(f"unknown task {task}")
    if len(result.leakage()):
        raise SystemExit("split leaks held-out groups into train")
    return adata, result.split, keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="norman", choices=["norman", "simulated"])
    parser.add_argument("--models", default=",".join(NEURAL))
    parser.add_argument(
        "--epochs", type=int, default=None, help="Cap on epochs (default: model's)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="Optional CSV of the table.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."
    )
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from pertbench.metrics.evaluator import Evaluator
    from pertbench.models.registry import create_model

    adata, split, keys = load_task(args.task, args.seed)
    counts = split.value_counts()
    n_test_groups = len(
        adata.obs.loc[(split == "test").to_numpy() & (adata.obs.condition != "control").to_numpy()]
        .groupby(["cell_type", "condition"], observed=True)
        .size()
    )
    print(
        f"task {args.task}: {adata.n_obs} cells x {adata.n_vars} genes; train "
        f"{counts.get('train', 0)}, val {counts.get('val', 0)}, test {counts.get('test', 0)} "
        f"cells; {n_test_groups} test groups"
    )
    rows = []
    baselines_done = False
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        model = create_model(name, keys=keys)
        start, cpu_start = time.perf_counter(), time.process_time()
        model.fit(adata, split, seed=args.seed, max_epochs=args.epochs, progress=False)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        pred = model.predict_split(adata, split, on="test")
        result = Evaluator(
            adata,
            pred,
            keys=keys,
            metrics=",".join(METRICS),
            split=split,
            on="test",
            baselines=not baselines_done,
            n_bootstrap=0,
            seed=args.seed,
            model_name=name,
            keep_aggregates=False,
        ).run()
        epochs = len(model.history) if model.history is not None else 0
        rows.append(
            {
                "model": name,
                **{m: result.value(m) for m in METRICS},
                "epochs": epochs,
                "fit_s": seconds,
                "cpu_s": cpu_seconds,
            }
        )
        print(f"  {name}: {epochs} epochs in {seconds:.0f}s (CPU {cpu_seconds:.0f}s)", flush=True)
        if not baselines_done:
            for base in BASELINES:
                rows.append(
                    {
                        "model": base,
                        **{m: result.value(f"{base}/{m}") for m in METRICS},
                        "epochs": 0,
                        "fit_s": float("nan"),
                        "cpu_s": float("nan"),
                    }
                )
            baselines_done = True
    table = pd.DataFrame(rows)
    order = {
        **{m: i for i, m in enumerate(NEURAL)},
        **{b: 100 + i for i, b in enumerate(BASELINES)},
    }
    table = table.sort_values("model", key=lambda s: s.map(order)).reset_index(drop=True)
    print()
    print(f"| model | {' | '.join(METRICS)} | epochs | fit s (wall) | fit s (CPU) |")
    print("|" + "---|" * (len(METRICS) + 4))
    for _, r in table.iterrows():
        values = " | ".join(f"{r[m]:.4f}" for m in METRICS)
        fit = "" if pd.isna(r["fit_s"]) else f"{r['fit_s']:.0f} | {r['cpu_s']:.0f}"
        print(f"| {r['model']} | {values} | {int(r['epochs'])} | {fit or ' | '} |")
    if args.out is not None:
        from pertbench.utils.io import write_csv_atomic

        write_csv_atomic(args.out, table)


if __name__ == "__main__":
    main()
