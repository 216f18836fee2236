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
Classifiers try to predict, from the basal latent (the encoder mean, what prediction and
the disentanglement probe read, standardised with the batch's statistics), the
perturbation (a softmax over the components plus "none": a combination ``A+B`` is the
target 1/2, 1/2) and each covariate with more than one value. They have their OWN Adam
optimiser (``adv_lr``). Every training step first updates the classifiers
``adv_steps - 1`` times on the detached latent of the batch (cross-entropy, plus
``penalty_weight`` times the squared norm of the gradient of their logits with respect to
the latent), then updates the autoencoder once with::

    loss_AE = NLL + kl_weight * KL + w(epoch) * adv_weight * confusion(z_basal)

``confusion`` (the default ``adv_objective``) is the Kullback-Leibler divergence from the
batch's label frequencies to the classifiers' predictions: bounded below by 0, reached
exactly when the predictions carry no information. The CPA paper's encoder instead
*maximises* the classifiers' cross-entropy (``adv_objective="maximize"``: ``- w *
adv_weight * CE``), which is unbounded: the encoder wins by making the classifiers
confidently wrong while the information stays (measured with the probe, see
docs/models.md). ``w(epoch)`` is CPA's schedule: 0 for ``adv_warmup_epochs`` (the
classifiers learn first), then a linear ramp to 1 over ``adv_ramp_epochs``.

Why standardised: a variational basal latent is often nearly collapsed (means of size
~0.03 against unit posterior noise); a classifier on the raw means then needs large,
penalised weights and reads little, while the information is all there at that scale (a
probe on standardised features reads it). (PerturBench's CPA* added the classifier loss,
with a plus sign, to one optimiser: the encoder then *helped* the classifiers.)
``cpa_noadv`` is the same model without adversary.

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
from pertbench.models.layers import (
    MLP,
    GaussianEncoder,
    kl_standard_normal,
    make_likelihood,
    reparameterize,
)
from pertbench.models.neural import LossModule, NeuralModel, NeuralParams
from pertbench.models.training import adam, optimizer_step

LIKELIHOODS = ("gaussian", "nb")
ADV_OBJECTIVES = ("confusion", "maximize")
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
        5,
        "Each training step updates the classifiers adv_steps-1 times on the batch, then "
        "the autoencoder once (>= 2).",
    )
    adv_objective: str = params_field(
        "confusion",
        "The autoencoder's adversarial term: confusion (bounded: KL from the label "
        "frequencies to the classifiers' predictions, 0 when they know nothing) or maximize "
        "(minus the classifiers' cross-entropy, unbounded, as in the CPA paper).",
        choices=ADV_OBJECTIVES,
    )
    adv_weight: float = params_field(
        20.0, "Weight of the adversarial term in the autoencoder's loss (after the ramp)."
    )
    adv_warmup_epochs: int = params_field(
        0,
        "Epochs at the start in which only the classifiers learn (the autoencoder is not "
        "pushed yet).",
    )
    adv_ramp_epochs: int = params_field(
        5, "Epochs over which the adversarial weight then rises linearly to adv_weight."
    )
    adv_lr: float = params_field(1e-2, "Learning rate of the classifiers' own Adam optimiser.")
    penalty_weight: float = params_field(
        0.0, "Weight of the classifiers' gradient penalty (smoothness; it also slows them)."
    )


