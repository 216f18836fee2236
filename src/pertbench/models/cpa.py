"""``cpa`` and ``cpa_noadv``: the compositional perturbation autoencoder (PerturBench's CPA*).

Model
-----
An encoder gives the *basal* latent of a cell (variational by default: mean and variance,
KL to N(0, I)). The latent the decoder reads is::

    z = z_basal + sum_p s(dose_p) * E_p + sum_k C_k[c_k]

where ``E_p`` is the embedding of perturbation ``p`` (an MLP of its one-hot vector, so a
combination is the sum of its parts), ``s`` the dose scaling (identity for plain
multi-hot perturbations) and ``C_k`` one embedding table per covariate key. The decoder
emits a Gaussian mean and variance over log-normalised expression, or negative-binomial
logits over raw counts (``likelihood="nb"``, see :class:`~pertbench.models.layers.NegativeBinomialLikelihood`).

Adversary
---------
Classifiers try to predict the perturbation (multi-label, so combinations work) and each
covariate from ``z_basal``. They have their OWN Adam optimiser and training alternates,
as in the CPA paper: of every ``adv_steps`` consecutive steps, ``adv_steps - 1`` update
the classifiers on ``z_basal.detach()`` (cross-entropy plus ``penalty_weight`` times the
squared norm of the gradient of their logits with respect to ``z_basal``), and one updates
the autoencoder, which MAXIMISES the classifiers' loss::

    loss_AE  = NLL + kl_weight * KL - adv_weight * CE_adversary(z_basal)
    loss_adv = CE_adversary(z_basal.detach()) + penalty_weight * ||d logits / d z_basal||^2

(PerturBench's CPA* added the classifier loss, with a plus sign, to one optimiser: the
encoder then *helped* the classifiers, the opposite of disentanglement.) ``cpa_noadv`` is
the same model without adversary.

Prediction is counterfactual and deterministic: the basal latent of a control cell is the
encoder mean (no sampling), the requested perturbation and covariates are added, and the
decoder mean (Gaussian) or expected normalised expression (NB) is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from pertbench.errors import ConfigError
from pertbench.models.base import params_field
from pertbench.models.layers import MLP, GaussianEncoder, kl_standard_normal, make_likelihood
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams
from pertbench.models.training import adam, optimizer_step

LIKELIHOODS = ("gaussian", "nb")
DOSE_SCALINGS = ("linear", "log1p", "sigmoid")


@dataclass
class CPANoAdvParams(NeuralParams):
    n_latent: int = params_field(64, "Dimension of the basal latent space.")
    hidden_dim: int = params_field(256, "Width of the hidden layers of encoder and decoder.")
    n_layers_encoder: int = params_field(
        2, "Hidden layers of the encoder (the decoder uses the same number)."
    )
    n_layers_pert_emb: int = params_field(2, "Hidden layers of the perturbation embedding MLP.")
    dropout: float = params_field(0.1, "Dropout probability after each hidden layer.")
    variational: bool = params_field(
        True, "Variational encoder (Gaussian basal latent with KL) instead of a plain one."
    )
    kl_weight: float = params_field(1.0, "Weight of the KL term of the basal latent.")
    likelihood: str = params_field(
        "gaussian",
        "gaussian (on log-normalised X) or nb (negative binomial on raw counts).",
        choices=LIKELIHOODS,
    )
    counts_layer: str = params_field("counts", "Layer with raw counts, read when likelihood=nb.")
    softplus_output: bool = params_field(
        False, "Softplus on the Gaussian mean to keep predictions non-negative."
    )
    dose_scaling: str = params_field(
        "linear",
        "How a dose scales the perturbation embedding: linear (d), log1p (log(1+d)) or "
        "sigmoid (learned per perturbation, sigmoid(a*log(1+d)+b)).",
        choices=DOSE_SCALINGS,
    )


@dataclass
class CPAParams(CPANoAdvParams):
    adv_classifier_n_layers: int = params_field(2, "Hidden layers of the adversarial classifiers.")
    adv_classifier_hidden_dim: int = params_field(
        128, "Width of the adversarial classifiers' hidden layers."
    )
    adv_steps: int = params_field(
        2,
        "Alternation period: of every adv_steps steps, adv_steps-1 train the adversary "
        "and one the autoencoder (>= 2).",
    )
    adv_weight: float = params_field(
        1.0, "Weight of the adversary's loss that the autoencoder maximises."
    )
    penalty_weight: float = params_field(
        10.0, "Weight of the adversary's gradient penalty (smoothness of the classifiers)."
    )


class DoseScaling(nn.Module):
    """Map dose values (entries of the perturbation matrix) to embedding weights."""

    def __init__(self, kind: str, n_perts: int) -> None:
        super().__init__()
        if kind not in DOSE_SCALINGS:
            raise ConfigError(
                f"dose_scaling must be one of {', '.join(DOSE_SCALINGS)}, got '{kind}'"
            )
        self.kind = kind
        if kind == "sigmoid":
            self.slope = nn.Parameter(torch.ones(n_perts))
            self.bias = nn.Parameter(torch.zeros(n_perts))

    def forward(self, dose: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return dose
        applied = (dose > 0).to(dose.dtype)  # an absent perturbation stays absent
        if self.kind == "log1p":
            return torch.log1p(dose.clamp_min(0)) * applied
        return torch.sigmoid(self.slope * torch.log1p(dose.clamp_min(0)) + self.bias) * applied


class CPANet(LossModule):
    """The CPA network with an optional alternating adversary."""

    def __init__(
        self,
        *,
        n_input: int,
        n_genes: int,
        n_perts: int,
        covariate_sizes: list[int],
        params: CPANoAdvParams,
        adversary: bool,
    ) -> None:
        super().__init__(lr=params.lr, wd=params.wd)
        p = params
        if p.likelihood not in LIKELIHOODS:
            raise ConfigError(
                f"likelihood must be one of {', '.join(LIKELIHOODS)}, got '{p.likelihood}'"
            )
        self.variational = p.variational
        self.kl_weight = float(p.kl_weight)
        latent = p.n_latent
        if p.variational:
            self.encoder: nn.Module = GaussianEncoder(
                n_input, p.hidden_dim, latent, p.n_layers_encoder, dropout=p.dropout
            )
        else:
            self.encoder = MLP(n_input, p.hidden_dim, latent, p.n_layers_encoder, dropout=p.dropout)
        self.pert_embedding = MLP(
            n_perts, p.hidden_dim, latent, p.n_layers_pert_emb, dropout=p.dropout
        )
        self.dose = DoseScaling(p.dose_scaling, n_perts)
        self.cov_embeddings = nn.ModuleList(nn.Embedding(size, latent) for size in covariate_sizes)
        self.likelihood = make_likelihood(p.likelihood, n_genes, softplus_mean=p.softplus_output)
        self.decoder = MLP(
            latent,
            p.hidden_dim,
            self.likelihood.n_params * n_genes,
            p.n_layers_encoder,
            dropout=p.dropout,
        )
        self.register_buffer("pert_identity", torch.eye(n_perts), persistent=False)
        self.adversary = adversary
        if adversary:
            q: CPAParams = p  # type: ignore[assignment]
            if q.adv_steps < 2:
                raise ConfigError(
                    f"adv_steps must be >= 2 (one autoencoder step per adv_steps), got {q.adv_steps}"
                )
            self.adv_steps = int(q.adv_steps)
            self.adv_weight = float(q.adv_weight)
            self.penalty_weight = float(q.penalty_weight)
            self.pert_classifier = MLP(
                latent, q.adv_classifier_hidden_dim, n_perts, q.adv_classifier_n_layers
            )
            # A covariate with one value carries no information to remove.
            self.cov_classifiers = nn.ModuleDict(
                {
                    str(k): MLP(
                        latent, q.adv_classifier_hidden_dim, size, q.adv_classifier_n_layers
                    )
                    for k, size in enumerate(covariate_sizes)
                    if size > 1
                }
            )

    # -- parameter groups ------------------------------------------------------------------
    def adversary_parameters(self) -> list[nn.Parameter]:
        if not self.adversary:
            return []
        return [*self.pert_classifier.parameters(), *self.cov_classifiers.parameters()]

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        adv = {id(p) for p in self.adversary_parameters()}
        return [p for p in self.parameters() if id(p) not in adv]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        ae = adam(self.autoencoder_parameters(), lr=self.lr, weight_decay=self.wd)
        if not self.adversary:
            return [ae]
        adv = adam(self.adversary_parameters(), lr=self.lr, weight_decay=self.wd)
        return [ae, adv]

    # -- forward pieces --------------------------------------------------------------------
    def basal(
        self, batch: dict[str, torch.Tensor], *, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z_basal, kl per cell)``: sampled in training, the mean otherwise."""
        x = batch["x"]
        if not self.variational:
            return self.encoder(x), None
        mu, logvar = self.encoder(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        return z, kl_standard_normal(mu, logvar)

    def perturbation_latent(self, pert: torch.Tensor) -> torch.Tensor:
        """Sum of dose-scaled per-perturbation embeddings (compositional)."""
        table = self.pert_embedding(self.pert_identity)  # (n_perts, latent)
        return self.dose(pert) @ table

    def attribute_latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = self.perturbation_latent(batch["pert"])
        codes = batch["cov_codes"]
        for k, embedding in enumerate(self.cov_embeddings):
            z = z + embedding(codes[:, k])
        return z

    def adversary_loss(
        self, z_basal: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Classifiers' cross-entropy (perturbation BCE + covariate CE) and their logits."""
        pert_logits = self.pert_classifier(z_basal)
        target = (batch["pert"] > 0).to(pert_logits.dtype)
        loss = F.binary_cross_entropy_with_logits(pert_logits, target)
        logits = [pert_logits]
        codes = batch["cov_codes"]
        for k, classifier in self.cov_classifiers.items():
            cov_logits = classifier(z_basal)
            loss = loss + F.cross_entropy(cov_logits, codes[:, int(k)])
            logits.append(cov_logits)
        return loss, logits

    def autoencoder_terms(
        self, batch: dict[str, torch.Tensor], *, sample: bool, with_adversary: bool
    ) -> dict[str, torch.Tensor]:
        z_basal, kl = self.basal(batch, sample=sample)
        out = self.decoder(z_basal + self.attribute_latent(batch))
        nll = self.likelihood.nll(out, batch).mean()
        terms = {"nll": nll}
        loss = nll
        if kl is not None:
            terms["kl"] = kl.mean()
            loss = loss + self.kl_weight * terms["kl"]
        if with_adversary and self.adversary:
            adv_ce, _ = self.adversary_loss(z_basal, batch)
            terms["adv_ce"] = adv_ce
            # The autoencoder maximises the adversary's loss: note the minus sign.
            loss = loss - self.adv_weight * adv_ce
        terms["loss"] = loss
        return terms

    def adversary_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Classifier loss on a detached basal latent, plus the gradient penalty."""
        with torch.no_grad():
            z_basal, _ = self.basal(batch, sample=True)
        z_basal = z_basal.detach().requires_grad_(True)
        ce, logits = self.adversary_loss(z_basal, batch)
        penalty = z_basal.new_zeros(())
        for block in logits:
            (grad,) = torch.autograd.grad(block.sum(), z_basal, create_graph=True)
            penalty = penalty + grad.pow(2).sum(dim=-1).mean()
        return {
            "adv_ce": ce,
            "adv_penalty": penalty,
            "adv_loss": ce + self.penalty_weight * penalty,
        }

    # -- training interface ----------------------------------------------------------------
    def is_adversary_step(self, step: int) -> bool:
        return self.adversary and step % self.adv_steps != 0

    def training_step(
        self, batch: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        if self.is_adversary_step(step):
            terms = self.adversary_terms(batch)
            optimizer_step(terms["adv_loss"], optimizers[1], gradient_clip=self.gradient_clip)
        else:
            terms = self.autoencoder_terms(batch, sample=True, with_adversary=True)
            optimizer_step(terms["loss"], optimizers[0], gradient_clip=self.gradient_clip)
        return {k: float(v.detach()) for k, v in terms.items()}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validation terms: the generative fit (NLL + KL) at the encoder mean.

        The adversarial term is reported (``adv_ce``) but excluded from ``loss``: early
        stopping monitors how well the model fits, not the state of the two-player game.
        """
        terms = self.autoencoder_terms(batch, sample=False, with_adversary=False)
        if self.adversary:
            terms["adv_ce"] = self.adversary_loss(self.basal(batch, sample=False)[0], batch)[0]
        return terms

    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z_basal, _ = self.basal(batch, sample=False)
        out = self.decoder(z_basal + self.attribute_latent(batch))
        return self.likelihood.predict(out, batch)


class CPANoAdversary(NeuralModel):
    """CPA* without the adversarial classifiers (``cpa_noadv``)."""

    name: ClassVar[str] = "cpa_noadv"
    description: ClassVar[str] = "CPA* autoencoder without the adversary (ablation)"
    Params: ClassVar[type] = CPANoAdvParams
    adversary: ClassVar[bool] = False
    # PerturBench appendix D.6, table 8 (without the adversary's entries).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_layers_encoder": {"type": "int", "low": 1, "high": 7, "step": 2},
        "n_layers_pert_emb": {"type": "int", "low": 1, "high": 5, "step": 1},
        "hidden_dim": {"type": "int", "low": 256, "high": 5376, "step": 1024},
        "n_latent": {"type": "categorical", "choices": [64, 128, 192, 256, 512]},
        "lr": {"type": "float", "low": 5e-6, "high": 1e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
        "dropout": {"type": "float", "low": 0.0, "high": 0.8, "step": 0.1},
        "kl_weight": {"type": "float", "low": 0.1, "high": 20.0, "log": True},
    }

    def _build_module(self, dims: dict[str, Any]) -> CPANet:
        return CPANet(
            n_input=dims["n_input"],
            n_genes=dims["n_genes"],
            n_perts=dims["n_perts"],
            covariate_sizes=list(dims["covariate_sizes"]),
            params=self.params,
            adversary=self.adversary,
        )


class CPA(CPANoAdversary):
    """CPA* with adversarial classifiers trained by their own optimiser, alternating."""

    name: ClassVar[str] = "cpa"
    description: ClassVar[str] = (
        "Compositional perturbation autoencoder with an alternating adversary (CPA*)"
    )
    Params: ClassVar[type] = CPAParams
    adversary: ClassVar[bool] = True
    # PerturBench appendix D.6, table 8.
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        **CPANoAdversary.search_space,
        "adv_classifier_n_layers": {"type": "int", "low": 1, "high": 5, "step": 1},
        "adv_classifier_hidden_dim": {"type": "int", "low": 128, "high": 1024, "log": True},
        "adv_steps": {"type": "categorical", "choices": [2, 3, 5, 7, 10, 20, 30]},
        "adv_weight": {"type": "float", "low": 0.1, "high": 20.0, "log": True},
        "penalty_weight": {"type": "float", "low": 0.1, "high": 20.0, "log": True},
    }
