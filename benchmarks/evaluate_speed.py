"""Speed and memory of ``pertbench evaluate`` (default metrics: fit + rank + DE).

Simulated screen (:func:`pertbench.data.simulate.simulate`): 3 covariates x 500
perturbations x 100 cells x 2,000 genes (plus 500 controls per covariate); truth is
sparse CSR (log1p counts), the prediction dense float32 (100 predicted cells per group,
as a model would output). The script
times, each in a fresh process so peak memory is measured cleanly:

- ``pertbench``: ``Evaluator(truth, pred, metrics="default").run()``;
- ``loop``: the same metrics computed the straightforward way, one group at a time
  (numpy means, scipy's Mann-Whitney U per group, scipy ``cdist`` per covariate for
  the rank metrics);
- ``cell-eval``: the cell-eval package (installed from PyPI into its own virtual
  environment under ``.venv-bench/``) on the metrics both compute; skipped with a
  message when it cannot be installed.

It prints times, ratios and peak memory (peak resident memory of the process minus its
resident memory before the inputs were loaded, over the size of the input matrices).
Targets: >= 10x faster than the loop, faster than cell-eval, peak < 2x the inputs.

Usage::

    python benchmarks/evaluate_speed.py                 # full size
    python benchmarks/evaluate_speed.py --perturbations 50 --skip-cell-eval   # quick
    python benchmarks/evaluate_speed.py --loop-groups 150   # time the loop on a subset
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
CELL_EVAL_SPEC = "cell-eval==0.8.2"


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------
def simulate(
    *,
    n_covariates: int,
    n_perturbations: int,
    n_cells: int,
    n_controls: int,
    n_genes: int,
    seed: int,
):
    """Truth from the project's simulator and a dense, model-like prediction.

    Truth: :func:`pertbench.data.simulate.simulate` (negative binomial counts with known
    perturbation programs, normalised to 1e4 and log1p; sparse CSR). Prediction: for every
    perturbed group, ``n_cells`` cells of log1p(expm1(observed group mean) x a per-gene
    error x a per-cell size factor): dense, continuous, close to but not equal to the
    truth, like a model's output.
    """
    import anndata as ad
    import pandas as pd

    from pertbench.data import PerturbationKeys, group_cells, group_mean
    from pertbench.data.simulate import simulate as simulate_counts

    truth = simulate_counts(
        n_covariates=n_covariates,
        n_perturbations=n_perturbations,
        n_combinations=0,
        n_cells_per_group=n_cells,
        n_control_cells=n_controls,
        n_genes=n_genes,
        seed=seed,
    )
    del truth.layers["counts"]  # the evaluation reads X only
    grouping = group_cells(truth.obs, PerturbationKeys())
    perturbed = np.flatnonzero(~grouping.groups["is_control"].to_numpy())
    means = group_mean(truth.X, grouping.group_codes, grouping.n_groups)[perturbed]
    rng = np.random.default_rng(seed + 1)
    expected = np.expm1(means) * rng.lognormal(0.0, 0.25, size=means.shape)
    group_of_cell = np.repeat(np.arange(perturbed.size), n_cells)
    blocks = []
    for lo in range(0, group_of_cell.size, 20_000):  # row chunks bound the temporaries
        g = group_of_cell[lo : lo + 20_000]
        size = rng.lognormal(0.0, 0.1, size=(g.size, 1))
        blocks.append(np.log1p(expected[g] * size).astype(np.float32))
    table = grouping.groups.iloc[perturbed]
    obs = pd.DataFrame(
        {
            "condition": table["condition"].to_numpy()[group_of_cell],
            "cell_type": table["cell_type"].to_numpy()[group_of_cell],
        },
        index=[f"pred{i}" for i in range(group_of_cell.size)],
    )
    pred = ad.AnnData(X=np.vstack(blocks), obs=obs, var=pd.DataFrame(index=truth.var_names.copy()))
    return truth, pred


def save_inputs(truth, pred, folder: Path) -> int:
    """Write the matrices as plain .npy (exact sizes on load); returns their bytes."""
    import pandas as pd

    X = truth.X
    np.save(folder / "truth_data.npy", X.data)
    np.save(folder / "truth_indices.npy", X.indices)
    np.save(folder / "truth_indptr.npy", X.indptr)
    np.save(folder / "pred.npy", pred.X)
    truth.obs.to_csv(folder / "truth_obs.csv")
    pred.obs.to_csv(folder / "pred_obs.csv")
    pd.DataFrame(index=truth.var_names).to_csv(folder / "genes.csv")
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes + pred.X.nbytes)


def load_inputs(folder: Path):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    truth_obs = pd.read_csv(folder / "truth_obs.csv", index_col=0)
    pred_obs = pd.read_csv(folder / "pred_obs.csv", index_col=0)
    pred_X = np.load(folder / "pred.npy")
    data = np.load(folder / "truth_data.npy")
    indices = np.load(folder / "truth_indices.npy")
    indptr = np.load(folder / "truth_indptr.npy")
    X = sp.csr_matrix((data, indices, indptr), shape=(len(truth_obs), pred_X.shape[1]))
    var = pd.read_csv(folder / "genes.csv", index_col=0)
    return ad.AnnData(X=X, obs=truth_obs, var=var), ad.AnnData(X=pred_X, obs=pred_obs, var=var)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak resident memory since the last :func:`_reset_peak` (MiB)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark, so loading the inputs does not count (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# (a) the straightforward per-group loop
# ---------------------------------------------------------------------------------------
def loop_metrics(
    truth, pred, *, top_k: int = 100, fdr: float = 0.05, max_groups: int | None = None
):
    """Default metrics, one group at a time, written the obvious way."""
    import pandas as pd
    from scipy import stats
    from scipy.spatial.distance import cdist
    from statsmodels.stats.multitest import multipletests

    def dense(M):
        return M.toarray() if hasattr(M, "toarray") else np.asarray(M)

    aggs = ("average", "delta", "logfc", "var")
    t_obs, p_obs = truth.obs, pred.obs
    results = []
    profiles = {}
    groups = (
        t_obs.loc[t_obs["condition"] != "control", ["cell_type", "condition"]]
        .drop_duplicates()
        .sort_values(["cell_type", "condition"])
        .itertuples(index=False)
    )
    groups = list(groups)[:max_groups] if max_groups else list(groups)
    controls = {}
    for cov, pert in groups:
        if cov not in controls:
            mask = ((t_obs["cell_type"] == cov) & (t_obs["condition"] == "control")).to_numpy()
            controls[cov] = dense(truth.X[mask]).astype(np.float64)
        ctrl = controls[cov]
        ctrl_mean = ctrl.mean(axis=0)
        t = dense(truth.X[((t_obs["cell_type"] == cov) & (t_obs["condition"] == pert)).to_numpy()])
        p = dense(pred.X[((p_obs["cell_type"] == cov) & (p_obs["condition"] == pert)).to_numpy()])
        t, p = t.astype(np.float64), p.astype(np.float64)
        row = {"cell_type": cov, "condition": pert}
        prof = {}
        for side, cells in (("t", t), ("p", p)):
            m = cells.mean(axis=0)
            prof[side] = {
                "average": m,
                "delta": m - ctrl_mean,
                "logfc": np.log2(np.maximum(m, 0) + 0.1) - np.log2(ctrl_mean + 0.1),
                "var": cells.var(axis=0),
            }
        for agg in aggs:
            a, b = prof["p"][agg], prof["t"][agg]
            row[f"rmse_{agg}"] = np.sqrt(np.mean((a - b) ** 2))
            row[f"mse_{agg}"] = np.mean((a - b) ** 2)
            row[f"mae_{agg}"] = np.mean(np.abs(a - b))
            row[f"cosine_{agg}"] = 1 - cdist(a[None], b[None], "cosine")[0, 0]
            row[f"pearson_{agg}"] = stats.pearsonr(a, b)[0]
            row[f"spearman_{agg}"] = stats.spearmanr(a, b)[0]
            row[f"r2_{agg}"] = 1 - np.sum((b - a) ** 2) / np.sum((b - b.mean()) ** 2)
        # DE: Mann-Whitney U (tie-corrected normal approximation) per gene, BH
        zs = {}
        for side, cells in (("t", t), ("p", p)):
            res = stats.mannwhitneyu(cells, ctrl, axis=0, method="asymptotic", use_continuity=False)
            n1, n2 = cells.shape[0], ctrl.shape[0]
            pvals = np.nan_to_num(res.pvalue, nan=1.0)
            z = np.sign(res.statistic - n1 * n2 / 2) * stats.norm.isf(pvals / 2)
            zs[side] = (z, multipletests(pvals, method="fdr_bh")[1])
        tz, tq = zs["t"]
        pz, _ = zs["p"]
        top = lambda s: set(np.argsort(-s)[:top_k])  # noqa: E731
        a_up, b_up = top(tz), top(pz)
        row[f"jaccard_top{top_k}"] = len(a_up & b_up) / len(a_up | b_up)
        a_abs, b_abs = top(np.abs(tz)), top(np.abs(pz))
        row[f"jaccard_abs_top{top_k}"] = len(a_abs & b_abs) / len(a_abs | b_abs)
        sig = np.flatnonzero(tq < fdr)
        if sig.size:
            k = min(top_k, sig.size)
            a_sig = set(sig[np.argsort(-np.abs(tz[sig]))][:k])
            row[f"overlap_top{top_k}"] = len(a_sig & set(np.argsort(-np.abs(pz))[:k])) / k
            row["direction_agreement"] = np.mean(
                np.sign(prof["t"]["delta"][sig]) == np.sign(prof["p"]["delta"][sig])
            )
        results.append(row)
        profiles[(cov, pert)] = prof
    table = pd.DataFrame(results)
    # rank metrics: per covariate, an N x N distance matrix per metric and aggregation
    metric_of = {
        "rmse": "euclidean",
        "mse": "sqeuclidean",
        "mae": "cityblock",
        "cosine": "cosine",
        "pearson": "correlation",
    }
    for cov in table["cell_type"].unique():
        rows = np.flatnonzero((table["cell_type"] == cov).to_numpy())
        keys = [(cov, p) for p in table["condition"].to_numpy()[rows]]
        n = len(keys)
        for agg in aggs:
            P = np.array([profiles[k]["p"][agg] for k in keys])
            T = np.array([profiles[k]["t"][agg] for k in keys])
            mats = {m: cdist(P, T, d) for m, d in metric_of.items()}
            rp, rt = stats.rankdata(P, axis=1), stats.rankdata(T, axis=1)
            mats["spearman"] = cdist(rp, rt, "correlation")
            sst = ((T - T.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
            mats["r2"] = cdist(P, T, "sqeuclidean") / sst[None, :]
            for m, D in mats.items():
                diag = np.diag(D)
                ranks = [
                    (
                        np.sum(np.delete(D[:, j], j) < diag[j])
                        + 0.5 * np.sum(np.delete(D[:, j], j) == diag[j])
                    )
                    / n
                    for j in range(n)
                ]
                table.loc[rows, f"{m}_rank_{agg}"] = ranks
        S = lambda M: 1 - cdist(M, M, "cosine")  # noqa: E731
        P = np.array([profiles[k]["p"]["logfc"] for k in keys])
        T = np.array([profiles[k]["t"]["logfc"] for k in keys])
        table.loc[rows, "matrix_distance"] = np.linalg.norm(S(P) - S(T))
    return table


# ---------------------------------------------------------------------------------------
# (b) cell-eval in its own environment
# ---------------------------------------------------------------------------------------
def ensure_cell_eval() -> Path | None:
    """Create/reuse .venv-bench with cell-eval; returns its python, or None if impossible."""
    python = BENCH_VENV / "bin" / "python"
    check = [str(python), "-c", "import cell_eval"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {CELL_EVAL_SPEC} into {BENCH_VENV} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", CELL_EVAL_SPEC],
            check=True,
            timeout=1800,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"cell-eval could not be installed ({exc}); skipping the comparison with it")
        return None
    if subprocess.run(check, capture_output=True).returncode != 0:
        print("cell-eval installed but cannot be imported; skipping the comparison with it")
        return None
    return python


#: cell-eval metrics that pertbench also computes (pertbench name in brackets):
#: pearson_delta [pearson_delta], mse/mae [mse_average/mae_average], mse_delta/mae_delta
#: [mse_delta/mae_delta], discrimination_score_l1/l2/cosine [mae/rmse/cosine rank
#: metrics], overlap_at_100 [overlap_top100], de_direction_match [direction_agreement].
CELL_EVAL_COMMON = (
    "pearson_delta",
    "mse",
    "mae",
    "mse_delta",
    "mae_delta",
    "discrimination_score_l1",
    "discrimination_score_l2",
    "discrimination_score_cosine",
    "overlap_at_100",
    "de_direction_match",
)
PERTBENCH_COMMON = (
    "pearson_delta,mse_average,mae_average,mse_delta,mae_delta,mae_rank_average,"
    "rmse_rank_average,cosine_rank_average,overlap_top100,direction_agreement"
)

CELL_EVAL_WORKER = r"""
import json, logging, os, resource, sys, time
import numpy as np
folder, common = sys.argv[1], sys.argv[2].split(",")
logging.disable(logging.CRITICAL)
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
import anndata as ad, pandas as pd, scipy.sparse as sp
from cell_eval import MetricsEvaluator
from cell_eval.metrics import metrics_registry
skip = [m for m in metrics_registry.list_metrics() if m not in common]
before = rss()
truth_obs = pd.read_csv(f"{folder}/truth_obs.csv", index_col=0)
pred_obs = pd.read_csv(f"{folder}/pred_obs.csv", index_col=0)
pred_X = np.load(f"{folder}/pred.npy")
X = sp.csr_matrix((np.load(f"{folder}/truth_data.npy"), np.load(f"{folder}/truth_indices.npy"),
                   np.load(f"{folder}/truth_indptr.npy")), shape=(len(truth_obs), pred_X.shape[1]))
