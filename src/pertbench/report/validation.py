"""Report section: the metric validation study of each simulated dataset (heatmap + table).

Reads ``DIR/validation/<dataset>/detection.csv`` written by the benchmark's validation job
(:mod:`pertbench.benchmark.validation`) and draws
:func:`pertbench.pl.validation.failure_heatmap`, then a table of which failures a few
headline metrics detect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pertbench.benchmark import paths

#: Metrics listed in the table under the heatmap (those present).
TABLE_METRICS = (
    "rmse_average",
    "pearson_delta",
    "cosine_logfc",
    "rmse_rank_average",
    "cosine_rank_logfc",
    "edistance",
    "jaccard_top100",
    "gi_rmse[interacting]",
    "gi_roc_auc[all]",
)


def validation_section(page: Any, out: Path) -> None:
    """Add the metric validation section to the report ``page`` (when the run made a study)."""
    from pertbench.benchmark.validation import VALIDATION_DIR

    root = Path(out) / VALIDATION_DIR
    studies = sorted(root.glob(f"*/{paths.DONE_FILE}")) if root.is_dir() else []
    if not studies:
        return
    from pertbench.metrics.validation import DETECTION_FILE, FAILURE_LABELS, STUDY_FILE
    from pertbench.report.html import _simple_table, esc

    page.section("validation", "Metric validation study")
    page.add(
        '<p class="note">From the simulated truth, predictions that fail in known ways are built '
        "from a fresh replicate of the experiment (same design and true profiles, new cells) and "
        "scored with every metric. A metric detects a failure when the failure scores worse than "
        "the perfect prediction by more than the perfect score's 95% bootstrap interval "
        "(numbers: the failure's rank for that metric, 1 = most penalised; dots: not detected). "
        "See docs/metric_validation.md.</p>"
    )
    for done in studies:
        folder = done.parent
        detection = pd.read_csv(folder / DETECTION_FILE)
        dataset = folder.name
        if (folder / STUDY_FILE).is_file():
            import json

            settings = json.loads((folder / STUDY_FILE).read_text())
            groups = settings.get("n_groups")
            if groups:
                page.add(f'<p class="note">{esc(dataset)}: {esc(groups)} perturbed groups.</p>')

        def draw(detection=detection, dataset=dataset):
            from pertbench.pl.validation import failure_heatmap

            return failure_heatmap(detection, title=f"Metric validation: {dataset}")

        page.try_figure(draw, f"validation_{dataset}", f"Metric validation study, {dataset}")
        shown = [m for m in TABLE_METRICS if m in set(detection["metric"])]
        if shown:
            rows = []
            for failure in pd.unique(detection["failure"]):
                part = detection[detection["failure"] == failure].set_index("metric")
                row = {"failure": FAILURE_LABELS.get(failure, failure)}
                n_detect = int(part["detected"].astype(str).eq("True").sum())
                row["metrics detecting it"] = f"{n_detect} of {len(part)}"
                for metric in shown:
                    value = str(part.loc[metric, "detected"]) if metric in part.index else ""
                    row[metric] = {"True": "yes", "False": "no"}.get(value, "–")
                rows.append(row)
            page.add(_simple_table(pd.DataFrame(rows), table_id=f"validation-{dataset}"))
