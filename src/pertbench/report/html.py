"""The benchmark report: one self-contained HTML file (figures embedded as base64 PNG).

``write_report(DIR)`` reads what a benchmark run left in ``DIR`` (results table, manifest,
config, cells, tuning folders) and writes ``DIR/report.html``, every figure as
``DIR/figures/*.png`` and the aggregated summary as ``DIR/summary.csv``. Sections appear
only when the run has their data (scenario curves need scenarios, tuning needs tuning).
Every user-supplied name (datasets, tasks, models, perturbations, errors) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pertbench.benchmark import paths
from pertbench.benchmark.config import FULL_SCENARIO
from pertbench.benchmark.materialize import read_manifest
from pertbench.report.calibration import BEATS_MARK
from pertbench.utils.io import write_bytes_atomic, write_csv_atomic, write_text_atomic

SUMMARY_TABLE_ID = "summary-table"
SUMMARY_CSV = "summary.csv"
BASELINE_ORDER = ("no_change", "perturbation_mean", "covariate_mean", "additive_within")
CEILING = "ceiling"
#: Headline metrics of the summary table, in order of preference (those present are shown).
HEADLINE_METRICS = (
    "rmse_average",
    "pearson_delta",
    "cosine_logfc",
    "r2_average",
    "rmse_rank_average",
    "cosine_rank_logfc",
    "edistance",
    "jaccard_top100",
)
MAX_HEADLINE = 6


def lower_is_better(metric: str) -> bool | None:
    """Direction of a metric from the metric registry (plug-ins included); ``None`` for a
    name the registry does not know (then no arrow and no best value is shown)."""
    from pertbench.metrics.catalog import direction

    found = direction(metric)
    return None if found is None else found == "lower"


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included)."""
    return html.escape(str(value), quote=True)


def _fmt(value: float, digits: int = 4) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{float(value):.{digits}g}"


# ---------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------
def model_order(models: Sequence[str], config_models: Sequence[str] = ()) -> list[str]:
    """Baselines first, then the config's order, then the rest; the ceiling last."""
    present = list(dict.fromkeys(models))
    ordered = [m for m in BASELINE_ORDER if m in present]
    ordered += [m for m in config_models if m in present and m not in ordered and m != CEILING]
    ordered += sorted(m for m in present if m not in ordered and m != CEILING)
    if CEILING in present:
        ordered.append(CEILING)
    return ordered


def headline_metrics(results: pd.DataFrame, preferred: Sequence[str] | None = None) -> list[str]:
    """The metrics shown in the summary table."""
    available = [m for m in pd.unique(results["metric"].astype(str)) if m]
    order = list(preferred or ()) + [m for m in HEADLINE_METRICS if m not in (preferred or ())]
    chosen = [m for m in order if m in available][:MAX_HEADLINE]
    return chosen or sorted(available)[:MAX_HEADLINE]


RANK_METRICS = (
    "rmse_rank_average",
    "cosine_rank_logfc",
    "cosine_rank_delta",
    "pearson_rank_delta",
    "mse_rank_delta",
    "rmse_rank_logfc",
)


