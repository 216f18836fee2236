"""Name -> model class, imported lazily so optional models cost nothing until used.

Models come from two places: pertbench's own (:data:`MODEL_PATHS`) and other installed
packages, which register theirs through the entry-point group ``pertbench.models``
(``name = "package.module:ClassName"`` in their ``pyproject.toml``). A package model is
listed by ``pertbench models`` and usable by name everywhere; a built-in name always wins
over a package's.

A class may also be given as ``package.module:ClassName`` where the user names it
(``pertbench train --model``, a benchmark config). A saved run folder is different: loading
it never imports a module its config names unless that model is registered or the user
passes the class explicitly (see :func:`model_class_for_run`).
"""

from __future__ import annotations

import importlib
import importlib.metadata

from pertbench.errors import ConfigError, MissingDependencyError, ModelError

ENTRY_POINT_GROUP = "pertbench.models"

# name -> "module:ClassName". One line per model; aliases point at the same class.
MODEL_PATHS: dict[str, str] = {
    "no_change": "pertbench.models.baselines:NoChange",
    "perturbation_mean": "pertbench.models.baselines:PerturbationMean",
    "covariate_mean": "pertbench.models.baselines:CovariateMean",
    "additive_within": "pertbench.models.baselines:AdditiveWithin",
    "linear_embedding": "pertbench.models.linear_embedding:LinearEmbedding",
    "nearest_perturbation": "pertbench.models.linear_embedding:NearestPerturbation",
    "linear": "pertbench.models.linear:LinearAdditive",
    "latent_additive": "pertbench.models.latent_additive:LatentAdditive",
    "decoder_only": "pertbench.models.decoder_only:DecoderOnly",
    "cpa": "pertbench.models.cpa:CPA",
    "cpa_noadv": "pertbench.models.cpa:CPANoAdversary",
    "sams_vae": "pertbench.models.sams_vae:SAMSVAE",
    "biolord": "pertbench.models.biolord:Biolord",
    "gears": "pertbench.models.gears:GEARS",
    "scgen": "pertbench.models.scgen:ScGen",
    "scpram": "pertbench.models.scpram:ScPRAM",
}

#: Always part of a benchmark (cells are skipped, with the reason, where one does not apply).
BASELINE_MODELS = (
    "no_change",
    "perturbation_mean",
    "covariate_mean",
    "additive_within",
    "linear_embedding",
    "nearest_perturbation",
)


def plugin_models() -> dict[str, str]:
    """``name -> "module:Class"`` of the models other packages register (entry points)."""
    found = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in MODEL_PATHS and ":" in entry.value:
            found.setdefault(entry.name, entry.value.strip())
    return found


def registered_models() -> dict[str, str]:
    """Every registered model: pertbench's own, then those of installed packages."""
    return {**MODEL_PATHS, **plugin_models()}


def available_models() -> list[str]:
    """Names of all registered models whose module exists in this installation."""
    names = []
    for name, path in registered_models().items():
        module = path.split(":")[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package that cannot be imported
            found = False
        if found:
            names.append(name)
    return names


def get_model_class(name: str):
    """Return the model class registered as ``name`` (or given as ``package.module:Class``).

    Raises
    ------
    ConfigError
        Unknown name (the message lists the known ones).
    MissingDependencyError
        The model needs an optional extra that is not installed.
    """
    registry = registered_models()
    if name not in registry:
        if ":" in name:
            return _import_model_class(name)
        raise ConfigError(
            f"unknown model '{name}'; available: {', '.join(available_models())} "
            "(or give your own class as package.module:ClassName)"
        )
    if name not in MODEL_PATHS:  # another package's model
        return _import_model_class(registry[name])
    module_name, class_name = MODEL_PATHS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except MissingDependencyError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("pertbench"):
            raise ConfigError(f"model '{name}' is not available in this installation") from exc
        raise
    return getattr(module, class_name)


def _import_model_class(path: str):
    """Import a user model given as ``package.module:ClassName`` (a PerturbationModel subclass)."""
    from pertbench.models.base import PerturbationModel

    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import model module '{module_name}' of '{path}': {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, PerturbationModel)):
        raise ConfigError(
            f"'{path}' is not a PerturbationModel subclass; give package.module:ClassName"
        )
    return cls


def model_class_for_run(name: str, *, where: str, model_class=None):
    """The class of a saved run's model, never importing what the run's config names.

    Parameters
    ----------
    name
        The model name stored in the run folder.
    where
        The run folder (for the message).
    model_class
        A class, or ``package.module:ClassName``, the user passes explicitly.

    Raises
    ------
    ModelError
        ``name`` is not registered and no class was given, or the given class is another
        model.
    """
    if model_class is not None:
        cls = model_class if isinstance(model_class, type) else get_model_class(str(model_class))
        if getattr(cls, "name", None) != name:
            raise ModelError(
                f"'{where}' holds a '{name}' model but the class given is '{cls.name}'"
            )
        return cls
    if name not in registered_models():
        raise ModelError(
            f"'{where}' holds model '{name}', which is not registered; pertbench does not "
            "import code a run folder names: install its package (entry point group "
            f"'{ENTRY_POINT_GROUP}') or pass the class explicitly (model_class=..., "
            "--model-class package.module:ClassName)"
        )
    return get_model_class(name)


def create_model(name: str, *, keys=None, **params):
    """Instantiate model ``name`` with hyperparameters ``params``."""
    return get_model_class(name)(keys=keys, **params)
