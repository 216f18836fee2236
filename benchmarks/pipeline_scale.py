"""Time and peak memory of the whole pipeline at 10^5, 3x10^5 and 10^6 cells x 2,000 genes.

Per size, five stages run one after the other, each in its own ``pertbench`` process
(through the CLI, as a user runs them), so each stage's peak resident set size is its own:

1. ``simulate --stream``: the simulator writes the dataset chunk by chunk;
2. ``split --task transfer``;
3. ``train --model latent_additive --epochs 1 --out-of-core``: one epoch read by blocks;
4. ``predict --out-of-core``: predictions written chunk by chunk;
5. ``evaluate`` (default metrics) of the predictions against the dataset.

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (the kernel's high-water mark of
that process: numpy, torch and HDF5 allocations included). A watchdog samples the RSS
every 0.2 s and kills a stage that passes ``--kill-gb`` (the machine is shared), which is
then reported as killed. The script prints time and peak RSS per stage and size, and per
stage the growth exponent: the least-squares slope of log(time) and of log(peak RSS)
against log(cells) (1 = linear). Target: every stage below ``--limit-gb`` (6 GB) at 10^6
cells and time growing at most linearly; the exit status is 1 when a stage misses the
memory target or fails.

``--threads N`` sets the math-library threads of every stage (OMP/MKL/OpenBLAS). On a
machine shared with other work, one thread can be several times faster than two (BLAS
threads spin-wait for each other when the cores are taken); say which was used.

Usage::

    python benchmarks/pipeline_scale.py                        # 1e5, 3e5, 1e6 cells
    python benchmarks/pipeline_scale.py --sizes 20000,60000    # quick check
    python benchmarks/pipeline_scale.py --threads 1            # on a loaded machine
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simulate_scale import _design  # the same simulated design

GB = 1024**3
STAGES = ("simulate", "split", "train", "predict", "evaluate")


@dataclass
class StageResult:
    stage: str
    cells: int
    seconds: float
    peak_bytes: int
    status: str  # "ok", "failed" or "killed"
    detail: str = ""


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0


def run_stage(
    stage: str, cells: int, command: list[str], *, kill_bytes: int, env: dict[str, str]
) -> StageResult:
    """Run one stage in a child process; its own peak RSS comes from ``os.wait4``."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    killed = threading.Event()

    def watch() -> None:
        while proc.returncode is None and not killed.is_set():
            if _rss_of(proc.pid) > kill_bytes:
                killed.set()
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Drain the pipes in threads so a chatty child never blocks on a full pipe.
    output: dict[str, str] = {}
    readers = [
        threading.Thread(target=lambda n=n, s=s: output.__setitem__(n, s.read()), daemon=True)
        for n, s in (("stdout", proc.stdout), ("stderr", proc.stderr))
    ]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    killed_now = killed.is_set()
    killed.set()
    for reader in readers:
        reader.join()
    watcher.join()
    peak = int(usage.ru_maxrss) * 1024  # kilobytes on Linux
    if killed_now:
        return StageResult(
            stage, cells, seconds, peak, "killed", f"RSS above {kill_bytes / GB:g} GB"
        )
    if proc.returncode != 0:
        last = (output.get("stderr", "").strip().splitlines() or ["(no message)"])[-1]
        return StageResult(stage, cells, seconds, peak, "failed", last)
    last = (output.get("stdout", "").strip().splitlines() or [""])[-1]
    return StageResult(stage, cells, seconds, peak, "ok", last)


def stage_commands(work: Path, design: dict, args: argparse.Namespace) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "pertbench"]
    data, split = work / "data.h5ad", work / "split.csv"
    run, pred, evaluation = work / "run", work / "pred.h5ad", work / "evaluation"
    simulate = [*cli, "simulate", "--out", str(data), "--stream"]
    for name in ("n_covariates", "n_perturbations", "n_combinations", "n_cells_per_group"):
        simulate += [f"--{name.replace('_', '-')}", str(design[name])]
    simulate += ["--n-control-cells", str(design["n_control_cells"])]
    simulate += ["--n-genes", str(design["n_genes"]), "--seed", "0"]
    return {
        "simulate": simulate,
        "split": [*cli, "split", str(data), "--task", "transfer", "--out", str(split)],
        "train": [
            *cli,
            "train",
            str(data),
            "--model",
            "latent_additive",
            "--split",
            str(split),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--out-of-core",
            "--no-progress",
            "--device",
            args.device,
        ],
        "predict": [
            *cli,
            "predict",
            str(run),
            "--data",
            str(data),
            "--out",
            str(pred),
            "--out-of-core",
            "--device",
            args.device,
        ],
        "evaluate": [
            *cli,
            "evaluate",
            "--pred",
            str(pred),
            "--truth",
            str(data),
            "--split",
            str(split),
            "--out",
            str(evaluation),
        ],
    }


