"""What sizing a search space for the data buys: ``latent_additive`` on Norman-sized data.

PerturBench's published space (widths 256..5376 in steps of 1024, 1..7 hidden layers) is
meant for GPU runs on 10^5-cell screens. ``pertbench tune`` sizes it for the data and device
(:func:`pertbench.models.search_space.size_space`); for the Norman subset on a CPU (500
genes, ~5,000 training cells) widths stop at 1,000 and depths at 3 hidden layers.

Printed, from one run:

- parameters of the largest configuration of each space, and the mean over 200 seeded draws
  of each (Optuna's random sampling, as in the first trials of a search): compute per step
  is proportional to the parameter count;
- measured seconds per training step (forward, backward, Adam) of the sized space's largest
  configuration and of a mid-sized published one (2304 x 5; the published largest,
  5376 x 7, needs ~10 GB for its weights and optimiser state), and their ratio next to the
  ratio of their parameter counts.

Usage::

    python benchmarks/tune_space_size.py            # Norman subset shape
    python benchmarks/tune_space_size.py --genes 2000 --cells 50000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pertbench.models.latent_additive import LatentAdditive, LatentAdditiveNet
from pertbench.models.search_space import size_space


def _net(n_genes: int, config: dict, *, device: str = "cpu") -> LatentAdditiveNet:
    params = LatentAdditive.make_params(config)
    with torch.device(device):
        return LatentAdditiveNet(
            n_input=n_genes, n_genes=n_genes, n_perts=40, n_cov=4, params=params
        )


def _n_params(n_genes: int, config: dict) -> int:
    return sum(p.numel() for p in _net(n_genes, config, device="meta").parameters())


def _draw(spec: dict, rng: np.random.Generator):
    if spec["type"] == "categorical":
        return spec["choices"][rng.integers(len(spec["choices"]))]
    low, high = spec["low"], spec["high"]
    if spec.get("log"):
        value = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        return round(value) if spec["type"] == "int" else value
    if spec["type"] == "int":
        step = int(spec.get("step", 1))
        return int(low + step * rng.integers((high - low) // step + 1))
    return float(rng.uniform(low, high))


def _largest(space: dict) -> dict:
    return {
        k: (max(v["choices"]) if v["type"] == "categorical" else v["high"])
        for k, v in space.items()
        if k in ("encoder_width", "n_layers", "latent_dim")
    }


def _seconds_per_step(n_genes: int, config: dict, *, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    net = _net(n_genes, {**config, "dropout": 0.1})
    optimizer = net.configure_optimizers()[0]
    data = {
        "ctrl": torch.rand(batch, n_genes),
        "x": torch.rand(batch, n_genes),
        "pert": torch.zeros(batch, 40).index_fill_(1, torch.tensor([0]), 1.0),
        "cov": torch.zeros(batch, 4).index_fill_(1, torch.tensor([0]), 1.0),
    }
    net.training_step(data, [optimizer], 0)  # warm-up
    start = time.perf_counter()
    for step in range(steps):
        net.training_step(data, [optimizer], step + 1)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--cells", type=int, default=5000, help="Training cells.")
    parser.add_argument("--device", default="cpu", help="Device the space is sized for.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    published = LatentAdditive.search_space
    sized, changes = size_space(
        published, n_genes=args.genes, n_train_cells=args.cells, device=args.device
    )
    print(f"{args.genes} genes, {args.cells:,} training cells, {args.device}: {', '.join(changes)}")
    for name, space in (("published", published), ("sized", sized)):
        rng = np.random.default_rng(0)
        draws = [
            _n_params(args.genes, {k: _draw(v, rng) for k, v in space.items()}) for _ in range(200)
        ]
        largest = _n_params(args.genes, _largest(space))
        print(
            f"{name:>9} space: largest {_largest(space)} = {largest / 1e6:,.1f} M parameters; "
            f"mean of 200 draws {np.mean(draws) / 1e6:,.1f} M"
        )
    mid = {"encoder_width": 2304, "n_layers": 5, "latent_dim": 512}
    top = _largest(sized)
    t_mid = _seconds_per_step(args.genes, mid, batch=args.batch_size, steps=args.steps)
    t_top = _seconds_per_step(args.genes, top, batch=args.batch_size, steps=args.steps)
    p_mid, p_top = _n_params(args.genes, mid), _n_params(args.genes, top)
    print(
        f"seconds per step (batch {args.batch_size}): published {mid} {t_mid:.3f}, "
        f"sized largest {top} {t_top:.3f}; ratio {t_mid / t_top:.1f}x "
        f"(parameters {p_mid / p_top:.1f}x)"
    )


if __name__ == "__main__":
    main()
