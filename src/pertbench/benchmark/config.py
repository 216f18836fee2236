"""The benchmark configuration: schema, validation and the canonical form saved with a run.

A config is a YAML mapping::

    name: my-benchmark
    keys: {perturbation_key: condition, control: control, covariate_keys: [cell_type]}
    datasets:                      # name -> exactly one of file / simulate / registry
      screen: {path: data/screen.h5ad}
      sim: {simulate: {n_perturbations: 12, seed: 0}}
      norman: {registry: norman19}
    tasks:                         # name -> a split of some datasets
      transfer: {task: transfer, datasets: [sim], options: {heldout_fraction: 0.3}}
      combos: {task: combo, datasets: [norman]}
      new: {task: unseen, datasets: [sim], options: {fraction: 0.3}}
      context: {task: fewshot, datasets: [sim], options: {target: CT0, n_shots: 3}}
      mine: {task: custom, datasets: [screen], split: splits/screen.csv}
    scenarios:                     # optional variants of every task's split
      imbalance: {entropy: [0.9, 0.7]}
      data_scaling: {fractions: [0.25, 0.5]}
    models:                        # label -> model (fixed params or tuned)
      linear: {}
      la_tuned: {model: latent_additive, tune: {n_trials: 20}}
    seeds: [0, 1]
    training: {max_epochs: 50, device: auto}
    evaluation: {metrics: [rmse_average, rmse_rank_average], split: test}

Every unknown key is a :class:`~pertbench.errors.ConfigError` naming the key and the fix.
:meth:`BenchmarkConfig.to_dict` gives the canonical form (absolute paths, all defaults
filled in) that is written to ``DIR/config.yaml`` and re-runs the same benchmark.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import TASKS
from pertbench.errors import ConfigError, InputFileError, PertbenchError, shown

SCENARIO_KINDS = {
    # kind -> (the key listing its levels, what one level means)
    "imbalance": ("entropy", "target normalised entropy of perturbations over covariates"),
    "downsample": ("fractions", "fraction of perturbed cells kept in every group"),
    "data_scaling": ("n_levels", "number of nested training sets (or explicit 'levels')"),
}
FULL_SCENARIO = "full"
SAVE_PREDICTIONS = ("cells", "mean", "none")

_TOP = {
    "name",
    "description",
    "keys",
    "datasets",
    "tasks",
    "scenarios",
    "models",
    "seeds",
    "training",
    "evaluation",
}
_DATASET = {"path", "simulate", "registry", "from_file", "keys", "description"}
_TASK = {"task", "datasets", "options", "split_seed", "split"}
_SCENARIO = {"tasks", "seed", "options"}
_MODEL = {"model", "params", "tune", "max_epochs"}
_TUNE = {"n_trials", "timeout", "objective", "direction", "search_space", "pruner"}
_TRAINING = {"max_epochs", "device"}
_EVALUATION = {"metrics", "split", "save_predictions", "interactions", "validate_metrics"}


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(f"config {where}: {message}")


def _check_keys(mapping: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise _fail(where, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = (
                f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(sorted(allowed))}"
            )
            raise _fail(where, f"unknown key {shown(key)}; {hint}")
    return dict(mapping)


def _name_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise _fail(where, "expected a name or a list of names")


def _int(value: Any, where: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"expected an integer, got {shown(value)}")
    if minimum is not None and value < minimum:
        raise _fail(where, f"must be at least {minimum}, got {value}")
    return int(value)


def _number_list(value: Any, where: str, *, low: float, high: float) -> list[float]:
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _fail(where, f"expected numbers, got {shown(v)}")
        if not low <= float(v) <= high:
            raise _fail(where, f"{v} is outside [{low}, {high}]")
        out.append(float(v))
    if not out:
        raise _fail(where, "give at least one level")
    return out


@dataclass(frozen=True)
class DatasetSpec:
    """One input dataset: a file, simulator settings or a public registry name.

    ``keys`` are the dataset's own obs columns (default: the config's ``keys``; for a
    registry dataset, the registry's). ``from_file`` gives a registry dataset's raw file
    when there is no network.
    """

    name: str
    kind: str  # "path" | "simulate" | "registry"
    keys: PerturbationKeys
    path: Path | None = None
    simulate: dict[str, Any] = field(default_factory=dict)
    registry: str | None = None
    from_file: Path | None = None
    description: str = ""
    own_keys: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.kind == "path":
            out["path"] = str(self.path)
        elif self.kind == "simulate":
            out["simulate"] = dict(self.simulate)
        else:
            out["registry"] = self.registry
            if self.from_file is not None:
                out["from_file"] = str(self.from_file)
        if self.own_keys:
            out["keys"] = self.keys.to_dict()
        if self.description:
            out["description"] = self.description
        return out


@dataclass(frozen=True)
class TaskSpec:
    """A split of some datasets: a task type with options, or a given split file."""

    name: str
    task: str
    datasets: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    split_seed: int = 0
    split: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "datasets": list(self.datasets),
            "options": dict(self.options),
            "split_seed": self.split_seed,
        }
        if self.split is not None:
            out["split"] = str(self.split)
        return out


@dataclass(frozen=True)
class ScenarioSpec:
    """Variants of some tasks' splits.

    ``imbalance`` (levels = target entropies) and ``downsample`` (levels = fractions)
    subsample the dataset and split it again with the task's own settings; ``data_scaling``
    (levels ``level1``...) builds nested training sets sharing val and test with
    :func:`pertbench.data.scenarios.data_scaling_splits` (transfer tasks only).
    """

    kind: str
    levels: tuple[Any, ...]
    tasks: tuple[str, ...] = ()
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def level_name(self, level: Any) -> str:
        if self.kind == "data_scaling":
            return f"data_scaling_{level}"
        return f"{self.kind}_{float(level):g}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seed": self.seed}
        if self.kind != "data_scaling":
            out[SCENARIO_KINDS[self.kind][0]] = list(self.levels)
        if self.tasks:
            out["tasks"] = list(self.tasks)
        out["options"] = dict(self.options)
        return out


@dataclass(frozen=True)
class TuneSpec:
    """Tune a model on each (dataset, task, scenario) before its seeds run."""

    n_trials: int = 20
    timeout: float | None = None
    objective: str | None = None
    direction: str = "minimize"
    search_space: dict[str, Any] | None = None
    pruner: str = "median"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_trials": self.n_trials,
            "direction": self.direction,
            "pruner": self.pruner,
        }
        if self.timeout is not None:
            out["timeout"] = self.timeout
        if self.objective is not None:
            out["objective"] = self.objective
        if self.search_space is not None:
            out["search_space"] = dict(self.search_space)
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A model under a label: fixed hyperparameters, or tuned ones."""

    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)
    tune: TuneSpec | None = None
    max_epochs: int | None = None
    is_baseline: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "params": dict(self.params)}
        if self.tune is not None:
            out["tune"] = self.tune.to_dict()
        if self.max_epochs is not None:
            out["max_epochs"] = self.max_epochs
        return out


