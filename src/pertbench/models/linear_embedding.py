"""Embedding baselines: ``linear_embedding`` (Ahlmann-Eltze et al. 2025) and
``nearest_perturbation``.

Both read perturbations by *features* (:class:`~pertbench.models.encoding.PerturbationEmbedding`),
so they predict a perturbation never seen in training whenever its vector is known; both
are closed form (seconds) and deterministic.

``linear_embedding``
    ``Y ~ A K B^T + b``. ``Y`` (genes x columns) holds the training pseudobulk *deltas*:
    one column per training (covariates, perturbation) group whose perturbation has a
    vector (mean of its cells - mean of the covariates' training controls). ``A``
    (genes x k) is the gene embedding: by default the gene PCA of the training pseudobulk
    (:func:`~pertbench.models.encoding.gene_pca`, k = ``n_components`` = 10). ``B``
    (columns x d) holds each column's perturbation vector: for a genetic perturbation of
    gene g, g's row of ``A`` (``perturbation_embedding="gene"``), or a precomputed vector
    (``varm:KEY``, a file). A combination's vector is the SUM of its singles' vectors (as
    the authors' double-perturbation code), so ``A K B^T`` is additive in the singles.
    **Covariates** enter through the centre only: ``b_c`` = the mean of covariate c's
    training columns (the pooled mean of all columns for covariates without any), while
    ``K`` is shared by all covariates, so a covariate with few training perturbations (the
    few-shot task) still borrows ``K`` from the others.
    ``K = (A^T A + lambda I)^-1 A^T (Y - b) B (B^T B + lambda I)^-1`` with ``lambda = ridge``
    (0.1). A request (c, p) from control cell x predicts ``x + A K B_p^T + b_c``.
``nearest_perturbation``
    The training perturbation whose vector is closest to the requested one (Euclidean or
    cosine distance; ties go to the first in sorted order) lends its delta: its delta
    measured in the requested covariates when it was, else its mean delta over the training
    covariates. A perturbation seen in training is its own nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.errors import ConfigError, ModelError, NotApplicableError
from pertbench.models.base import FitContext, PredictionInputs, params_field
from pertbench.models.baselines import _AnalyticBaseline, _dense
from pertbench.models.encoding import (
    EMBEDDING_HELP,
    PerturbationEmbedding,
    gene_pca,
    parse_embedding_source,
    perturbation_embedding,
    read_embedding_table,
    varm_embedding,
)
from pertbench.models.pseudobulk import TrainingProfiles, training_profiles

__all__ = ["LinearEmbedding", "NearestPerturbation", "solve_linear_embedding"]


def solve_linear_embedding(Y: np.ndarray, A: np.ndarray, B: np.ndarray, ridge: float) -> np.ndarray:
    """``K = (A^T A + ridge I)^-1 A^T Y B (B^T B + ridge I)^-1`` for centred ``Y``.

    Parameters
    ----------
    Y
        (genes x columns) centred targets.
    A
        (genes x k) gene embedding.
    B
        (columns x d) perturbation embedding of the columns.
    ridge
        Penalty lambda >= 0 (0 is the plain least-squares solution for full-rank A, B).
    """
    left = A.T @ A + ridge * np.eye(A.shape[1])
    right = B.T @ B + ridge * np.eye(B.shape[1])
    middle = A.T @ Y @ B  # k x d
    return np.linalg.solve(right.T, np.linalg.solve(left, middle).T).T


@dataclass
class EmbeddingParams:
    n_components: int = params_field(
        10, "Dimension of the gene PCA of the training pseudobulk (gene_embedding=pca)."
    )
    gene_embedding: str = params_field(
        "pca",
        "'pca' (gene PCA of the training pseudobulk), 'varm:KEY' or a .csv/.tsv file "
        "(rows: genes; genes absent from it get zero rows).",
    )
    perturbation_embedding: str = params_field("gene", f"Perturbation vectors: {EMBEDDING_HELP}.")


@dataclass
class LinearEmbeddingParams(EmbeddingParams):
    ridge: float = params_field(0.1, "Ridge penalty lambda on both sides of K.")


@dataclass
class NearestParams(EmbeddingParams):
    metric: str = params_field(
        "euclidean", "Distance between perturbation vectors.", choices=("euclidean", "cosine")
    )


class _EmbeddingBaseline(_AnalyticBaseline):
    """Shared part: the gene embedding, perturbation vectors, predictability, persistence."""

    input_kind = "expression"
    #: Embeddings read var/varm of the training data, not only group statistics.
    streams_training = False

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        parse_embedding_source(self.params.perturbation_embedding)
        if self.params.gene_embedding != "pca":
            kind, _ = parse_embedding_source(self.params.gene_embedding, what="gene_embedding")
            if kind not in ("varm", "file"):
                raise ConfigError(
                    "gene_embedding must be 'pca', 'varm:KEY' or a .csv/.tsv file of gene vectors"
                )
        if self.params.n_components < 1:
            raise ConfigError(f"n_components must be at least 1, got {self.params.n_components}")
        self.embedding: PerturbationEmbedding | None = None
        self.covariate_labels: list[list[str]] = []

    @property
    def predicts_unseen_perturbations(self) -> bool:
        return True

    def can_predict(self, labels) -> np.ndarray:
        self._require_fitted()
        return self.embedding.known(labels, self.keys)

    def cannot_predict_message(self, labels: list[str]) -> str:
        return (
            f"{self.name} has no perturbation embedding ({self.embedding.source}) for "
            f"{', '.join(sorted(labels)[:5])}: give vectors for them with "
            "perturbation_embedding=varm:KEY or a .csv/.tsv file"
        )

    def _gene_embedding(self, train: ad.AnnData, profiles: TrainingProfiles) -> np.ndarray:
        source = self.params.gene_embedding
        if source == "pca":
            return gene_pca(profiles.group_means, self.params.n_components)
        kind, argument = parse_embedding_source(source, what="gene_embedding")
        if kind == "varm":
            return varm_embedding(train, argument)
        names, vectors = read_embedding_table(argument)
        rows = pd.Index(names).get_indexer(self.genes)
        if (rows >= 0).sum() < 2:
            raise ModelError(
                f"gene embedding file '{argument}' names fewer than 2 of the data's genes; "
                "its first column must hold gene names as in var_names"
            )
        out = np.zeros((len(self.genes), vectors.shape[1]))
        out[rows >= 0] = vectors[rows[rows >= 0]]
        return out

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        profiles = training_profiles(train, self.keys)
        gene_vectors = self._gene_embedding(train, profiles)
        self.embedding = perturbation_embedding(
            self.params.perturbation_embedding, adata=train, gene_embedding=gene_vectors
        )
        table = profiles.delta_groups
        usable = self.embedding.known(table[self.keys.perturbation_key], self.keys)
        if not usable.any():
            raise NotApplicableError(
                f"{self.name}: no training perturbation has a vector in the "
                f"{self.embedding.source} embedding; check perturbation_embedding"
            )
        self._fit_embedding(profiles, gene_vectors, usable)

    def _fit_embedding(self, profiles: TrainingProfiles, A: np.ndarray, usable: np.ndarray):
        raise NotImplementedError

    def _cov_table(self, profiles: TrainingProfiles, codes: np.ndarray) -> list[list[str]]:
        cov_keys = list(self.keys.covariate_keys)
        if not cov_keys:
            return [[] for _ in codes]
        return profiles.covariates.loc[codes, cov_keys].astype(str).to_numpy().tolist()

    def _extra_config(self) -> dict[str, Any]:
        return {
            "embedding_names": list(self.embedding.names),
            "embedding_source": self.embedding.source,
            "covariate_labels": self.covariate_labels,
        }

    def _state(self) -> dict[str, Any]:
        import torch

        return {"embedding": torch.from_numpy(np.ascontiguousarray(self.embedding.vectors))}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.embedding = PerturbationEmbedding(
            list(map(str, extra["embedding_names"])),
            state["embedding"].cpu().numpy().astype(np.float64),
            str(extra["embedding_source"]),
        )
        self.covariate_labels = [list(map(str, row)) for row in extra["covariate_labels"]]


class LinearEmbedding(_EmbeddingBaseline):
    """``x_ctrl + A K B_p^T + b_c``: the linear gene x perturbation embedding model."""

    name: ClassVar[str] = "linear_embedding"
    description: ClassVar[str] = (
        "Ahlmann-Eltze et al. 2025: delta = A K B^T + b with gene PCA A and perturbation "
        "embedding B (closed form; predicts unseen perturbations with known vectors)"
    )
    Params: ClassVar[type] = LinearEmbeddingParams

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        if self.params.ridge < 0:
            raise ConfigError(f"ridge must be non-negative, got {self.params.ridge}")
        self.gene_vectors: np.ndarray | None = None  # A (genes x k)
        self.K: np.ndarray | None = None  # k x d
        self.centres: np.ndarray | None = None  # (n_covariates, genes) b_c
        self.pooled_centre: np.ndarray | None = None  # (genes,)

    def _fit_embedding(self, profiles: TrainingProfiles, A: np.ndarray, usable: np.ndarray):
        table = profiles.delta_groups.loc[usable]
        Y = profiles.deltas[usable].T  # genes x columns
        B = self.embedding.encode(table[self.keys.perturbation_key], self.keys).astype(np.float64)
        cov_codes, cov_uniques = pd.factorize(table["covariate_code"].to_numpy(), sort=True)
        sums = np.zeros((len(cov_uniques), Y.shape[0]))
        np.add.at(sums, cov_codes, Y.T)
        self.centres = sums / np.bincount(cov_codes)[:, None]
        self.pooled_centre = Y.mean(axis=1)
        self.covariate_labels = self._cov_table(profiles, cov_uniques)
        centred = Y - self.centres[cov_codes].T
        self.gene_vectors = A
        self.K = solve_linear_embedding(centred, A, B, float(self.params.ridge))

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        obs = inputs.obs
        labels = obs[self.keys.perturbation_key].astype(str).to_numpy()
        codes, uniques = pd.factorize(labels)
        B = self.embedding.encode(uniques, self.keys).astype(np.float64)
        effect = (self.gene_vectors @ self.K @ B.T).T  # distinct perturbations x genes
        rows = _covariate_rows_from_labels(self.keys, obs, self.covariate_labels)
        centres = np.vstack([self.centres, self.pooled_centre[None, :]])
        delta = effect[codes] + centres[np.where(rows >= 0, rows, len(self.centres))]
        # a control request is the control itself (its vector is zero, not its centre)
        delta[np.asarray([not self.keys.components(x) for x in labels])] = 0.0
        return _dense(inputs.X).astype(np.float64) + delta

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            **super()._state(),
            "gene_vectors": torch.from_numpy(np.ascontiguousarray(self.gene_vectors)),
            "K": torch.from_numpy(np.ascontiguousarray(self.K)),
            "centres": torch.from_numpy(np.ascontiguousarray(self.centres)),
            "pooled_centre": torch.from_numpy(np.ascontiguousarray(self.pooled_centre)),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        super()._load_state(state, extra)
        for name in ("gene_vectors", "K", "centres", "pooled_centre"):
            setattr(self, name, state[name].cpu().numpy().astype(np.float64))


class NearestPerturbation(_EmbeddingBaseline):
    """The delta of the training perturbation closest in embedding space."""

    name: ClassVar[str] = "nearest_perturbation"
    description: ClassVar[str] = (
        "Delta of the training perturbation closest in embedding space (within the "
        "requested covariates when measured there)"
    )
    Params: ClassVar[type] = NearestParams
    # neighbours and notes describe a whole request, so a request is predicted in one piece
    chunked_prediction: ClassVar[bool] = False

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        if self.params.metric not in ("euclidean", "cosine"):
            raise ConfigError(f"metric must be euclidean or cosine, got '{self.params.metric}'")
        self.candidates: list[str] = []  # training perturbation labels, sorted
        self.candidate_vectors: np.ndarray | None = None  # (n_candidates, d)
        self.mean_delta: np.ndarray | None = None  # (n_candidates, genes)
        self.within_index: list[list[int]] = []  # [covariate row, candidate] per within delta
        self.within_delta: np.ndarray | None = None
        #: The neighbour chosen for each distinct requested perturbation (last prediction).
        self.neighbours: dict[str, str] = {}

    def _fit_embedding(self, profiles: TrainingProfiles, A: np.ndarray, usable: np.ndarray):
        table = profiles.delta_groups.loc[usable].reset_index(drop=True)
        deltas = profiles.deltas[usable]
        labels = table[self.keys.perturbation_key].astype(str)
        # one label per perturbation identity (A+B and B+A are one), sorted for ties
        first = table.assign(label=labels).groupby("key", sort=True)["label"].first()
        self.candidates = first.tolist()
        cand_index = {key: i for i, key in enumerate(first.index)}
        cand = table["key"].map(cand_index).to_numpy()
        self.candidate_vectors = self.embedding.encode(self.candidates, self.keys).astype(
            np.float64
        )
        sums = np.zeros((len(self.candidates), deltas.shape[1]))
        np.add.at(sums, cand, deltas)
        self.mean_delta = sums / np.bincount(cand, minlength=len(self.candidates))[:, None]
        cov_codes, cov_uniques = pd.factorize(table["covariate_code"].to_numpy(), sort=True)
        self.covariate_labels = self._cov_table(profiles, cov_uniques)
        self.within_index = np.column_stack([cov_codes, cand]).tolist()
        self.within_delta = deltas

    def _nearest(self, vectors: np.ndarray) -> np.ndarray:
        cands = self.candidate_vectors
        if self.params.metric == "cosine":
            norm = lambda m: m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)  # noqa: E731
            distance = 1.0 - norm(vectors) @ norm(cands).T
        else:
            distance = (
                (vectors**2).sum(axis=1)[:, None]
                - 2.0 * vectors @ cands.T
                + (cands**2).sum(axis=1)[None, :]
            )
        return np.argmin(np.round(distance, 12), axis=1)  # first (sorted) among exact ties

    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        obs = inputs.obs
        labels = obs[self.keys.perturbation_key].astype(str).to_numpy()
        rows = _covariate_rows_from_labels(self.keys, obs, self.covariate_labels)
        pairs = pd.MultiIndex.from_arrays([labels, rows])
        codes, uniques = pd.factorize(pairs)
        distinct = np.asarray([label for label, _ in uniques], dtype=object)
        nearest = self._nearest(self.embedding.encode(distinct, self.keys).astype(np.float64))
        within = {(int(c), int(k)): i for i, (c, k) in enumerate(self.within_index)}
        deltas = np.empty((len(uniques), self.mean_delta.shape[1]))
        self.neighbours = {}
        for u, (label, row) in enumerate(uniques):  # distinct requests, not cells
            k = int(nearest[u])
            self.neighbours[str(label)] = self.candidates[k]
            hit = within.get((int(row), k))
            deltas[u] = self.within_delta[hit] if hit is not None else self.mean_delta[k]
            if not self.keys.components(str(label)):
                deltas[u] = 0.0
        borrowed = [f"{p} -> {q}" for p, q in self.neighbours.items() if p != q]
        if borrowed:
            self.prediction_notes.append(
                f"nearest_perturbation: {len(borrowed)} perturbation(s) use the delta of "
                f"their nearest training perturbation ({', '.join(borrowed[:5])}"
                f"{' ...' if len(borrowed) > 5 else ''})"
            )
        return _dense(inputs.X).astype(np.float64) + deltas[codes]

    def _extra_config(self) -> dict[str, Any]:
        return {
            **super()._extra_config(),
            "candidates": self.candidates,
            "within_index": self.within_index,
        }

    def _state(self) -> dict[str, Any]:
        import torch

        return {
            **super()._state(),
            "candidate_vectors": torch.from_numpy(np.ascontiguousarray(self.candidate_vectors)),
            "mean_delta": torch.from_numpy(np.ascontiguousarray(self.mean_delta)),
            "within_delta": torch.from_numpy(np.ascontiguousarray(self.within_delta)),
        }

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        super()._load_state(state, extra)
        self.candidates = list(map(str, extra["candidates"]))
        self.within_index = [[int(c), int(k)] for c, k in extra["within_index"]]
        for name in ("candidate_vectors", "mean_delta", "within_delta"):
            setattr(self, name, state[name].cpu().numpy().astype(np.float64))


def _covariate_rows_from_labels(keys, obs: pd.DataFrame, labels: list[list[str]]) -> np.ndarray:
    """Index of each request's covariates in ``labels`` (-1 where training had none)."""
    cov_keys = list(keys.covariate_keys)
    if not cov_keys:
        return np.zeros(len(obs), dtype=np.int64) if labels else np.full(len(obs), -1)
    if not labels:
        return np.full(len(obs), -1, dtype=np.int64)
    known = pd.MultiIndex.from_tuples([tuple(row) for row in labels])
    return known.get_indexer(pd.MultiIndex.from_frame(obs[cov_keys].astype(str))).astype(np.int64)
