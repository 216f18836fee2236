"""Peak memory of ``pertbench evaluate``: files streamed from disk vs AnnData in memory.

For each size (default 75k, 150k and 300k cells x 2,000 genes) the script simulates a
screen straight to disk (:func:`pertbench.data.simulate.simulate_to_h5ad`: 3 cell types x
250 perturbations, cells per group growing with the size, 10% controls), a split where
each perturbation is held out (test) in one cell type and trained in the other two (half
of the controls in test), and a dense float32 prediction of the test groups (observed
values plus noise, as a model would output), written chunk by chunk. Then, each in a
fresh process whose peak resident memory is read from the kernel (``wait4``):

- ``stream``: ``pertbench evaluate --truth T.h5ad --pred P.h5ad --split S.csv ...``
  (paths: both files are read block by block from disk);
- ``memory``: both files read into memory with ``anndata.read_h5ad`` and
  ``Evaluator(truth, pred, ...)`` on the objects (the path every caller had before);

with the default metrics, with and without ``--baselines --ceiling``. It prints peak RSS
and time per run, the ratio memory/stream in each setting, the growth of the streamed
peak from the smallest to the largest size, and checks that both modes wrote identical
tables. Target: the streamed peak roughly flat in the number of cells and far below the
in-memory one.

Usage::

    python benchmarks/evaluate_memory.py                       # 75k, 150k, 300k
    python benchmarks/evaluate_memory.py --sizes 75000 --modes stream
    python benchmarks/evaluate_memory.py --workdir /tmp/evalmem --keep   # reuse files
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's pertbench, here and in the children
N_COVARIATES = 3
N_PERTURBATIONS = 250

IN_MEMORY = """
import sys, warnings
import anndata as ad
from pertbench.metrics import Evaluator
truth_path, pred_path, split_path, out, refs = sys.argv[1:6]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    truth = ad.read_h5ad(truth_path)
    pred = ad.read_h5ad(pred_path)
refs = refs == "1"
Evaluator(truth, pred, split=split_path, baselines=refs, ceiling=refs, n_bootstrap=200,
          keep_aggregates=False).run().write(out)
"""


def make_files(folder: Path, n_cells: int, n_genes: int, seed: int = 0) -> tuple[Path, ...]:
    """Simulated truth, split and dense prediction for ``n_cells`` cells (reused if there)."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    from pertbench.data.ondisk import RowReader, open_h5ad
    from pertbench.data.simulate import simulate_to_h5ad
    from pertbench.data.splits import write_split

    folder.mkdir(parents=True, exist_ok=True)
    truth_path, split_path, pred_path = (
        folder / "truth.h5ad",
        folder / "split.csv",
        folder / "pred.h5ad",
    )
    if truth_path.exists() and split_path.exists() and pred_path.exists():
        return truth_path, split_path, pred_path
    per_group = max(1, round(0.9 * n_cells / (N_COVARIATES * N_PERTURBATIONS)))
    controls = max(1, (n_cells - per_group * N_COVARIATES * N_PERTURBATIONS) // N_COVARIATES)
    simulate_to_h5ad(
        truth_path,
        n_covariates=N_COVARIATES,
        n_perturbations=N_PERTURBATIONS,
        n_combinations=0,
        n_cells_per_group=per_group,
        n_control_cells=controls,
        n_genes=n_genes,
        seed=seed,
    )
    truth = open_h5ad(truth_path, validate=False)
    obs = truth.obs
    pert = obs["condition"].astype(str).to_numpy()
    cov = obs["cell_type"].astype(str).to_numpy()
    is_ctrl = pert == "control"
    perts = sorted(set(pert[~is_ctrl]))
    covs = sorted(set(cov))
    held = {p: covs[i % len(covs)] for i, p in enumerate(perts)}  # one cell type each
    test = ~is_ctrl & (cov == np.array([held.get(p, "") for p in pert]))
    rng = np.random.default_rng(seed)
    test |= is_ctrl & (rng.random(truth.n_obs) < 0.5)
    split = pd.Series(np.where(test, "test", "train"), index=obs.index.astype(str))
    write_split(split, split_path)

    rows = np.flatnonzero(test & ~is_ctrl)
    reader = RowReader(truth.X)
    with h5py.File(pred_path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs.iloc[rows].copy())
        write_elem(f, "var", truth.var.copy())
        for name in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, name, {})
        X = f.create_dataset("X", shape=(rows.size, n_genes), dtype=np.float32)
        X.attrs["encoding-type"] = "array"
        X.attrs["encoding-version"] = "0.2.0"
        step = 4096
        for i, lo in enumerate(range(0, rows.size, step)):
            block = reader.read(rows[lo : lo + step]).toarray()
            noise = np.random.default_rng([seed, i]).normal(0.0, 0.2, size=block.shape)
            X[lo : lo + block.shape[0]] = np.maximum(block + noise, 0.0).astype(np.float32)
    truth.close()
    return truth_path, split_path, pred_path


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run a command; return (seconds, peak RSS in GiB) of that process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"command failed ({status}): {' '.join(cmd)}\n{err[-2000:]}")
    return seconds, usage.ru_maxrss / 1024**2  # KiB -> GiB


