"""Which obs columns hold the perturbation, the covariates and the dose.

Nothing in pertbench hard-codes a column name: every function that reads perturbation
metadata takes a :class:`PerturbationKeys`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pertbench.errors import ConfigError


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class PerturbationKeys:
    """Names of the obs columns and labels that describe perturbations.

    Parameters
    ----------
    perturbation_key
        obs column with the perturbation label of each cell (default ``"condition"``).
    control
        Label of unperturbed control cells in that column (default ``"control"``).
    delimiter
        Joins the components of a combination, e.g. ``"KLF1+MAP2K6"`` (default ``"+"``).
    covariate_keys
        obs columns whose values define a biological state (cell type, cell line,
        treatment, ...). A comma-separated string is accepted.
    dose_key
        Optional obs column with the dose (numeric, or one value per component joined
        by ``delimiter``).
    """

    perturbation_key: str = "condition"
    control: str = "control"
    delimiter: str = "+"
    covariate_keys: tuple[str, ...] = field(default=("cell_type",))
    dose_key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "covariate_keys", _as_tuple(self.covariate_keys))
        if not self.perturbation_key:
            raise ConfigError("perturbation key must be a non-empty obs column name")
        if not self.control:
            raise ConfigError("control label must be non-empty")
        if not self.delimiter:
            raise ConfigError("combination delimiter must be non-empty")
        if self.delimiter in self.control:
            raise ConfigError(
                f"control label '{self.control}' contains the combination delimiter "
                f"'{self.delimiter}'; choose another --delimiter"
            )
        if self.perturbation_key in self.covariate_keys:
            raise ConfigError(
                f"'{self.perturbation_key}' is both the perturbation key and a covariate key"
            )
        if len(set(self.covariate_keys)) != len(self.covariate_keys):
            raise ConfigError(f"covariate keys are repeated: {', '.join(self.covariate_keys)}")

    # -- combinations -------------------------------------------------------------------
    def components(self, label: str) -> tuple[str, ...]:
        """Split a perturbation label into its components; the control has none."""
        if label == self.control:
            return ()
        return tuple(label.split(self.delimiter))

    def is_combination(self, label: str) -> bool:
        """True when ``label`` names two or more perturbations."""
        return len(self.components(label)) > 1

    def join(self, components: Iterable[str]) -> str:
        """Join components into a label (the empty set is the control)."""
        parts = [c for c in components]
        return self.delimiter.join(parts) if parts else self.control

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["covariate_keys"] = list(self.covariate_keys)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerturbationKeys:
        known = {"perturbation_key", "control", "delimiter", "covariate_keys", "dose_key"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown perturbation key setting(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> PerturbationKeys:
        """Return a copy with some fields changed."""
        return replace(self, **changes)
