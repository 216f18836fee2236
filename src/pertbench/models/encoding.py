"""Category encodings a model learns at fit time and must reuse at prediction time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import DataValidationError, UnknownCategoryError


@dataclass
class CategoryEncoding:
    """Vocabulary of perturbation components and covariate values seen in training.

    Attributes
    ----------
    keys
        Column names used to read perturbations and covariates.
    perturbations
        Sorted perturbation *components* (single perturbations; controls excluded). A
        combination ``A+B`` is encoded multi-hot over these.
    covariates
        For each covariate key, the sorted values seen in training.
    """

    keys: PerturbationKeys
    perturbations: list[str] = field(default_factory=list)
    covariates: dict[str, list[str]] = field(default_factory=dict)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def fit(cls, obs: pd.DataFrame, keys: PerturbationKeys) -> CategoryEncoding:
        """Collect the vocabulary from the cells a model trains on."""
        labels = pd.unique(obs[keys.perturbation_key].astype(str))
        components = sorted({c for label in labels for c in keys.components(label)})
        covariates = {
            k: sorted(pd.unique(obs[k].astype(str)).tolist()) for k in keys.covariate_keys
        }
        return cls(keys=keys, perturbations=components, covariates=covariates)

    @property
    def n_perturbations(self) -> int:
        return len(self.perturbations)

    @property
    def covariate_sizes(self) -> list[int]:
        return [len(self.covariates[k]) for k in self.keys.covariate_keys]

    @property
    def n_covariate_columns(self) -> int:
        """Width of the concatenated one-hot covariate encoding."""
        return int(sum(self.covariate_sizes))

    # -- encoding --------------------------------------------------------------------------
    def perturbation_matrix(
        self, labels: Sequence[str] | pd.Series, dose: Sequence[Any] | None = None
    ) -> sp.csr_matrix:
        """Multi-hot (n_cells x n_perturbations) CSR matrix; controls are all-zero rows.

        With ``dose``, each component's entry is its dose instead of 1 (a scalar dose
        applies to every component; ``"1+0.5"`` gives one dose per component).
        """
        labels = np.asarray(pd.Series(labels).astype(str))
        codes, uniques = pd.factorize(labels)
        index = {p: i for i, p in enumerate(self.perturbations)}
        rows, cols = [], []
        unknown = []
        for u, label in enumerate(uniques):  # loops over unique labels, not cells
            comps = self.keys.components(label)
            for comp in comps:
                if comp == "":
                    raise DataValidationError(
                        f"perturbation '{label}' has an empty component; fix the label "
                        f"(delimiter is '{self.keys.delimiter}')"
                    )
                if comp not in index:
                    unknown.append(comp)
                    continue
                rows.append(u)
                cols.append(index[comp])
        if unknown:
            names = ", ".join(sorted(set(unknown))[:10])
            raise UnknownCategoryError(
                f"the model was not trained on perturbation(s) {names}; it can only predict "
                f"combinations of the {len(self.perturbations)} perturbations it saw"
            )
        per_unique = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(len(uniques), len(self.perturbations)),
        )
        matrix = per_unique[codes]
        if dose is not None:
            matrix = self._apply_dose(matrix, labels, dose)
        return sp.csr_matrix(matrix, dtype=np.float32)

    def _apply_dose(
        self, matrix: sp.csr_matrix, labels: np.ndarray, dose: Sequence[Any]
    ) -> sp.csr_matrix:
        dose_str = np.asarray(pd.Series(dose).astype(str))
        pairs = pd.Series(list(zip(labels, dose_str, strict=True)))
        codes, uniques = pd.factorize(pairs)
        index = {p: i for i, p in enumerate(self.perturbations)}
        rows, cols, vals = [], [], []
        for u, (label, d) in enumerate(uniques):
            comps = self.keys.components(label)
            parts = d.split(self.keys.delimiter)
            if len(parts) == 1:
                parts = parts * len(comps)
            if comps and len(parts) != len(comps):
                raise DataValidationError(
                    f"dose '{d}' does not match perturbation '{label}': give one dose or one per component"
                )
            for comp, part in zip(comps, parts, strict=False):
                try:
                    value = float(part)
                except ValueError as exc:
                    raise DataValidationError(f"dose '{d}' of '{label}' is not numeric") from exc
                rows.append(u)
                cols.append(index[comp])
                vals.append(value)
        per_unique = sp.csr_matrix(
            (np.asarray(vals, np.float32), (rows, cols)),
            shape=(len(uniques), len(self.perturbations)),
        )
        return per_unique[codes]

    def covariate_codes(self, obs: pd.DataFrame) -> np.ndarray:
        """Integer code per cell and covariate key, shape (n_cells, n_keys)."""
        out = np.zeros((len(obs), len(self.keys.covariate_keys)), dtype=np.int64)
        for j, key in enumerate(self.keys.covariate_keys):
            if key not in obs.columns:
                raise DataValidationError(f"obs has no covariate column '{key}'")
            values = obs[key].astype(str).to_numpy()
            vocab = pd.Index(self.covariates[key])
            codes = vocab.get_indexer(values)
            if (codes < 0).any():
                unknown = sorted(set(values[codes < 0]))[:10]
                raise UnknownCategoryError(
                    f"the model was not trained on {key} value(s) {', '.join(unknown)}; "
                    f"known: {', '.join(self.covariates[key][:10])}"
                )
            out[:, j] = codes
        return out

    def covariate_onehot(self, obs: pd.DataFrame) -> np.ndarray:
        """Concatenated one-hot encoding of all covariate keys, float32 (n_cells x width)."""
        codes = self.covariate_codes(obs)
        out = np.zeros((len(obs), self.n_covariate_columns), dtype=np.float32)
        offset = 0
        rows = np.arange(len(obs))
        for j, size in enumerate(self.covariate_sizes):
            out[rows, offset + codes[:, j]] = 1.0
            offset += size
        return out

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.keys.to_dict(),
            "perturbations": list(self.perturbations),
            "covariates": dict(self.covariates),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoryEncoding:
        return cls(
            keys=PerturbationKeys.from_dict(data["keys"]),
            perturbations=list(data["perturbations"]),
            covariates={k: list(v) for k, v in data["covariates"].items()},
        )