def exponent(cells: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(cells)."""
    if len(cells) < 2:
        return float("nan")
    return float(np.polyfit(np.log(cells), np.log(values), 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="Cells per run.")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--perturbations", type=int, default=100)
    parser.add_argument("--covariates", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Math-library threads per stage (OMP/MKL/OpenBLAS; default: the libraries' own).",
    )
    parser.add_argument("--limit-gb", type=float, default=6.0, help="Peak RSS target per stage.")
    parser.add_argument("--kill-gb", type=float, default=8.0, help="Kill a stage above this RSS.")
    parser.add_argument("--stages", default=",".join(STAGES), help="Stop after the last listed.")
    parser.add_argument(
        "--work-dir", default=None, help="Where the files go (default: a temp dir)."
    )
    parser.add_argument("--keep", action="store_true", help="Keep the files of every size.")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    wanted = [s for s in STAGES if s in args.stages.split(",")]
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="pipeline_scale_"))
    env = dict(os.environ)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
    print(
        f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())} "
        f"({os.cpu_count()} CPUs)"
    )
    results: list[StageResult] = []
    for cells in sizes:
        design = _design(cells, args.genes, args.perturbations, args.covariates)
        work = root / f"cells_{cells}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        commands = stage_commands(work, design, args)
        for stage in wanted:
            result = run_stage(
                stage, cells, commands[stage], kill_bytes=int(args.kill_gb * GB), env=env
            )
            results.append(result)
            print(
                f"{cells:>9,} cells  {stage:<9} {result.seconds:8.1f} s  peak RSS "
                f"{result.peak_bytes / GB:5.2f} GB  {result.status}: {result.detail}",
                flush=True,
            )
            if result.status != "ok":
                break
        if (work / "data.h5ad").exists():
            size = (work / "data.h5ad").stat().st_size
            pred = work / "pred.h5ad"
            print(
                f"{cells:>9,} cells  files: data {size / GB:.2f} GB"
                + (f", predictions {pred.stat().st_size / GB:.2f} GB" if pred.exists() else ""),
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    print("\nstage      " + "".join(f"{c:>22,}" for c in sizes) + "   time exp.  RSS exp.")
    failed = False
    for stage in wanted:
        rows = [r for r in results if r.stage == stage]
        cells = [r.cells for r in rows if r.status == "ok"]
        cols = "".join(
            f"{r.seconds:>10.1f} s {r.peak_bytes / GB:>6.2f} GB"
            + (" " if r.status == "ok" else "!")
            for r in rows
        )
        t_exp = exponent(cells, [r.seconds for r in rows if r.status == "ok"])
        m_exp = exponent(cells, [r.peak_bytes for r in rows if r.status == "ok"])
        print(f"{stage:<11}{cols}   {t_exp:8.2f}  {m_exp:8.2f}")
        failed |= any(r.status != "ok" or r.peak_bytes > args.limit_gb * GB for r in rows)
    ok = [r for r in results if r.status == "ok"]
    totals = {c: sum(r.seconds for r in ok if r.cells == c) for c in sizes}
    complete = [c for c in sizes if sum(r.cells == c for r in ok) == len(wanted)]
    if complete:
        print(
            "end to end "
            + "".join(f"{totals[c]:>10.1f} s" + " " * 11 for c in complete)
            + f"   {exponent(complete, [totals[c] for c in complete]):8.2f}"
        )
    worst = max(ok, key=lambda r: r.peak_bytes, default=None)
    if worst is not None:
        print(
            f"largest peak RSS: {worst.peak_bytes / GB:.2f} GB ({worst.stage}, {worst.cells:,} "
            f"cells) = {worst.peak_bytes / (args.limit_gb * GB):.2f} x the {args.limit_gb:g} GB "
            "target"
        )
    if not args.work_dir and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