def rank_metric_selection(results: pd.DataFrame) -> list[str]:
    """The rank metrics drawn in the report (preferred ones first, at most 4)."""
    available = [m for m in pd.unique(results["metric"].astype(str)) if "_rank_" in m]
    chosen = [m for m in RANK_METRICS if m in available]
    return (chosen or sorted(available))[:4]


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds, sd over seeds (ddof=1), mean 95% interval and normalised score.

    One row per (dataset, task, scenario, model, metric) of the successful cells.
    """
    ok = results[(results["status"] == "ok") & (results["metric"].astype(str) != "")].copy()
    columns = ["dataset", "task", "scenario", "model", "metric"]
    stats = [
        "mean",
        "sd",
        "ci_low",
        "ci_high",
        "normalized",
        "normalized_best",
        "best_baseline",
        "beats_baselines",
        "n_seeds",
    ]
    if ok.empty:
        return pd.DataFrame(columns=[*columns, *stats])
    for column in ("normalized_best", "beats_baselines"):  # results of older versions
        if column not in ok:
            ok[column] = math.nan
    if "best_baseline" not in ok:
        ok["best_baseline"] = ""
    ok["best_baseline"] = ok["best_baseline"].fillna("").astype(str)
    grouped = ok.groupby(columns, sort=False)
    summary = grouped.agg(
        mean=("value", "mean"),
        sd=("value", "std"),  # ddof 1: NaN with a single seed
        ci_low=("ci_low", "mean"),
        ci_high=("ci_high", "mean"),
        normalized=("normalized", "mean"),
        normalized_best=("normalized_best", "mean"),
        # share of seeds in which the model beat every baseline
        beats_baselines=("beats_baselines", "mean"),
        n_seeds=("value", "count"),
    ).reset_index()
    # the floor most seeds chose (ties: the first name in alphabetical order)
    chosen = ok[ok["best_baseline"] != ""]
    floors = (
        chosen.groupby([*columns, "best_baseline"], sort=False)
        .size()
        .rename("n")
        .reset_index()
        .sort_values(["n", "best_baseline"], ascending=[False, True], kind="stable")
        .drop_duplicates(columns)
        .drop(columns="n")
    )
    summary = summary.merge(floors, on=columns, how="left")
    summary["best_baseline"] = summary["best_baseline"].fillna("")
    return summary[[*columns, *stats]]


# ---------------------------------------------------------------------------------------
# Page building
# ---------------------------------------------------------------------------------------
@dataclass
class _Page:
    out: Path
    figures_dir: Path
    parts: list[str] = field(default_factory=list)
    toc: list[tuple[str, str]] = field(default_factory=list)
    figure_count: int = 0
    notes: list[str] = field(default_factory=list)

    def section(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{esc(anchor)}">{esc(title)}</h2>')

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig: Any, name: str, caption: str) -> None:
        """Save ``fig`` as ``figures/<name>.png`` and embed it."""
        import matplotlib.pyplot as plt

        from pertbench.pl.png import figure_png

        data = figure_png(fig)
        plt.close(fig)
        self.figure_count += 1
        filename = f"{self.figure_count:02d}_{paths.slug(name)}.png"
        write_bytes_atomic(self.figures_dir / filename, data)
        encoded = base64.b64encode(data).decode("ascii")
        self.parts.append(
            f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{encoded}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )

    def try_figure(self, make: Callable[[], Any], name: str, caption: str) -> None:
        """Draw a figure; a failure becomes a visible note instead of a broken report."""
        try:
            fig = make()
        except Exception as exc:  # one bad figure must not lose the rest of the report
            self.parts.append(
                f'<p class="note error">figure "{esc(caption)}" could not be drawn: '
                f"{esc(type(exc).__name__)}: {esc(str(exc).splitlines()[0] if str(exc) else '')}</p>"
            )
            return
        if fig is not None:
            self.figure(fig, name, caption)


def _summary_table(
    summary: pd.DataFrame,
    metrics: Sequence[str],
    models_order: Sequence[str],
    badges: Mapping[tuple[str, str, str], str] | None = None,
) -> str:
    """The summary table; ``badges`` maps (dataset, task, model) to HTML shown by the name."""
    from pertbench.report.calibration import calibrated_cell

    badges = badges or {}
    full = summary[summary["scenario"] == FULL_SCENARIO]
    header = [
        '<th class="label">dataset</th><th class="label">task</th><th class="label">model</th>'
    ]
    arrows = {True: " ↓", False: " ↑", None: ""}
    for metric in metrics:
        header.append(f"<th>{esc(metric)}{arrows[lower_is_better(metric)]}</th>")
    rows = []
    for (dataset, task), block in full.groupby(["dataset", "task"], sort=False):
        best: dict[str, float] = {}
        for metric in metrics:
            scored = block[(block["metric"] == metric) & (block["model"] != CEILING)]
            values = scored["mean"].dropna()
            lower = lower_is_better(metric)
            if len(values) and lower is not None:
                best[metric] = values.min() if lower else values.max()
        for model in [m for m in models_order if m in set(block["model"])]:
            cells = []
            for metric in metrics:
                hit = block[(block["model"] == model) & (block["metric"] == metric)]
                if hit.empty:
                    cells.append("<td>–</td>")
                    continue
                r = hit.iloc[0]
                is_best = model != CEILING and metric in best and r["mean"] == best[metric]
                cls = ' class="best"' if is_best else ""
                cells.append(f"<td{cls}>{calibrated_cell(r, _fmt, esc)}</td>")
            cls = ' class="baseline"' if model in BASELINE_ORDER or model == CEILING else ""
            rows.append(
                f'<tr{cls}><td class="label">{esc(dataset)}</td><td class="label">{esc(task)}</td>'
                f'<td class="label">{esc(model)}{badges.get((dataset, task, model), "")}</td>'
                f"{''.join(cells)}</tr>"
            )
    return (
        f'<table id="{SUMMARY_TABLE_ID}"><thead><tr>{"".join(header)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _simple_table(frame: pd.DataFrame, *, table_id: str | None = None, digits: int = 4) -> str:
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if isinstance(value, (float, np.floating)):
                cells.append(f"<td>{_fmt(value, digits)}</td>")
            else:
                cells.append(f'<td class="label">{esc(value)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def environment() -> dict[str, str]:
    """Machine and software facts printed at the end of the report."""
    from pertbench.report.crate import software_versions

    facts = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu cores": str(os.cpu_count()),
    }
    try:
        import torch

        facts["cuda"] = (
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
        )
    except Exception:  # torch missing or broken CUDA: report, do not fail
        facts["cuda"] = "unknown"
    facts.update({f"version: {k}": v for k, v in software_versions().items()})
    return facts


def write_report(out: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write ``DIR/report.html`` (self-contained) and ``DIR/figures/*.png`` for a benchmark.

    Returns
    -------
    Path
        The report file.
    """
    import yaml

    from pertbench import __version__
    from pertbench.errors import InputFileError

    out = Path(out).resolve()
    results_file = out / paths.RESULTS_PARQUET
    if not results_file.is_file():
        raise InputFileError(
            f"'{out}' has no {paths.RESULTS_PARQUET}; run 'pertbench benchmark CONFIG --out {out}' first"
        )
    results = pd.read_parquet(results_file)
    config = (
        yaml.safe_load((out / paths.CONFIG_FILE).read_text(encoding="utf-8"))
        if (out / paths.CONFIG_FILE).is_file()
        else {}
    )
    manifest = read_manifest(out)
    failures = (
        pd.read_csv(out / paths.FAILURES_CSV)
        if (out / paths.FAILURES_CSV).is_file()
        else pd.DataFrame()
    )

    figures_dir = out / paths.FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    for old in figures_dir.glob("*.png"):  # figures of an earlier report of this run
        old.unlink()
    page = _Page(out=out, figures_dir=figures_dir)
    name = config.get("name", out.name)
    title = title or f"pertbench benchmark report: {name}"
    config_models = list((config.get("models") or {}).keys())
    models = model_order(results["model"].astype(str).unique(), config_models)
    preferred = (config.get("evaluation") or {}).get("metrics")
    metrics = headline_metrics(results, preferred)
    summary = summarize(results)
    write_csv_atomic(out / SUMMARY_CSV, summary)

    cells = results[results["model"] != CEILING].drop_duplicates(
        ["dataset", "task", "scenario", "model", "seed"]
    )
    n_ok, n_cells = int((cells["status"] == "ok").sum()), len(cells)
    n_skipped = int((cells["status"] == "skipped").sum())
    page.add(f"<h1>{esc(title)}</h1>")
    page.add(
        f'<p class="meta">Generated {esc(datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))} by '
        f"pertbench {esc(__version__)} · {n_ok} of {n_cells} cells succeeded"
        + (f" ({n_skipped} skipped: model not applicable)" if n_skipped else "")
        + " · "
        f"seeds: {esc(', '.join(map(str, sorted(results['seed'].unique()))))}</p>"
    )
    if config.get("description"):
        page.add(f"<p>{esc(config['description'])}</p>")
    toc_index = len(page.parts)

    # -- summary ------------------------------------------------------------------------
    page.section("summary", "Summary")
    page.add(
        '<p class="note">First, large: the calibrated score (model − no_change) / (ceiling − no_change), '
        "0 = no better than predicting no change, 1 = as good as a perfect model can look given the "
        "measurement noise (the noise ceiling, validated on simulated truth: docs/metrics.md). "
        "Below it: the raw value, mean over seeds ± sd across seeds, the 95% bootstrap interval over "
        "perturbations (averaged over seeds), and 'vs B': the same score with the best simple "
        f"baseline B of that metric as the floor (0 = no better than B). {BEATS_MARK}: beats every "
        "simple baseline by more than its 95% interval in every seed. "
        "Best raw value per metric in bold; ↓ lower is better, ↑ higher is better.</p>"
    )
    from pertbench.report.diagnostics import badge_legend, collapse_badges, diagnostic_sections

    badges = collapse_badges(out, summary)
    page.add(_summary_table(summary, metrics, models, badges))
    if badges:
        page.add(badge_legend())

    # -- rank metrics -------------------------------------------------------------------
    rank_metrics = rank_metric_selection(results)
    full_ok = summary[summary["scenario"] == FULL_SCENARIO]
    if rank_metrics:
        page.section("ranks", "Rank metrics")
        page.add(
            '<p class="note">Rank of each true perturbation among all predictions of its covariates '
            "(0 = perfect; about 0.5 = no better than a random order, what a model that predicts the "
            "same profile for every perturbation gets). Bars: mean over seeds; whiskers: 95% interval.</p>"
        )
        for (dataset, task), block in full_ok[full_ok["metric"].isin(rank_metrics)].groupby(
            ["dataset", "task"], sort=False
        ):
            if not np.isfinite(block["mean"].to_numpy(dtype=float)).any():
                page.add(
                    f'<p class="note">{esc(dataset)} / {esc(task)}: no rank metric is defined '
                    "(every covariate combination has fewer than 2 test perturbations).</p>"
                )
                continue
            table = block.rename(columns={"mean": "value"})
            order = {m: i for i, m in enumerate(models)}
            table = table.sort_values("model", key=lambda s: s.map(order))

            def draw(table=table, dataset=dataset, task=task):
                from pertbench import pl

                fig = pl.rank_bars(table, metrics=rank_metrics, figsize=(8.0, 3.6))
                fig.suptitle(f"{dataset} / {task}", fontsize=10)
                return fig

            page.try_figure(draw, f"ranks_{dataset}_{task}", f"Rank metrics, {dataset} / {task}")

    from pertbench.report.calibration import baseline_section, systematic_variation_section

    baseline_section(page, summary, metrics, BASELINE_ORDER)
    systematic_variation_section(page, results)
    _interaction_section(page, results, summary, models)
    diagnostic_sections(page, out, models)
    _prediction_sections(page, results, manifest, config, models)
    _validation_section(page, out)
    _scenario_sections(page, results, manifest, models, metrics)
    _tuning_section(page, out)
    _stability_section(page, results, models, metrics)
    _failures_section(page, failures)

    # -- inputs, environment --------------------------------------------------------------
    page.section("inputs", "Inputs")
    if manifest.get("datasets"):
        rows = [
            {
                "dataset": name,
                "cells": entry.get("n_obs", ""),
                "genes": entry.get("n_vars", ""),
                "source": json.dumps(entry.get("source"), default=str)
                if isinstance(entry.get("source"), dict)
                else entry.get("source", ""),
                "sha256": entry.get("sha256", ""),
            }
            for name, entry in manifest["datasets"].items()
        ]
        page.add(_simple_table(pd.DataFrame(rows)))
    if manifest.get("splits"):
        rows = []
        for key, entry in manifest["splits"].items():
            dataset, task, scenario = key.split("|")
            counts = entry.get("n_cells", {})
            rows.append(
                {
                    "dataset": dataset,
                    "task": task,
                    "scenario": scenario,
                    "train": counts.get("train", 0),
                    "val": counts.get("val", 0),
                    "test": counts.get("test", 0),
                    "sha256": entry.get("sha256", "")[:16],
                }
            )
        page.add(_simple_table(pd.DataFrame(rows)))
    if (out / paths.CONFIG_FILE).is_file():
        page.add("<h3>Configuration</h3>")
        page.add(f"<pre>{esc((out / paths.CONFIG_FILE).read_text(encoding='utf-8'))}</pre>")
    page.section("environment", "Environment and versions")
    page.add(
        _simple_table(pd.DataFrame([{"item": k, "value": v} for k, v in environment().items()]))
    )

    toc = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in page.toc)
    page.parts.insert(toc_index, f"<nav><ul>{toc}</ul></nav>")
    template = string.Template(
        (Path(__file__).parent / "templates" / "report.html").read_text(encoding="utf-8")
    )
    text = template.substitute(
        title=esc(title), version=esc(__version__), body="\n".join(page.parts)
    )
    return write_text_atomic(out / paths.REPORT_FILE, text)


