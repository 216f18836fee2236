"""pertbench: predict and benchmark single-cell responses to perturbations.

Sub-packages: :mod:`pertbench.data` (contract, preprocessing, splits, scenarios,
simulator, public datasets), :mod:`pertbench.models` (model zoo behind one API),
:mod:`pertbench.metrics` (evaluation suite), :mod:`pertbench.workflows` (held-out cell
type workflow), :mod:`pertbench.tuning` (Optuna), :mod:`pertbench.benchmark` (runner),
:mod:`pertbench.report` (HTML report, RO-Crate) and :mod:`pertbench.pl` (figures).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pertbench")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import PertbenchError

#: Sub-packages reachable as attributes (``import pertbench as pb; pb.models.create_model``),
#: imported on first use so ``import pertbench`` (and ``pertbench --help``) stays light.
SUBPACKAGES = ("benchmark", "data", "metrics", "models", "pl", "report", "tuning", "workflows")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        import importlib

        return importlib.import_module(f"pertbench.{name}")
    raise AttributeError(f"module 'pertbench' has no attribute {name!r}")


__all__ = ["PertbenchError", "PerturbationKeys", "__version__"]
