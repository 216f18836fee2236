"""Package a benchmark directory as an RO-Crate (``ro-crate-metadata.json``).

The crate describes the run so that others can find, check and re-run it (FAIR):

- the input datasets with their SHA-256 checksums (files outside the directory are
  referenced by absolute ``file://`` URI, never copied);
- the exact configuration (``config.yaml``; ``pertbench benchmark config.yaml --out NEW``
  re-runs it) and the manifest of materialised inputs;
- every split file with its checksum;
- the results table, failures, the report and its figures, and the per-cell and tuning
  folders;
- the software: pertbench and the libraries the numbers depend on, with versions;
- one ``CreateAction`` (the run) linking the instrument (pertbench), its inputs (object)
  and its outputs (result), following the Workflow Run RO-Crate conventions.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pertbench.benchmark import paths
from pertbench.benchmark.materialize import read_manifest
from pertbench.metrics.collapse import COLLAPSE_FILE
from pertbench.models.probe import PROBE_FILE
from pertbench.utils.io import write_text_atomic

CRATE_FILE = "ro-crate-metadata.json"

_FORMATS = {
    ".csv": "text/csv",
    ".parquet": "application/vnd.apache.parquet",
    ".h5ad": "application/x-hdf5",
    ".html": "text/html",
    ".png": "image/png",
    ".json": "application/json",
    ".yaml": "application/yaml",
}


def software_versions() -> dict[str, str]:
    """Versions of Python, pertbench and the libraries the results depend on."""
    import platform
    from importlib import metadata

    from pertbench import __version__

    versions = {"python": platform.python_version(), "pertbench": __version__}
    for dist in (
        "numpy",
        "scipy",
        "pandas",
        "anndata",
        "scanpy",
        "scikit-learn",
        "torch",
        "optuna",
        "POT",
        "matplotlib",
        "pyarrow",
        "rocrate",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _file_properties(
    path: Path, *, checksum: str | None = None, name: str | None = None
) -> dict[str, Any]:
    props: dict[str, Any] = {"name": name or path.name}
    if path.is_file():
        props["contentSize"] = str(path.stat().st_size)
        props["sha256"] = checksum or paths.sha256_file(path)
        props["dateModified"] = datetime.fromtimestamp(
            path.stat().st_mtime, timezone.utc
        ).isoformat()
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt:
        props["encodingFormat"] = fmt
    return props


def write_crate(out: str | os.PathLike) -> Path:
    """Write ``DIR/ro-crate-metadata.json`` describing the benchmark in ``DIR``.

    Returns
    -------
    Path
        The metadata file (written atomically; the crate's files are not moved).
    """
    import yaml
    from rocrate.model.contextentity import ContextEntity
    from rocrate.rocrate import ROCrate

    out = Path(out).resolve()
    config = yaml.safe_load((out / paths.CONFIG_FILE).read_text(encoding="utf-8"))
    manifest = read_manifest(out)
    versions = software_versions()

    crate = ROCrate(gen_preview=False)
    crate.name = f"pertbench benchmark: {config.get('name', 'benchmark')}"
    crate.description = (
        config.get("description")
        or "Single-cell perturbation response benchmark (datasets, splits, predictions, metrics, report)."
    )
    crate.datePublished = datetime.now(timezone.utc).isoformat()
    crate.keywords = ["single-cell", "perturbation", "benchmark", "pertbench"]

    software = {}
    for name, version in versions.items():
        entity = ContextEntity(
            crate,
            f"#software-{name}",
            properties={"@type": "SoftwareApplication", "name": name, "version": version},
        )
        if name == "pertbench":
            entity["url"] = "https://pypi.org/project/pertbench/"
        software[name] = crate.add(entity)
    pertbench_app = software["pertbench"]
    pertbench_app["softwareRequirements"] = [e for n, e in software.items() if n != "pertbench"]

    def add_local(rel: str, **props: Any) -> Any:
        path = out / rel
        return crate.add_file(dest_path=rel, properties={**_file_properties(path), **props})

    inputs, outputs = [], []
    config_entity = add_local(
        paths.CONFIG_FILE,
        description="Exact benchmark configuration; re-run with: pertbench benchmark config.yaml --out NEWDIR",
    )
    inputs.append(config_entity)
    outputs.append(add_local(paths.MANIFEST_FILE, description="Materialised inputs with checksums"))

    for name, entry in manifest.get("datasets", {}).items():
        path = Path(entry["path"])
        props = {
            **_file_properties(path, checksum=entry["sha256"], name=f"dataset {name}"),
            "sha256": entry["sha256"],
            "description": _dataset_description(name, entry),
        }
        if "n_obs" in entry:
            props["variableMeasured"] = f"{entry['n_obs']} cells x {entry['n_vars']} genes"
        try:
            rel = path.relative_to(out).as_posix()
            entity = crate.add_file(dest_path=rel, properties=props)
        except ValueError:  # outside the crate: reference it, never copy it
            entity = crate.add_file(source=path.as_uri(), properties=props)
        inputs.append(entity)

    for key, entry in sorted(manifest.get("splits", {}).items()):
        rel = Path(entry["path"]).relative_to(out).as_posix()
        dataset, task, scenario = key.split("|")
        entity = crate.add_file(
            dest_path=rel,
            properties={
                **_file_properties(out / rel, checksum=entry["sha256"]),
                "description": f"split of dataset {dataset}, task {task}, scenario {scenario} (obs_name,split)",
            },
        )
        inputs.append(entity)

    for rel, description in (
        (
            paths.RESULTS_PARQUET,
            "Results: one row per (dataset, task, scenario, model, seed) x metric",
        ),
        (paths.RESULTS_CSV, "Results (CSV copy of results.parquet)"),
        (paths.FAILURES_CSV, "Cells and tuning jobs that failed, with their errors"),
        (PROBE_FILE, "Disentanglement probe of each cell's basal latent, one row per target"),
        (COLLAPSE_FILE, "Collapse statistics of each cell's predictions"),
        (paths.REPORT_FILE, "Self-contained HTML report"),
    ):
        if (out / rel).is_file():
            outputs.append(add_local(rel, description=description))
    figures = out / paths.FIGURES_DIR
    if figures.is_dir():
        for png in sorted(figures.glob("*.png")):
            outputs.append(add_local(png.relative_to(out).as_posix(), description="report figure"))
    for folder, description in (
        ("datasets", "Materialised (simulated or downloaded) datasets"),
        ("cells", "Per-cell predictions (predictions.h5ad), metrics and training logs"),
        ("tuning", "Hyperparameter studies (trials, best parameters, importances)"),
    ):
        if (out / folder).is_dir():
            outputs.append(
                crate.add_dataset(
                    dest_path=f"{folder}/", properties={"name": folder, "description": description}
                )
            )

    action = ContextEntity(
        crate,
        "#benchmark-run",
        properties={
            "@type": "CreateAction",
            "name": f"pertbench benchmark {config.get('name', '')}".strip(),
            "actionStatus": {"@id": "http://schema.org/CompletedActionStatus"},
            "endTime": datetime.now(timezone.utc).isoformat(),
        },
    )
    action["instrument"] = pertbench_app
    action["object"] = inputs
    action["result"] = outputs
    crate.add(action)
    crate.root_dataset["mentions"] = [action]
    crate.mainEntity = config_entity

    text = json.dumps(crate.metadata.generate(), indent=2, sort_keys=True, ensure_ascii=False)
    return write_text_atomic(out / CRATE_FILE, text + "\n")


def _dataset_description(name: str, entry: dict[str, Any]) -> str:
    source = entry.get("source")
    if isinstance(source, dict) and "simulate" in source:
        settings = ", ".join(f"{k}={v}" for k, v in source["simulate"].items())
        return f"dataset '{name}': simulated by pertbench.data.simulate ({settings})"
    if isinstance(source, dict) and "registry" in source:
        return f"dataset '{name}': public dataset '{source['registry']}' curated by pertbench.data.public"
    return f"dataset '{name}': input file {entry['path']}"
