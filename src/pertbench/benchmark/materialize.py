"""Materialise a benchmark's inputs once: datasets and splits, with SHA-256 checksums.

Simulated and registry datasets are written to ``DIR/datasets/<name>.h5ad``; file datasets
are read in place (never copied) and only checksummed. Every (dataset, task, scenario)
split is written to ``DIR/splits/<dataset>/<task>/<scenario>.csv``. ``DIR/manifest.json``
lists them all with checksums; a resumed run reuses what the manifest lists (after checking
the checksums) and refuses to continue if an input file changed underneath it.
"""

from __future__ import annotations

import json
import warnings
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
from pertbench.errors import ConfigError, SplitError
from pertbench.utils.io import write_h5ad_atomic, write_json_atomic


def split_key(dataset: str, task: str, scenario: str) -> str:
    return f"{dataset}|{task}|{scenario}"


def read_manifest(out: Path) -> dict[str, Any]:
    path = Path(out) / paths.MANIFEST_FILE
    if not path.is_file():
        return {"datasets": {}, "splits": {}}
    return json.loads(path.read_text())


def materialize(
    config: BenchmarkConfig, out: Path, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """Write (or verify) every dataset and split of ``config`` under ``out``; return the manifest."""
    out = Path(out)
    manifest = read_manifest(out)
    loaded: dict[str, ad.AnnData] = {}

    def dataset(name: str) -> ad.AnnData:
        if name not in loaded:
            from pertbench.tuning.fitting import load_dataset

            loaded.clear()  # keep one dataset in memory at a time
            loaded[name] = load_dataset(manifest["datasets"][name]["path"], keys=config.keys)
        return loaded[name]

    for name, spec in config.datasets.items():
        manifest["datasets"][name] = _materialize_dataset(
            spec, out, manifest["datasets"].get(name), log
        )
        write_json_atomic(out / paths.MANIFEST_FILE, manifest)

    for task_name, task in config.tasks.items():
        for ds in task.datasets:
            base_key = split_key(ds, task_name, FULL_SCENARIO)
            base_entry = _reuse_split(manifest["splits"].get(base_key))
            if base_entry is None:
                log(f"split: {ds} / {task_name}")
                split, summary = _make_task_split(dataset(ds), task, config)
                base_entry = _write_split(
                    split, paths.split_file(out, ds, task_name, FULL_SCENARIO), summary
                )
                manifest["splits"][base_key] = base_entry
                write_json_atomic(out / paths.MANIFEST_FILE, manifest)
            for scenario in config.scenario_names(task_name)[1:]:
                key = split_key(ds, task_name, scenario)
                if _reuse_split(manifest["splits"].get(key)) is not None:
                    continue
                spec, level = config.scenario_of(scenario)
                log(f"split: {ds} / {task_name} / {scenario}")
                split, summary = apply_scenario(dataset(ds), spec, level, task, config)
                manifest["splits"][key] = _write_split(
                    split, paths.split_file(out, ds, task_name, scenario), summary
                )
                write_json_atomic(out / paths.MANIFEST_FILE, manifest)
    return manifest


def _materialize_dataset(
    spec: DatasetSpec, out: Path, previous: dict[str, Any] | None, log: Callable[[str], None]
) -> dict[str, Any]:
    if spec.kind == "path":
        path = Path(spec.path)
        checksum = paths.sha256_file(path)
        if previous is not None and previous.get("sha256") != checksum:
            raise ConfigError(
                f"dataset '{spec.name}' ({path}) changed since this benchmark started "
                "(checksum differs); restore it or run into a new --out"
            )
        entry = {"kind": "path", "path": str(path), "sha256": checksum, "source": str(path)}
    else:
        target = paths.dataset_file(out, spec.name)
        if (
            previous is not None
            and target.is_file()
            and paths.sha256_file(target) == previous.get("sha256")
        ):
            return previous
        if spec.kind == "simulate":
            log(f"dataset: simulating '{spec.name}'")
            from pertbench.data.simulate import simulate

            adata = simulate(**spec.simulate)
            source = {"simulate": dict(spec.simulate)}
        else:
            log(f"dataset: fetching '{spec.name}' ({spec.registry}) from the public registry")
            adata = _fetch_registry(spec.registry, out)
            source = {"registry": spec.registry}
        write_h5ad_atomic(target, adata, compression="gzip")
        entry = {
            "kind": spec.kind,
            "path": str(target),
            "sha256": paths.sha256_file(target),
            "source": source,
        }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # old AnnData layouts
        backed = ad.read_h5ad(entry["path"], backed="r")
        entry["n_obs"], entry["n_vars"] = int(backed.n_obs), int(backed.n_vars)
        backed.file.close()
    entry["bytes"] = Path(entry["path"]).stat().st_size
    return entry


def _fetch_registry(name: str, out: Path) -> ad.AnnData:
    from pertbench.data import public

    return public.load(name, cache_dir=Path(out) / "downloads")


def _reuse_split(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if entry is None:
        return None
    path = Path(entry["path"])
    if path.is_file() and paths.sha256_file(path) == entry.get("sha256"):
        return entry
    return None


def _write_split(split: pd.Series, target: Path, summary: dict[str, Any]) -> dict[str, Any]:
    from pertbench.data.splits import write_split

    write_split(split, target)
    counts = {k: int(v) for k, v in split.value_counts().items() if k}
    return {
        "path": str(target),
        "sha256": paths.sha256_file(target),
        "n_cells": counts,
        "summary": summary,
    }


def _make_task_split(
    adata: ad.AnnData, task: TaskSpec, config: BenchmarkConfig
) -> tuple[pd.Series, dict[str, Any]]:
    from pertbench.data.splits import make_task_split

    if task.task == "custom":
        result = make_task_split(adata, "custom", keys=config.keys, path=task.split)
    else:
        result = make_task_split(
            adata, task.task, keys=config.keys, seed=task.split_seed, **task.options
        )
    leaks = result.leakage()
    if len(leaks):
        first = leaks.iloc[0].astype(str).to_dict()
        raise SplitError(
            f"task '{task.name}' puts {len(leaks)} held-out group(s) in train too (e.g. {first}); fix the split"
        )
    return result.split, _summary_dict(result)


def _summary_dict(result: Any) -> dict[str, Any]:
    summary = getattr(result, "summary", None)
    if isinstance(summary, pd.DataFrame):
        return json.loads(summary.to_json(orient="records"))
    if isinstance(summary, dict):
        return json.loads(json.dumps(summary, default=str))
    return {}


def apply_scenario(
    adata: ad.AnnData,
    spec: ScenarioSpec,
    level: Any,
    task: TaskSpec,
    config: BenchmarkConfig,
) -> tuple[pd.Series, dict[str, Any]]:
    """The split of one scenario level of ``task``.

    ``imbalance`` and ``downsample`` subsample the dataset and split the subset with the
    task's own settings; cells they remove are left out (``""``) so every scenario shares
    the one materialised dataset file. ``data_scaling`` returns its nested level's split.
    """
    from pertbench.data import scenarios

    if spec.kind == "data_scaling":
        results = scenarios.data_scaling_splits(
            adata, keys=config.keys, seed=spec.seed, **spec.options
        )
        result = results[level]
        return _full_split(result.split, adata), _summary_dict(result)
    if spec.kind == "imbalance":
        subset = scenarios.imbalance_by_entropy(
            adata, keys=config.keys, target_entropy=float(level), seed=spec.seed, **spec.options
        )
    else:
        subset = scenarios.downsample_perturbed(
            adata, keys=config.keys, fraction=float(level), seed=spec.seed, **spec.options
        )
    split, summary = _make_task_split(subset, task, config)
    summary = {"split": summary, "scenario": _jsonable(subset.uns.get("pertbench_scenario", {}))}
    return _full_split(split, adata), summary


def _full_split(split: pd.Series, adata: ad.AnnData) -> pd.Series:
    """``split`` over all cells of ``adata`` (cells it does not name are left out)."""
    from pertbench.data.splits import LEFT_OUT

    full = split.reindex(pd.Index(adata.obs_names.astype(str)), fill_value=LEFT_OUT)
    full.index.name = "obs_name"
    full.name = "split"
    return full


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