# ---------------------------------------------------------------------------------------
# Sections that need data beyond the results table
# ---------------------------------------------------------------------------------------
def _interaction_section(
    page: _Page, results: pd.DataFrame, summary: pd.DataFrame, models: list[str]
) -> None:
    """Genetic-interaction tables by subgroup (:mod:`pertbench.report.interactions`)."""
    from pertbench.report.interactions import interaction_section

    interaction_section(page, results, summary, models)


def _validation_section(page: _Page, out: Path) -> None:
    """The metric validation heatmap (:mod:`pertbench.report.validation`)."""
    from pertbench.report.validation import validation_section

    validation_section(page, out)


def _prediction_sections(
    page: _Page, results: pd.DataFrame, manifest: dict, config: dict, models: list[str]
) -> None:
    """Scatter plots and similarity heatmaps from saved predictions (first seed, full scenario)."""
    from pertbench.report.predictions import prediction_figures

    prediction_figures(page, results, manifest, config, models)


def _scenario_sections(
    page: _Page, results: pd.DataFrame, manifest: dict, models: list[str], metrics: list[str]
) -> None:
    from pertbench.report.figures import scenario_curves

    ok = results[results["status"] == "ok"]
    curve_metrics = metrics[:3]
    for kind, title, xlabel in (
        (
            "imbalance",
            "Imbalance",
            "normalised entropy of perturbations over covariates (1 = balanced)",
        ),
        ("downsample", "Downsampled perturbed cells", "fraction of perturbed cells kept"),
        ("data_scaling", "Data scaling", "training covariates"),
    ):
        prefix = f"{kind}_"
        scen = ok[ok["scenario"].str.startswith(prefix) | (ok["scenario"] == FULL_SCENARIO)]
        if not (scen["scenario"].str.startswith(prefix)).any():
            continue
        page.section(kind, title)
        for (dataset, task), block in scen.groupby(["dataset", "task"], sort=False):
            names = [s for s in block["scenario"].unique() if s.startswith(prefix)]
            if not names:
                continue
            x = pd.Series({s: _scenario_level(kind, s, manifest, dataset, task) for s in names})
            if kind == "downsample":
                x[FULL_SCENARIO] = 1.0  # the full data keeps every perturbed cell
            elif kind == "imbalance":
                x[FULL_SCENARIO] = _scenario_level(kind, FULL_SCENARIO, manifest, dataset, task)
            x = x.dropna()
            page.try_figure(
                lambda block=block, x=x, dataset=dataset, task=task, xlabel=xlabel: scenario_curves(
                    block,
                    metrics=curve_metrics,
                    x=x,
                    xlabel=xlabel,
                    title=f"{dataset} / {task}",
                    models=[m for m in models if m != CEILING],
                ),
                f"{kind}_{dataset}_{task}",
                f"{title}: {dataset} / {task} (mean ± sd over seeds)",
            )


