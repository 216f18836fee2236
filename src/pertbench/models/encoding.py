"""Encodings a model learns at fit time and must reuse at prediction time.

- :class:`CategoryEncoding`: the vocabulary of perturbation components (multi-hot) and
  covariate values (one-hot) seen in training. A one-hot model cannot encode a component
  it never saw.
- :class:`PerturbationEmbedding`: perturbation components encoded by *features* (a vector
  per component; a combination is the sum of its parts), so a perturbation absent from
  training can be encoded whenever its vector is known. The vectors come from
  :func:`perturbation_embedding`: the gene embedding's row of the perturbed gene (for
  genetic perturbations; by default the gene PCA of the training pseudobulk,
  :func:`gene_pca`), an ``adata.varm`` key, or a CSV/TSV file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    InputFileError,
    UnknownCategoryError,
    UnseenPerturbationError,
)


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
            for comp, value in zip(
                self.keys.components(label), dose_values(label, d, self.keys), strict=True
            ):
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


def dose_values(label: str, dose: str, keys: PerturbationKeys) -> list[float]:
    """One numeric dose per component of ``label`` (a single dose applies to every part)."""
    comps = keys.components(label)
    parts = str(dose).split(keys.delimiter)
    if len(parts) == 1:
        parts = parts * len(comps)
    if comps and len(parts) != len(comps):
        raise DataValidationError(
            f"dose '{dose}' does not match perturbation '{label}': give one dose or one per component"
        )
    try:
        return [float(part) for part in parts[: len(comps)]]
    except ValueError as exc:
        raise DataValidationError(f"dose '{dose}' of '{label}' is not numeric") from exc


# ---------------------------------------------------------------------------------------
# Perturbation features
# ---------------------------------------------------------------------------------------
EMBEDDING_HELP = (
    "'gene' (the perturbed gene's row of the gene embedding), 'varm:KEY' (rows of "
    "adata.varm[KEY] for perturbations named after genes) or a .csv/.tsv file "
    "(first column: perturbation names, then one column per dimension)"
)


def parse_embedding_source(value: str, *, what: str = "perturbation_embedding") -> tuple[str, str]:
    """``(kind, argument)`` of an embedding source: ``gene``, ``varm:KEY``, ``pca``, a file."""
    value = str(value).strip()
    if value in ("gene", "pca"):
        return value, ""
    if value.startswith("varm:") and len(value) > 5:
        return "varm", value[5:]
    if value.startswith("file:") and len(value) > 5:
        return "file", value[5:]
    if value.lower().endswith((".csv", ".tsv", ".txt")):
        return "file", value
    raise ConfigError(f"{what} '{value}' is not understood; give {EMBEDDING_HELP}")


def read_embedding_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Names (first column) and vectors (the other columns) of an embedding CSV/TSV file."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"embedding file '{path}' does not exist")
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        frame = pd.read_csv(path, sep=sep, index_col=0)
    except Exception as exc:  # malformed file of any kind
        raise InputFileError(f"cannot read embedding file '{path}': {exc}") from exc
    try:
        vectors = frame.to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise DataValidationError(
            f"embedding file '{path}' has non-numeric values; rows are names then numbers"
        ) from exc
    names = frame.index.astype(str)
    if vectors.ndim != 2 or vectors.shape[1] == 0 or not len(names):
        raise DataValidationError(f"embedding file '{path}' has no vectors (name, then numbers)")
    if not names.is_unique:
        raise DataValidationError(
            f"embedding file '{path}' repeats names, e.g. {names[names.duplicated()][0]!r}"
        )
    if not np.isfinite(vectors).all():
        raise DataValidationError(f"embedding file '{path}' contains NaN or inf values")
    return names.tolist(), vectors


def varm_embedding(adata: ad.AnnData, key: str) -> np.ndarray:
    """``adata.varm[key]`` as a finite dense float64 (genes x d) array, or a clear error."""
    if key not in adata.varm:
        available = ", ".join(adata.varm.keys()) or "none"
        raise DataValidationError(f"varm has no embedding '{key}' (available: {available})")
    value = adata.varm[key]
    value = value.toarray() if sp.issparse(value) else np.asarray(value, dtype=np.float64)
    if value.ndim != 2 or not np.isfinite(value).all():
        raise DataValidationError(f"varm['{key}'] must be a finite (genes x dims) array")
    return value.astype(np.float64)


def gene_pca(group_means: np.ndarray, n_components: int) -> np.ndarray:
    """Gene embedding (genes x k): PCA of the genes x training-groups pseudobulk matrix.

    As Ahlmann-Eltze et al. (``prcomp`` of the genes x conditions matrix): genes are the
    observations, each group's profile is centred over genes, and a gene's embedding is its
    principal-component score (U S). ``k = min(n_components, rank)``. Each component's sign
    is fixed (largest absolute entry positive) so the result is deterministic.
    """
    Y = np.asarray(group_means, dtype=np.float64).T  # genes x groups
    Y = Y - Y.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(Y, full_matrices=False)
    rank = int((S > S.max(initial=0.0) * 1e-10).sum()) if S.size else 0
    k = max(min(int(n_components), rank), 1)
    scores = U[:, :k] * S[:k]
    flip = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(k)])
    return scores * np.where(flip == 0, 1.0, flip)


@dataclass
class PerturbationEmbedding:
    """A feature vector per perturbation component; a combination is the sum of its parts.

    Attributes
    ----------
    names
        Component names (perturbation labels of singles, or gene names).
    vectors
        (n_names x d) float64.
    source
        Where the vectors came from (``gene``, ``varm:KEY``, a file path).
    """

    names: list[str]
    vectors: np.ndarray
    source: str

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.names)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def known(self, labels, keys: PerturbationKeys) -> np.ndarray:
        """True for each label whose components all have a vector (the control: True)."""
        return np.asarray(
            [
                all(p in self._index for p in keys.components(str(label)))
                for label in pd.Series(labels).astype(str)
            ],
            dtype=bool,
        )

    def encode(self, labels, keys: PerturbationKeys, dose=None) -> np.ndarray:
        """(n_labels x d) float32: the (dose-weighted) sum of the components' vectors."""
        labels = np.asarray(pd.Series(labels).astype(str))
        doses = (
            np.asarray(pd.Series(dose).astype(str))
            if dose is not None
            else np.full(len(labels), "1")
        )
        pairs = pd.MultiIndex.from_arrays([labels, doses])
        codes, uniques = pd.factorize(pairs)
        table = np.zeros((len(uniques), self.dim))
        unknown: set[str] = set()
        for u, (label, d) in enumerate(uniques):  # loops over distinct requests, not cells
            comps = keys.components(label)
            weights = dose_values(label, d, keys) if dose is not None else [1.0] * len(comps)
            for comp, weight in zip(comps, weights, strict=True):
                row = self._index.get(comp)
                if row is None:
                    unknown.add(comp)
                else:
                    table[u] += weight * self.vectors[row]
        if unknown:
            raise UnseenPerturbationError(
                f"no {self.source} embedding for perturbation(s) {', '.join(sorted(unknown)[:10])}"
            )
        return table[codes].astype(np.float32)

    def subset(self, names) -> PerturbationEmbedding:
        """The vectors of ``names`` that are known (kept in that order)."""
        rows = [self._index[n] for n in names if n in self._index]
        return PerturbationEmbedding(
            [self.names[r] for r in rows], self.vectors[rows].copy(), self.source
        )


def perturbation_embedding(
    source: str,
    *,
    adata: ad.AnnData,
    gene_embedding: np.ndarray | None = None,
) -> PerturbationEmbedding:
    """Resolve a perturbation-embedding source into vectors.

    Parameters
    ----------
    source
        ``gene`` (rows of ``gene_embedding`` over ``adata.var_names``), ``varm:KEY`` or a
        CSV/TSV file (``file:PATH`` or a path ending in .csv/.tsv/.txt).
    adata
        The training data (its genes, and its varm for ``varm:KEY``).
    gene_embedding
        (n_genes x d) gene embedding aligned to ``adata.var_names``, for ``gene``.
    """
    kind, argument = parse_embedding_source(source)
    genes = [str(g) for g in adata.var_names]
    if kind in ("gene", "pca"):
        if gene_embedding is None:
            raise ConfigError("the 'gene' perturbation embedding needs a gene embedding")
        return PerturbationEmbedding(genes, np.asarray(gene_embedding, np.float64), "gene")
    if kind == "varm":
        return PerturbationEmbedding(genes, varm_embedding(adata, argument), source)
    names, vectors = read_embedding_table(argument)
    return PerturbationEmbedding(names, vectors, str(argument))
