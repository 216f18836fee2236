"""Report sections drawn from saved predictions, with :mod:`pertbench.pl`: per-model
scatter plots of one held-out group and logfc similarity (collapse) heatmaps.

They use the first seed of the full scenario of each (dataset, task); cells whose
predictions were not saved (``save_predictions: none``) are skipped with a note.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.benchmark import paths
from pertbench.benchmark.config import FULL_SCENARIO

#: At most this many heatmap figures per (dataset, task), trained models first.
MAX_HEATMAPS = 12


def _read(path: str | Path) -> Any:
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # old AnnData layouts
        return ad.read_h5ad(path)


def strongest_group(truth: Any, split: pd.Series, keys: Any, *, on: str) -> tuple[dict, Any, Any]:
    """The held-out group whose observed mean moves furthest from its controls.

    Returns ``(labels, group cells, control cells)`` where ``labels`` maps the covariate
    and perturbation columns to the group's values.
    """
    from pertbench.data.groups import group_cells, group_mean

    mask = (split == on).to_numpy()
    held = truth[mask & (truth.obs[keys.perturbation_key].astype(str) != keys.control).to_numpy()]
    grouping = group_cells(held.obs, keys)
    means = group_mean(held.X, grouping.group_codes, grouping.n_groups)
    all_groups = group_cells(truth.obs, keys)
    control_means = group_mean(
        truth.X,
        np.where(all_groups.is_control, all_groups.covariate_codes, -1),
        len(all_groups.covariates),
    )
    cov_lookup = (
        pd.MultiIndex.from_frame(all_groups.covariates[list(keys.covariate_keys)])
        if keys.covariate_keys
        else None
    )
    distances = []
    for i, row in grouping.groups.iterrows():  # loops over groups, not cells
        if cov_lookup is not None:
            code = cov_lookup.get_loc(tuple(str(row[k]) for k in keys.covariate_keys))
        else:
            code = 0
        distances.append(float(np.linalg.norm(means[i] - control_means[code])))
    best = int(np.argmax(distances))
    labels = {
        k: str(grouping.groups.iloc[best][k]) for k in (*keys.covariate_keys, keys.perturbation_key)
    }
    in_group = np.ones(truth.n_obs, dtype=bool)
    for k, v in labels.items():
        in_group &= (truth.obs[k].astype(str) == v).to_numpy()
    controls = all_groups.is_control.copy()
    for k in keys.covariate_keys:
        controls &= (truth.obs[k].astype(str) == labels[k]).to_numpy()
    return labels, truth[in_group & mask], truth[controls]


def prediction_figures(
    page: Any, results: pd.DataFrame, manifest: dict, config: dict, models: list[str]
) -> None:
    """Add the scatter and heatmap sections to the report ``page``."""
    from matplotlib.figure import Figure

    from pertbench import pl
    from pertbench.data.keys import PerturbationKeys
    from pertbench.data.splits import read_split

    ok = results[
        (results["status"] == "ok")
        & (results["scenario"] == FULL_SCENARIO)
        & (results["model"] != "ceiling")
    ]
    if ok.empty or not manifest.get("datasets"):
        return
    on = (config.get("evaluation") or {}).get("split", "test")
    blocks = list(ok.groupby(["dataset", "task"], sort=False))
    scatter_parts: list[tuple[str, Any]] = []
    heatmap_parts: list[tuple[str, Any]] = []
    for (dataset, task), block in blocks:
        entry = manifest["datasets"].get(dataset)
        split_entry = manifest.get("splits", {}).get(f"{dataset}|{task}|{FULL_SCENARIO}")
        if entry is None or split_entry is None:
            continue
        keys = PerturbationKeys.from_dict(entry.get("keys") or config.get("keys") or {})
        truth = _read(entry["path"])
        split = read_split(split_entry["path"], truth.obs_names)
        seed = int(block["seed"].min())
        present = [m for m in models if m in set(block["model"])]
        predictions = {}
        for model in present:
            file = (
                paths.cell_dir(page.out, dataset, task, FULL_SCENARIO, model, seed)
                / paths.PREDICTIONS_FILE
            )
            if file.is_file():
                predictions[model] = _read(file)
        if not predictions:
            page.notes.append(f"{dataset} / {task}: no saved predictions to draw")
            continue
        scatter_parts.append(((dataset, task, seed), (truth, split, keys, predictions)))
        heatmap_parts.append(((dataset, task, seed), (truth, split, keys, predictions)))

    if scatter_parts:
        page.section("scatter", "Predicted vs observed expression")
        page.add(
            '<p class="note">One held-out group per dataset and task (the one whose observed mean moves '
            "furthest from its controls), first seed; grey: all genes, red: the group's top 100 DE genes "
            "(Wilcoxon against its controls).</p>"
        )
    for (dataset, task, seed), (truth, split, keys, predictions) in scatter_parts:

        def draw(
            truth=truth, split=split, keys=keys, predictions=predictions, dataset=dataset, task=task
        ):
            labels, group, controls = strongest_group(truth, split, keys, on=on)
            n = len(predictions)
            ncols = min(4, n)
            nrows = math.ceil(n / ncols)
            fig = Figure(figsize=(3.3 * ncols, 3.3 * nrows), layout="constrained")
            axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
            for ax, (model, pred) in zip(axes, predictions.items(), strict=False):
                mask = np.ones(pred.n_obs, dtype=bool)
                for k, v in labels.items():
                    mask &= (pred.obs[k].astype(str) == v).to_numpy()
                pl.mean_scatter(
                    group, pred[mask], controls=controls, ax=ax, title=model, n_labels=5
                )
            for ax in axes[n:]:
                ax.set_visible(False)
            fig.suptitle(f"{dataset} / {task}: {' / '.join(labels.values())}", fontsize=10)
            return fig

        page.try_figure(
            draw,
            f"scatter_{dataset}_{task}",
            f"Predicted vs observed mean expression, {dataset} / {task} (seed {seed})",
        )

    if heatmap_parts:
        page.section("collapse", "Similarity heatmaps (collapse check)")
        page.add(
            '<p class="note">Cosine similarity between the logfc profiles of the held-out perturbations '
            "(one covariate), predicted (left) and observed (right). A model that predicts one profile "
            "for every perturbation shows a uniform left matrix.</p>"
        )
    for (dataset, task, seed), (truth, split, keys, predictions) in heatmap_parts:
        covariate = _covariate_with_most_groups(truth, split, keys, on=on)
        trained_first = sorted(
            predictions, key=lambda m: m in ("no_change", "perturbation_mean", "covariate_mean")
        )
        for model in trained_first[:MAX_HEATMAPS]:

            def draw(
                model=model,
                truth=truth,
                split=split,
                keys=keys,
                predictions=predictions,
                covariate=covariate,
            ):
                from pertbench.metrics import Evaluator

                result = Evaluator(
                    truth,
                    predictions[model],
                    keys=keys,
                    metrics=["cosine_logfc"],
                    split=split,
                    on=on,
                    n_bootstrap=0,
                    keep_aggregates=True,
                    model_name=model,
                ).run()
                fig = pl.similarity_heatmaps(result, covariate=covariate, figsize=(8.0, 3.8))
                fig.suptitle(f"{model}: {fig.get_suptitle()}", fontsize=10)
                return fig

            page.try_figure(
                draw,
                f"similarity_{dataset}_{task}_{model}",
                f"logfc similarity, {dataset} / {task}, covariate {covariate}, model {model} (seed {seed})",
            )


def _covariate_with_most_groups(truth: Any, split: pd.Series, keys: Any, *, on: str) -> str | None:
    """Label of the covariate combination with the most held-out perturbations."""
    from pertbench.data.groups import group_cells

    mask = (split == on).to_numpy() & (
        truth.obs[keys.perturbation_key].astype(str) != keys.control
    ).to_numpy()
    if not mask.any():
        return None
    grouping = group_cells(truth.obs[mask], keys)
    counts = grouping.groups.groupby("covariate_code").size()
    return str(grouping.covariates["label"].iloc[int(counts.idxmax())])