@dataclass(frozen=True)
class BenchmarkConfig:
    """A validated benchmark configuration (see the module docstring for the YAML form)."""

    name: str
    description: str
    keys: PerturbationKeys
    datasets: dict[str, DatasetSpec]
    tasks: dict[str, TaskSpec]
    scenarios: tuple[ScenarioSpec, ...]
    models: dict[str, ModelSpec]
    seeds: tuple[int, ...]
    max_epochs: int | None
    device: str
    metrics: tuple[str, ...] | None
    on: str
    save_predictions: str
    interactions: bool = True
    """Genetic-interaction metrics of held-out combinations, by subgroup, in every cell."""
    validate_metrics: bool = False
    """Run the metric validation study on every simulated dataset (report heatmap)."""

    def to_dict(self) -> dict[str, Any]:
        """Canonical mapping (absolute paths, defaults filled), YAML-ready, re-runnable."""
        models = {
            label: spec.to_dict() for label, spec in self.models.items() if not spec.is_baseline
        }
        scenarios: dict[str, Any] = {}
        for spec in self.scenarios:
            scenarios[spec.kind] = spec.to_dict()
        return {
            "name": self.name,
            "description": self.description,
            "keys": self.keys.to_dict(),
            "datasets": {name: spec.to_dict() for name, spec in self.datasets.items()},
            "tasks": {name: spec.to_dict() for name, spec in self.tasks.items()},
            "scenarios": scenarios,
            "models": models,
            "seeds": list(self.seeds),
            "training": {"max_epochs": self.max_epochs, "device": self.device},
            "evaluation": {
                "metrics": list(self.metrics) if self.metrics is not None else None,
                "split": self.on,
                "save_predictions": self.save_predictions,
                "interactions": self.interactions,
                "validate_metrics": self.validate_metrics,
            },
        }

    def scenario_names(self, task: str) -> list[str]:
        """``full`` plus every scenario level that applies to ``task``."""
        names = [FULL_SCENARIO]
        for spec in self.scenarios:
            if not spec.tasks or task in spec.tasks:
                names += [spec.level_name(level) for level in spec.levels]
        return names

    def scenario_of(self, name: str) -> tuple[ScenarioSpec, Any] | None:
        for spec in self.scenarios:
            for level in spec.levels:
                if spec.level_name(level) == name:
                    return spec, level
        return None