def same_tables(a: Path, b: Path) -> bool:
    import pandas as pd

    for name in ("summary.csv", "per_group.csv", "per_covariate.csv"):
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        if not x.equals(y):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="75000,150000,300000")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--modes", default="stream,memory")
    parser.add_argument("--references", default="0,1", help="0: plain, 1: --baselines --ceiling")
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the simulated files")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    modes = args.modes.split(",")
    refs_options = [r == "1" for r in args.references.split(",")]
    base = Path(args.workdir or tempfile.mkdtemp(prefix="pertbench-evalmem-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    pertbench = [sys.executable, "-m", "pertbench"]
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        truth, split, pred = make_files(base / f"n{n}", n, args.genes)
        print(f"{n:,} cells: files ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for refs in refs_options:
            outs = {}
            for mode in modes:
                out = base / f"n{n}" / f"eval_{mode}_{int(refs)}"
                if mode == "stream":
                    cmd = [
                        *pertbench, "evaluate", "--truth", str(truth), "--pred", str(pred),
                        "--split", str(split), "--out", str(out), "--n-bootstrap", "200",
                    ]  # fmt: skip
                    cmd += ["--baselines", "--ceiling"] if refs else []
                else:
                    cmd = [sys.executable, "-c", IN_MEMORY, str(truth), str(pred), str(split)]
                    cmd += [str(out), "1" if refs else "0"]
                seconds, peak = run(cmd, env)
                outs[mode] = out
                rows.append((n, mode, refs, seconds, peak))
                label = "baselines+ceiling" if refs else "plain"
                print(f"  {mode:<6} {label:<17} {seconds:7.1f} s  peak {peak:6.2f} GiB", flush=True)
            if len(outs) == 2:
                same = same_tables(outs["stream"], outs["memory"])
                print(f"  identical tables stream vs memory: {'yes' if same else 'NO'}", flush=True)

    print("\nsummary (peak RSS GiB; ratio = memory / stream)")
    print(f"{'cells':>9} {'references':<17} {'stream':>7} {'memory':>7} {'ratio':>6}")
    for n in sizes:
        for refs in refs_options:
            got = {m: p for (nn, m, r, _, p) in rows if nn == n and r == refs}
            s, m = got.get("stream", float("nan")), got.get("memory", float("nan"))
            label = "baselines+ceiling" if refs else "plain"
            print(f"{n:>9,} {label:<17} {s:7.2f} {m:7.2f} {m / s:6.2f}")
    if len(sizes) > 1 and "stream" in modes:
        for refs in refs_options:
            got = {nn: p for (nn, m, r, _, p) in rows if m == "stream" and r == refs}
            growth = got[sizes[-1]] / got[sizes[0]]
            label = "baselines+ceiling" if refs else "plain"
            print(
                f"streamed peak, {label}: x{growth:.2f} from {sizes[0]:,} to {sizes[-1]:,} cells "
                f"(cells x{sizes[-1] / sizes[0]:.0f})"
            )
    if not args.keep and args.workdir is None:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