def _scenario_level(kind: str, scenario: str, manifest: dict, dataset: str, task: str) -> float:
    """x position of a scenario level: achieved entropy, kept fraction or training covariates."""
    entry = manifest.get("splits", {}).get(f"{dataset}|{task}|{scenario}", {})
    info = entry.get("scenario") or {}
    if kind == "imbalance":
        if "perturbation_entropy" in info:
            return float(info["perturbation_entropy"])
        level = scenario.rsplit("_", 1)[-1]
        return float(level) if scenario != FULL_SCENARIO else math.nan
    if kind == "downsample":
        return float(scenario.rsplit("_", 1)[-1])
    covariates = (entry.get("params") or {}).get("training_covariates")
    if isinstance(covariates, list):
        return float(len(covariates))
    digits = "".join(ch for ch in scenario.rsplit("_", 1)[-1] if ch.isdigit())
    return float(digits) if digits else math.nan


def _tuning_section(page: _Page, out: Path) -> None:
    from pertbench.report.figures import importance_bars, tuning_history

    studies = sorted((out / "tuning").glob("**/trials.csv")) if (out / "tuning").is_dir() else []
    if not studies:
        return
    page.section("tuning", "Hyperparameter tuning")
    for trials_file in studies:
        folder = trials_file.parent
        label = " / ".join(folder.relative_to(out / "tuning").parts)
        trials = pd.read_csv(trials_file)
        best_file = folder / "best_params.json"
        best = json.loads(best_file.read_text()) if best_file.is_file() else {}
        page.add(f"<h3>{esc(label)}</h3>")
        counts = trials["state"].value_counts().to_dict() if "state" in trials else {}
        page.add(
            f'<p class="note">{esc(", ".join(f"{v} {k.lower()}" for k, v in counts.items()))}; '
            f"objective {esc(best.get('objective', ''))}; best value {esc(_fmt(best.get('value', math.nan)))} "
            f"(trial {esc(best.get('trial', '–'))}); best parameters: <code>{esc(json.dumps(best.get('params', {})))}</code></p>"
        )
        if len(trials):
            page.try_figure(
                lambda trials=trials, label=label, best=best: tuning_history(
                    trials, title=label, direction=best.get("direction", "minimize")
                ),
                f"tuning_{label}",
                f"Tuning history: {label}",
            )
        importances_file = folder / "importances.csv"
        if importances_file.is_file():
            importances = pd.read_csv(importances_file)
            if importances["importance"].notna().any():
                page.try_figure(
                    lambda importances=importances, label=label: importance_bars(
                        importances, title=label
                    ),
                    f"importances_{label}",
                    f"Parameter importances (fANOVA): {label}",
                )
            else:
                page.add(f'<p class="note">importances: {esc(importances["note"].iloc[0])}</p>')