def load_config(
    source: str | os.PathLike | Mapping[str, Any], *, base_dir: Path | None = None
) -> BenchmarkConfig:
    """Read and validate a benchmark config from a YAML file or a mapping.

    Relative paths in the config are resolved against the config file's folder (or
    ``base_dir`` for a mapping).
    """
    from pertbench.utils.io import read_yaml

    if isinstance(source, Mapping):
        raw = dict(source)
        base = Path(base_dir or Path.cwd()).resolve()
    else:
        path = Path(source)
        if not path.is_file():
            raise InputFileError(
                f"config file '{path}' does not exist; start from 'pertbench benchmark --default'"
            )
        raw = read_yaml(path, what="config")
        base = path.resolve().parent
        if raw is None:
            raise ConfigError(f"config '{path}' is empty; list datasets, tasks and models")
    return parse_config(raw, base_dir=base)


def parse_config(raw: Any, *, base_dir: Path) -> BenchmarkConfig:
    """Validate a config mapping (see :func:`load_config`)."""
    from pertbench.models.registry import BASELINE_MODELS

    top = _check_keys(raw, _TOP, "top level")
    for required in ("datasets", "tasks", "models"):
        if not top.get(required):
            raise _fail(
                "top level", f"'{required}' is missing or empty; see 'pertbench benchmark --help'"
            )

    try:
        keys = PerturbationKeys.from_dict(top.get("keys") or {})
    except PertbenchError as exc:
        raise _fail("keys", str(exc)) from exc

    for section in ("datasets", "tasks"):
        if not isinstance(top[section], Mapping):
            raise _fail(section, "expected a mapping of name -> settings")
    datasets = {
        str(name): _parse_dataset(str(name), spec, base_dir, keys)
        for name, spec in top["datasets"].items()
    }
    tasks = {
        str(name): _parse_task(str(name), spec, datasets, base_dir)
        for name, spec in top["tasks"].items()
    }
    scenarios = _parse_scenarios(top.get("scenarios"), tasks)

    models: dict[str, ModelSpec] = {}
    raw_models = top["models"]
    if isinstance(raw_models, Sequence) and not isinstance(raw_models, str):
        raw_models = {str(name): None for name in _name_list(raw_models, "models")}
    if not isinstance(raw_models, Mapping):
        raise _fail("models", "expected a mapping of label -> {model, params, tune}")
    for label, spec in raw_models.items():
        models[str(label)] = _parse_model(str(label), spec)
    for baseline in BASELINE_MODELS:
        # Baselines are always part of a benchmark (the calibration reference).
        if baseline not in models:
            models[baseline] = ModelSpec(label=baseline, model=baseline, is_baseline=True)

    seeds_raw = top.get("seeds", [0])
    seeds_list = (
        seeds_raw
        if isinstance(seeds_raw, Sequence) and not isinstance(seeds_raw, str)
        else [seeds_raw]
    )
    seeds = tuple(_int(s, "seeds", minimum=0) for s in seeds_list)
    if not seeds or len(set(seeds)) != len(seeds):
        raise _fail("seeds", "give a non-empty list of distinct integers, e.g. [0, 1, 2]")

    training = _check_keys(top.get("training"), _TRAINING, "training")
    max_epochs = training.get("max_epochs")
    if max_epochs is not None:
        max_epochs = _int(max_epochs, "training.max_epochs", minimum=1)
    device = str(training.get("device", "auto"))

    evaluation = _check_keys(top.get("evaluation"), _EVALUATION, "evaluation")
    metrics = evaluation.get("metrics")
    if metrics is not None:
        metrics = tuple(_name_list(metrics, "evaluation.metrics"))
        if not metrics:
            raise _fail("evaluation.metrics", "give at least one metric name or leave it out")
        from pertbench.metrics import resolve_metrics

        try:
            resolve_metrics(list(metrics))
        except PertbenchError as exc:
            raise _fail("evaluation.metrics", str(exc)) from exc
    on = str(evaluation.get("split", "test"))
    if on not in ("val", "test"):
        raise _fail("evaluation.split", f"must be val or test, got {shown(on)}")
    save_predictions = str(evaluation.get("save_predictions", "cells"))
    if save_predictions not in SAVE_PREDICTIONS:
        raise _fail("evaluation.save_predictions", f"must be one of {', '.join(SAVE_PREDICTIONS)}")
    switches = {}
    for key, default in (("interactions", True), ("validate_metrics", False)):
        switches[key] = evaluation.get(key, default)
        if not isinstance(switches[key], bool):
            raise _fail(f"evaluation.{key}", f"must be true or false, got {switches[key]!r}")

    return BenchmarkConfig(
        name=str(top.get("name", "benchmark")),
        description=str(top.get("description", "")),
        keys=keys,
        datasets=datasets,
        tasks=tasks,
        scenarios=scenarios,
        models=models,
        seeds=seeds,
        max_epochs=max_epochs,
        device=device,
        metrics=metrics,
        on=on,
        save_predictions=save_predictions,
        **switches,
    )


