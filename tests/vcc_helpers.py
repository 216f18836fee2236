"""Running the cell-eval package next to pertbench's VCC metrics on the same inputs.

Shared by tests/metrics/test_vcc_parity.py and benchmarks/vcc_parity.py.

- :func:`mixed_prediction`: a deterministic, imperfect prediction built from observed
  cells (each predicted cell mixes an observed cell of the group, or of another group
  for "swapped" perturbations, with a control cell), so DE calls, fold changes and
  discrimination ranks are all non-trivial.
- :func:`prediction_file`: what cell-eval reads as a prediction: the predicted cells and
  the truth's control cells, in the prediction's storage and the common dtype.
- :func:`cell_eval_blocks`: cell-eval's per-perturbation results for every covariate
  block (one ``MetricsEvaluator`` per block, like ``cell-eval run --celltype-col``).
- :func:`compare`: |pertbench - cell-eval| of every metric, with the bound that applies
  where DE genes tie at a top-k cut.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.metrics.vcc_eval import VCCResult, metric_names

CELL_EVAL_VERSION = "0.8.2"
#: cell-eval metrics pertbench does not reproduce (not part of the VCC; see docs/metrics.md).
NOT_REPRODUCED = ["pearson_edistance", "clustering_agreement", "pr_auc", "roc_auc"]


def covariate_labels(obs: pd.DataFrame, keys: PerturbationKeys) -> np.ndarray:
    cov = list(keys.covariate_keys)
    if not cov:
        return np.full(len(obs), "all", dtype=object)
    return obs[cov].astype(str).agg("/".join, axis=1).to_numpy()


def mixed_prediction(
    truth: ad.AnnData,
    keys: PerturbationKeys,
    *,
    seed: int = 0,
    own: float = 0.6,
    swap: int = 0,
    dense: bool = False,
    dtype=None,
) -> ad.AnnData:
    """Predicted cells ``own * x_source + (1 - own) * x_control`` for every perturbed group.

    ``x_source`` is an observed cell of the group itself, except for the first ``swap``
    perturbations of each block, whose cells come from the next perturbation of the
    block (a wrong prediction the discrimination score must notice).
    """
    rng = np.random.default_rng(seed)
    X = sp.csr_matrix(truth.X)
    pert = truth.obs[keys.perturbation_key].astype(str).to_numpy()
    block = covariate_labels(truth.obs, keys)
    sources, controls, template = [], [], []
    for label in np.unique(block):
        in_block = block == label
        ctrl = np.flatnonzero(in_block & (pert == keys.control))
        perts = sorted(set(pert[in_block]) - {keys.control})
        for i, p in enumerate(perts):
            rows = np.flatnonzero(in_block & (pert == p))
            if i < swap:  # cells of the next perturbation, drawn with replacement
                other = np.flatnonzero(in_block & (pert == perts[(i + 1) % len(perts)]))
                sources.append(rng.choice(other, rows.size))
            else:
                sources.append(rng.permutation(rows))
            controls.append(rng.choice(ctrl, rows.size))
            template.append(rows)
    src, ctl, rows = (np.concatenate(v) for v in (sources, controls, template))
    P = sp.csr_matrix(own * X[src] + (1.0 - own) * X[ctl])
    P = P.astype(dtype or X.dtype)
    obs = truth.obs.iloc[rows][[keys.perturbation_key, *keys.covariate_keys]].copy()
    obs.index = [f"pred{i}" for i in range(len(obs))]
    var = pd.DataFrame(index=truth.var_names)
    return ad.AnnData(X=P.toarray() if dense else P, obs=obs, var=var)


def prediction_file(pred: ad.AnnData, controls: ad.AnnData, keys: PerturbationKeys) -> ad.AnnData:
    """The predicted cells followed by ``controls``, in ``pred``'s storage, common dtype."""
    dtype = np.result_type(pred.X.dtype, controls.X.dtype)
    if sp.issparse(pred.X):
        X = sp.vstack([sp.csr_matrix(pred.X), sp.csr_matrix(controls.X)]).tocsr()
    else:
        C = controls.X.toarray() if sp.issparse(controls.X) else np.asarray(controls.X)
        X = np.vstack([np.asarray(pred.X), C])
    col = keys.perturbation_key
    obs = pd.concat([pred.obs[[col]].astype(str), controls.obs[[col]].astype(str)])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(X=X.astype(dtype), obs=obs, var=pd.DataFrame(index=pred.var_names))


