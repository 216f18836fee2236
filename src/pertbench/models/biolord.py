"""``biolord``: PerturBench's Biolord* (one-hot perturbations, no GO/RDKit embedding).

The decoder reads ``[u + noise, PertEmb(p), CovEmb(c)]`` where ``u = Enc(x)`` is the
*unknown-attributes* latent of the cell, ``PertEmb`` an MLP of the multi-hot perturbation
and ``CovEmb`` the sum of one embedding table per covariate key. During training Gaussian
noise of standard deviation ``noise`` is added to ``u`` and ``u`` is penalised
(``penalty_weight * mean_i ||u_i||^2``): together an information bottleneck that pushes
what the known attributes (perturbation, covariates) explain into their embeddings.

Loss: squared error summed over genes, averaged over cells (the scale PerturBench's
``penalty_weight`` range refers to), plus the penalty. Prediction encodes the control cell
without noise and decodes it with the requested perturbation and its covariates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from pertbench.errors import ConfigError
from pertbench.models.base import params_field
from pertbench.models.latent_additive import ARCHITECTURE_SPACE
from pertbench.models.layers import MLP
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams


@dataclass
class BiolordParams(NeuralParams):
    n_layers: int = params_field(2, "Hidden layers of encoder, perturbation MLP and decoder.")
    encoder_width: int = params_field(256, "Width of the hidden layers.")
    latent_dim: int = params_field(32, "Dimension of each latent block (unknown, pert., cov.).")
    penalty_weight: float = params_field(
        10.0, "Weight of the penalty on the unknown-attributes latent ||Enc(x)||^2."
    )
    noise: float = params_field(
        0.1, "Std of the Gaussian noise added to the unknown-attributes latent in training."
    )
    dropout: float = params_field(0.1, "Dropout probability after each hidden layer.")
    softplus_output: bool = params_field(True, "Apply softplus to the decoder output (>= 0).")


class BiolordNet(LossModule):
    def __init__(
        self, *, n_genes: int, n_perts: int, covariate_sizes: list[int], params: BiolordParams
    ) -> None:
        super().__init__(lr=params.lr, wd=params.wd)
        p = params
        if p.noise < 0 or p.penalty_weight < 0:
            raise ConfigError("biolord noise and penalty_weight must be non-negative")
        d = p.latent_dim
        self.noise = float(p.noise)
        self.penalty_weight = float(p.penalty_weight)
        self.softplus_output = p.softplus_output
        self.latent_dim = d
        self.encoder = MLP(n_genes, p.encoder_width, d, p.n_layers, dropout=p.dropout)
        self.pert_encoder = MLP(n_perts, p.encoder_width, d, p.n_layers, dropout=p.dropout)
        self.cov_embeddings = nn.ModuleList(nn.Embedding(size, d) for size in covariate_sizes)
        self.decoder = MLP(3 * d, p.encoder_width, n_genes, p.n_layers, dropout=p.dropout)

    def _decode(self, u: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cov = u.new_zeros(u.shape[0], self.latent_dim)
        codes = batch["cov_codes"]
        for k, embedding in enumerate(self.cov_embeddings):
            cov = cov + embedding(codes[:, k])
        out = self.decoder(torch.cat([u, self.pert_encoder(batch["pert"]), cov], dim=-1))
        return F.softplus(out) if self.softplus_output else out

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        u = self.encoder(batch["x"])
        noisy = u + self.noise * torch.randn_like(u) if self.training else u
        pred = self._decode(noisy, batch)
        recon = F.mse_loss(pred, batch["x"], reduction="none").sum(dim=-1).mean()
        penalty = u.pow(2).sum(dim=-1).mean()
        return {
            "loss": recon + self.penalty_weight * penalty,
            "recon": recon,
            "penalty": penalty,
        }

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._decode(self.encoder(batch["x"]), batch)

    def basal_latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The unknown-attributes latent ``u = Enc(x)`` (no noise)."""
        return self.encoder(batch["x"])


class Biolord(NeuralModel):
    """Biolord* with one-hot perturbations and a penalised unknown-attributes latent."""

    name: ClassVar[str] = "biolord"
    description: ClassVar[str] = (
        "Biolord*: decoder of [Enc(x)+noise, PertEmb(p), CovEmb(c)], penalised Enc(x)"
    )
    Params: ClassVar[type] = BiolordParams
    # PerturBench appendix D.6, table 11.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "penalty_weight": {"type": "float", "low": 1e1, "high": 1e5, "log": True},
        **ARCHITECTURE_SPACE,
        "latent_dim": {"type": "categorical", "choices": [64, 128, 192, 256, 512]},
        "lr": {"type": "float", "low": 5e-6, "high": 5e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.8, "step": 0.1},
    }

    def _build_module(self, dims: dict[str, Any]) -> BiolordNet:
        return BiolordNet(
            n_genes=dims["n_genes"],
            n_perts=dims["n_perts"],
            covariate_sizes=list(dims["covariate_sizes"]),
            params=self.params,
        )
