"""Options shared by many commands, and how the CLI reports errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pertbench.data.keys import PerturbationKeys

PerturbationKeyOpt = Annotated[
    str, typer.Option("--perturbation-key", help="obs column with the perturbation of each cell.")
]
ControlOpt = Annotated[
    str, typer.Option("--control", help="Label of control cells in the perturbation column.")
]
CovariatesOpt = Annotated[
    str,
    typer.Option("--covariates", help="Comma-separated obs columns defining biological states."),
]
DelimiterOpt = Annotated[
    str, typer.Option("--delimiter", help="Joins the parts of a combination, e.g. A+B.")
]
DoseKeyOpt = Annotated[
    str | None, typer.Option("--dose-key", help="Optional obs column with the dose.")
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Random seed; the same seed gives the same result.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (GPU when present), cpu or cuda.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
ExistingFile = Annotated[Path, typer.Argument(help="Input .h5ad file.", show_default=False)]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an existing output (without it, existing outputs are kept)."
    ),
]
MaxEpochsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-epochs",
        "--epochs",
        help="Epoch limit of every training run (default: each model's own); early stopping "
        "may end sooner.",
    ),
]


def make_keys(
    perturbation_key: str = "condition",
    control: str = "control",
    covariates: str = "cell_type",
    delimiter: str = "+",
    dose_key: str | None = None,
) -> PerturbationKeys:
    """Build :class:`PerturbationKeys` from the shared CLI options."""
    return PerturbationKeys(
        perturbation_key=perturbation_key,
        control=control,
        delimiter=delimiter,
        covariate_keys=covariates,
        dose_key=dose_key or None,
    )


def parse_set_options(values: list[str] | None) -> dict[str, str]:
    """Parse repeated ``--set key=value`` options into a dict (values stay strings)."""
    from pertbench.errors import ConfigError

    out: dict[str, str] = {}
    for item in values or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        out[key] = value.strip()
    return out


def read_data(path: Path, keys: PerturbationKeys, **options: Any):
    """Read and validate an .h5ad (:func:`pertbench.data.read_h5ad`); data warnings are
    printed as one ``warning:`` line each."""
    import warnings

    from pertbench.data.loading import DataWarning, read_h5ad

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        adata = read_h5ad(path, keys=keys, **options)
    for w in caught:
        if issubclass(w.category, DataWarning):
            typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return adata


def echo(message: str) -> None:
    """Print a status line to stdout."""
    typer.echo(message)