def run_cell_eval(
    real: ad.AnnData,
    pred_file: ad.AnnData,
    keys: PerturbationKeys,
    outdir: Path,
    *,
    profile: str = "full",
    de_real=None,
):
    """cell-eval's per-perturbation results (pandas, indexed by perturbation), its
    aggregate table (polars) and the real DE it computed (for reuse)."""
    from cell_eval import MetricsEvaluator

    logging.getLogger("cell_eval").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = MetricsEvaluator(
            adata_pred=pred_file.copy(),
            adata_real=real.copy(),
            de_real=de_real,
            control_pert=keys.control,
            pert_col=keys.perturbation_key,
            num_threads=1,
            outdir=str(outdir),
        )
        skip = NOT_REPRODUCED if profile == "full" else None
        results, agg = evaluator.compute(
            profile=profile, skip_metrics=skip, write_csv=False, break_on_error=True
        )
    per_pert = results.to_pandas().set_index("perturbation")
    return per_pert, agg, evaluator.de_comparison.real.data


def cell_eval_blocks(
    truth: ad.AnnData,
    pred: ad.AnnData,
    keys: PerturbationKeys,
    outdir: Path,
    *,
    controls_of=None,
    profile: str = "full",
    de_real: dict | None = None,
):
    """cell-eval's results for every covariate block of ``pred``.

    ``controls_of(label, truth_controls)`` may replace the controls written into the
    prediction file (default: the truth's). Returns ``{label: (per_pert, agg, de_real)}``.
    """
    t_block = covariate_labels(truth.obs, keys)
    p_block = covariate_labels(pred.obs, keys)
    out = {}
    for label in pd.unique(p_block):
        real = truth[t_block == label].copy()
        ctrl = real[real.obs[keys.perturbation_key].astype(str) == keys.control].copy()
        if controls_of is not None:
            ctrl = controls_of(label, ctrl)
        block_pred = pred[p_block == label].copy()
        perts = set(block_pred.obs[keys.perturbation_key].astype(str))
        keep = real.obs[keys.perturbation_key].astype(str).isin(perts | {keys.control})
        real = real[keep.to_numpy()].copy()
        file = prediction_file(block_pred, ctrl, keys)
        reuse = None if de_real is None else de_real[label]
        out[label] = run_cell_eval(real, file, keys, outdir, profile=profile, de_real=reuse)
    return out


def tie_bounds(ties: pd.DataFrame | None, keys: PerturbationKeys) -> dict[tuple, float]:
    """(block label, perturbation, metric) -> the most a tie at a cut can move the value
    (summed over truth and prediction; see VCCResult.ties)."""
    if ties is None or ties.empty:
        return {}
    labels = covariate_labels(ties, keys)
    # another choice among the tied genes can swap at most this many chosen genes
    bound = np.minimum(ties["places"], ties["tied_genes"] - ties["places"]) / ties["k"]
    frame = pd.DataFrame(
        {"label": labels, "pert": ties[keys.perturbation_key], "metric": ties["metric"]}
    )
    return bound.groupby([frame["label"], frame["pert"], frame["metric"]]).sum().to_dict()


def compare(result: VCCResult, cell_eval: dict, keys: PerturbationKeys, *, metrics=None):
    """|pertbench - cell-eval| of every metric and group (cell-eval's missing values count
    as NaN; NaN on one side only counts as inf).

    Returns the largest difference per metric over the groups without a tie at a cut,
    and for the others (group, metric, difference, bound) with the bound of
    :func:`tie_bounds`. ``metrics``: those to compare (default: all of pertbench's).
    """
    bounds = tie_bounds(result.ties, keys)
    per_group = result.per_group
    block = covariate_labels(per_group, keys)
    worst = dict.fromkeys(metric_names() if metrics is None else metrics, 0.0)
    tied = []
    for label, (ce, _, _) in cell_eval.items():
        mine = per_group[block == label].set_index(keys.perturbation_key)
        ce = ce.reindex(mine.index)
        for m in worst:
            a = mine[m].to_numpy(dtype=float)
            b = ce[m].to_numpy(dtype=float) if m in ce else np.full(a.size, np.nan)
            diff = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
            diff = np.nan_to_num(diff, nan=np.inf)
            for i, pert in enumerate(mine.index):
                bound = bounds.get((label, pert, m))
                if bound is None:
                    worst[m] = max(worst[m], float(diff[i]))
                else:
                    tied.append((f"{label}:{pert}", m, float(diff[i]), bound))
    return worst, tied


def cell_eval_means(cell_eval: dict, metric: str) -> dict[str, float]:
    """cell-eval's aggregate mean of ``metric`` per block (its agg_results 'mean' row)."""
    out = {}
    for label, (_, agg, _) in cell_eval.items():
        row = agg.filter(agg["statistic"] == "mean")
        out[label] = float(row[metric][0]) if metric in row.columns else float("nan")
    return out
