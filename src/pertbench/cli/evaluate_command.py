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

#: The profile that runs cell-eval's metrics and the VCC score (not a registry profile:
#: its metrics are computed on cells by pertbench.metrics.vcc_eval).
VCC_PROFILE = "vcc"
#: VCC metrics echoed after a ``--profile vcc`` run (all are in vcc_summary.csv).
VCC_HEADLINE = (
    "overlap_at_N",
    "discrimination_score_l1",
    "mae",
    "pearson_delta",
    "vcc_score/overlap_at_N",
    "vcc_score/discrimination_score_l1",
    "vcc_score/mae",
    "vcc_score/avg_score",
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
                help="default (fit + rank + DE + reference-aware), all (+ logp, distribution "
                "metrics), or a comma list of profiles, families (fit, rank, de, distribution, "
                "reference) and metric names. Default: the --profile, else default.",
            ),
        ] = None,
        profile: Annotated[
            str | None,
            typer.Option(
                "--profile",
                help="A named metric profile: default, all, vcc (cell-eval's metrics, its mean "
                "baseline and the Virtual Cell Challenge score, with intervals), or one "
                "registered by a package (pertbench.metrics.catalog.register_profile); "
                "--metrics adds to it (not to vcc).",
            ),
        ] = None,
        baselines: Annotated[
            bool,
            typer.Option(
                "--baselines",
                help="Also score the no_change, perturbation_mean, covariate_mean and (for "
                "combinations) additive_within baselines (needs --split): adds normalized_best "
                "and beats_baselines to calibration.csv.",
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
        from pertbench.errors import ConfigError
        from pertbench.metrics.evaluator import Evaluator
        from pertbench.utils.outputs import check_output, new_folder

        check_output(out, kind="folder", inputs=[pred, truth, split], overwrite=overwrite)
        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        if profile is not None and profile.strip().lower() == VCC_PROFILE:
            if metrics is not None:
                raise ConfigError(
                    "--profile vcc computes cell-eval's own metric set; drop --metrics or "
                    "use another profile"
                )
            _evaluate_vcc(pred, truth, out, keys, split, n_bootstrap, seed, n_jobs)
            return
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


def _evaluate_vcc(pred, truth, out, keys, split, n_bootstrap, seed, n_jobs) -> None:
    """``--profile vcc``: cell-eval's metrics, mean baseline and VCC score with intervals."""
    import os

    from pertbench.data.splits import read_split
    from pertbench.metrics.vcc_eval import _read
    from pertbench.metrics.vcc_summary import evaluate_vcc
    from pertbench.utils.io import write_csv_atomic
    from pertbench.utils.outputs import new_folder

    truth_data = _read(str(truth), "truth")
    labels = read_split(split, truth_data.obs_names) if split is not None else None
    result, summary = evaluate_vcc(
        truth_data,
        str(pred),
        keys=keys,
        split=labels,
        n_bootstrap=n_bootstrap,
        seed=seed,
        n_jobs=n_jobs or min(os.cpu_count() or 1, 8),
    )
    with new_folder(out) as tmp:
        write_csv_atomic(tmp / "vcc_summary.csv", summary)
        write_csv_atomic(tmp / "vcc_per_group.csv", result.per_group)
        write_csv_atomic(tmp / "vcc_per_covariate.csv", result.per_covariate)
        write_csv_atomic(tmp / "vcc_baseline_per_group.csv", result.baseline_per_group)
        write_csv_atomic(tmp / "vcc_scores.csv", result.scores)
    n_groups = len(result.per_group)
    echo(f"cell-eval / VCC metrics of {n_groups} group(s) in {len(result.per_covariate)} block(s)")
    table = summary.set_index("metric")
    for metric in VCC_HEADLINE:
        if metric in table.index:
            row = table.loc[metric]
            ci = (
                f"  [{row['ci_low']:.4g}, {row['ci_high']:.4g}]"
                if row.notna().get("ci_low", False)
                else ""
            )
            base = table["value"].get(f"baseline/{metric}")
            versus = f"  (mean baseline {base:.4g})" if base is not None else ""
            echo(f"  {metric:<36} {row['value']:.4g}{ci}{versus}")
    for note in result.notes:
        echo(f"note: {note}")
    echo(f"wrote {out}")
