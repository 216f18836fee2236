"""``latent_additive``: PerturBench's latent additive baseline.

``z = Enc(x_ctrl [, c]) + PertMLP(p)``, ``x_hat = Dec(z [, c])`` with MLPs (dropout and
layer norm), trained with mean squared error on matched controls (each perturbed cell
paired with a random control of the same covariates, resampled every epoch).

With ``embedding_key`` the encoder reads a precomputed cell embedding from ``obsm`` (for
example scGPT's) instead of expression; the target and the prediction stay expression.
Counterfactual requests must then carry the control cells' embedding in the same ``obsm``
key (:func:`pertbench.models.base.build_counterfactuals` copies ``obsm``).

With ``perturbation_embedding`` the perturbation MLP reads perturbation *features* instead
of the multi-hot code (the default): the perturbed gene's row of the gene PCA of the
training pseudobulk (``gene``, ``perturbation_embedding_dim`` components, as the
``linear_embedding`` baseline), ``varm:KEY`` or a CSV/TSV file; a combination is the sum of
its parts' vectors. The model then predicts perturbations never seen in training whenever
their vector is known.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pertbench.errors import ConfigError, DataValidationError, NotApplicableError
from pertbench.models.base import FitContext, PerturbationModel, params_field
from pertbench.models.data import CellTable, embedding_matrix
from pertbench.models.encoding import (
    EMBEDDING_HELP,
    PerturbationEmbedding,
    gene_pca,
    parse_embedding_source,
    perturbation_embedding,
)
from pertbench.models.layers import MLP
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams

ARCHITECTURE_SPACE: dict[str, dict[str, Any]] = {
    "n_layers": {"type": "int", "low": 1, "high": 7, "step": 2},
    "encoder_width": {"type": "int", "low": 256, "high": 5376, "step": 1024},
}


@dataclass
class LatentAdditiveParams(NeuralParams):
    n_layers: int = params_field(2, "Hidden layers of the encoder, perturbation MLP and decoder.")
    encoder_width: int = params_field(512, "Width of the hidden layers.")
    latent_dim: int = params_field(64, "Dimension of the latent space.")
    dropout: float = params_field(0.1, "Dropout probability after each hidden layer.")
    softplus_output: bool = params_field(True, "Apply softplus to the decoder output (>= 0).")
    inject_covariates_encoder: bool = params_field(
        True, "Feed the one-hot covariates to the encoder."
    )
    inject_covariates_decoder: bool = params_field(
        True, "Feed the one-hot covariates to the decoder."
    )
    embedding_key: str = params_field(
        "", "obsm key of a cell embedding (e.g. scGPT) to encode instead of expression; '' = X."
    )
    perturbation_embedding: str = params_field(
        "",
        f"Perturbation features instead of the multi-hot code ('' = multi-hot): {EMBEDDING_HELP}.",
    )
    perturbation_embedding_dim: int = params_field(
        10, "Components of the gene PCA used by perturbation_embedding=gene."
    )


class LatentAdditiveNet(LossModule):
    def __init__(
        self,
        *,
        n_input: int,
        n_genes: int,
        n_perts: int,
        n_cov: int,
        params: LatentAdditiveParams,
    ) -> None:
        super().__init__(lr=params.lr, wd=params.wd)
        p = params
        self.cov_encoder = p.inject_covariates_encoder and n_cov > 0
        self.cov_decoder = p.inject_covariates_decoder and n_cov > 0
        self.softplus_output = p.softplus_output
        self.encoder = MLP(
            n_input + (n_cov if self.cov_encoder else 0),
            p.encoder_width,
            p.latent_dim,
            p.n_layers,
            dropout=p.dropout,
        )
        self.pert_encoder = MLP(
            n_perts, p.encoder_width, p.latent_dim, p.n_layers, dropout=p.dropout
        )
        self.decoder = MLP(
            p.latent_dim + (n_cov if self.cov_decoder else 0),
            p.encoder_width,
            n_genes,
            p.n_layers,
            dropout=p.dropout,
        )

    def basal_latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Enc(x_ctrl [, c])``: the cell's latent before the perturbation is added."""
        h = batch["ctrl"]
        if self.cov_encoder:
            h = torch.cat([h, batch["cov"]], dim=-1)
        return self.encoder(h)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.basal_latent(batch) + self.pert_encoder(batch["pert"])
        if self.cov_decoder:
            z = torch.cat([z, batch["cov"]], dim=-1)
        out = self.decoder(z)
        return F.softplus(out) if self.softplus_output else out

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(batch), batch["x"])}

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)


