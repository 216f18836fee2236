"""Model commands: ``train``, ``predict`` and ``models``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer

from pertbench.cli.common import (
    ControlOpt,
    CovariatesOpt,
    DelimiterOpt,
    DeviceOpt,
    DoseKeyOpt,
    ExistingFile,
    MaxEpochsOpt,
    OverwriteOpt,
    PerturbationKeyOpt,
    ProgressOpt,
    SeedOpt,
    echo,
    make_keys,
    parse_set_options,
    read_data,
)

RUN_FILE = "run.json"
SPLIT_FILE = "split.csv"
LOG_FILE = "training_log.csv"


OutOfCoreOpt = Annotated[
    bool | None,
    typer.Option(
        "--out-of-core/--in-memory",
        help="Read the data by blocks of rows from disk, or load it whole. Default: out of "
        "core when X and the layers would take 1 GiB or more in memory.",
        show_default=False,
    ),
]


def _open_data(path: Path, keys, out_of_core: bool | None):
    """The dataset, loaded (in memory) or opened by rows (out of core, see --out-of-core)."""
    from pertbench.data.ondisk import open_h5ad, prefer_out_of_core

    if out_of_core is None:
        out_of_core = prefer_out_of_core(path)
    return open_h5ad(path, keys=keys) if out_of_core else read_data(path, keys)


def _versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from pertbench import __version__

    out = {"pertbench": __version__, "python": platform.python_version()}
    for package in ("torch", "numpy", "scipy", "pandas", "anndata"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _write_probe(estimator, adata, split, out: Path, seed: int) -> str | None:
    """Probe the basal latent of the split's held-out cells into ``out/probe.csv``.

    Returns the probed split parts (``val+test``), or ``None`` when the model has no basal
    latent or the split holds out no cells.
    """
    from pertbench.models.probe import HELD_OUT, PROBE_FILE, disentanglement_probe
    from pertbench.utils.io import write_csv_atomic

    parts = [part for part in HELD_OUT if (split == part).any()]
    if not parts:
        return None
    table = disentanglement_probe(estimator, adata, split, on=parts, seed=seed)
    if table is None:
        return None
    write_csv_atomic(out / PROBE_FILE, table)
    return "+".join(parts)


def model_listing() -> list[dict[str, Any]]:
    """Every installed model with its hyperparameters (default, type, help) and search space."""
    import dataclasses

    from pertbench.errors import PertbenchError
    from pertbench.models.registry import available_models, get_model_class, registered_models

    listing = []
    registry = registered_models()
    for name in available_models():
        try:
            cls = get_model_class(name)
        except (PertbenchError, ImportError):  # an optional extra that does not import
            continue
        if registry.get(name, "").split(":")[-1] != cls.__name__:
            continue
        params = []
        for field in dataclasses.fields(cls.Params):
            entry = {
                "name": field.name,
                "type": type(field.default).__name__,
                "default": field.default,
                "help": field.metadata.get("help", ""),
            }
            if "choices" in field.metadata:
                entry["choices"] = list(field.metadata["choices"])
            params.append(entry)
        listing.append(
            {
                "name": name,
                "description": cls.description,
                "input": cls.input_kind,
                "params": params,
                "search_space": cls.search_space,
            }
        )
    return listing


def register(app: typer.Typer) -> None:
    """Add the model commands to ``app``."""

    @app.command("train")
    def train_cmd(
        ctx: typer.Context,
        data: ExistingFile,
        model: Annotated[
            str, typer.Option("--model", "-m", help="Model name (see 'pertbench models').")
        ],
        split: Annotated[
            Path, typer.Option("--split", help="Split CSV (obs_name,split) from 'pertbench split'.")
        ],
        out: Annotated[
            Path,
            typer.Option(
                "--out",
                "-o",
                help="Run folder: saved model, training_log.csv, split.csv, run.json and probe.csv.",
            ),
        ],
        max_epochs: MaxEpochsOpt = None,
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="Hyperparameter as key=value; repeat for several (e.g. --set lr=1e-3).",
            ),
        ] = None,
        seed: SeedOpt = 0,
        device: DeviceOpt = "auto",
        progress: ProgressOpt = True,
        overwrite: OverwriteOpt = False,
        probe: Annotated[
            bool,
            typer.Option(
                "--probe/--no-probe",
                help="Write probe.csv: what a fresh classifier reads from the basal latent of "
                "the held-out (val + test) cells (models with a latent space).",
            ),
        ] = True,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        dose_key: DoseKeyOpt = None,
        out_of_core: OutOfCoreOpt = None,
        block_size: Annotated[
            int, typer.Option("--block-size", help="Out of core: consecutive cells per block.")
        ] = 1024,
        buffer_blocks: Annotated[
            int,
            typer.Option("--buffer-blocks", help="Out of core: blocks read and shuffled together."),
        ] = 64,
    ) -> None:
        """Train a model on the train cells of a split (early stopping on val) into a run folder."""
        import dataclasses

        from pertbench.data.ondisk import OnDiskData
        from pertbench.data.splits import read_split, write_split
        from pertbench.models.base import _jsonable
        from pertbench.models.blocks import BlockSampling
        from pertbench.models.registry import create_model
        from pertbench.utils.io import write_csv_atomic, write_json_atomic
        from pertbench.utils.outputs import check_output, new_folder

        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        # Validate the model name and hyperparameters before reading any data.
        estimator = create_model(model, keys=keys, **parse_set_options(set_))
        sampling = BlockSampling(block_size=block_size, buffer_blocks=buffer_blocks)
        check_output(out, kind="folder", inputs=[data, split], overwrite=overwrite)
        adata = _open_data(data, keys, out_of_core)
        on_disk = isinstance(adata, OnDiskData)
        split_series = read_split(split, adata.obs_names)
        started = _now()
        # an on-disk dataset is closed when training ends, however it ends
        with new_folder(out) as tmp, adata if on_disk else contextlib.nullcontext():
            estimator.fit(
                adata,
                split_series,
                seed=seed,
                device=device,
                max_epochs=max_epochs,
                progress=progress,
                log_dir=tmp,
                sampling=sampling,
            )
            estimator.save(tmp)
            if estimator.history is not None and not (tmp / LOG_FILE).exists():
                write_csv_atomic(tmp / LOG_FILE, estimator.history)
            write_split(split_series, tmp / SPLIT_FILE)
            probe_cells = _write_probe(estimator, adata, split_series, tmp, seed) if probe else None
            counts = split_series.value_counts()
            history = estimator.history
            run = {
                "command": ctx.command_path,
                "arguments": _jsonable({k: v for k, v in ctx.params.items()}),
                "model": estimator.name,
                "params": _jsonable(dataclasses.asdict(estimator.params)),
                "keys": keys.to_dict(),
                "seed": seed,
                "device": estimator.device,
                "data": str(Path(data).resolve()),
                "split": str(Path(split).resolve()),
                "n_cells": {s: int(counts.get(s, 0)) for s in ("train", "val", "test")},
                "data_loading": (
                    {"out_of_core": True, **dataclasses.asdict(sampling)}
                    if on_disk
                    else {"out_of_core": False}
                ),
                "epochs_trained": len(history) if history is not None else 0,
                "best_epoch": (
                    int(history.loc[history["best"], "epoch"].iloc[0])
                    if history is not None and "best" in history and history["best"].any()
                    else None
                ),
                "fit_seconds": estimator.fit_seconds,
                "probe": probe_cells,
                "started": started,
                "finished": _now(),
                "versions": _versions(),
            }
            write_json_atomic(tmp / RUN_FILE, run)
        best = run["best_epoch"]
        echo(
            f"trained {estimator.name} on {run['n_cells']['train']} cells for "
            f"{run['epochs_trained']} epoch(s)"
            + (f" (best epoch {best})" if best is not None else "")
            + f" in {estimator.fit_seconds:.1f}s -> {out}"
        )

    @app.command("predict")
    def predict_cmd(
        run_dir: Annotated[
            Path,
            typer.Argument(help="Run folder written by 'pertbench train'.", show_default=False),
        ],
        data: Annotated[
            Path, typer.Option("--data", help="Dataset (.h5ad) holding the control cells.")
        ],
        out: Annotated[
            Path, typer.Option("--out", "-o", help="Predictions (.h5ad), written atomically.")
        ],
        on: Annotated[
            str, typer.Option("--on", help="Which held-out groups to predict: test or val.")
        ] = "test",
        split: Annotated[
            Path | None,
            typer.Option("--split", help="Split CSV (default: the run's own split.csv)."),
        ] = None,
        seed: Annotated[
            int | None, typer.Option("--seed", help="Prediction seed (default: the training seed).")
        ] = None,
        model_class: Annotated[
            str | None,
            typer.Option(
                "--model-class",
                help="package.module:ClassName of a model that is not registered (a run "
                "folder never imports the code it names).",
            ),
        ] = None,
        device: DeviceOpt = "auto",
        overwrite: OverwriteOpt = False,
        out_of_core: OutOfCoreOpt = None,
        chunk_cells: Annotated[
            int,
            typer.Option(
                "--chunk-cells", help="Out of core: predicted cells made and written at a time."
            ),
        ] = 16_384,
    ) -> None:
        """Predict every held-out group of the split from its covariates' control cells.

        One predicted cell per control cell; obs carries the covariates, the perturbation
        and the control cell's name (control_obs_name). Out of core, only the control
        cells are read and the predictions are written chunk by chunk.
        """
        from pertbench.data.ondisk import OnDiskData
        from pertbench.data.splits import read_split
        from pertbench.errors import ConfigError, InputFileError
        from pertbench.models.base import PerturbationModel
        from pertbench.utils.io import write_h5ad_atomic
        from pertbench.utils.outputs import check_output

        if on not in ("test", "val"):
            raise ConfigError(f"--on must be test or val, got '{on}'")
        if not run_dir.is_dir():
            raise InputFileError(
                f"run folder '{run_dir}' does not exist; train with 'pertbench train'"
            )
        check_output(out, kind="file", inputs=[run_dir, data, split], overwrite=overwrite)
        estimator = PerturbationModel.load(run_dir, device=device, model_class=model_class)
        split_path = split if split is not None else run_dir / SPLIT_FILE
        if not split_path.is_file():
            raise InputFileError(f"no split file '{split_path}'; pass --split SPLIT.csv")
        adata = _open_data(data, estimator.keys, out_of_core)
        split_series = read_split(split_path, adata.obs_names)
        if isinstance(adata, OnDiskData):
            with adata:
                plan = estimator.split_plan(adata, split_series, on=on)
                estimator.predict_split_to_h5ad(
                    adata,
                    split_series,
                    out,
                    on=on,
                    seed=seed,
                    chunk_cells=chunk_cells,
                    uns={"run": str(run_dir.resolve())},
                )
            n_cells, n_groups = plan.n_cells, len(plan.requests)
        else:
            pred = estimator.predict_split(adata, split_series, on=on, seed=seed)
            pred.uns["pertbench"]["run"] = str(run_dir.resolve())
            write_h5ad_atomic(out, pred)
            n_cells, n_groups = (
                pred.n_obs,
                len(
                    pred.obs[
                        [*estimator.keys.covariate_keys, estimator.keys.perturbation_key]
                    ].drop_duplicates()
                ),
            )
        echo(f"predicted {n_cells} cells for {n_groups} {on} group(s) -> {out}")

    @app.command("models")
    def models_cmd(
        name: Annotated[
            str | None, typer.Argument(help="Show only this model.", show_default=False)
        ] = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="Print JSON instead of text.")
        ] = False,
    ) -> None:
        """List the models with their hyperparameters, defaults and help."""
        import json

        from pertbench.errors import ConfigError
        from pertbench.models.base import _jsonable

        listing = model_listing()
        if name is not None:
            listing = [m for m in listing if m["name"] == name]
            if not listing:
                known = ", ".join(m["name"] for m in model_listing())
                raise ConfigError(f"unknown model '{name}'; available: {known}")
        if as_json:
            typer.echo(json.dumps(_jsonable(listing), indent=2))
            return
        for entry in listing:
            echo(f"{entry['name']}: {entry['description']}")
            for p in entry["params"]:
                choices = f" [{' | '.join(map(str, p['choices']))}]" if "choices" in p else ""
                echo(f"    {p['name']} = {p['default']!r} ({p['type']}){choices}: {p['help']}")
            if entry["search_space"]:
                echo(f"    tuned: {', '.join(entry['search_space'])}")
            echo("")
