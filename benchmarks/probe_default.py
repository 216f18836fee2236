"""Disentanglement probe of CPA with and without its adversary on the default benchmark's data.

Builds the dataset and splits of ``pertbench benchmark --default`` (the shipped
``configs/default.yaml``: simulated data, covariate transfer and combination tasks), trains
``cpa`` and ``cpa_noadv`` with that config's hyperparameters and epochs for each seed, and
prints the probe table of each (held-out val + test cells: accuracy of a fresh
cross-validated classifier on the basal latent, chance, and the same probe on expression
PCA), the rank metrics of the predictions (the cost of removing information), and the mean
over seeds. ``--set key=value`` changes a hyperparameter of ``cpa`` (compare variants);
``--model`` probes other models the config defines (e.g. ``sams_vae``, ``biolord``).

Usage::

    python benchmarks/probe_default.py                       # transfer task, seeds 0 1 2
    python benchmarks/probe_default.py --tasks transfer,combo --seeds 0 1 2
    python benchmarks/probe_default.py --set adv_objective=maximize   # the unbounded variant
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd

RANK_METRICS = ["rmse_rank_average", "cosine_rank_logfc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="transfer", help="comma-separated tasks of the config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", default="cpa,cpa_noadv")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="key=value for cpa's hyperparameters (repeatable)",
    )
    parser.add_argument("--classifier", default="logistic", choices=["logistic", "mlp"])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to write the dataset and splits (default: a temp folder)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    import torch

    from pertbench.benchmark.config import FULL_SCENARIO, default_config_path, load_config
    from pertbench.benchmark.materialize import materialize, split_key
    from pertbench.cli.common import parse_set_options
    from pertbench.data.splits import read_split
    from pertbench.models.probe import disentanglement_probe
    from pertbench.tuning.fitting import fit_and_evaluate, load_dataset

    torch.set_num_threads(1)
    config = load_config(default_config_path())
    overrides = parse_set_options(args.overrides)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pertbench-probe-"))
    manifest = materialize(config, workdir, log=lambda msg: None)
    (dataset,) = config.datasets
    keys = config.datasets[dataset].keys
    adata = load_dataset(manifest["datasets"][dataset]["path"], keys=keys)
    rows = []
    for task in args.tasks.split(","):
        split_file = manifest["splits"][split_key(dataset, task, FULL_SCENARIO)]["path"]
        split = read_split(split_file, adata.obs_names)
        for label in args.models.split(","):
            spec = config.models[label] if label in config.models else config.models["cpa"]
            model = spec.model if label in config.models else label
            params = dict(spec.params)
            if model == "cpa_noadv":  # the config's cpa settings without the adversary's
                params = {k: v for k, v in config.models["cpa"].params.items() if "adv" not in k}
            if model == "cpa":
                params.update(overrides)
            for seed in args.seeds:
                start = time.perf_counter()
                outcome = fit_and_evaluate(
                    adata,
                    split,
                    model=model,
                    params=params,
                    keys=keys,
                    seed=seed,
                    on=("test",),
                    metrics=RANK_METRICS,
                    device="cpu",
                    max_epochs=spec.max_epochs or config.max_epochs,
                )
                probe = disentanglement_probe(
                    outcome.model, adata, split, seed=seed, classifier=args.classifier
                )
                seconds = time.perf_counter() - start
                ranks = outcome.values["test"]
                for r in probe.itertuples():
                    rows.append(
                        {
                            "task": task,
                            "model": label,
                            "seed": seed,
                            "target": r.target,
                            "accuracy": r.accuracy,
                            "chance": r.chance,
                            "reference_accuracy": r.reference_accuracy,
                            "n_cells": r.n_cells,
                            **ranks,
                        }
                    )
                    print(
                        f"{task:9s} {label:10s} seed {seed}  {r.target:13s} accuracy "
                        f"{r.accuracy:.3f}  chance {r.chance:.3f}  reference "
                        f"{r.reference_accuracy:.3f}  (n={r.n_cells})  "
                        + "  ".join(f"{m} {v:.3f}" for m, v in ranks.items())
                        + f"  {seconds:.0f} s",
                        flush=True,
                    )
    table = pd.DataFrame(rows)
    mean = table.groupby(["task", "target", "model"], sort=False)[
        ["accuracy", "chance", "reference_accuracy", *RANK_METRICS]
    ].agg(["mean", "std"])
    print(
        "\nmean (sd) over seeds",
        args.seeds,
        "classifier",
        args.classifier,
        "cpa overrides",
        overrides or "none",
    )
    print(mean.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