class LatentAdditive(NeuralModel):
    """Encoder of the control cell plus a perturbation embedding, decoded (PerturBench)."""

    name: ClassVar[str] = "latent_additive"
    description: ClassVar[str] = (
        "Dec(Enc(x_ctrl) + PertMLP(p)) with covariates; optional obsm embedding input"
    )
    Params: ClassVar[type] = LatentAdditiveParams
    uses_matched_controls: ClassVar[bool] = True
    # PerturBench appendix D.6, table 9.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        **ARCHITECTURE_SPACE,
        "latent_dim": {"type": "categorical", "choices": [64, 128, 192, 256, 512]},
        "lr": {"type": "float", "low": 5e-6, "high": 5e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.8, "step": 0.1},
    }

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        if self.params.perturbation_embedding:
            parse_embedding_source(self.params.perturbation_embedding)
            if self.params.perturbation_embedding_dim < 1:
                raise ConfigError("perturbation_embedding_dim must be at least 1")
        self.pert_embedding: PerturbationEmbedding | None = None
        #: Training perturbations left out because they have no vector (last fit).
        self.dropped_perturbations: list[str] = []

    # -- perturbation features -----------------------------------------------------------
    @property
    def predicts_unseen_perturbations(self) -> bool:
        return bool(self.params.perturbation_embedding)

    def can_predict(self, labels) -> np.ndarray:
        if self.pert_embedding is None:
            return super().can_predict(labels)
        self._require_fitted()
        return self.pert_embedding.known(labels, self.keys)

    def cannot_predict_message(self, labels: list[str]) -> str:
        if not self.params.perturbation_embedding:
            return super().cannot_predict_message(labels)
        return (
            f"model '{self.name}' has no perturbation embedding "
            f"({self.params.perturbation_embedding}) for {', '.join(sorted(labels)[:5])}"
        )

    def _perturbation_width(self) -> int:
        if self.pert_embedding is None:
            return super()._perturbation_width()
        return self.pert_embedding.dim

    def _perturbation_features(self, obs: pd.DataFrame) -> np.ndarray:
        dose_key = self.keys.dose_key
        dose = obs[dose_key] if dose_key and dose_key in obs else None
        return self.pert_embedding.encode(obs[self.keys.perturbation_key], self.keys, dose)

    def _perturbation_inputs(self, obs: pd.DataFrame):
        if self.pert_embedding is None:
            return super()._perturbation_inputs(obs)
        return self._perturbation_features(obs)

    def _table(self, adata: ad.AnnData) -> CellTable:
        table = super()._table(adata)
        if self.pert_embedding is not None:
            table.arrays["pert"] = self._perturbation_features(adata.obs)
        return table

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        source = self.params.perturbation_embedding
        self.pert_embedding = None
        if source:
            gene_vectors = None
            if parse_embedding_source(source)[0] == "gene":
                from pertbench.models.pseudobulk import training_profiles

                profiles = training_profiles(train, self.keys)
                gene_vectors = gene_pca(
                    profiles.group_means, self.params.perturbation_embedding_dim
                )
            embedding = perturbation_embedding(source, adata=train, gene_embedding=gene_vectors)
            # as linear_embedding: cells of a perturbation without a vector cannot be
            # encoded and are left out of training (listed in dropped_perturbations)
            cell_known = embedding.known(train.obs[self.keys.perturbation_key], self.keys)
            self.dropped_perturbations = sorted(
                pd.unique(train.obs.loc[~cell_known, self.keys.perturbation_key].astype(str))
            )
            if cell_known.any() and not cell_known.all():
                train = train[cell_known]
            labels = pd.unique(train.obs[self.keys.perturbation_key].astype(str))
            known = embedding.known(labels, self.keys)
            if val is not None:
                # validation cells whose perturbation has no vector cannot be scored
                known_val = embedding.known(val.obs[self.keys.perturbation_key], self.keys)
                val = val[known_val] if known_val.any() else None
            if not known.all() or not any(self.keys.components(str(x)) for x in labels):
                raise NotApplicableError(
                    f"model '{self.name}': no training perturbation has a vector in the "
                    f"{embedding.source} embedding"
                )
            self.pert_embedding = embedding
        super()._fit(train, val, context)

    def _fit_from_disk(self, data, train_rows, val_rows, context: FitContext) -> None:
        if self.params.perturbation_embedding:
            # Perturbation vectors are learnt from the training cells (gene embedding:
            # their group means), so these cells are read into memory and fitted as such.
            PerturbationModel._fit_from_disk(self, data, train_rows, val_rows, context)
            return
        self.pert_embedding = None
        self.dropped_perturbations = []
        super()._fit_from_disk(data, train_rows, val_rows, context)

    def _extra_config(self) -> dict[str, Any]:
        extra = super()._extra_config()
        if self.pert_embedding is not None:
            extra["pert_embedding"] = {
                "names": list(self.pert_embedding.names),
                "source": self.pert_embedding.source,
            }
        return extra

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        if self.pert_embedding is not None:
            state["pert_embedding"] = torch.from_numpy(
                np.ascontiguousarray(self.pert_embedding.vectors)
            )
        return state

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        if "pert_embedding" in extra:
            info = extra["pert_embedding"]
            self.pert_embedding = PerturbationEmbedding(
                list(map(str, info["names"])),
                state["pert_embedding"].cpu().numpy().astype(np.float64),
                str(info["source"]),
            )
        super()._load_state(state, extra)

    # -- inputs --------------------------------------------------------------------------
    def _input_matrix(self, adata: ad.AnnData):
        key = self._embedding_key()
        if key is None:
            return super()._input_matrix(adata)
        value = embedding_matrix(adata, key)
        expected = (self.dims or {}).get("n_input")
        if expected is not None and value.shape[1] != expected:
            raise DataValidationError(
                f"obsm['{key}'] has {value.shape[1]} dimensions but the model was trained on "
                f"{expected}; use the same embedding as in training"
            )
        return np.ascontiguousarray(value, dtype=np.float32)

    def _build_module(self, dims: dict[str, Any]) -> LatentAdditiveNet:
        return LatentAdditiveNet(
            n_input=dims["n_input"],
            n_genes=dims["n_genes"],
            n_perts=dims["n_perts"],
            n_cov=dims["n_cov"],
            params=self.params,
        )
