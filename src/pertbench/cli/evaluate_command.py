"""``pertbench evaluate``: score predictions of any model against observed cells."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pertbench.cli.common import (
    ControlOpt,
    CovariatesOpt,
    DelimiterOpt,
    DoseKeyOpt,
    OverwriteOpt,
    PerturbationKeyOpt,
    SeedOpt,
    echo,
    make_keys,
)

#: Metrics echoed after a run (when computed); everything is in the output files.
HEADLINE_METRICS = (
    "rmse_average",
    "cosine_logfc",
    "rmse_rank_average",
    "cosine_rank_logfc",
    "pearson_delta",
    "jaccard_top100",
)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to the CLI."""

    @app.command("evaluate")
    def evaluate(
        pred: Annotated[
            Path,
            typer.Option(
                "--pred", help="Predicted cells (.h5ad) with the same obs keys as the truth."
            ),
        ],
        truth: Annotated[
            Path,
            typer.Option(
                "--truth", help="Observed cells (.h5ad); may be the whole dataset with controls."
            ),
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                help="Output folder for summary.csv, per_group.csv, per_covariate.csv, "
                "calibration.csv and evaluation.json.",
            ),
        ],
        metrics: Annotated[
            str | None,
            typer.Option(
                "--metrics",
                help="default (fit + rank + DE), all (+ logp, distribution metrics), or a comma "
                "list of profiles, families (fit, rank, de, distribution) and metric names. "
                "Default: the --profile, else default.",
            ),
        ] = None,
        profile: Annotated[
            str | None,
            typer.Option(
                "--profile",
                help="A named metric profile: default, all, or one registered by a package "
                "(pertbench.metrics.catalog.register_profile); --metrics adds to it.",
            ),
        ] = None,
        baselines: Annotated[
            bool,
            typer.Option(
                "--baselines",
                help="Also score the no_change, perturbation_mean and covariate_mean baselines "
                "(needs --split).",
            ),
        ] = False,
        ceiling: Annotated[
            bool,
            typer.Option(
                "--ceiling",
                help="Also estimate the noise ceiling (the expected score of a perfect model "
                "given the measurement noise); with --baselines this gives normalised scores.",
            ),
        ] = False,
        replicate_agreement: Annotated[
            bool,
            typer.Option(
                "--replicate-agreement",
                help="Also score one half of each group's cells against the other half "
                "(reference replicate_agreement; not the ceiling).",
            ),
        ] = False,
        split: Annotated[
            Path | None,
            typer.Option(
                "--split",
                help="Split CSV (obs_name,split) of the truth: restricts observed cells to --on "
                "and trains the baselines.",
            ),
        ] = None,
        on: Annotated[
            str,
            typer.Option("--on", help="Split holding the evaluated groups: train, val or test."),
        ] = "test",
        skip_missing: Annotated[
            bool,
            typer.Option(
                "--skip-missing",
                help="Skip and report groups missing from pred or truth instead of failing.",
            ),
        ] = False,
        top_k: Annotated[
            int, typer.Option("--top-k", help="Size of the top DE gene sets (jaccard/overlap).")
        ] = 100,
        fdr: Annotated[
            float, typer.Option("--fdr", help="FDR threshold of truth-significant genes.")
        ] = 0.05,
        n_bootstrap: Annotated[
            int,
            typer.Option(
                "--n-bootstrap", help="Bootstrap resamples for 95% intervals (0: no intervals)."
            ),
        ] = 1000,
        model_name: Annotated[
            str, typer.Option("--model-name", help="Name of the scored model in the tables.")
        ] = "model",
        n_jobs: Annotated[
            int | None,
            typer.Option(
                "--n-jobs", help="Threads for the DE tests (default: available CPUs, at most 8)."
            ),
        ] = None,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        dose_key: DoseKeyOpt = None,
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Score predicted cells against observed cells (any model, pertbench's or not).

        Groups are (covariates, perturbation) pairs present in both files (with --split:
        all groups of the --on split). Genes are matched by name. Controls always come
        from the truth. Both files are read from disk one covariate block at a time, so
        memory depends on the largest block, not on the number of cells.
        """
        from pertbench.metrics.evaluator import Evaluator
        from pertbench.utils.outputs import check_output, new_folder

        check_output(out, kind="folder", inputs=[pred, truth, split], overwrite=overwrite)
        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        evaluator = Evaluator(
            truth,
            pred,
            keys=keys,
            metrics=metrics,
            profile=profile,
            split=split,
            on=on,
            baselines=baselines,
            ceiling=ceiling,
            replicate_agreement=replicate_agreement,
            skip_missing=skip_missing,
            seed=seed,
            top_k=top_k,
            fdr=fdr,
            n_bootstrap=n_bootstrap,
            model_name=model_name,
            keep_aggregates=False,
            n_jobs=n_jobs,
        )
        result = evaluator.run()
        with new_folder(out) as tmp:
            result.write(tmp)
        folder = out
        echo(
            f"evaluated {result.settings['n_groups']} group(s) over {result.settings['n_genes']} genes"
        )
        shown = [f"{m}_top{top_k}" if m == "jaccard_top100" else m for m in HEADLINE_METRICS]
        table = result.summary.set_index("metric")
        for metric in shown:
            if metric in table.index:
                row = table.loc[metric]
                ci = ""
                if "ci_low" in table.columns and row.notna().get("ci_low", False):
                    ci = f"  [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
                line = f"  {metric:<22} {row['value']:.4g}{ci}"
                normalized = f"normalized/{metric}"
                if normalized in table.index:
                    line += f"  (normalised {table.loc[normalized, 'value']:.3g})"
                echo(line)
        for note in result.notes:
            echo(f"note: {note}")
        if not result.skipped.empty:
            echo(f"skipped {len(result.skipped)} group(s); listed in {folder / 'evaluation.json'}")
        echo(f"wrote {folder}")
