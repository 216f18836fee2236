"""Name -> model class, imported lazily so optional models cost nothing until used."""

from __future__ import annotations

import importlib

from pertbench.errors import ConfigError, MissingDependencyError

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


def available_models() -> list[str]:
    """Names of all registered models whose module exists in this installation."""
    names = []
    for name, path in MODEL_PATHS.items():
        module = path.split(":")[0]
        if importlib.util.find_spec(module) is not None:
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
    if name not in MODEL_PATHS:
        if ":" in name:
            return _import_model_class(name)
        raise ConfigError(
            f"unknown model '{name}'; available: {', '.join(available_models())} "
            "(or give your own class as package.module:ClassName)"
        )
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


def create_model(name: str, *, keys=None, **params):
    """Instantiate model ``name`` with hyperparameters ``params``."""
    return get_model_class(name)(keys=keys, **params)
