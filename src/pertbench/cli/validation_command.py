"""``pertbench validate-metrics``: which metric detects which known failure of a prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pertbench.cli.common import SeedOpt, echo

#: Metrics whose detections are echoed after a run (everything is in the output files).
ECHOED = ("rmse_average", "pearson_delta", "rmse_rank_average", "cosine_rank_logfc")


def register(app: typer.Typer) -> None:
    """Add the ``validate-metrics`` command to the CLI."""

    @app.command("validate-metrics")
    def validate_metrics_cmd(
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                help="Output folder: scores.csv, detection.csv, study.json, heatmap.png.",
            ),
        ],
        data: Annotated[
            Path | None,
            typer.Option(
                "--data",
                help="A dataset made by 'pertbench simulate' (default: the study's own "
                "simulation, see docs/metric_validation.md).",
            ),
        ] = None,
        metrics: Annotated[
            str,
            typer.Option("--metrics", help="Evaluator metric selection (all: the catalogue)."),
        ] = "all",
        shrink: Annotated[
            float, typer.Option("--shrink", help="Share of the effect kept by 'shrunk'.")
        ] = 0.5,
        noise_scale: Annotated[
            float,
            typer.Option(
                "--noise-scale",
                help="Size of 'noise' and 'systematic' relative to the rms true effect.",
            ),
        ] = 1.0,
        n_bootstrap: Annotated[
            int, typer.Option("--n-bootstrap", help="Bootstrap resamples of the intervals.")
        ] = 1000,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="Replace the files of an earlier study.")
        ] = False,
        seed: SeedOpt = 0,
    ) -> None:
        """Which metric detects which known failure of a prediction (docs/metric_validation.md).

        From one simulated truth: a perfect prediction (a fresh replicate of the experiment),
        collapsed to the covariate mean, shrunk towards control, right genes with the wrong
        sign, noise added, additive for interacting pairs, and a systematic shift. Reports
        which failures each metric detects and how it ranks them.
        """
        from pertbench.errors import ConfigError
        from pertbench.metrics.validation import DETECTION_FILE, validate_metrics

        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out '{out}' is a file; give a folder")
        if out.is_dir() and (out / DETECTION_FILE).exists() and not overwrite:
            raise ConfigError(
                f"'{out}' already holds a validation study; choose another --out or pass --overwrite"
            )
        if not 0.0 <= shrink <= 1.0:
            raise ConfigError(f"--shrink must be between 0 and 1, got {shrink}")
        if noise_scale < 0:
            raise ConfigError(f"--noise-scale must be >= 0, got {noise_scale}")
        study = validate_metrics(
            data,
            metrics=metrics,
            shrink=shrink,
            noise_scale=noise_scale,
            n_bootstrap=n_bootstrap,
            seed=seed,
            log=lambda message: echo(message),
        )
        folder = study.write(out)
        detection = study.detection
        for metric in ECHOED:
            rows = detection[detection["metric"] == metric]
            if rows.empty:
                continue
            found = [f for f, d in zip(rows["failure"], rows["detected"], strict=True) if d is True]
            echo(f"  {metric:<20} detects: {', '.join(found) if found else 'none'}")
        echo(f"wrote {folder}")
