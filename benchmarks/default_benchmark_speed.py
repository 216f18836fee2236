"""Where the default benchmark's time went, and what each speedup saves (ratios, one run).

``make benchmark`` (the shipped default config, 2 workers) first; then, on its finished
folder, three comparisons of the same work done two ways, each in this one run:

- ``blas``: six latent-model cells of the combo task (fit, predict, evaluate, probe)
  run by two spawned worker processes at once, with workers set up as before (only the
  ``*_NUM_THREADS`` variables, which numpy's OpenBLAS, loaded at ``import numpy``, had
  already read: four BLAS threads on two cores) and as now
  (:func:`pertbench.utils.processes.limit_threads`). Wall time of the pair.
- ``ceiling``: the saved predictions of every model of one split and seed evaluated one
  after the other in one process, without and with the reused noise ceiling
  (``Evaluator(reuse_references=True)``); the tables are checked to be identical.
- ``report``: ``write_report`` with every figure cropped by ``bbox_inches="tight"`` (as
  before: a figure with a layout engine is then drawn twice) and as now
  (:func:`pertbench.pl.png.figure_png`).

Usage::

    python benchmarks/default_benchmark_speed.py                # runs the benchmark first
    python benchmarks/default_benchmark_speed.py --run runs/default   # a finished run

Timings on a shared machine are noisy: read the ratios, measured side by side.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LATENT_MODELS = ("cpa", "sams_vae", "biolord")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_default(out: Path) -> None:
    """``pertbench benchmark --default`` with 2 workers; prints wall and CPU time."""
    start, cpu = time.perf_counter(), _children_cpu()
    command = Path(sys.executable).with_name("pertbench")
    subprocess.run(
        [str(command), "benchmark", "--default", "--out", str(out), "--workers", "2"], check=True
    )
    print(
        f"default benchmark: {time.perf_counter() - start:.1f} s wall, "
        f"{_children_cpu() - cpu:.1f} s CPU (user + sys), 2 workers"
    )


def _env_only(threads: int, parent_pid: int) -> None:
    """The worker set-up before limit_threads: variables and torch, no thread-pool limits."""
    from pertbench.utils.processes import THREAD_VARIABLES, die_with_parent

    die_with_parent(parent_pid)
    for var in THREAD_VARIABLES:
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _limited(threads: int, parent_pid: int) -> None:
    from pertbench.utils.processes import die_with_parent, limit_threads

    die_with_parent(parent_pid)
    limit_threads(threads)


def _cell(args: tuple[str, str]) -> float:
    from pertbench.benchmark.config import default_config_path, load_config
    from pertbench.benchmark.jobs import run_job
    from pertbench.benchmark.runner import build_jobs

    out, job_id = Path(args[0]), args[1]
    os.chdir(out)
    manifest = json.loads((out / "manifest.json").read_text())
    jobs, _ = build_jobs(load_config(default_config_path()), out, manifest, threads=1)
    job = jobs[job_id]
    shutil.rmtree(job.directory)
    job.directory.mkdir(parents=True)
    start = time.perf_counter()
    outcome = run_job(job)
    assert outcome.status == "ok", outcome.error
    return time.perf_counter() - start


def compare_blas(run: Path, scratch: Path) -> None:
    ids = [f"cell:simulated|combo|full|{m}|{s}" for m in LATENT_MODELS for s in (0, 1)]
    walls, cpus = {}, {}
    for label, initializer in (("variables only", _env_only), ("limit_threads", _limited)):
        copy = scratch / f"blas_{label.replace(' ', '_')}"
        shutil.copytree(run, copy)
        cpu = _children_cpu()
        with cf.ProcessPoolExecutor(
            2,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=initializer,
            initargs=(1, os.getpid()),
        ) as pool:
            pool.submit(time.sleep, 0).result()  # both workers started before timing
            start = time.perf_counter()
            list(pool.map(_cell, [(str(copy), i) for i in ids]))
            walls[label] = time.perf_counter() - start
        cpus[label] = _children_cpu() - cpu  # the workers' CPU time, once they are joined
        print(
            f"blas: {len(ids)} cells on 2 workers, {label}: {walls[label]:.1f} s wall, "
            f"{cpus[label]:.1f} s worker CPU (spinning BLAS threads count here)"
        )
    old, new = "variables only", "limit_threads"
    print(f"blas: ratio {walls[old] / walls[new]:.2f}x wall, {cpus[old] / cpus[new]:.2f}x CPU")


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished default benchmark folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pertbench-speed-") as tmp:
        scratch = Path(tmp)
        run = args.run.resolve() if args.run else scratch / "default"
        if args.run is None:
            run_default(run)
        compare_blas(run, scratch)
        compare_ceiling(run)
        compare_report(run, scratch)


if __name__ == "__main__":
    main()
