"""Time and memory of the rank family at 500, 1,000 and 5,000 perturbations per covariate.

One covariate block of N perturbations x G genes (default 2,000), one aggregation: the
observed profiles and four predictions scored against them, as in an evaluation with
baselines: the model and ``perturbation_mean`` (N distinct rows each), ``no_change`` and
``covariate_mean`` (one profile repeated N times). For each source the seven rank
metrics (rmse, mse, mae, cosine, pearson, spearman, r2 ranks) and ``matrix_distance`` are
computed three ways, in the same process and on the same arrays:

- ``per-metric``: every rank metric its own call of the rank code of commit ``--before``
  (the code before the shared engine; read with ``git show``), 7 N x N computations per
  source (only up to ``--per-metric-max`` perturbations, it is the slowest);
- ``before``: that code as the evaluator called it, one ``rank_metrics`` call per source
  (rmse, mse and r2 share one matrix; the truth side is recomputed in every call);
- ``shared``: :func:`pertbench.metrics.rank.rank_family` with the truth's operands
  prepared once (:class:`~pertbench.metrics.rank.ProfileOperands`) and shared by the four
  sources, all kinds in one pass over bounded column blocks; single-threaded, and again
  with ``--threads`` threads for the L1 distances of ``mae`` (as ``n_jobs`` does in the
  evaluator; BLAS stays single-threaded).

Time is wall-clock; memory is the peak of traced allocations (``tracemalloc``; NumPy
buffers are traced) above the inputs. The script prints both and their ratios, and
checks that the ranks agree (exactly up to 2,048 perturbations, where both compute the
matrix in one piece).

Usage::

    python benchmarks/rank_scale.py                    # 500, 1,000, 5,000 x 2,000 genes
    python benchmarks/rank_scale.py --sizes 500,1000 --genes 500    # quick
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pertbench.metrics.fit import FIT_METRICS  # noqa: E402
from pertbench.metrics.rank import ProfileOperands, matrix_distance, rank_family  # noqa: E402

BEFORE = "f3ecbb6"  # the last commit before the shared rank engine


def load_before(commit: str):
    """The rank module as it was at ``commit`` (imported from a temporary file)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:src/pertbench/metrics/rank.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "rank_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rank_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def block(n: int, genes: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Observed profiles and four predictions of one covariate block."""
    rng = np.random.default_rng(seed)
    truth = rng.gamma(2.0, 1.0, size=(n, genes))
    sources = {
        "model": truth + rng.normal(0.0, 0.5, size=truth.shape),
        "perturbation_mean": truth + rng.normal(0.0, 1.0, size=truth.shape),
        "no_change": np.repeat(rng.gamma(2.0, 1.0, size=(1, genes)), n, axis=0),
        "covariate_mean": np.repeat(truth.mean(axis=0, keepdims=True), n, axis=0),
    }
    return truth, sources


def per_metric(old, truth, sources) -> dict:
    """Every rank metric its own call of the code before (7 N x N matrices per source)."""
    return {
        name: {m: old.rank_metrics(P, truth, [m])[m] for m in FIT_METRICS}
        | {"matrix_distance": old.matrix_distance(P, truth)}
        for name, P in sources.items()
    }


def before(old, truth, sources) -> dict:
    """The code before, as the evaluator called it: one call per source."""
    return {
        name: old.rank_metrics(P, truth, FIT_METRICS)
        | {"matrix_distance": old.matrix_distance(P, truth)}
        for name, P in sources.items()
    }


def shared(truth, sources, n_jobs: int = 1) -> dict:
    """The shared engine: the truth's operands once for every source, blocked passes."""
    ops = ProfileOperands(truth)
    return {
        name: rank_family(P, ops, FIT_METRICS, n_jobs=n_jobs)
        | {"matrix_distance": matrix_distance(P, truth)}
        for name, P in sources.items()
    }


def measure(fn, *args):
    """(seconds, peak MiB of traced allocations during fn(*args), result)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, peak / 2**20, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,5000")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--before", default=BEFORE, help="commit of the code compared with")
    parser.add_argument("--per-metric-max", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="also time the shared engine with this many "
        "threads for the L1 (mae) distances, as the evaluator's n_jobs does (1: skip)",
    )
    args = parser.parse_args()
    old = load_before(args.before)
    print(f"rank family, one block, one aggregation, 4 sources, {args.genes:,} genes")
    print("ratios: this approach's time (memory) over that of the single-threaded shared one")
    print(f"{'N':>6} {'approach':<11} {'time s':>8} {'peak MiB':>9} {'time x':>7} {'memory x':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        truth, sources = block(n, args.genes, args.seed)

        runs = {}
        if n <= args.per_metric_max:
            runs["per-metric"] = measure(per_metric, old, truth, sources)
        runs["before"] = measure(before, old, truth, sources)
        if args.threads > 1:
            runs[f"shared {args.threads}t"] = measure(shared, truth, sources, args.threads)
        runs["shared"] = measure(shared, truth, sources)
        t_new, m_new, new = runs["shared"]
        for label, (t, m, _) in runs.items():
            ratio = "" if label == "shared" else f"{t / t_new:7.2f} {m / m_new:9.2f}"
            print(f"{n:>6} {label:<11} {t:8.2f} {m:9.1f} {ratio}")
        _, _, ref = runs["before"]
        differ = sum(int(np.sum(ref[s][k] != new[s][k])) for s in sources for k in FIT_METRICS)
        md = max(abs(ref[s]["matrix_distance"] - new[s]["matrix_distance"]) for s in sources)
        for label, (_, _, other) in runs.items():
            if label.startswith("shared "):  # threads must not change a single rank
                assert all(
                    np.array_equal(other[s][k], new[s][k]) for s in sources for k in FIT_METRICS
                ), label
        print(
            f"{'':>6} ranks differing from before: {differ} of {4 * 7 * n:,}; "
            f"largest matrix_distance difference {md:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