def _parse_dataset(name: str, spec: Any, base_dir: Path, keys: PerturbationKeys) -> DatasetSpec:
    where = f"datasets.{name}"
    spec = _check_keys(spec, _DATASET, where)
    kinds = [k for k in ("path", "simulate", "registry") if k in spec]
    if len(kinds) != 1:
        raise _fail(
            where,
            "give exactly one of 'path' (an .h5ad file), 'simulate' (settings) or "
            "'registry' (a public dataset name)",
        )
    kind = kinds[0]
    description = str(spec.get("description", ""))
    own_keys = spec.get("keys") is not None
    if own_keys:
        try:
            keys = PerturbationKeys.from_dict(spec["keys"])
        except PertbenchError as exc:
            raise _fail(f"{where}.keys", str(exc)) from exc
    if "from_file" in spec and kind != "registry":
        raise _fail(f"{where}.from_file", "only a registry dataset takes 'from_file'")
    if kind == "path":
        path = _existing_file(spec["path"], base_dir, f"{where}.path")
        return DatasetSpec(
            name=name, kind=kind, keys=keys, path=path, description=description, own_keys=own_keys
        )
    if kind == "simulate":
        settings = spec["simulate"] or {}
        if not isinstance(settings, Mapping):
            raise _fail(f"{where}.simulate", "expected a mapping of simulator settings")
        _check_simulator_settings(dict(settings), f"{where}.simulate")
        if not own_keys:
            # The simulator writes its own column names; the dataset's keys follow them.
            keys = keys.replace(
                perturbation_key=settings.get("perturbation_key", "condition"),
                control=settings.get("control", "control"),
                delimiter=settings.get("delimiter", "+"),
                covariate_keys=(settings.get("covariate_key", "cell_type"),),
                dose_key=settings.get("dose_key", "dose") if settings.get("doses") else None,
            )
        return DatasetSpec(
            name=name,
            kind=kind,
            keys=keys,
            simulate=dict(settings),
            description=description,
            own_keys=own_keys,
        )
    registry = str(spec["registry"])
    info = _registry_info(registry, f"{where}.registry")
    from_file = (
        _existing_file(spec["from_file"], base_dir, f"{where}.from_file")
        if spec.get("from_file")
        else None
    )
    return DatasetSpec(
        name=name,
        kind=kind,
        keys=keys if own_keys else info.keys,
        registry=info.name,
        from_file=from_file,
        description=description,
        own_keys=own_keys,
    )


