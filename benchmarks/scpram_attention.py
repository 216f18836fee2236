"""scPRAM's per-cell attention: vectorised (chunked matrix products + argpartition) vs one cell at a time.

Builds random latents (default 20,000 query cells x 10,000 reference controls x 100
dimensions), computes the top-k cosine attention and the per-cell shifts both ways on the
first ``--loop-cells`` queries (the loop is the straightforward per-cell version), checks
that they agree, and prints the measured speed-up per cell and the vectorised throughput.

Usage::

    python benchmarks/scpram_attention.py [--queries 20000] [--references 10000] [--loop-cells 500]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pertbench.models.scpram import attention_weights


def per_cell(
    query: np.ndarray, reference: np.ndarray, shifts: np.ndarray, ratio: float
) -> np.ndarray:
    k = math.ceil(ratio * len(reference))
    ref_norm = np.linalg.norm(reference, axis=1)
    out = np.empty((len(query), shifts.shape[1]))
    for q, z in enumerate(query):  # the per-cell loop the vectorised version replaces
        sims = reference @ z / (ref_norm * np.linalg.norm(z))
        top = np.argsort(-sims)[:k]
        w = np.clip(sims[top], 0, None)
        out[q] = (w / w.sum()) @ shifts[top]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--references", type=int, default=10000)
    parser.add_argument("--dims", type=int, default=100)
    parser.add_argument("--ratio", type=float, default=0.05)
    parser.add_argument("--loop-cells", type=int, default=500)
    args = parser.parse_args()
    gen = np.random.default_rng(0)
    query = gen.normal(size=(args.queries, args.dims)) + 1.0
    reference = gen.normal(size=(args.references, args.dims)) + 1.0
    shifts = gen.normal(size=(args.references, args.dims))

    start = time.perf_counter()
    deltas = attention_weights(query, reference, ratio=args.ratio) @ shifts
    vec = time.perf_counter() - start

    n_loop = min(args.loop_cells, args.queries)
    start = time.perf_counter()
    looped = per_cell(query[:n_loop], reference, shifts, args.ratio)
    loop = time.perf_counter() - start
    max_diff = float(np.abs(looped - deltas[:n_loop]).max())

    per_cell_vec = vec / args.queries
    per_cell_loop = loop / n_loop
    print(
        f"queries {args.queries:,} x references {args.references:,} x {args.dims} dims, k = {math.ceil(args.ratio * args.references)}"
    )
    print(f"vectorised: {vec:.2f} s for all queries ({args.queries / vec:,.0f} cells/s)")
    print(f"per-cell loop: {loop:.2f} s for {n_loop} queries ({n_loop / loop:,.0f} cells/s)")
    print(f"max |difference| of the shifts: {max_diff:.2e}")
    print(f"speed-up per cell: {per_cell_loop / per_cell_vec:.1f}x")


if __name__ == "__main__":
    main()
