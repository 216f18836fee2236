"""Where a perfect model's mae_var comes from at few cells per group, by detection count.

The ``var`` aggregation's mae ceiling is the one fit ceiling the validation grid leaves
outside 1 +/- 0.15 (n = 10, effect 0.5: oracle normalised 0.82). This script splits a
perfect model's absolute variance error over genes by how many of the group's ``n``
observed cells detect them, and compares it with what the plain iterated bootstrap
(``2 |v_b - v| - |v_bb - v_b|``) estimates in each stratum, and with a second-order
Good-Turing estimate of the error on the genes no cell detected:

    sum over undetected genes of sigma^2 ~ A1 - A2,
    A1 = (1 / n) sum over genes detected once of x^2,
    A2 = 1 / (n (n - 1)) sum over genes detected twice of (x_1^2 + x_2^2),

(``E[A_k] = sum_g p_g^k E[x^2 | detected] (1 - p_g)^(n - k)``; the unseen genes' share is
``A1 - A2 + A3 - ...``). The "truth" per gene is the variance of the oracle's cells (500 per
group, the same effects). It prints, for each stratum, the perfect model's error, the
bootstrap's estimate and their ratio, then the totals of three rules:

- ``bootstrap``: the plain iterated bootstrap over all genes;
- ``group-scaled``: the bootstrap scaled by sqrt(exact / bootstrap noise energy) per group,
  the scale the shipped rule applies (without its unseen-gene draws);
- ``detected + Good-Turing``: the bootstrap on detected genes, unscaled, plus A1 - A2;

and no_change's error beside them: the normalised score divides by its excess over the
ceiling, which says how close the ceiling has to be.

Usage::

    python benchmarks/var_error_by_detection.py [--seed 0] [--cells 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceiling_validation import truth_and_oracles

from pertbench.metrics.ceiling_corrections import _variance_mse_weights
from pertbench.models.data import dense_rows

EDGES = (1, 2, 3, 5)  # strata: 0, 1, 2, 3-4, >= 5 detections
NAMES = ("0", "1", "2", "3-4", ">=5")
REPLICATES = 40


def group_labels(adata) -> np.ndarray:
    return (adata.obs["condition"].astype(str) + "|" + adata.obs["cell_type"].astype(str)).values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells", type=int, default=10)
    parser.add_argument("--effect", type=float, default=0.5)
    args = parser.parse_args()
    if args.cells < 4:
        parser.error(
            f"--cells must be at least 4 (the variance's exact noise needs 4), got {args.cells}"
        )

    truth, oracle, _, _ = truth_and_oracles(args.cells, args.effect, n_genes=500, seed=args.seed)
    labels_t, labels_o = group_labels(truth), group_labels(oracle)
    rng = np.random.default_rng(args.seed)
    k = len(NAMES)
    true_abs, boot_abs, boot_sq, exact_sq, genes = (np.zeros(k) for _ in range(5))
    good_turing = no_change = 0.0
    cell_types = truth.obs["cell_type"].astype(str).values
    controls = truth.obs["condition"].astype(str).values == "control"
    for group in np.unique(labels_o):
        cells = dense_rows(truth.X, np.flatnonzero(labels_t == group))
        n = cells.shape[0]
        observed_var = cells.var(axis=0)
        stratum = np.digitize((cells != 0).sum(axis=0), EDGES)
        oracle_var = dense_rows(oracle.X, np.flatnonzero(labels_o == group)).var(axis=0)
        error = np.abs(observed_var - oracle_var)
        own_controls = np.flatnonzero(controls & (cell_types == group.split("|")[1]))
        control_var = dense_rows(truth.X, own_controls).var(axis=0)
        no_change += np.abs(observed_var - control_var).sum()
        a, b = _variance_mse_weights(n)
        centred4 = ((cells - cells.mean(axis=0)) ** 4).mean(axis=0)
        exact = a * centred4 + b * observed_var**2
        est_abs, est_sq = np.zeros(cells.shape[1]), np.zeros(cells.shape[1])
        for _ in range(REPLICATES):
            replicate = cells[rng.integers(0, n, n)]
            v_b = replicate.var(axis=0)
            v_bb = replicate[rng.integers(0, n, n)].var(axis=0)
            est_abs += 2 * np.abs(v_b - observed_var) - np.abs(v_bb - v_b)
            est_sq += 2 * (v_b - observed_var) ** 2 - (v_bb - v_b) ** 2
        est_abs /= REPLICATES
        est_sq /= REPLICATES
        squares = (cells**2).sum(axis=0)
        good_turing += squares[stratum == 1].sum() / n - squares[stratum == 2].sum() / (n * (n - 1))
        for s in range(k):
            at = stratum == s
            true_abs[s] += error[at].sum()
            boot_abs[s] += est_abs[at].sum()
            boot_sq[s] += est_sq[at].sum()
            exact_sq[s] += exact[at].sum()
            genes[s] += at.sum()

    print(f"n={args.cells} cells/group, effect {args.effect}, seed {args.seed}, 500 genes")
    print(f"{'detections':>10} {'genes':>7} {'perfect':>9} {'bootstrap':>9} {'ratio':>6}")
    for s in range(k):
        ratio = boot_abs[s] / true_abs[s] if true_abs[s] > 0 else np.nan
        print(f"{NAMES[s]:>10} {genes[s]:7.0f} {true_abs[s]:9.1f} {boot_abs[s]:9.1f} {ratio:6.3f}")
    total = true_abs.sum()
    scaled = boot_abs.sum() * np.sqrt(exact_sq.sum() / boot_sq.sum())
    detected = boot_abs[1:].sum() + good_turing
    print(f"undetected genes: perfect {true_abs[0]:.1f}, Good-Turing A1 - A2 {good_turing:.1f}")
    print("total mae, as a ratio to the perfect model's:")
    print(f"  bootstrap            {boot_abs.sum() / total:.3f}")
    print(f"  group-scaled         {scaled / total:.3f}")
    print(f"  detected + Good-Turing {detected / total:.3f}")
    print(f"  no_change (the floor)  {no_change / total:.3f}")
    print(
        "the normalised score divides by the floor's excess over the ceiling, so a ceiling "
        f"off by x% moves it by about x / {100 * (no_change / total - 1):.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
