"""pertbench's cell-eval / VCC metrics next to the cell-eval package on the shared data.

For the Kang and the Norman subset, one deterministic imperfect prediction (the one the
parity tests use: each predicted cell mixes an observed cell with a control cell; on
Norman three perturbations per cell line are predicted from another perturbation's
cells, dense float64) and cell-eval's mean baseline are scored by
:func:`pertbench.metrics.vcc_eval.vcc_metrics` and by cell-eval 0.8.2 (one
``MetricsEvaluator`` per cell type, prediction files holding the truth's controls).

Prints, per dataset and metric: the mean over cell types of the block means of both
tools, and the largest |difference| over all (cell type, perturbation) values outside
ties at a top-k cut; the VCC score (``avg_score`` against the mean baseline) per cell
type and its mean (the difference: the largest over cell types); the top-k cuts that fall
inside a tie of DE genes (where cell-eval's value depends on polars' thread count); and
the wall time of both tools, measured in this run, as a ratio.

Usage::

    python benchmarks/vcc_parity.py [--data-dir ../shared/data] [--markdown]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the helpers shared with the parity tests

HEADLINE = ["overlap_at_N", "precision_at_N", "discrimination_score_l1", "mae"]


def score_dataset(name: str, path: Path, *, swap: int, dense: bool, dtype, outdir: Path):
    import anndata as ad
    import cell_eval

    from pertbench.data.keys import PerturbationKeys
    from pertbench.metrics import vcc
    from pertbench.metrics.vcc_eval import VCCResult, vcc_metrics
    from vcc_helpers import (
        cell_eval_blocks,
        cell_eval_means,
        compare,
        mixed_prediction,
        run_cell_eval,
    )

    keys = PerturbationKeys(covariate_keys=("cell_type",))
    truth = ad.read_h5ad(path)
    pred = mixed_prediction(truth, keys, seed=0, swap=swap, dense=dense, dtype=dtype)
    labels = sorted(truth.obs["cell_type"].astype(str).unique())

    start = time.perf_counter()
    base_files = {}
    for label in labels:
        real = truth[truth.obs["cell_type"].astype(str) == label].copy()
        base = cell_eval.build_base_mean_adata(real, pert_col="condition", control_pert="control")
        base.obs["cell_type"] = label
        base_files[label] = base
    user = cell_eval_blocks(truth, pred, keys, outdir)
    base = {
        label: run_cell_eval(
            truth[truth.obs["cell_type"].astype(str) == label].copy(),
            base_files[label],
            keys,
            outdir,
            de_real=user[label][2],
        )
        for label in labels
    }
    cell_eval_seconds = time.perf_counter() - start

    baseline = ad.concat([b[b.obs["condition"] != "control"] for b in base_files.values()])
    start = time.perf_counter()
    result = vcc_metrics(truth, pred, keys=keys, baseline=baseline)
    pertbench_seconds = time.perf_counter() - start

    worst, tied = compare(result, user, keys)
    base_result = VCCResult(
        per_group=result.baseline_per_group,
        per_covariate=result.baseline_per_covariate,
        ties=result.baseline_ties,
    )
    base_worst, base_tied = compare(base_result, base, keys)
    rows = []
    per_cov = result.per_covariate.set_index("label")
    for metric in worst:
        theirs = cell_eval_means(user, metric)
        rows.append(
            (
                metric,
                float(np.nanmean(per_cov[metric].to_numpy(dtype=float))),
                float(np.nanmean(list(theirs.values()))),
                worst[metric],
            )
        )
    scores = []
    vcc_columns = ["statistic", *vcc.VCC_PROFILE]
    for label in labels:
        theirs = cell_eval.score_agg_metrics(
            user[label][1].select(vcc_columns), base[label][1].select(vcc_columns)
        ).to_pandas()
        theirs = theirs.set_index("metric")["from_baseline"]["avg_score"]
        mine = float(result.scores.set_index("label").loc[label, "avg_score"])
        scores.append((label, mine, float(theirs)))
    return {
        "name": name,
        "rows": rows,
        "baseline_worst": base_worst,
        "tied": tied,
        "base_tied": base_tied,
        "scores": scores,
        "seconds": (pertbench_seconds, cell_eval_seconds),
        "n_groups": len(result.per_group),
    }


def report(res: dict, markdown: bool) -> None:
    name = res["name"]
    print(f"\n## {name} ({res['n_groups']} perturbation x cell-type groups)\n")
    head = "| metric | pertbench | cell-eval | max abs difference |"
    print(head if markdown else f"{'metric':40s} pertbench   cell-eval   max|diff|")
    if markdown:
        print("|---|---|---|---|")
    scores = np.array([(mine, theirs) for _, mine, theirs in res["scores"]])
    score_row = (
        "avg_score (VCC score, vs mean baseline)",
        float(scores[:, 0].mean()),
        float(scores[:, 1].mean()),
        float(np.abs(scores[:, 0] - scores[:, 1]).max()),
    )
    for metric, mine, theirs, diff in [*res["rows"], score_row]:
        if markdown:
            print(f"| {metric} | {mine:.6f} | {theirs:.6f} | {diff:.2g} |")
        else:
            print(f"{metric:40s} {mine:9.6f} {theirs:11.6f} {diff:11.2g}")
    print()
    for label, mine, theirs in res["scores"]:
        print(
            f"VCC score {label}: pertbench {mine:.6f}  cell-eval {theirs:.6f}  "
            f"|diff| {abs(mine - theirs):.2g}"
        )
    base = max(res["baseline_worst"].values())
    print(f"mean baseline, all metrics: max |diff| {base:.2g} outside ties at a cut")
    for what, tied in (("prediction", res["tied"]), ("mean baseline", res["base_tied"])):
        if not tied:
            print(f"{what}: no top-k cut inside a tie of DE genes")
            continue
        moved = [t for t in tied if t[2] > 1e-6]
        print(
            f"{what}: {len(tied)} (group, metric) values with a top-k cut inside a tie of "
            f"DE genes; {len(moved)} differ from cell-eval, by at most "
            f"{max(t[2] for t in tied):.4g}"
        )
        for group, metric, diff, bound in moved:
            if metric in ("overlap_at_N", "precision_at_N"):
                print(f"  {group} {metric}: |diff| {diff:.4g} (a tie can move it by {bound:.4g})")
    mine_s, theirs_s = res["seconds"]
    print(
        f"time: pertbench {mine_s:.1f} s, cell-eval {theirs_s:.1f} s "
        f"(ratio cell-eval / pertbench {theirs_s / mine_s:.1f}; cell-eval includes its "
        "numba compilation and the baseline files)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    kang = args.data_dir / "kang2018_pbmc_ifnb_subset.h5ad"
    norman = args.data_dir / "norman19_mcfaline23_subset.h5ad"
    for path in (kang, norman):
        if not path.is_file():
            print(f"{path} not found; pass --data-dir", file=sys.stderr)
            return 2
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, kwargs in (
            ("Kang", kang, {"swap": 0, "dense": False, "dtype": None}),
            ("Norman", norman, {"swap": 3, "dense": True, "dtype": np.float64}),
        ):
            report(score_dataset(name, path, outdir=Path(tmp), **kwargs), args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
