"""Materialise a benchmark's inputs once: datasets and splits, with SHA-256 checksums.

Simulated and registry datasets are written to ``DIR/datasets/<name>.h5ad``; file datasets
are read in place (never copied) and only checksummed. Every (dataset, task, scenario)
split is written to ``DIR/splits/<dataset>/<task>/<scenario>.csv``. ``DIR/manifest.json``
lists them all with checksums; a resumed run reuses what the manifest lists (after checking
the checksums) and refuses to continue if an input file changed underneath it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from pertbench.benchmark import paths
from pertbench.benchmark.config import (
    FULL_SCENARIO,
    BenchmarkConfig,
    DatasetSpec,
    ScenarioSpec,
    TaskSpec,
)
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, InputFileError, SplitError
from pertbench.utils.io import write_h5ad_atomic, write_json_atomic


def split_key(dataset: str, task: str, scenario: str) -> str:
    return f"{dataset}|{task}|{scenario}"


def read_manifest(out: Path) -> dict[str, Any]:
    """``DIR/manifest.json`` with every path made absolute (the file stores paths inside
    ``DIR`` relative to it, so a benchmark folder can be moved or shared)."""
    path = Path(out) / paths.MANIFEST_FILE
    if not path.is_file():
        return {"datasets": {}, "splits": {}}
    manifest = json.loads(path.read_text())
    for section in ("datasets", "splits"):
        for entry in manifest.get(section, {}).values():
            entry["path"] = str((Path(out) / entry["path"]).resolve())
    return manifest


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest atomically, paths inside ``out`` relative to it."""
    root = Path(out).resolve()
    stored = json.loads(json.dumps(manifest))
    for section in ("datasets", "splits"):
        for entry in stored.get(section, {}).values():
            path = Path(entry["path"]).resolve()
            if path.is_relative_to(root):
                entry["path"] = path.relative_to(root).as_posix()
    return write_json_atomic(root / paths.MANIFEST_FILE, stored)


