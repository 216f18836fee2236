"""Time and peak memory of the simulator at 1,000,000 cells x 2,000 genes.

Each mode runs in a fresh child process, whose peak resident set size (``ru_maxrss``: the
whole process, numpy and C allocations included) is read when it ends; a sampling thread
also records the RSS curve. Run::

    python benchmarks/simulate_scale.py                 # 1e6 x 2000, in memory and streamed
    python benchmarks/simulate_scale.py --cells 100000  # quicker

The peak must stay under ``--limit-gb`` (6 GB); the script prints the ratios and exits 1
when a mode exceeds it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _design(cells: int, genes: int, perturbations: int, covariates: int) -> dict:
    """Knobs giving about ``cells`` cells: covariates x (perturbations + 10 combos) groups."""
    combos = 10
    groups = covariates * (perturbations + combos)
    controls = 2
    per_group = max(1, round(cells / (groups + controls * covariates)))
    return dict(
        n_covariates=covariates,
        n_perturbations=perturbations,
        n_combinations=combos,
        n_genes=genes,
        n_cells_per_group=per_group,
        n_control_cells=controls * per_group,
        seed=0,
    )


def child(mode: str, options: dict, out_dir: str) -> None:
    peak = {"sampled": _rss_bytes()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak["sampled"] = max(peak["sampled"], _rss_bytes())

    import numpy as np  # noqa: F401  (imports are part of the baseline, not the peak)

    from pertbench.data.simulate import simulate, simulate_to_h5ad

    baseline = _rss_bytes()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    if mode == "memory":
        adata = simulate(**options)
        n_cells, n_genes, nnz = adata.n_obs, adata.n_vars, adata.X.nnz
    else:
        import h5py

        path = Path(out_dir) / "simulated.h5ad"
        simulate_to_h5ad(path, **options)
        with h5py.File(path, "r") as f:
            n_cells, n_genes = (int(v) for v in f["X"].attrs["shape"])
            nnz = int(f["X"]["data"].shape[0])
        size = path.stat().st_size
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    result = {
        "mode": mode,
        "cells": n_cells,
        "genes": n_genes,
        "nnz": nnz,
        "seconds": seconds,
        "baseline_bytes": baseline,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sampled_peak_bytes": peak["sampled"],
    }
    if mode == "stream":
        result["file_bytes"] = size
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=100)
    parser.add_argument("--covariates", type=int, default=3)
    parser.add_argument("--modes", default="memory,stream")
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--limit-gb", type=float, default=6.0)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, json.loads(args.options), args.out_dir)
        return 0
    options = _design(args.cells, args.genes, args.perturbations, args.covariates)
    options["n_jobs"] = args.n_jobs
    print(f"design: {json.dumps(options)}")
    failed = False
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent.parent) as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--options",
                    json.dumps(options),
                    "--out-dir",
                    tmp,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            print(f"{mode}: failed\n{proc.stderr}")
            failed = True
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        dense = r["cells"] * r["genes"] * 4
        peak = max(r["peak_bytes"], r["sampled_peak_bytes"])
        print(
            f"{mode:>6}: {r['cells']:,} cells x {r['genes']:,} genes, "
            f"{100 * r['nnz'] / (r['cells'] * r['genes']):.1f}% non-zero, "
            f"time {r['seconds']:.1f} s ({r['cells'] / r['seconds']:,.0f} cells/s), "
            f"peak RSS {peak / GB:.2f} GB (after imports {r['baseline_bytes'] / GB:.2f} GB)"
        )
        print(
            f"        peak / limit {args.limit_gb:g} GB = {peak / (args.limit_gb * GB):.2f}; "
            f"one dense float32 cells x genes matrix would be {dense / GB:.1f} GB "
            f"(= {dense / peak:.2f} x this peak)"
            + (f"; file {r['file_bytes'] / GB:.2f} GB" if "file_bytes" in r else "")
        )
        failed |= peak > args.limit_gb * GB
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