def _existing_file(value: Any, base_dir: Path, where: str) -> Path:
    path = Path(os.path.expanduser(str(value)))
    path = (base_dir / path).resolve() if not path.is_absolute() else path
    if not path.is_file():
        raise _fail(
            where,
            f"file '{path}' does not exist; fix the path (relative paths are relative to the config file)",
        )
    return path


def _check_simulator_settings(settings: dict[str, Any], where: str) -> None:
    import dataclasses

    from pertbench.data.simulate import SimulationParams

    allowed = {f.name for f in dataclasses.fields(SimulationParams)}
    _check_keys(settings, allowed, where)


def _registry_info(name: str, where: str) -> Any:
    from pertbench.data import public

    try:
        return public.dataset_info(name)
    except PertbenchError as exc:
        raise _fail(where, str(exc)) from exc


def _parse_task(
    name: str, spec: Any, datasets: Mapping[str, DatasetSpec], base_dir: Path
) -> TaskSpec:
    where = f"tasks.{name}"
    spec = _check_keys(spec, _TASK, where)
    task = spec.get("task", name)
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), TASKS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(TASKS)}"
        raise _fail(f"{where}.task", f"unknown task {shown(task)}; {hint}")
    names = _name_list(spec.get("datasets"), f"{where}.datasets") or list(datasets)
    for ds in names:
        if ds not in datasets:
            raise _fail(
                f"{where}.datasets", f"unknown dataset '{ds}'; defined: {', '.join(datasets)}"
            )
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise _fail(f"{where}.options", "expected a mapping of split options")
    split = spec.get("split")
    if task == "custom":
        if split is None:
            raise _fail(where, "a custom task needs 'split: path/to/split.csv'")
        split_path = Path(os.path.expanduser(str(split)))
        split_path = (
            (base_dir / split_path).resolve() if not split_path.is_absolute() else split_path
        )
        if not split_path.is_file():
            raise _fail(f"{where}.split", f"file '{split_path}' does not exist")
    elif split is not None:
        raise _fail(
            f"{where}.split",
            "only a 'custom' task reads a split file; remove 'split' or set task: custom",
        )
    else:
        split_path = None
    split_seed = _int(spec.get("split_seed", 0), f"{where}.split_seed", minimum=0)
    return TaskSpec(
        name=name,
        task=str(task),
        datasets=tuple(names),
        options=dict(options),
        split_seed=split_seed,
        split=split_path,
    )


def _parse_scenarios(raw: Any, tasks: Mapping[str, TaskSpec]) -> tuple[ScenarioSpec, ...]:
    scenarios = _check_keys(raw, set(SCENARIO_KINDS), "scenarios")
    out = []
    for kind, spec in scenarios.items():
        where = f"scenarios.{kind}"
        spec = _check_keys(spec, {SCENARIO_KINDS[kind][0], *_SCENARIO}, where)
        names = _name_list(spec.get("tasks"), f"{where}.tasks")
        for t in names:
            if t not in tasks:
                raise _fail(
                    f"{where}.tasks", f"unknown task {shown(t)}; defined: {', '.join(tasks)}"
                )
        options = spec.get("options") or {}
        if not isinstance(options, Mapping):
            raise _fail(f"{where}.options", "expected a mapping")
        options = dict(options)
        seed = _int(spec.get("seed", 0), f"{where}.seed", minimum=0)
        if kind == "data_scaling":
            transfer = [t for t, ts in tasks.items() if ts.task == "transfer"]
            wrong = [t for t in names if t not in transfer]
            if wrong or not transfer:
                raise _fail(f"{where}.tasks", "data scaling applies to transfer tasks only")
            names = names or transfer
            if "heldout_covariates" not in options:
                raise _fail(
                    f"{where}.options",
                    "needs 'heldout_covariates' (the covariates whose perturbations are held out)",
                )
            if "n_levels" in spec:
                options["n_levels"] = spec["n_levels"]
            if "n_levels" in options and "levels" in options:
                raise _fail(where, "give either n_levels or options.levels, not both")
            if "levels" in options:
                n_levels = len(options["levels"])
            else:
                n_levels = _int(options.get("n_levels", 3), f"{where}.n_levels", minimum=1)
                options["n_levels"] = n_levels
            levels: tuple[Any, ...] = tuple(f"level{i}" for i in range(1, n_levels + 1))
        else:
            level_key = SCENARIO_KINDS[kind][0]
            if level_key not in spec:
                raise _fail(where, f"needs '{level_key}: [...]' ({SCENARIO_KINDS[kind][1]})")
            values = _number_list(spec[level_key], f"{where}.{level_key}", low=0.0, high=1.0)
            if any(v <= 0 for v in values):
                raise _fail(f"{where}.{level_key}", "levels must be in (0, 1]")
            levels = tuple(dict.fromkeys(values))
        out.append(
            ScenarioSpec(kind=kind, levels=levels, tasks=tuple(names), seed=seed, options=options)
        )
    return tuple(out)