def adversary_schedule(epoch: int, warmup_epochs: int, ramp_epochs: int) -> float:
    """Fraction of ``adv_weight`` applied in ``epoch`` (0-based).

    0 during the ``warmup_epochs`` (the classifiers learn, the autoencoder is not pushed),
    then rising linearly over ``ramp_epochs`` to 1, as CPA's adversarial warm-up.
    """
    if epoch < warmup_epochs:
        return 0.0
    if ramp_epochs <= 0:
        return 1.0
    return float(min(1.0, (epoch - warmup_epochs + 1) / ramp_epochs))


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
    """The CPA network with an optional adversary (classifiers with their own optimiser)."""

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
            if q.adv_objective not in ADV_OBJECTIVES:
                raise ConfigError(
                    f"adv_objective must be one of {', '.join(ADV_OBJECTIVES)}, "
                    f"got '{q.adv_objective}'"
                )
            if min(q.adv_warmup_epochs, q.adv_ramp_epochs) < 0:
                raise ConfigError("adv_warmup_epochs and adv_ramp_epochs must be >= 0")
            if min(q.adv_weight, q.penalty_weight) < 0 or q.adv_lr <= 0:
                raise ConfigError("adv_weight and penalty_weight must be >= 0 and adv_lr positive")
            self.adv_steps = int(q.adv_steps)
            self.adv_objective = q.adv_objective
            self.adv_weight = float(q.adv_weight)
            self.adv_warmup_epochs = int(q.adv_warmup_epochs)
            self.adv_ramp_epochs = int(q.adv_ramp_epochs)
            self.adv_lr = float(q.adv_lr)
            self.penalty_weight = float(q.penalty_weight)
            #: Fraction of adv_weight in force in the current epoch (adversary_schedule).
            self.adv_scale = adversary_schedule(0, self.adv_warmup_epochs, self.adv_ramp_epochs)
            # One class per perturbation component plus one for "no perturbation".
            self.pert_classifier = MLP(
                latent, q.adv_classifier_hidden_dim, n_perts + 1, q.adv_classifier_n_layers
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
        adv = adam(self.adversary_parameters(), lr=self.adv_lr, weight_decay=self.wd)
        return [ae, adv]

    def epoch_start(self, epoch: int) -> None:
        if self.adversary:
            self.adv_scale = adversary_schedule(epoch, self.adv_warmup_epochs, self.adv_ramp_epochs)

    # -- forward pieces --------------------------------------------------------------------
    def _encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encoder mean and log-variance (``None`` for a plain encoder)."""
        if not self.variational:
            return self.encoder(batch["x"]), None
        return self.encoder(batch["x"])

    def basal(
        self, batch: dict[str, torch.Tensor], *, sample: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(z_basal, kl per cell)``: sampled in training, the mean otherwise."""
        mu, logvar = self._encode(batch)
        if logvar is None:
            return mu, None
        z = reparameterize(mu, logvar) if sample else mu
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

    def adversary_logits(self, z_basal: torch.Tensor) -> list[torch.Tensor]:
        """Logits of the perturbation classifier, then of each covariate classifier.

        The classifiers read the latent standardised with the batch's (detached) mean and
        sd, so no scale of the latent hides information from them.
        """
        mean = z_basal.mean(dim=0, keepdim=True).detach()
        sd = z_basal.std(dim=0, keepdim=True).detach().clamp_min(1e-6)
        z = (z_basal - mean) / sd
        return [self.pert_classifier(z)] + [head(z) for head in self.cov_classifiers.values()]

    def adversary_targets(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per classifier, each cell's label as a distribution over its classes.

        Perturbation: uniform over the applied components (a combination ``A+B`` puts
        1/2 on each part), or all on the extra "no perturbation" class for a control.
        Covariates: one-hot.
        """
        applied = (batch["pert"] > 0).to(batch["x"].dtype)
        n_applied = applied.sum(dim=-1, keepdim=True)
        none = (n_applied == 0).to(applied.dtype)
        codes = batch["cov_codes"]
        return [torch.cat([applied / n_applied.clamp_min(1.0), none], dim=-1)] + [
            F.one_hot(codes[:, int(k)], head.out_dim).to(applied.dtype)
            for k, head in self.cov_classifiers.items()
        ]

    def adversary_loss(
        self, z_basal: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Classifiers' cross-entropy (summed over classifiers, mean over cells) and logits."""
        logits = self.adversary_logits(z_basal)
        loss = z_basal.new_zeros(())
        for block, target in zip(logits, self.adversary_targets(batch), strict=True):
            loss = loss - (target * F.log_softmax(block, dim=-1)).sum(dim=-1).mean()
        return loss, logits

    def confusion_loss(self, z_basal: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How far the classifiers' predictions are from knowing nothing (>= 0).

        The target of every prediction is the batch's label frequencies (the mean of the
        cells' label distributions): what a classifier that learned nothing from the basal
        latent predicts. The term is the Kullback-Leibler divergence from those
        frequencies to each prediction (cross-entropy minus the frequencies' entropy),
        averaged over cells and summed over the classifiers. It is 0 exactly when every
        prediction equals the frequencies and, by convexity, its mean over cells is
        smallest when the predictions do not depend on the latent at all: unlike the
        negative cross-entropy, the encoder gains nothing by making the classifiers
        confidently wrong.
        """
        logits = self.adversary_logits(z_basal)
        loss = z_basal.new_zeros(())
        for block, target in zip(logits, self.adversary_targets(batch), strict=True):
            freq = target.mean(dim=0)
            entropy = -(freq * torch.log(freq.clamp_min(1e-12))).sum()
            cross = -(freq * F.log_softmax(block, dim=-1)).sum(dim=-1).mean()
            loss = loss + cross - entropy
        return loss

    def autoencoder_terms(
        self, batch: dict[str, torch.Tensor], *, sample: bool, with_adversary: bool
    ) -> dict[str, torch.Tensor]:
        mu, logvar = self._encode(batch)
        z_basal = reparameterize(mu, logvar) if sample and logvar is not None else mu
        out = self.decoder(z_basal + self.attribute_latent(batch))
        nll = self.likelihood.nll(out, batch).mean()
        terms = {"nll": nll}
        loss = nll
        if logvar is not None:
            terms["kl"] = kl_standard_normal(mu, logvar).mean()
            loss = loss + self.kl_weight * terms["kl"]
        if with_adversary and self.adversary:
            # The classifiers read the mean, so it is the mean the encoder must clean.
            weight = self.adv_weight * self.adv_scale
            if self.adv_objective == "confusion":
                terms["adv_confusion"] = self.confusion_loss(mu, batch)
                loss = loss + weight * terms["adv_confusion"]
            else:
                terms["adv_ce"] = self.adversary_loss(mu, batch)[0]
                # The autoencoder maximises the classifiers' loss: note the minus sign.
                loss = loss - weight * terms["adv_ce"]
        terms["loss"] = loss
        return terms

    def adversary_terms(
        self, batch: dict[str, torch.Tensor], z_basal: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Classifier loss on the detached basal latent (encoder mean), plus the penalty."""
        if z_basal is None:
            with torch.no_grad():
                z_basal = self.basal(batch, sample=False)[0]
        z_basal = z_basal.detach().requires_grad_(True)
        ce, logits = self.adversary_loss(z_basal, batch)
        penalty = z_basal.new_zeros(())
        for block in logits if self.penalty_weight > 0 else ():
            (grad,) = torch.autograd.grad(block.sum(), z_basal, create_graph=True)
            penalty = penalty + grad.pow(2).sum(dim=-1).mean()
        return {
            "adv_ce": ce,
            "adv_penalty": penalty,
            "adv_loss": ce + self.penalty_weight * penalty,
        }

    # -- training interface ----------------------------------------------------------------
    def training_step(
        self, batch: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        terms: dict[str, torch.Tensor] = {}
        if self.adversary:
            # The classifiers catch up with the current encoder on this batch first, so
            # the autoencoder is pushed by classifiers that read what the latent holds.
            with torch.no_grad():
                z_basal = self.basal(batch, sample=False)[0]
            for _ in range(self.adv_steps - 1):
                terms = self.adversary_terms(batch, z_basal)
                optimizer_step(terms["adv_loss"], optimizers[1], gradient_clip=self.gradient_clip)
        terms.update(self.autoencoder_terms(batch, sample=True, with_adversary=True))
        optimizer_step(terms["loss"], optimizers[0], gradient_clip=self.gradient_clip)
        return {k: float(v.detach()) for k, v in terms.items()}

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validation terms: the generative fit (NLL + KL) at the encoder mean.

        The classifiers' cross-entropy is reported (``adv_ce``), and with the bounded
        objective their confusion term too, but neither is part of ``loss``: early
        stopping monitors how well the model fits, not the state of the two-player game.
        """
        terms = self.autoencoder_terms(batch, sample=False, with_adversary=False)
        if self.adversary:
            mu = self.basal(batch, sample=False)[0]
            terms["adv_ce"] = self.adversary_loss(mu, batch)[0]
            if self.adv_objective == "confusion":
                terms["adv_confusion"] = self.confusion_loss(mu, batch)
        return terms

    def basal_latent(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The basal latent the adversary acts on: the encoder mean."""
        return self.basal(batch, sample=False)[0]

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
    """CPA* with adversarial classifiers trained by their own optimiser, bounded objective."""

    name: ClassVar[str] = "cpa"
    description: ClassVar[str] = (
        "Compositional perturbation autoencoder with a bounded adversary (CPA*)"
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
