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

__all__ = ["PertbenchError", "PerturbationKeys", "__version__"]