def _parse_model(label: str, spec: Any) -> ModelSpec:
    from pertbench.models.registry import BASELINE_MODELS
    from pertbench.tuning.fitting import resolve_model_class, resolve_params

    where = f"models.{label}"
    spec = _check_keys(spec, _MODEL, where)
    model = str(spec.get("model", label))
    try:
        model_class = resolve_model_class(model)
    except PertbenchError as exc:
        raise _fail(f"{where}.model", str(exc)) from exc
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise _fail(f"{where}.params", "expected a mapping of hyperparameters")
    try:
        resolve_params(model_class, params)
    except PertbenchError as exc:
        raise _fail(f"{where}.params", str(exc)) from exc
    tune = None
    if spec.get("tune") is not None:
        tune = _parse_tune(spec["tune"], f"{where}.tune", model_class, params)
    max_epochs = spec.get("max_epochs")
    if max_epochs is not None:
        max_epochs = _int(max_epochs, f"{where}.max_epochs", minimum=1)
    return ModelSpec(
        label=label,
        model=model,
        params=dict(params),
        tune=tune,
        max_epochs=max_epochs,
        is_baseline=model in BASELINE_MODELS and not params and tune is None and label == model,
    )


def _parse_tune(raw: Any, where: str, model_class: Any, params: Mapping[str, Any]) -> TuneSpec:
    from pertbench.metrics.objective import Objective
    from pertbench.tuning.study import PRUNERS, effective_search_space

    if raw is True:
        raw = {}
    spec = _check_keys(raw, _TUNE, where)
    n_trials = _int(spec.get("n_trials", 20), f"{where}.n_trials", minimum=1)
    timeout = spec.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise _fail(f"{where}.timeout", "must be a positive number of seconds")
    direction = str(spec.get("direction", "minimize"))
    objective = spec.get("objective")
    pruner = str(spec.get("pruner", "median"))
    if pruner not in PRUNERS:
        raise _fail(f"{where}.pruner", f"must be one of {', '.join(PRUNERS)}")
    try:
        Objective.parse(objective, direction=direction)
        space = effective_search_space(model_class, spec.get("search_space"), params)
    except PertbenchError as exc:
        raise _fail(where, str(exc)) from exc
    if not space:
        raise _fail(
            where,
            f"model '{model_class.name}' has no hyperparameters to search; remove 'tune' or give a search_space",
        )
    return TuneSpec(
        n_trials=n_trials,
        timeout=float(timeout) if timeout is not None else None,
        objective=objective,
        direction=direction,
        search_space=dict(spec["search_space"]) if spec.get("search_space") else None,
        pruner=pruner,
    )


def default_config_path() -> Path:
    """The benchmark config shipped with the package (``pertbench benchmark --default``)."""
    from importlib.resources import files

    return Path(str(files("pertbench") / "configs" / "default.yaml"))


def dump_config(config: BenchmarkConfig) -> str:
    """YAML text of the canonical config."""
    import yaml

    header = (
        "# pertbench benchmark configuration (canonical form, written by the run).\n"
        "# Re-run it with: pertbench benchmark config.yaml --out NEWDIR\n"
    )
    return header + yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