def _stability_section(
    page: _Page, results: pd.DataFrame, models: list[str], metrics: list[str]
) -> None:
    from pertbench.report.figures import seed_stability

    ok = results[(results["status"] == "ok") & (results["scenario"] == FULL_SCENARIO)]
    if ok["seed"].nunique() < 2:
        return
    page.section("stability", "Stability across seeds")
    page.add('<p class="note">Each dot is one training seed; bars are the mean.</p>')
    for (dataset, task), block in ok.groupby(["dataset", "task"], sort=False):
        page.try_figure(
            lambda block=block, dataset=dataset, task=task: seed_stability(
                block,
                metrics=metrics[:3],
                title=f"{dataset} / {task}",
                models=[m for m in models if m in set(block["model"])],
            ),
            f"stability_{dataset}_{task}",
            f"Seed stability: {dataset} / {task}",
        )


def _failures_section(page: _Page, failures: pd.DataFrame) -> None:
    if failures.empty:
        return
    status = failures["status"] if "status" in failures else pd.Series("failed", failures.index)
    skipped = failures[status == "skipped"]
    failed = failures[status != "skipped"]
    if len(failed):
        page.section("failures", "Failures")
        page.add(
            f'<p class="note error">{len(failed)} job(s) failed; their cells are missing from the tables above.</p>'
        )
        page.add(_simple_table(failed.fillna("")))
    if len(skipped):
        page.section("skipped", "Skipped: model not applicable")
        page.add(
            f'<p class="note">{len(skipped)} job(s) were skipped because the model cannot '
            "predict the task (e.g. a one-hot model asked for perturbations it never saw); "
            "the reason is given for each.</p>"
        )
        page.add(_simple_table(skipped.fillna("")))
