"""Data commands: simulate, preprocess, split, scenario, datasets, info."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pertbench.cli.common import (
    ControlOpt,
    CovariatesOpt,
    DelimiterOpt,
    DoseKeyOpt,
    ExistingFile,
    OverwriteOpt,
    PerturbationKeyOpt,
    SeedOpt,
    echo,
    make_keys,
    read_data,
)

OutFile = Annotated[Path, typer.Option("--out", "-o", help="Output file (written atomically).")]
OnCountsOpt = Annotated[
    str,
    typer.Option(
        "--on-counts",
        help="If X holds raw counts: normalize (log1p of 1e4-normalised, with a warning), "
        "error, or allow.",
    ),
]


def _load_obs(path: Path, keys):
    """A dataset for commands that use only obs: a large file (the out-of-core rule of
    ``pertbench train``) is validated chunk by chunk and only its obs and var are kept."""
    from pertbench.data.ondisk import prefer_out_of_core, read_obs

    return read_obs(path, keys=keys) if prefer_out_of_core(path) else read_data(path, keys)


def _csv_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def register(app: typer.Typer) -> None:
    """Add the data commands to ``app``."""

    @app.command("info")
    def info_cmd(
        data: ExistingFile,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        dose_key: DoseKeyOpt = None,
        max_rows: Annotated[int, typer.Option(help="Rows of the group table to print.")] = 200,
    ) -> None:
        """Describe a dataset: cells per covariate x perturbation, controls, value type, problems.

        Exits 2 when a fatal problem is found (the report is printed first).
        """
        import anndata as ad  # noqa: F401  (fail fast on a broken install)

        from pertbench.data.loading import read_h5ad, validate_adata
        from pertbench.errors import DataValidationError

        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        adata = read_h5ad(data, keys=keys, validate=False, on_counts="allow")
        report = validate_adata(adata, keys=keys, expect="any", raise_errors=False)
        if report.value_type == "counts":
            report.warnings.insert(
                0,
                "X holds raw counts; pertbench normalises them on load (or run "
                "'pertbench preprocess')",
            )
        echo(f"{data}")
        echo(report.to_text())
        if len(report.groups):
            table = report.groups.drop(columns=["is_control"])
            if keys.covariate_keys:
                wide = table.pivot_table(
                    index=keys.perturbation_key,
                    columns=list(keys.covariate_keys),
                    values="n_cells",
                    aggfunc="sum",
                    fill_value=0,
                    observed=True,
                )
                echo("cells per perturbation (rows) x covariates (columns):")
                echo(wide.to_string(max_rows=max_rows))
            else:
                echo(table.to_string(index=False, max_rows=max_rows))
        if report.errors:
            raise DataValidationError(
                f"{len(report.errors)} problem(s) found in {data.name}: {report.errors[0]}"
            )

    @app.command("simulate")
    def simulate_cmd(
        out: OutFile,
        n_covariates: Annotated[int, typer.Option(help="Cell types / lines.")] = 3,
        n_perturbations: Annotated[int, typer.Option(help="Single perturbations.")] = 20,
        n_combinations: Annotated[int, typer.Option(help="Measured pairs of singles.")] = 10,
        n_cells_per_group: Annotated[int, typer.Option(help="Cells per group.")] = 50,
        n_control_cells: Annotated[
            int | None, typer.Option(help="Controls per covariate (default 2x group size).")
        ] = None,
        n_genes: Annotated[int, typer.Option(help="Genes.")] = 500,
        program_size: Annotated[
            float, typer.Option(help="Fraction of genes each perturbation affects.")
        ] = 0.05,
        effect_scale: Annotated[float, typer.Option(help="Effect size sd (log scale).")] = 1.0,
        modulation_sd: Annotated[
            float, typer.Option(help="Covariate-specific modulation of effects (log sd).")
        ] = 0.3,
        interaction_fraction: Annotated[
            float, typer.Option(help="Share of measured pairs that interact (Norman 2019: 0.82).")
        ] = 0.82,
        interaction_classes: Annotated[
            str | None,
            typer.Option(
                help="Weights of the non-additive classes, e.g. 'synergy=2,epistasis=1' "
                "(default Norman 2019: synergy=30,buffering=8,suppression=12,epistasis=9,"
                "neomorphic=13)."
            ),
        ] = None,
        interaction_strength: Annotated[
            float, typer.Option(help="Scale of the departures from additivity (0: additive).")
        ] = 1.0,
        interaction_scale: Annotated[
            float, typer.Option(help="Sd of an extra sparse random interaction term (0: off).")
        ] = 0.0,
        library_size: Annotated[float, typer.Option(help="Mean counts per cell.")] = 1000.0,
        dispersion: Annotated[float, typer.Option(help="Negative binomial dispersion.")] = 0.2,
        imbalance: Annotated[float, typer.Option(help="Log-normal sd of group sizes.")] = 0.0,
        missing_fraction: Annotated[
            float, typer.Option(help="Share of covariate x perturbation groups not measured.")
        ] = 0.0,
        doses: Annotated[
            str | None, typer.Option(help="Comma-separated dose levels (adds obs 'dose').")
        ] = None,
        n_studies: Annotated[
            int, typer.Option(help="Studies with a batch shift (adds obs 'study').")
        ] = 1,
        perturbation_type: Annotated[str, typer.Option(help="genetic or chemical.")] = "genetic",
        n_jobs: Annotated[int, typer.Option(help="Threads drawing chunks.")] = 1,
        stream: Annotated[
            bool,
            typer.Option(help="Write chunk by chunk to disk (constant memory, for huge data)."),
        ] = False,
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Simulate count data with known per-group effects (see docs/data.md)."""
        from pertbench.data.simulate import simulate, simulate_to_h5ad
        from pertbench.errors import ConfigError
        from pertbench.utils.io import write_h5ad_atomic
        from pertbench.utils.outputs import check_output

        check_output(out, kind="file", overwrite=overwrite)

        try:
            dose_values = [float(d) for d in _csv_list(doses)] if doses else None
        except ValueError as exc:
            raise ConfigError(f"--doses must be comma-separated numbers, got '{doses}'") from exc
        class_weights = None
        if interaction_classes:
            try:
                pairs = [item.split("=", 1) for item in _csv_list(interaction_classes) or []]
                class_weights = {name.strip(): float(value) for name, value in pairs}
            except ValueError as exc:
                raise ConfigError(
                    "--interaction-classes must be comma-separated name=weight pairs, got "
                    f"'{interaction_classes}'"
                ) from exc
        options = dict(
            n_covariates=n_covariates,
            n_perturbations=n_perturbations,
            n_combinations=n_combinations,
            n_cells_per_group=n_cells_per_group,
            n_control_cells=n_control_cells,
            n_genes=n_genes,
            program_size=program_size,
            effect_scale=effect_scale,
            modulation_sd=modulation_sd,
            interaction_fraction=interaction_fraction,
            interaction_classes=class_weights,
            interaction_strength=interaction_strength,
            interaction_scale=interaction_scale,
            library_size=library_size,
            dispersion=dispersion,
            imbalance=imbalance,
            missing_fraction=missing_fraction,
            doses=dose_values,
            n_studies=n_studies,
            perturbation_type=perturbation_type,
            n_jobs=n_jobs,
            seed=seed,
        )
        if stream:
            simulate_to_h5ad(out, **options)
            echo(f"wrote {out}")
            return
        adata = simulate(**options)
        write_h5ad_atomic(out, adata)
        echo(
            f"wrote {out}: {adata.n_obs:,} cells x {adata.n_vars:,} genes, "
            f"{adata.obs['condition'].nunique() - 1} perturbations, "
            f"{100 * adata.X.nnz / max(adata.n_obs * adata.n_vars, 1):.1f}% non-zero"
        )

    @app.command("preprocess")
    def preprocess_cmd(
        data: ExistingFile,
        out: OutFile,
        n_top_genes: Annotated[int, typer.Option(help="Highly variable genes (0: none).")] = 4000,
        n_de_genes: Annotated[
            int, typer.Option(help="DE genes per perturbation and covariates (0: none).")
        ] = 25,
        hvg_mode: Annotated[
            str, typer.Option(help="batch (scanpy batch-aware, PerturBench) or union.")
        ] = "batch",
        de_method: Annotated[str, typer.Option(help="scanpy rank_genes_groups method.")] = "t-test",
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        dose_key: DoseKeyOpt = None,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Normalise counts (1e4 + log1p) and keep HVGs + top DE genes + perturbed genes."""
        from pertbench.data.preprocess import PREPROCESS_KEY, preprocess
        from pertbench.utils.io import write_h5ad_atomic
        from pertbench.utils.outputs import check_output

        check_output(out, kind="file", inputs=[data], overwrite=overwrite)
        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        adata = read_data(data, keys, validate=False, on_counts="allow")
        result = preprocess(
            adata,
            keys=keys,
            n_top_genes=n_top_genes,
            n_de_genes=n_de_genes,
            hvg_mode=hvg_mode,
            de_method=de_method,
        )
        write_h5ad_atomic(out, result)
        info = result.uns[PREPROCESS_KEY]
        echo(
            f"wrote {out}: {result.n_obs:,} cells x {info['n_genes_out']:,} genes "
            f"(from {info['n_genes_in']:,}; input {info['input']}; {info['n_hvg']} HVGs "
            f"[{info['hvg_flavor']}], {info['n_de']} DE genes, {info['n_perturbed']} perturbed genes)"
        )
        if len(info["de_skipped"]):
            echo(f"note: {len(info['de_skipped'])} group(s) too small for DE were skipped")

    @app.command("split")
    def split_cmd(
        data: ExistingFile,
        out: OutFile,
        task: Annotated[
            str,
            typer.Option(
                help="transfer, combo, combo_inverse, celltype, unseen, fewshot or custom."
            ),
        ] = "transfer",
        fraction: Annotated[
            float | None,
            typer.Option(
                help="Share held out: per covariate (transfer, default 0.3), of eligible "
                "combinations (combo, 0.7), singles (combo_inverse, 0.3) or singles held "
                "out in every covariate (unseen, 0.3)."
            ),
        ] = None,
        combo_fraction: Annotated[
            float | None,
            typer.Option(
                help="unseen: share of the other combinations held out (default --fraction)."
            ),
        ] = None,
        heldout_perturbations: Annotated[
            str | None,
            typer.Option(
                help="unseen: comma-separated perturbations to hold out (instead of a draw)."
            ),
        ] = None,
        candidates: Annotated[
            str | None,
            typer.Option(help="unseen: comma-separated singles to draw the held-out ones from."),
        ] = None,
        target: Annotated[
            str | None,
            typer.Option(help="fewshot: the target covariate (e.g. A172)."),
        ] = None,
        n_shots: Annotated[
            int | None,
            typer.Option(help="fewshot: perturbations of the target kept in train (default 3)."),
        ] = None,
        shots: Annotated[
            str | None,
            typer.Option(
                help="fewshot: comma-separated perturbations of the target kept in train."
            ),
        ] = None,
        heldout_covariates: Annotated[
            str | None,
            typer.Option(help="transfer: comma-separated covariates to hold out in (default all)."),
        ] = None,
        max_heldout_covariates: Annotated[
            int, typer.Option(help="transfer: most covariates a perturbation is held out in.")
        ] = 1,
        min_train_covariates: Annotated[
            int,
            typer.Option(help="transfer: fewest training covariates per held-out perturbation."),
        ] = 1,
        val_fraction: Annotated[
            float | None,
            typer.Option(
                help="Share of held-out groups in val (rest test; default 0.5); celltype: share "
                "of each training group's cells in val (default 0.1)."
            ),
        ] = None,
        heldout: Annotated[
            str | None, typer.Option(help="celltype: the covariate value to hold out, e.g. CD4T.")
        ] = None,
        split_file: Annotated[
            Path | None, typer.Option("--split-file", help="custom: the split CSV to check.")
        ] = None,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        dose_key: DoseKeyOpt = None,
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Build a task split, print its summary and unplaced groups, write obs_name,split CSV."""
        from pertbench.data.splits import make_task_split
        from pertbench.errors import ConfigError, SplitError
        from pertbench.utils.outputs import check_output

        check_output(out, kind="file", inputs=[data, split_file], overwrite=overwrite)
        keys = make_keys(perturbation_key, control, covariates, delimiter, dose_key)
        adata = _load_obs(data, keys)
        options: dict = {}
        if task == "transfer":
            options.update(
                heldout_covariates=_csv_list(heldout_covariates),
                max_heldout_covariates=max_heldout_covariates,
                min_train_covariates=min_train_covariates,
            )
        elif heldout_covariates is not None:
            raise ConfigError("--heldout-covariates only applies to --task transfer")
        task_only = {
            "unseen": {
                "combo_fraction": combo_fraction,
                "heldout_perturbations": _csv_list(heldout_perturbations),
                "candidates": _csv_list(candidates),
            },
            "fewshot": {"target": target, "n_shots": n_shots, "shots": _csv_list(shots)},
        }
        for owner, values in task_only.items():
            given = {k: v for k, v in values.items() if v is not None}
            if given and task != owner:
                flags = ", ".join("--" + k.replace("_", "-") for k in given)
                raise ConfigError(f"{flags} only apply to --task {owner}")
            options.update(given if task == owner else {})
        if task == "fewshot" and target is None:
            raise ConfigError("--task fewshot needs --target COVARIATE (e.g. --target A172)")
        if task == "celltype":
            if not heldout:
                raise ConfigError("--task celltype needs --heldout VALUE (e.g. --heldout CD4T)")
            options["heldout"] = heldout
        if task == "custom":
            if split_file is None:
                raise ConfigError("--task custom needs --split-file FILE.csv")
            options["path"] = split_file
        if fraction is not None:
            if task in ("celltype", "custom", "fewshot"):
                raise ConfigError(f"--fraction does not apply to --task {task}")
            options["fraction"] = fraction
        if val_fraction is not None:
            if task == "custom":
                raise ConfigError("--val-fraction does not apply to --task custom")
            options["val_fraction"] = val_fraction
        result = make_task_split(adata, task, keys=keys, seed=seed, **options)
        echo(result.to_text())
        leak = result.leakage()
        if len(leak):
            raise SplitError(
                f"the split leaks {len(leak)} held-out pair(s) into train (e.g. "
                f"{'/'.join(map(str, leak.iloc[0, :-2]))}); not written"
            )
        result.write(out)
        echo(f"wrote {out}")

    scenario_app = typer.Typer(
        help="Benchmark scenarios: imbalance, downsample, scaling.", no_args_is_help=True
    )
    app.add_typer(scenario_app, name="scenario")

    @scenario_app.command("imbalance")
    def scenario_imbalance(
        data: ExistingFile,
        out: OutFile,
        target_entropy: Annotated[
            float, typer.Option(help="Normalised entropy to reach (PerturBench: 1, 0.9, 0.8, 0.7).")
        ],
        reference_covariate: Annotated[
            str | None, typer.Option(help="Covariate that keeps all perturbations.")
        ] = None,
        min_perturbations: Annotated[
            int, typer.Option(help="Fewest perturbations kept per covariate.")
        ] = 30,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Subsample perturbations per covariate to a target normalised entropy; write the data."""
        from pertbench.data.scenarios import imbalance_by_entropy
        from pertbench.utils.io import write_h5ad_atomic
        from pertbench.utils.outputs import check_output

        check_output(out, kind="file", inputs=[data], overwrite=overwrite)

        keys = make_keys(perturbation_key, control, covariates, delimiter)
        adata = read_data(data, keys)
        result = imbalance_by_entropy(
            adata,
            keys=keys,
            target_entropy=target_entropy,
            reference_covariate=reference_covariate,
            min_perturbations=min_perturbations,
            seed=seed,
        )
        write_h5ad_atomic(out, result)
        info = result.uns["pertbench_scenario"]
        echo(
            f"wrote {out}: {result.n_obs:,} cells; entropy {info['perturbation_entropy']:.3f} "
            f"(target {target_entropy}); perturbations per covariate: "
            + ", ".join(f"{k} {v}" for k, v in info["perturbations_per_covariate"].items())
        )

    @scenario_app.command("downsample")
    def scenario_downsample(
        data: ExistingFile,
        out: OutFile,
        fraction: Annotated[
            float, typer.Option(help="Share of perturbed cells kept per cell type.")
        ] = 0.2,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Keep all controls and a fraction of perturbed cells per cell type; write the data."""
        from pertbench.data.scenarios import downsample_perturbed
        from pertbench.utils.io import write_h5ad_atomic
        from pertbench.utils.outputs import check_output

        check_output(out, kind="file", inputs=[data], overwrite=overwrite)

        keys = make_keys(perturbation_key, control, covariates, delimiter)
        adata = read_data(data, keys)
        result = downsample_perturbed(adata, keys=keys, fraction=fraction, seed=seed)
        write_h5ad_atomic(out, result)
        info = result.uns["pertbench_scenario"]
        echo(
            f"wrote {out}: {info['n_cells_after']:,} of {info['n_cells_before']:,} cells; "
            f"cell entropy {info['cell_entropy_before']:.3f} -> {info['cell_entropy']:.3f}"
        )

    @scenario_app.command("scaling")
    def scenario_scaling(
        data: ExistingFile,
        out_dir: Annotated[
            Path, typer.Option("--out-dir", help="Folder for level1.csv, level2.csv, ...")
        ],
        heldout_covariates: Annotated[
            str, typer.Option(help="Comma-separated covariates whose perturbations are held out.")
        ],
        n_levels: Annotated[int, typer.Option(help="Nested training levels.")] = 3,
        fraction: Annotated[
            float, typer.Option(help="Share of perturbations held out per held-out covariate.")
        ] = 0.7,
        perturbation_key: PerturbationKeyOpt = "condition",
        control: ControlOpt = "control",
        covariates: CovariatesOpt = "cell_type",
        delimiter: DelimiterOpt = "+",
        seed: SeedOpt = 0,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Nested training sets with more covariates, same val/test; one split CSV per level."""
        from pertbench.data.scenarios import data_scaling_splits
        from pertbench.utils.outputs import check_output, new_folder

        check_output(out_dir, kind="folder", inputs=[data], overwrite=overwrite, option="--out-dir")
        keys = make_keys(perturbation_key, control, covariates, delimiter)
        adata = read_data(data, keys)
        levels = data_scaling_splits(
            adata,
            keys=keys,
            heldout_covariates=_csv_list(heldout_covariates) or [],
            n_levels=n_levels,
            fraction=fraction,
            seed=seed,
        )
        with new_folder(out_dir) as tmp:
            for name, result in levels.items():
                result.write(tmp / f"{name}.csv")
        for name, result in levels.items():
            path = out_dir / f"{name}.csv"
            p = result.params
            echo(
                f"{path}: {p['n_train_cells']:,} training cells from "
                f"{', '.join(p['training_covariates'])}; entropy {p['perturbation_entropy']:.3f}"
                + (
                    f"; {p['unsupported_heldout_pairs']} held-out pair(s) without training support"
                    if p["unsupported_heldout_pairs"]
                    else ""
                )
            )

    datasets_app = typer.Typer(
        help="Public datasets: list, info, fetch (download + curate).", no_args_is_help=True
    )
    app.add_typer(datasets_app, name="datasets")

    @datasets_app.command("list")
    def datasets_list() -> None:
        """List the registered public datasets and whether they are cached."""
        from pertbench.data.public import cache_dir, list_datasets

        table = list_datasets()
        echo(table.drop(columns=["url"]).to_string(index=False))
        echo(f"cache: {cache_dir()}")

    @datasets_app.command("info")
    def datasets_info(name: Annotated[str, typer.Argument(help="Dataset name.")]) -> None:
        """Show a dataset's source, citation, checksum and the keys to use with it."""
        from pertbench.data.public import dataset_info

        for key, value in dataset_info(name).to_dict().items():
            echo(f"{key}: {value}")

    @datasets_app.command("fetch")
    def datasets_fetch(
        name: Annotated[str, typer.Argument(help="Dataset name.")],
        from_file: Annotated[
            Path | None,
            typer.Option("--from-file", help="Curate this raw file instead of downloading."),
        ] = None,
        force: Annotated[
            bool,
            typer.Option(
                "--force",
                "--overwrite",
                help="Download and curate again, replacing the cached copy.",
            ),
        ] = False,
        progress: Annotated[bool, typer.Option(help="Show a download progress bar.")] = True,
    ) -> None:
        """Download (or take --from-file), curate to the data contract and cache a dataset."""
        from pertbench.data.public import dataset_info, fetch

        path = fetch(name, from_file=from_file, force=force, progress=progress)
        keys = dataset_info(name).keys
        echo(f"curated {name}: {path}")
        echo(
            f"use with: --perturbation-key {keys.perturbation_key} --control {keys.control} "
            f"--covariates {','.join(keys.covariate_keys)}"
            + (f" --dose-key {keys.dose_key}" if keys.dose_key else "")
        )
