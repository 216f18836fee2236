"""Where the default benchmark's time went, and what each speedup saves (ratios, one run).

Three comparisons of the same work done two ways, side by side in this one run:

- ``workers``: the shipped default benchmark (2 workers, as ``make benchmark``) with its
  worker processes set up as before (only the ``*_NUM_THREADS`` variables, which numpy's
  OpenBLAS, loaded at ``import numpy``, had already read: two BLAS threads per worker on
  two cores) and as now (:func:`pertbench.utils.processes.limit_threads`). Wall and CPU
  time (user + sys, workers included); the results tables are checked to be identical.
- ``ceiling``: the saved predictions of every model of one split and seed evaluated one
  after the other in one process, without and with the reused noise ceiling
  (``Evaluator(reuse_references=True)``); the tables are checked to be identical.
- ``report``: ``write_report`` with every figure cropped by ``bbox_inches="tight"`` (as
  before: a figure with a layout engine is then drawn twice) and as now
  (:func:`pertbench.pl.png.figure_png`).

Usage::

    python benchmarks/default_benchmark_speed.py     # about 5 minutes on 2 cores

Timings on a shared machine are noisy: read the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _cpu() -> float:
    """CPU time (user + sys) of this process and of its joined children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def _env_only(threads: int, parent_pid: int) -> None:
    """The worker set-up before limit_threads: variables and torch, no thread-pool limits.

    The old initializer lived in ``pertbench.benchmark.backends``: unpickling it imported
    that module (numpy and scipy with their OpenBLAS) before it set any variable.
    """
    import pertbench.benchmark.backends  # noqa: F401  (the import order of the old set-up)
    from pertbench.utils.processes import THREAD_VARIABLES, die_with_parent

    die_with_parent(parent_pid)
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def compare_workers(scratch: Path) -> Path:
    """The default benchmark (2 workers) with workers set up as before and as now."""
    import pandas as pd

    from pertbench.benchmark import backends
    from pertbench.benchmark.runner import run_benchmark

    measured, folders = {}, {}
    current = backends._init_worker
    for label, initializer in (("variables only", _env_only), ("limit_threads", current)):
        folders[label] = scratch / f"default_{label.replace(' ', '_')}"
        backends._init_worker = initializer  # looked up when the pool starts
        try:
            start, cpu = time.perf_counter(), _cpu()
            run_benchmark(None, out=folders[label], workers=2, log=lambda msg: None)
            measured[label] = (time.perf_counter() - start, _cpu() - cpu)
        finally:
            backends._init_worker = current
        wall, cpu = measured[label]
        print(f"benchmark, workers with {label}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    tables = [pd.read_parquet(f / "results.parquet") for f in folders.values()]
    timing = ["fit_seconds", "predict_seconds", "evaluate_seconds"]
    pd.testing.assert_frame_equal(*(t.drop(columns=timing) for t in tables), check_exact=True)
    (w0, c0), (w1, c1) = measured.values()
    print(f"benchmark: identical results; ratio {w0 / w1:.2f}x wall, {c0 / c1:.2f}x CPU")
    return folders["limit_threads"]


def compare_ceiling(run: Path) -> None:
    import pandas as pd

    from pertbench.benchmark import paths
    from pertbench.data.splits import read_split
    from pertbench.metrics import Evaluator
    from pertbench.metrics.references import REFERENCE_CACHE
    from pertbench.report.predictions import _read

    manifest = json.loads((run / "manifest.json").read_text())
    os.chdir(run)
    truth = _read(manifest["datasets"]["simulated"]["path"])
    split = read_split(manifest["splits"]["simulated|combo|full"]["path"], truth.obs_names)
    cells = sorted((run / "cells" / "simulated" / "combo" / "full").glob("*/seed_0"))
    preds = {c.parent.name: _read(c / paths.PREDICTIONS_FILE) for c in cells}
    tables, walls = {}, {}
    for reuse in (False, True):
        REFERENCE_CACHE.clear()
        start = time.perf_counter()
        tables[reuse] = [
            Evaluator(
                truth,
                pred,
                split=split,
                on="test",
                baselines=["no_change"],
                ceiling=True,
                seed=0,
                model_name=name,
                keep_aggregates=False,
                reuse_references=reuse,
            )
            .run()
            .summary
            for name, pred in preds.items()
        ]
        walls[reuse] = time.perf_counter() - start
    for fresh, reused in zip(tables[False], tables[True], strict=True):
        pd.testing.assert_frame_equal(fresh, reused, check_exact=True)
    print(
        f"ceiling: {len(preds)} evaluations, {walls[False]:.1f} s computed every time, "
        f"{walls[True]:.1f} s reused (identical tables): ratio {walls[False] / walls[True]:.2f}x"
    )


def compare_report(run: Path, scratch: Path) -> None:
    """The report with every figure cropped (drawn twice) as before, and as now."""
    import io

    from pertbench.pl import png
    from pertbench.report import write_report

    def cropped(fig, *, dpi=png.DPI):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        return buffer.getvalue()

    walls = {}
    for label in ("cropped", "drawn once"):
        copy = scratch / f"report_{label.replace(' ', '_')}"
        shutil.copytree(run, copy)
        renderer = png.figure_png
        if label == "cropped":
            png.figure_png = cropped
        try:
            start = time.perf_counter()
            write_report(copy)
            walls[label] = time.perf_counter() - start
        finally:
            png.figure_png = renderer
    print(
        f"report: {walls['cropped']:.1f} s with every figure cropped (bbox_inches='tight'), "
        f"{walls['drawn once']:.1f} s drawing laid-out figures once: "
        f"ratio {walls['cropped'] / walls['drawn once']:.2f}x"
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="pertbench-speed-") as tmp:
        scratch = Path(tmp)
        run = compare_workers(scratch)
        compare_ceiling(run)
        compare_report(run, scratch)


if __name__ == "__main__":
    main()
