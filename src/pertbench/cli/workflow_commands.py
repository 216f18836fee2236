"""Workflow commands: ``celltype-transfer``, ``sensitivity`` and ``cross-study``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from pertbench.cli.common import (
    DeviceOpt,
    ExistingFile,
    MaxEpochsOpt,
    OverwriteOpt,
    ProgressOpt,
    SeedOpt,
    echo,
    read_data,
)

ConditionKeyOpt = Annotated[
    str, typer.Option("--condition-key", help="obs column with the condition of each cell.")
]
ControlLabelOpt = Annotated[
    str, typer.Option("--control", help="Label of control cells in the condition column.")
]
StimulatedOpt = Annotated[
    str | None,
    typer.Option(
        "--stimulated",
        help="Label of the perturbed cells to predict (default: the only non-control label).",
    ),
]
CellTypeKeyOpt = Annotated[
    str, typer.Option("--cell-type-key", help="obs column with the cell type of each cell.")
]
OutOpt = Annotated[
    Path,
    typer.Option(
        "--out",
        help="Output folder (created; reruns resume and add their rows to its tables).",
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Model hyperparameter as MODEL.NAME=VALUE, e.g. --set scgen.n_latent=50 (repeatable).",
    ),
]
ValFractionOpt = Annotated[
    float,
    typer.Option("--val-fraction", help="Share of each training group used for early stopping."),
]
BootstrapOpt = Annotated[
    int, typer.Option("--n-bootstrap", help="Bootstrap draws of the R^2/MSE/Pearson metrics.")
]
FiguresOpt = Annotated[bool, typer.Option("--figures/--no-figures", help="Write the figures.")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume/--no-resume", help="Keep finished results with the same settings (default)."
    ),
]
BaselinesOpt = Annotated[
    str,
    typer.Option(
        "--baselines", help="Comma-separated baselines scored beside the models ('' for none)."
    ),
]


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _model_params(values: list[str] | None, models: tuple[str, ...]) -> dict[str, dict[str, str]]:
    from pertbench.cli.common import parse_set_options
    from pertbench.errors import ConfigError

    out: dict[str, dict[str, str]] = {}
    for key, value in parse_set_options(values).items():
        if "." not in key:
            raise ConfigError(
                f"--set expects MODEL.NAME=VALUE (e.g. scgen.n_latent=50), got '{key}'"
            )
        model, name = key.split(".", 1)
        if model not in models:
            raise ConfigError(
                f"--set names model '{model}', which is not run ({', '.join(models)})"
            )
        out.setdefault(model, {})[name] = value
    return out


def _keys(condition_key: str, control: str, cell_type_key: str):
    from pertbench.data.keys import PerturbationKeys

    return PerturbationKeys(
        perturbation_key=condition_key, control=control, covariate_keys=(cell_type_key,)
    )


@contextlib.contextmanager
def _workflow_output(out: Path, data: Path, overwrite: bool) -> Iterator[Path]:
    """The output policy of the accumulating workflows: ``out`` resumes (``--overwrite``
    starts afresh) and a first run that fails before any result leaves no folder behind."""
    from pertbench.utils.outputs import check_output, results_folder

    check_output(out, kind="resumable", inputs=[data], overwrite=overwrite)
    with results_folder(
        out, overwrite=overwrite, has_results=lambda folder: any(folder.rglob("metrics.csv"))
    ) as folder:
        yield folder


def _options(
    models, baselines, sets, epochs, seed, val_fraction, n_bootstrap, figures, device, progress
):
    from pertbench.models.base import PerturbationModel  # noqa: F401  (fail early on torch)
    from pertbench.workflows.celltype_transfer import TransferOptions

    return TransferOptions(
        models=models,
        baselines=baselines,
        model_params=_model_params(sets, (*models, *baselines)),
        epochs=epochs,
        seed=seed,
        val_fraction=val_fraction,
        n_bootstrap=n_bootstrap,
        figures=figures,
        device=device,
        progress=progress,
    )


def _summary(
    table, columns=("r2", "pearson_delta", "edistance", "jaccard_top100", "train_seconds")
):
    import pandas as pd

    cols = [c for c in columns if c in table.columns]
    with pd.option_context("display.width", 140, "display.max_rows", 200):
        echo(table[["model", "cell_type", *cols]].round(4).to_string(index=False))


def _shared(out: Path, keys, stimulated, options, resume) -> dict:
    """Keyword arguments every workflow function takes from the command line."""
    return dict(
        out_dir=out, keys=keys, stimulated=stimulated, options=options, resume=resume, log=echo
    )


def _run_celltype_transfer(data, keys, options, out, cell_type, stimulated, imbalance, resume):
    """Read the data and run the held-out cell-type workflow (with --imbalance: both scenarios)."""
    import time

    from pertbench.workflows.celltype_transfer import celltype_transfer
    from pertbench.workflows.experiments import imbalance_experiment

    adata = read_data(data, keys)
    start = time.perf_counter()
    shared = _shared(out, keys, stimulated, options, resume)
    if imbalance is None:
        table = celltype_transfer(adata, cell_types=cell_type, **shared)
        _summary(table)
        echo(f"wrote {out / 'metrics.csv'} ({time.perf_counter() - start:.1f}s)")
    else:
        comparison = imbalance_experiment(adata, fraction=imbalance, cell_types=cell_type, **shared)
        cols = [c for c in comparison.columns if c.startswith(("r2_", "edistance_"))]
        echo(comparison[["model", "cell_type", *cols]].round(4).to_string(index=False))
        echo(f"wrote {out / 'imbalance_comparison.csv'} ({time.perf_counter() - start:.1f}s)")


def register(app: typer.Typer) -> None:
    @app.command("celltype-transfer")
    def celltype_transfer_command(
        data: ExistingFile,
        cell_type: Annotated[
            str,
            typer.Option(
                "--cell-type",
                help="Cell type to hold out, a comma-separated list, or 'all' for each in turn.",
            ),
        ],
        out: OutOpt,
        models: Annotated[
            str, typer.Option("--models", help="Comma-separated models to train.")
        ] = "scgen,scpram",
        baselines: BaselinesOpt = "no_change,perturbation_mean",
        condition_key: ConditionKeyOpt = "condition",
        control: ControlLabelOpt = "control",
        stimulated: StimulatedOpt = None,
        cell_type_key: CellTypeKeyOpt = "cell_type",
        epochs: MaxEpochsOpt = None,
        seed: SeedOpt = 0,
        sets: SetOpt = None,
        imbalance: Annotated[
            float | None,
            typer.Option(
                "--imbalance",
                help="Also run on data keeping all controls and this fraction of perturbed "
                "cells per type (e.g. 0.2), and write a balanced-vs-imbalanced table.",
            ),
        ] = None,
        val_fraction: ValFractionOpt = 0.1,
        n_bootstrap: BootstrapOpt = 100,
        figures: FiguresOpt = True,
        resume: ResumeOpt = True,
        overwrite: OverwriteOpt = False,
        device: DeviceOpt = "auto",
        progress: ProgressOpt = False,
    ) -> None:
        """Predict a held-out cell type's perturbed state (scGen/scPRAM tutorial task).

        Trains each model with the cell type's perturbed cells held out, predicts them from
        its controls, scores with the tutorial metrics beside the no_change and
        perturbation_mean baselines, and writes OUT/metrics.csv and figures. Reruns keep
        finished (model, cell type) results and add new ones to metrics.csv.
        """
        keys = _keys(condition_key, control, cell_type_key)
        options = _options(
            _split_names(models),
            _split_names(baselines),
            sets,
            epochs,
            seed,
            val_fraction,
            n_bootstrap,
            figures,
            device,
            progress,
        )
        options.validate()
        with _workflow_output(out, data, overwrite):
            _run_celltype_transfer(
                data, keys, options, out, cell_type, stimulated, imbalance, resume
            )

    @app.command("sensitivity")
    def sensitivity_command(
        data: ExistingFile,
        out: OutOpt,
        model: Annotated[
            str, typer.Option("--model", help="Model whose hyperparameters vary.")
        ] = "scgen",
        grid: Annotated[
            list[str] | None,
            typer.Option(
                "--grid",
                help="A varied hyperparameter as NAME=V1,V2,... (repeatable). Default: scgen "
                "n_layers x dropout, scpram n_latent x ratio (3 x 3).",
            ),
        ] = None,
        cell_type: Annotated[
            str,
            typer.Option("--cell-type", help="Held-out cell type(s), comma-separated, or 'all'."),
        ] = "all",
        condition_key: ConditionKeyOpt = "condition",
        control: ControlLabelOpt = "control",
        stimulated: StimulatedOpt = None,
        cell_type_key: CellTypeKeyOpt = "cell_type",
        epochs: MaxEpochsOpt = None,
        seed: SeedOpt = 0,
        sets: SetOpt = None,
        val_fraction: ValFractionOpt = 0.1,
        n_bootstrap: BootstrapOpt = 100,
        figures: FiguresOpt = True,
        resume: ResumeOpt = True,
        overwrite: OverwriteOpt = False,
        device: DeviceOpt = "auto",
        progress: ProgressOpt = False,
    ) -> None:
        """Hyperparameter sensitivity on the held-out cell-type task (tutorial grid).

        Runs every grid configuration (resumable), writes OUT/sensitivity.csv and
        OUT/sensitivity_importance.csv: per metric, the share of its variance explained by
        each parameter's main effect, and the most influential parameter.
        """
        from pertbench.workflows.experiments import parse_grid, sensitivity_experiment

        keys = _keys(condition_key, control, cell_type_key)
        options = _options(
            (model,), (), sets, epochs, seed, val_fraction, n_bootstrap, figures, device, progress
        )
        options.validate()
        parsed = parse_grid(grid, model)
        with _workflow_output(out, data, overwrite):
            _, importance = sensitivity_experiment(
                read_data(data, keys),
                model=model,
                grid=parsed,
                cell_types=cell_type,
                **_shared(out, keys, stimulated, options, resume),
            )
        echo(importance.round(3).to_string(index=False))
        echo(f"wrote {out / 'sensitivity_importance.csv'}")

    @app.command("cross-study")
    def cross_study_command(
        data: ExistingFile,
        out: OutOpt,
        train_study: Annotated[str, typer.Option("--train-study", help="Study to train on (A).")],
        test_study: Annotated[
            str, typer.Option("--test-study", help="Study whose controls are perturbed (B).")
        ],
        study_key: Annotated[
            str, typer.Option("--study-key", help="obs column naming the study of each cell.")
        ] = "study",
        models: Annotated[
            str, typer.Option("--models", help="Comma-separated models to train.")
        ] = "scgen,scpram",
        baselines: BaselinesOpt = "no_change,perturbation_mean",
        condition_key: ConditionKeyOpt = "condition",
        control: ControlLabelOpt = "control",
        stimulated: StimulatedOpt = None,
        cell_type_key: CellTypeKeyOpt = "cell_type",
        epochs: MaxEpochsOpt = None,
        seed: SeedOpt = 0,
        sets: SetOpt = None,
        n_bootstrap: BootstrapOpt = 100,
        figures: FiguresOpt = True,
        resume: ResumeOpt = True,
        overwrite: OverwriteOpt = False,
        device: DeviceOpt = "auto",
        progress: ProgressOpt = False,
    ) -> None:
        """Train on study A, predict the perturbed state of study B's controls.

        scGen applies A's latent delta to B's controls; scPRAM attends from B's controls to
        A's reference controls. Scored per cell type of B against B's real perturbed cells;
        writes OUT/metrics.csv, figures and OUT/attention.csv.
        """
        from pertbench.workflows.experiments import cross_study_transfer

        keys = _keys(condition_key, control, cell_type_key)
        options = _options(
            _split_names(models),
            _split_names(baselines),
            sets,
            epochs,
            seed,
            0.1,
            n_bootstrap,
            figures,
            device,
            progress,
        )
        options.validate()
        with _workflow_output(out, data, overwrite):
            table = cross_study_transfer(
                read_data(data, keys),
                study_key=study_key,
                train_study=train_study,
                test_study=test_study,
                **_shared(out, keys, stimulated, options, resume),
            )
        _summary(table)
        echo(f"wrote {out / 'metrics.csv'}")
