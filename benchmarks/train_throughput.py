"""Training throughput of ``latent_additive`` and the share of step time spent loading data.

Simulates a large sparse dataset with the project's simulator (default 200,000 cells x
2,000 genes), builds ``latent_additive`` at PerturBench's default size (3 hidden layers of
width 3072, latent 160, batch 4,000 -- its published config), and times training steps
split into:

- *loading*: building the batch -- target rows and their matched controls densified
  from CSR (on a GPU: gathered as non-zeros, densified on the device), perturbation and
  covariate encodings -- plus, amortised over the epoch, the per-epoch shuffle and
  vectorised control matching of all cells;
- *compute*: moving the batch to the device (and densifying it there on a GPU), forward,
  backward and optimiser step.

Prints cells/second and the loading fraction of step time, measured in one run. Target:
loading under 10% of step time.

With ``--out-of-core`` the data are streamed into an ``.h5ad`` file and training reads
them block by block (``pertbench.models.blocks.BlockLoader``): the control pool and the
per-cell metadata are in memory, expression is read from disk a buffer at a time. Loading
is then measured over one whole epoch of batches built without training (every buffer
read included), divided by the number of steps.

Usage::

    python benchmarks/train_throughput.py                 # the full 200k-cell run
    python benchmarks/train_throughput.py --cells 20000 --steps 3   # quick check
    python benchmarks/train_throughput.py --out-of-core   # read from disk by blocks
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000, help="Approximate number of cells.")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=100)
    parser.add_argument("--covariates", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4000)
    parser.add_argument("--width", type=int, default=3072, help="encoder_width (PerturBench: 3072)")
    parser.add_argument("--layers", type=int, default=3, help="n_layers (PerturBench: 3)")
    parser.add_argument("--latent", type=int, default=160, help="latent_dim (PerturBench: 160)")
    parser.add_argument("--steps", type=int, default=6, help="Timed training steps.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument(
        "--prefetch",
        type=int,
        default=0,
        help="Also time training with batches built this many ahead in a background thread.",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-of-core", action="store_true", help="Train from an .h5ad file read by blocks."
    )
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--buffer-blocks", type=int, default=64)
    args = parser.parse_args()

    from pertbench.data.ondisk import open_h5ad
    from pertbench.data.simulate import simulate, simulate_to_h5ad
    from pertbench.models.blocks import BlockLoader, BlockSampling, DiskCells
    from pertbench.models.data import BatchLoader, CellTable
    from pertbench.models.encoding import CategoryEncoding
    from pertbench.models.latent_additive import LatentAdditive
    from pertbench.models.layers import torch_seed_scope
    from pertbench.models.training import move_batch
    from pertbench.utils.random import resolve_device

    device = resolve_device(args.device)
    # controls are 2 x n_cells_per_group per covariate in the simulator
    per_group = max(1, round(args.cells / (args.covariates * (args.perturbations + 2))))
    design = dict(
        n_covariates=args.covariates,
        n_perturbations=args.perturbations,
        n_combinations=0,
        n_cells_per_group=per_group,
        n_genes=args.genes,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    if args.out_of_core:
        folder = tempfile.TemporaryDirectory(prefix="train_throughput_")
        path = Path(folder.name) / "data.h5ad"
        simulate_to_h5ad(path, **design)
        adata = open_h5ad(path)  # obs and var in memory, X on disk
        nnz = adata.X.nnz
    else:
        adata = simulate(**design)
        nnz = adata.X.nnz
    t_sim = time.perf_counter() - t0
    density = nnz / (adata.n_obs * adata.n_vars)
    print(
        f"data: {adata.n_obs:,} cells x {adata.n_vars:,} genes, CSR {density:.1%} non-zero "
        f"({'streamed to disk and opened by rows' if args.out_of_core else 'simulated'} in "
        f"{t_sim:.1f}s)"
    )

    model = LatentAdditive(
        n_layers=args.layers,
        encoder_width=args.width,
        latent_dim=args.latent,
        batch_size=args.batch_size,
    )
    model.genes = pd.Index(adata.var_names)
    model.encoding = CategoryEncoding.fit(adata.obs, model.keys)
    t0 = time.perf_counter()
    if args.out_of_core:
        table = DiskCells(adata, np.arange(adata.n_obs), model.encoding, genes=model.genes)
        pool = table.controls()
        sampling = BlockSampling(block_size=args.block_size, buffer_blocks=args.buffer_blocks)
    else:
        table = CellTable.from_adata(adata, model.encoding, genes=model.genes)
        pool = table
    t_table = time.perf_counter() - t0
    dims = {
        "n_genes": adata.n_vars,
        "n_perts": model.encoding.n_perturbations,
        "n_cov": model.encoding.n_covariate_columns,
        "covariate_sizes": model.encoding.covariate_sizes,
        "n_input": adata.n_vars,
        "n_train_cells": table.n_cells,
    }
    fields = ("x", "pert", "cov", "cov_codes")
    on_gpu = device.startswith("cuda")

    def make_loader(prefetch: int):
        options = dict(
            batch_size=args.batch_size,
            seed=args.seed,
            fields=fields,
            controls=pool,
            control_fields={"ctrl": "x"},
            prefetch=prefetch,
            pin_memory=on_gpu,
            densify_on_device=on_gpu,  # as training does on a GPU
        )
        if args.out_of_core:
            return BlockLoader(table, sampling=sampling, **options)
        return BatchLoader(table, **options)

    def timed_steps(loader: BatchLoader, module, optimizers) -> tuple[float, float, float]:
        """Mean seconds per step waiting for the batch and computing; epoch-plan seconds."""
        t0 = time.perf_counter()
        batches = iter(loader(0))  # the epoch's shuffle + matching happen here
        t_plan = time.perf_counter() - t0
        waits, computes = [], []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            batch = move_batch(batch, device)
            module.training_step(batch, optimizers, step)
            if on_gpu:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if step >= args.warmup:
                waits.append(t1 - t0)
                computes.append(t2 - t1)
        if hasattr(batches, "close"):
            batches.close()
        return float(np.mean(waits)), float(np.mean(computes)), t_plan

    with torch_seed_scope(args.seed, device):
        module = model._build_module(dims).to(device).train()
        optimizers = module.configure_optimizers()
        n_params = sum(p.numel() for p in module.parameters())
        print(
            f"model: latent_additive n_layers={args.layers} width={args.width} "
            f"latent={args.latent} ({n_params / 1e6:.1f}M parameters), batch {args.batch_size}, "
            f"device {device}, {torch.get_num_threads()} torch threads"
        )
        loader = make_loader(prefetch=0)
        n_batches = len(loader)
        load, compute, t_plan = timed_steps(loader, module, optimizers)
        prefetch_result = None
        if args.prefetch:
            prefetch_result = timed_steps(make_loader(args.prefetch), module, optimizers)

    plan_per_step = t_plan / n_batches  # the epoch's shuffle + matching, amortised
    if args.out_of_core:
        # Buffers are read every buffer_cells / batch_size steps: average a whole epoch.
        t0 = time.perf_counter()
        for _ in make_loader(prefetch=0)(1):
            pass
        load, plan_per_step = (time.perf_counter() - t0) / n_batches, 0.0
        print(
            f"one-time metadata table + control pool ({pool.n_cells:,} controls read): "
            f"{t_table:.2f}s; blocks of {args.block_size} cells, buffers of "
            f"{sampling.buffer_cells:,} cells"
        )
        print(
            f"per step: loading {load * 1e3:.1f} ms (one whole epoch of batches read from "
            f"disk and built, divided by its {n_batches} steps), compute {compute * 1e3:.1f} ms "
            f"(mean of {args.steps} steps)"
        )
    else:
        print(
            f"one-time CSR table build: {t_table:.2f}s; per-epoch shuffle + matching: {t_plan:.3f}s"
        )
        print(
            f"per step (batches built inline): loading {(load + plan_per_step) * 1e3:.1f} ms "
            f"(batch {load * 1e3:.1f} + epoch plan {plan_per_step * 1e3:.2f}), compute "
            f"{compute * 1e3:.1f} ms, mean of {args.steps} steps"
        )
    loading = load + plan_per_step
    step_time = loading + compute
    print(f"cells/second: {args.batch_size / step_time:,.0f}")
    print(
        f"epoch of {table.n_cells:,} cells ({n_batches} steps): about {n_batches * step_time:.0f}s"
    )
    fraction = loading / step_time
    verdict = "OK (< 10%)" if fraction < 0.10 else "ABOVE the 10% target"
    print(f"data loading fraction of step time: {fraction:.2%} {verdict}")
    if prefetch_result is not None:
        wait, compute_p, plan_p = prefetch_result
        waiting = wait + plan_p / n_batches
        print(
            f"with prefetch={args.prefetch} (background thread): the loop waits "
            f"{waiting * 1e3:.1f} ms per step for data, compute {compute_p * 1e3:.1f} ms: "
            f"{waiting / (waiting + compute_p):.2%} of step time"
        )


if __name__ == "__main__":
    main()
