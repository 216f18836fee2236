"""``decoder_only``: PerturBench's decoder-only baselines (no expression input).

``x_hat = MLP(inputs)`` with three variants selected by ``inputs``:

- ``"both"``: covariates and perturbation;
- ``"covariates"``: covariates only -- collapses to one profile per covariate state, a
  lower bound any useful model must beat (it ignores the perturbation entirely);
- ``"perturbations"``: perturbation only -- ignores the cell state.

Trained with mean squared error on all training cells (controls with an empty
perturbation included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from pertbench.errors import ConfigError, ModelError
from pertbench.models.base import params_field
from pertbench.models.latent_additive import ARCHITECTURE_SPACE
from pertbench.models.layers import MLP
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams

DECODER_INPUTS = ("both", "covariates", "perturbations")


@dataclass
class DecoderOnlyParams(NeuralParams):
    inputs: str = params_field(
        "both", "What the decoder sees: both, covariates or perturbations.", choices=DECODER_INPUTS
    )
    n_layers: int = params_field(2, "Hidden layers of the decoder MLP.")
    encoder_width: int = params_field(512, "Width of the hidden layers.")
    dropout: float = params_field(0.1, "Dropout probability after each hidden layer.")
    softplus_output: bool = params_field(True, "Apply softplus to the output (>= 0).")


class DecoderOnlyNet(LossModule):
    def __init__(self, *, n_genes: int, n_perts: int, n_cov: int, params: DecoderOnlyParams):
        super().__init__(lr=params.lr, wd=params.wd)
        self.use_pert = params.inputs in ("both", "perturbations")
        self.use_cov = params.inputs in ("both", "covariates")
        width = (n_perts if self.use_pert else 0) + (n_cov if self.use_cov else 0)
        if width == 0:
            raise ModelError(
                "decoder_only with inputs=covariates needs covariate keys; set --covariates "
                "or use inputs=both"
            )
        self.softplus_output = params.softplus_output
        self.decoder = MLP(
            width, params.encoder_width, n_genes, params.n_layers, dropout=params.dropout
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.use_pert:
            parts.append(batch["pert"])
        if self.use_cov:
            parts.append(batch["cov"])
        out = self.decoder(torch.cat(parts, dim=-1))
        return F.softplus(out) if self.softplus_output else out

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(batch), batch["x"])}

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)


class DecoderOnly(NeuralModel):
    """MLP from covariates and/or perturbation to expression, no control cell input."""

    name: ClassVar[str] = "decoder_only"
    description: ClassVar[str] = (
        "x_hat = MLP(covariates and/or perturbation); no expression input (ablation baseline)"
    )
    Params: ClassVar[type] = DecoderOnlyParams
    input_kind: ClassVar[str] = "none"
    # PerturBench appendix D.6, table 13.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        **ARCHITECTURE_SPACE,
        "lr": {"type": "float", "low": 5e-6, "high": 5e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
        "softplus_output": {"type": "categorical", "choices": [True, False]},
    }

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        if self.params.inputs not in DECODER_INPUTS:
            raise ConfigError(
                f"decoder_only.inputs must be one of {', '.join(DECODER_INPUTS)}, "
                f"got '{self.params.inputs}'"
            )

    def _build_module(self, dims: dict[str, Any]) -> DecoderOnlyNet:
        return DecoderOnlyNet(
            n_genes=dims["n_genes"],
            n_perts=dims["n_perts"],
            n_cov=dims["n_cov"],
            params=self.params,
        )