var = pd.read_csv(f"{folder}/genes.csv", index_col=0)
seconds = 0.0
n_rows = 0
for cov in sorted(truth_obs["cell_type"].unique()):
    # cell-eval scores one context (covariate) at a time; the prediction carries the
    # observed controls so that both sides are tested against the same control cells
    t_mask = (truth_obs["cell_type"] == cov).to_numpy()
    p_mask = (pred_obs["cell_type"] == cov).to_numpy()
    c_mask = t_mask & (truth_obs["condition"] == "control").to_numpy()
    real = ad.AnnData(X=X[t_mask], obs=truth_obs[t_mask].copy(), var=var)
    pred = ad.AnnData(
        X=np.vstack([pred_X[p_mask], X[c_mask].toarray()]),
        obs=pd.concat([pred_obs[p_mask], truth_obs[c_mask]]),
        var=var,
    )
    start = time.perf_counter()
    ev = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert="control",
                          pert_col="condition", outdir=f"{folder}/cell_eval_{cov}")
    results, _ = ev.compute(profile="full", skip_metrics=skip, write_csv=False)
    seconds += time.perf_counter() - start
    n_rows += results.height
print(json.dumps({"seconds": seconds, "n_groups": n_rows, "rss_before": before,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# ---------------------------------------------------------------------------------------
# Workers (run in fresh processes)
# ---------------------------------------------------------------------------------------
def worker(kind: str, folder: Path, loop_groups: int | None, n_jobs: int | None = None) -> dict:
    import pandas as pd  # noqa: F401  (import before measuring the baseline)

    from pertbench.metrics import Evaluator

    before = _rss_mb()
    truth, pred = load_inputs(folder)
    loaded = _rss_mb()
    peak_loading = _peak_mb()
    reset = _reset_peak()
    start = time.perf_counter()
    if kind.startswith("pertbench"):
        metrics = PERTBENCH_COMMON if kind == "pertbench-common" else "default"
        result = Evaluator(truth, pred, metrics=metrics, n_jobs=n_jobs).run()
        n_groups = result.settings["n_groups"]
    else:
        table = loop_metrics(truth, pred, max_groups=loop_groups)
        n_groups = len(table)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "n_groups": n_groups,
        "rss_before": before,
        "rss_loaded": loaded,
        "peak_loading": peak_loading,
        "peak_reset": reset,
        "peak": _peak_mb(),
    }


def run_worker(kind: str, folder: Path, loop_groups: int | None, n_jobs: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--data", str(folder)]
    if loop_groups:
        cmd += ["--loop-groups", str(loop_groups)]
    if n_jobs:
        cmd += ["--n-jobs", str(n_jobs)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--covariates", type=int, default=3)
    parser.add_argument("--perturbations", type=int, default=500)
    parser.add_argument("--cells", type=int, default=100)
    parser.add_argument("--controls", type=int, default=500)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--loop-groups",
        type=int,
        default=None,
        help="time the loop on the first N groups only and extrapolate linearly",
    )
    parser.add_argument(
        "--n-jobs",
        type=int,
        default=None,
        help="threads for pertbench's DE tests (default: its own, the CPUs available)",
    )
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-cell-eval", action="store_true")
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.loop_groups, args.n_jobs)))
        return 0

    with tempfile.TemporaryDirectory(prefix="pertbench-bench-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        truth, pred = simulate(
            n_covariates=args.covariates,
            n_perturbations=args.perturbations,
            n_cells=args.cells,
            n_controls=args.controls,
            n_genes=args.genes,
            seed=args.seed,
        )
        input_bytes = save_inputs(truth, pred, folder)
        n_groups = args.covariates * args.perturbations
        print(
            f"data: truth {truth.n_obs} cells (sparse, {truth.X.nnz / np.prod(truth.shape):.0%} "
            f"non-zero), pred {pred.n_obs} cells (dense), {args.genes} genes, {n_groups} groups; "
            f"input matrices {input_bytes / 2**30:.2f} GiB; simulated in {time.perf_counter() - start:.0f} s",
            flush=True,
        )
        del truth, pred

        ours = run_worker("pertbench", folder, None, args.n_jobs)
        peak_ratio = (ours["peak"] - ours["rss_before"]) * 2**20 / input_bytes
        scope = (
            "during the evaluation, inputs included"
            if ours["peak_reset"]
            else "including loading the inputs (peak could not be reset)"
        )
        print(
            f"pertbench: {ours['seconds']:.1f} s for {ours['n_groups']} groups; peak memory "
            f"{(ours['peak'] - ours['rss_before']) / 1024:.2f} GiB = {peak_ratio:.2f}x the input "
            f"matrices ({scope})",
            flush=True,
        )
        if not args.skip_loop:
            loop = run_worker("loop", folder, args.loop_groups)
            loop_seconds = loop["seconds"] * n_groups / loop["n_groups"]
            note = (
                f" (measured on {loop['n_groups']} groups, scaled to {n_groups})"
                if loop["n_groups"] < n_groups
                else ""
            )
            print(
                f"per-group loop: {loop_seconds:.1f} s{note}; pertbench is "
                f"{loop_seconds / ours['seconds']:.1f}x faster",
                flush=True,
            )
        if not args.skip_cell_eval:
            python = ensure_cell_eval()
            if python is not None:
                out = subprocess.run(
                    [str(python), "-c", CELL_EVAL_WORKER, str(folder), ",".join(CELL_EVAL_COMMON)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    print(f"cell-eval failed; skipping it:\n{out.stderr[-2000:]}")
                else:
                    ce = json.loads(out.stdout.strip().splitlines()[-1])
                    common = run_worker("pertbench-common", folder, None, args.n_jobs)
                    print(
                        f"cell-eval ({len(CELL_EVAL_COMMON)} metrics pertbench also computes, "
                        f"{ce['n_groups']} groups): {ce['seconds']:.1f} s; pertbench on the same "
                        f"metrics: {common['seconds']:.1f} s ({ce['seconds'] / common['seconds']:.1f}x "
                        f"faster); pertbench's whole default set: {ours['seconds']:.1f} s "
                        f"({ce['seconds'] / ours['seconds']:.1f}x faster)",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