def materialize(
    config: BenchmarkConfig, out: Path, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """Write (or verify) every dataset and split of ``config`` under ``out``; return the manifest."""
    out = Path(out)
    manifest = read_manifest(out)
    loaded: dict[str, ad.AnnData] = {}

    def dataset(name: str) -> ad.AnnData:
        # Splits and scenarios need cell metadata only: this process never loads X (it is
        # validated chunk by chunk); jobs carry the file's path and every worker reads it.
        if name not in loaded:
            from pertbench.data.ondisk import read_obs

            loaded.clear()  # keep one dataset's metadata at a time
            loaded[name] = read_obs(
                manifest["datasets"][name]["path"], keys=config.datasets[name].keys
            )
        return loaded[name]

    for name, spec in config.datasets.items():
        manifest["datasets"][name] = _materialize_dataset(
            spec, out, manifest["datasets"].get(name), log
        )
        write_manifest(out, manifest)

    for task_name, task in config.tasks.items():
        for ds in task.datasets:
            keys = config.datasets[ds].keys
            base_key = split_key(ds, task_name, FULL_SCENARIO)
            if _reuse_split(manifest["splits"].get(base_key)) is None:
                log(f"split: {ds} / {task_name}")
                result = _make_task_split(dataset(ds), task, keys)
                manifest["splits"][base_key] = _write_split(
                    result.split,
                    paths.split_file(out, ds, task_name, FULL_SCENARIO),
                    result,
                    scenario={"kind": FULL_SCENARIO, **_entropies(dataset(ds), keys)},
                )
                write_manifest(out, manifest)
            for scenario in config.scenario_names(task_name)[1:]:
                key = split_key(ds, task_name, scenario)
                if _reuse_split(manifest["splits"].get(key)) is not None:
                    continue
                spec, level = config.scenario_of(scenario)
                log(f"split: {ds} / {task_name} / {scenario}")
                split, result, info = apply_scenario(dataset(ds), spec, level, task, keys)
                manifest["splits"][key] = _write_split(
                    split, paths.split_file(out, ds, task_name, scenario), result, scenario=info
                )
                write_manifest(out, manifest)
    return manifest


def _materialize_dataset(
    spec: DatasetSpec, out: Path, previous: dict[str, Any] | None, log: Callable[[str], None]
) -> dict[str, Any]:
    if spec.kind == "simulate":
        target = paths.dataset_file(out, spec.name)
        if (
            previous is not None
            and target.is_file()
            and paths.sha256_file(target) == previous.get("sha256")
        ):
            return previous
        log(f"dataset: simulating '{spec.name}'")
        from pertbench.data.simulate import simulate

        write_h5ad_atomic(target, simulate(**spec.simulate))
        entry: dict[str, Any] = {
            "kind": "simulate",
            "path": str(target),
            "sha256": paths.sha256_file(target),
            "source": {"simulate": dict(spec.simulate)},
        }
    else:
        if spec.kind == "path":
            path = Path(spec.path)
            source: dict[str, Any] = {"file": str(path)}
        else:
            from pertbench.data import public

            log(f"dataset: '{spec.name}' from the public registry ({spec.registry})")
            path = Path(public.fetch(spec.registry, from_file=spec.from_file))
            info = public.dataset_info(spec.registry)
            source = {"registry": info.name, "url": info.url, "citation": info.citation}
        _shape(spec.name, path)  # a file that is not an .h5ad is refused before anything runs
        checksum = paths.sha256_file(path)
        if previous is not None and previous.get("sha256") != checksum:
            raise ConfigError(
                f"dataset '{spec.name}' ({path}) changed since this benchmark started "
                "(checksum differs); restore it or run into a new --out"
            )
        # Files are read in place, never copied; the checksum pins what was used.
        entry = {"kind": spec.kind, "path": str(path), "sha256": checksum, "source": source}
    entry["n_obs"], entry["n_vars"] = _shape(spec.name, Path(entry["path"]))
    entry["bytes"] = Path(entry["path"]).stat().st_size
    entry["keys"] = spec.keys.to_dict()
    return entry


def _shape(name: str, path: Path) -> tuple[int, int]:
    """(cells, genes) of an .h5ad, read from its metadata (no matrix is loaded); one-line
    error if it is not one."""
    from pertbench.data.ondisk import h5ad_shape

    try:
        return h5ad_shape(path)
    except InputFileError as exc:
        raise InputFileError(f"dataset '{name}': {exc}") from exc


def _reuse_split(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    path = Path(entry["path"])
    if path.is_file() and paths.sha256_file(path) == entry.get("sha256"):
        return entry
    return None


def _write_split(
    split: pd.Series, target: Path, result: Any, *, scenario: dict[str, Any] | None = None
) -> dict[str, Any]:
    from pertbench.data.splits import write_split

    write_split(split, target)
    counts = {k: int(v) for k, v in split.value_counts().items() if k}
    roles = result.summary["role"].value_counts().to_dict() if len(result.summary) else {}
    entry = {
        "path": str(target),
        "sha256": paths.sha256_file(target),
        "n_cells": counts,
        "n_groups": {str(k): int(v) for k, v in roles.items()},
        "task": result.task,
        "params": _jsonable(result.params),
        "notes": list(result.notes),
        "n_unplaced": len(result.unplaced),
    }
    if scenario is not None:
        entry["scenario"] = scenario
    return entry


def _make_task_split(adata: ad.AnnData, task: TaskSpec, keys: PerturbationKeys) -> Any:
    from pertbench.data.splits import make_task_split

    if task.task == "custom":
        result = make_task_split(adata, "custom", keys=keys, path=task.split)
    else:
        result = make_task_split(adata, task.task, keys=keys, seed=task.split_seed, **task.options)
    leaks = result.leakage()
    if len(leaks):
        first = leaks.iloc[0].astype(str).to_dict()
        raise SplitError(
            f"task '{task.name}' puts {len(leaks)} held-out group(s) in train too "
            f"(e.g. {first}); fix the split"
        )
    return result


def apply_scenario(
    adata: ad.AnnData,
    spec: ScenarioSpec,
    level: Any,
    task: TaskSpec,
    keys: PerturbationKeys,
) -> tuple[pd.Series, Any, dict[str, Any]]:
    """The split of one scenario level of ``task``: (split over all cells, SplitResult, info).

    ``imbalance`` and ``downsample`` subsample the dataset and split the subset with the
    task's own settings; cells they remove are left out (``""``) so every scenario shares
    the one materialised dataset file. ``data_scaling`` returns its nested level's split.
    """
    from pertbench.data import scenarios

    if spec.kind == "data_scaling":
        results = scenarios.data_scaling_splits(adata, keys=keys, seed=spec.seed, **spec.options)
        result = results[level]
        info = {"kind": spec.kind, "level": level, "params": _jsonable(result.params)}
        return _full_split(result.split, adata), result, info
    if spec.kind == "imbalance":
        subset = scenarios.imbalance_by_entropy(
            adata, keys=keys, target_entropy=float(level), seed=spec.seed, **spec.options
        )
    else:
        subset = scenarios.downsample_perturbed(
            adata, keys=keys, fraction=float(level), seed=spec.seed, **spec.options
        )
    result = _make_task_split(subset, task, keys)
    info = {
        "kind": spec.kind,
        "level": float(level),
        **_jsonable(subset.uns.get("pertbench_scenario", {})),
    }
    return _full_split(result.split, adata), result, info


def _entropies(adata: ad.AnnData, keys: PerturbationKeys) -> dict[str, float]:
    from pertbench.data.scenarios import scenario_entropy

    return {k: float(v) for k, v in scenario_entropy(adata.obs, keys).items()}


def _full_split(split: pd.Series, adata: ad.AnnData) -> pd.Series:
    """``split`` over all cells of ``adata`` (cells it does not name are left out)."""
    from pertbench.data.splits import LEFT_OUT

    full = split.reindex(pd.Index(adata.obs_names.astype(str)), fill_value=LEFT_OUT)
    full.index.name = "obs_name"
    full.name = "split"
    return full


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
