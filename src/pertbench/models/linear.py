"""``linear``: PerturBench's LinearAdditive baseline.

``x_hat = x_ctrl + W [p ; c] + b`` where ``x_ctrl`` is a random control cell of the same
covariates (resampled every epoch), ``p`` the multi-hot perturbation and ``c`` the one-hot
covariates; optionally ``softplus`` of the sum. Trained with mean squared error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from pertbench.models.base import params_field
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams


@dataclass
class LinearParams(NeuralParams):
    lr: float = params_field(1e-3, "Learning rate of the Adam optimiser.")
    wd: float = params_field(1e-4, "Weight decay (L2 penalty) of the Adam optimiser.")
    inject_covariates: bool = params_field(
        True, "Add the one-hot covariates to the linear map's input (W [p ; c])."
    )
    softplus_output: bool = params_field(
        False, "Apply softplus to the prediction to keep it non-negative."
    )


class LinearAdditiveNet(LossModule):
    """``x_ctrl + Linear([p ; c])``; the map starts at zero so training starts at ``x_ctrl``."""

    def __init__(
        self,
        *,
        n_genes: int,
        n_perts: int,
        n_cov: int,
        inject_covariates: bool,
        softplus_output: bool,
        lr: float,
        wd: float,
    ) -> None:
        super().__init__(lr=lr, wd=wd)
        self.inject_covariates = inject_covariates
        self.softplus_output = softplus_output
        self.effect = nn.Linear(n_perts + (n_cov if inject_covariates else 0), n_genes)
        nn.init.zeros_(self.effect.weight)
        nn.init.zeros_(self.effect.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        code = batch["pert"]
        if self.inject_covariates:
            code = torch.cat([code, batch["cov"]], dim=-1)
        out = batch["ctrl"] + self.effect(code)
        return F.softplus(out) if self.softplus_output else out

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": F.mse_loss(self(batch), batch["x"])}

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self(batch)


class LinearAdditive(NeuralModel):
    """Control cell plus a linear effect of perturbation and covariates (PerturBench)."""

    name: ClassVar[str] = "linear"
    description: ClassVar[str] = (
        "x_ctrl + W[onehot(perturbation); onehot(covariates)], trained on matched controls"
    )
    Params: ClassVar[type] = LinearParams
    uses_matched_controls: ClassVar[bool] = True
    # PerturBench appendix D.6, table 10.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "lr": {"type": "float", "low": 5e-6, "high": 5e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
    }

    def _build_module(self, dims: dict[str, Any]) -> LinearAdditiveNet:
        p = self.params
        return LinearAdditiveNet(
            n_genes=dims["n_genes"],
            n_perts=dims["n_perts"],
            n_cov=dims["n_cov"],
            inject_covariates=p.inject_covariates,
            softplus_output=p.softplus_output,
            lr=p.lr,
            wd=p.wd,
        )
