"""``latent_additive``: PerturBench's latent additive baseline.

``z = Enc(x_ctrl [, c]) + PertMLP(p)``, ``x_hat = Dec(z [, c])`` with MLPs (dropout and
layer norm), trained with mean squared error on matched controls (each perturbed cell
paired with a random control of the same covariates, resampled every epoch).

With ``embedding_key`` the encoder reads a precomputed cell embedding from ``obsm`` (for
example scGPT's) instead of expression; the target and the prediction stay expression.
Counterfactual requests must then carry the control cells' embedding in the same ``obsm``
key (:func:`pertbench.models.base.build_counterfactuals` copies ``obsm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import torch
from torch.nn import functional as F

from pertbench.errors import DataValidationError
from pertbench.models.base import params_field
from pertbench.models.data import embedding_matrix
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
