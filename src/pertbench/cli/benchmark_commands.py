"""``pertbench tune``, ``pertbench benchmark`` and ``pertbench report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pertbench.cli.common import (
    ControlOpt,
    CovariatesOpt,
    DelimiterOpt,
    DeviceOpt,
    DoseKeyOpt,
    MaxEpochsOpt,
    PerturbationKeyOpt,
    echo,
    make_keys,
    parse_set_options,
)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)
    app.command("benchmark")(benchmark_command)
    app.command("report")(report_command)


def tune_command(
    data: Annotated[Path, typer.Argument(help="Input .h5ad file.", show_default=False)],
    model: Annotated[str, typer.Option("--model", help="Model to tune (see 'pertbench models').")],
    split: Annotated[
        Path, typer.Option("--split", help="Split CSV (obs_name,split) with train and val cells.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder; an existing study there is resumed.")
    ],
    n_trials: Annotated[
        int,
        typer.Option(
            "--n-trials", help="Trials to finish in total (across resumptions and workers)."
        ),
    ] = 60,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Start no new trial after this many seconds.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="SQLAlchemy URL of a shared study (e.g. postgresql+psycopg://user@host/db); default: DIR/study.db.",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option("--study-name", help="Study name in the storage (default pertbench-MODEL)."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Local worker processes sharing the study.")
    ] = 1,
    seed: Annotated[
        int, typer.Option("--seed", help="Seeds the sampler and every trial's training.")
    ] = 0,
    objective: Annotated[
        str | None,
        typer.Option(
            "--objective",
            help="Expression over validation metrics; default 'rmse_average + 0.1 * rmse_rank_average'.",
        ),
    ] = None,
    direction: Annotated[
        str, typer.Option("--direction", help="minimize or maximize the objective.")
    ] = "minimize",
    stability_seeds: Annotated[
        int,
        typer.Option(
            "--stability-seeds", help="Extra seeds the best configuration is retrained with."
        ),
    ] = 4,
    max_epochs: MaxEpochsOpt = None,
    pruner: Annotated[
        str, typer.Option("--pruner", help="median, halving or none (pruning on validation loss).")
    ] = "median",
    set_params: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Fix a hyperparameter (not searched): --set name=value; repeatable."
        ),
    ] = None,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space", help="YAML file overriding the search space (name: {type, low, high, ...})."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="Comma-separated metrics reported for the stability seeds (default: evaluator's set).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start a new study in --out, replacing the one there (default: resume it).",
        ),
    ] = False,
    perturbation_key: PerturbationKeyOpt = "condition",
    control: ControlOpt = "control",
    covariates: CovariatesOpt = "cell_type",
    delimiter: DelimiterOpt = "+",
    dose_key: DoseKeyOpt = None,
) -> None:
    """Search a model's hyperparameters with Optuna (TPE, pruning), resumably.

    Writes trials.csv, best_params.json, importances.csv, stability.csv and
    stability_summary.csv to --out. A killed run resumes where it stopped when started again
    with the same arguments, with the same trials as an uninterrupted run; several processes
    or machines share one study through --storage.
    """
    from pertbench.errors import ConfigError
    from pertbench.tuning import TuneSettings, tune
    from pertbench.utils.io import read_yaml
    from pertbench.utils.outputs import check_output

    check_output(out, kind="resumable", inputs=[data, split, space], overwrite=overwrite)
    keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
    search_space = None
    if space is not None:
        search_space = read_yaml(space, what="search space file") or {}
        if not isinstance(search_space, dict):
            raise ConfigError(
                f"search space file '{space}' must map parameter names to distributions"
            )
    settings = TuneSettings(
        model=model,
        n_trials=n_trials,
        timeout=timeout,
        seed=seed,
        objective=objective,
        direction=direction,
        stability_seeds=stability_seeds,
        fixed_params=parse_set_options(set_params),
        search_space=search_space,
        max_epochs=max_epochs,
        device=device,
        pruner=pruner,
        study_name=study_name,
        workers=workers,
        storage=storage,
        report_metrics=tuple(m.strip() for m in metrics.split(",") if m.strip())
        if metrics
        else None,
    )
    result = tune(data, split, out=out, settings=settings, keys=keys, overwrite=overwrite)
    echo(f"best value: {result.best_value:.6g}")
    echo(f"best parameters: {result.best_params}")
    if len(result.stability_summary):
        for _, row in result.stability_summary.iterrows():
            echo(
                f"  {row['split']} {row['metric']}: {row['mean']:.4g} ± {row['sd']:.2g} (n={row['n_seeds']})"
            )
    echo(f"outputs: {result.out_dir}")


def benchmark_command(
    config: Annotated[
        Path | None,
        typer.Argument(help="Benchmark config YAML (omit with --default).", show_default=False),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Benchmark folder (created).")] = None,
    default: Annotated[
        bool,
        typer.Option("--default", help="Run the small simulated benchmark shipped with pertbench."),
    ] = False,
    workers: Annotated[int, typer.Option("--workers", help="Jobs running at once.")] = 1,
    backend: Annotated[str, typer.Option("--backend", help="local (processes) or ray.")] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", help="Address of a running Ray cluster (default: start one locally)."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the benchmark in --out (finished cells are skipped)."
        ),
    ] = False,
    report: Annotated[
        bool,
        typer.Option("--report/--no-report", help="Write report.html and the RO-Crate at the end."),
    ] = True,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config", help="Print the validated config (canonical YAML) and exit."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Start the benchmark afresh in --out, replacing an earlier one there.",
        ),
    ] = False,
) -> None:
    """Run every (dataset, task, scenario, model, seed) cell of a benchmark config.

    Baselines and the noise ceiling are always included. Results go to DIR/results.parquet
    and DIR/results.csv (one row per cell x metric); the command ends by writing
    DIR/report.html and the RO-Crate metadata and printing the report's path. Start from
    the shipped config: pertbench benchmark --default --print-config > my.yaml
    """
    from pertbench.benchmark.config import default_config_path, dump_config, load_config
    from pertbench.benchmark.runner import run_benchmark
    from pertbench.errors import ConfigError
    from pertbench.utils.outputs import check_output

    if default and config is not None:
        raise ConfigError("give either a CONFIG file or --default, not both")
    if not default and config is None:
        raise ConfigError("give a CONFIG file, or --default for the shipped benchmark")
    parsed = load_config(default_config_path() if default else config)
    if print_config:
        typer.echo(dump_config(parsed), nl=False)
        return
    if out is None:
        raise ConfigError("--out is required: the folder the benchmark writes to")
    if resume and overwrite:
        raise ConfigError("give either --resume (continue) or --overwrite (start afresh), not both")
    inputs = [config, *(spec.path for spec in parsed.datasets.values())]
    check_output(out, kind="resumable", inputs=inputs, overwrite=overwrite)
    result = run_benchmark(
        parsed,
        out=out,
        workers=workers,
        backend=backend,
        ray_address=ray_address,
        resume=resume,
        report=report,
        overwrite=overwrite,
    )
    echo(f"results: {result.out_dir / 'results.parquet'}")
    if result.report is not None:
        echo(f"report: {result.report}")


def report_command(
    directory: Annotated[
        Path,
        typer.Argument(help="A benchmark folder (from 'pertbench benchmark').", show_default=False),
    ],
    crate: Annotated[
        bool, typer.Option("--crate/--no-crate", help="Also refresh ro-crate-metadata.json.")
    ] = True,
) -> None:
    """Write DIR/report.html (self-contained) and DIR/figures/*.png for a benchmark folder."""
    from pertbench.report import write_crate, write_report

    path = write_report(directory)
    if crate:
        write_crate(directory)
    echo(f"report: {path}")
