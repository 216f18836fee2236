"""Typed exceptions.

Every error a user can cause by passing bad input is a subclass of :class:`PertbenchError`.
The message is one line that says what is wrong and how to fix it; the CLI prints it to
stderr and exits with status 2 (the traceback only appears with ``--debug``).
"""

from __future__ import annotations

import re


class PertbenchError(Exception):
    """Base class of all errors caused by user input or environment, not by a bug."""


class PertbenchWarning(UserWarning):
    """Base class of pertbench's own warnings (printed by the CLI as one ``warning:`` line)."""


class InputFileError(PertbenchError, FileNotFoundError):
    """A file is missing, unreadable or of the wrong format."""


class DataValidationError(PertbenchError, ValueError):
    """The data violates the data contract (missing key, bad values, no controls, ...)."""


class SplitError(PertbenchError, ValueError):
    """A split cannot be built or read, or it leaks held-out groups into training."""


class ConfigError(PertbenchError, ValueError):
    """A configuration value, hyperparameter or option is invalid."""


class ModelError(PertbenchError, ValueError):
    """A model cannot be trained, loaded or asked for this prediction."""


class UnknownCategoryError(ModelError, KeyError):
    """A perturbation or covariate value that the trained model never saw."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class NotApplicableError(ModelError):
    """The model does not apply to this data or task (a benchmark records the cell as
    ``skipped`` with the message as its reason, instead of failing)."""


class UnseenPerturbationError(UnknownCategoryError, NotApplicableError):
    """A model is asked for a perturbation it cannot encode (absent from its training data,
    or without a known embedding)."""


class EvaluationError(PertbenchError, ValueError):
    """Predictions and truth cannot be compared (missing gene or group, NaN, ...)."""


class OutputError(PertbenchError):
    """An output cannot be written where asked (it exists, it is an input, not writable)."""


class MissingDependencyError(PertbenchError, ImportError):
    """An optional extra is not installed."""


class NetworkError(PertbenchError, ConnectionError):
    """A download failed (for example, no internet access)."""


_PRINTABLE_NAME = re.compile(r"[A-Za-z0-9_.+\-/ ]{1,60}")


def shown(value: object) -> str:
    """``value`` quoted for a message when it looks like a name, else only its length.

    Messages about a file a user pointed at (a config, a split, a search space) must never
    print the file's contents: whatever is quoted from it passes through here, so a wrong
    path such as ``/etc/shadow`` leaks nothing while a typo like ``n_trial`` is still shown.
    """
    text = str(value)
    if _PRINTABLE_NAME.fullmatch(text):
        return repr(text)
    return f"<a {len(text)}-character value that is not a name>"


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise a helpful :class:`MissingDependencyError`.

    Parameters
    ----------
    module
        Importable module name, e.g. ``"ray"``.
    extra
        Name of the pertbench extra that provides it, e.g. ``"ray"``.
    purpose
        What the module is needed for, used in the message.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the optional package '{module}'; "
            f"install it with: pip install 'pertbench[{extra}]'"
        ) from exc
