"""Neural building blocks shared by every network in the model zoo.

Written once and reused: the multilayer perceptron (dropout, layer/batch norm), a Gaussian
variational encoder, the Gaussian and negative-binomial likelihoods, the standard-normal KL
and a seeded scope for torch's own random state (dropout and reparameterisation draw from
it). Nothing here knows about AnnData; see :mod:`pertbench.models.data` for batching.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from pertbench.errors import ConfigError

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
}
_NORMS = ("layer", "batch", "none")

#: Lower bound on negative-binomial parameters, against log(0) and 1/0.
EPS = 1e-6
#: Floor of the Gaussian variance on log-normalised expression. Without it the decoder
#: drives the variance of genes that are zero in a training batch towards 0, the training
#: likelihood diverges to +inf and the validation loss explodes (sd 0.1 on log1p scale is
#: far below the measurement noise of single-cell counts).
MIN_VARIANCE = 1e-2


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation '{name}'; choose one of {', '.join(_ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """Multilayer perceptron: ``n_layers`` hidden blocks, then a linear output layer.

    Each hidden block is ``Linear -> norm -> activation -> dropout``. With ``n_layers=0``
    the network is a single linear map ``in_dim -> out_dim``.

    Parameters
    ----------
    in_dim, hidden_dim, out_dim
        Input width, width of every hidden layer, output width.
    n_layers
        Number of hidden blocks (PerturBench's ``n_layers``).
    dropout
        Dropout probability after each hidden activation (0 disables it).
    norm
        ``"layer"`` (layer normalisation, the PerturBench default), ``"batch"`` or ``"none"``.
    activation
        Hidden activation: relu, leaky_relu, elu, gelu, silu or tanh.
    output_activation
        Optional activation on the output (e.g. ``"relu"``); ``None`` keeps it linear.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        n_layers: int = 1,
        *,
        dropout: float = 0.0,
        norm: str = "layer",
        activation: str = "relu",
        output_activation: str | None = None,
    ) -> None:
        super().__init__()
        if n_layers < 0:
            raise ConfigError(f"an MLP needs n_layers >= 0, got {n_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in _NORMS:
            raise ConfigError(f"unknown norm '{norm}'; choose one of {', '.join(_NORMS)}")
        if min(in_dim, out_dim) < 1 or (n_layers and hidden_dim < 1):
            raise ConfigError(
                f"MLP widths must be positive, got in={in_dim}, hidden={hidden_dim}, out={out_dim}"
            )
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(n_layers):
            blocks.append(nn.Linear(width, hidden_dim))
            if norm == "layer":
                blocks.append(nn.LayerNorm(hidden_dim))
            elif norm == "batch":
                blocks.append(nn.BatchNorm1d(hidden_dim))
            blocks.append(_activation(activation))
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim))
        if output_activation is not None:
            blocks.append(_activation(output_activation))
        self.net = nn.Sequential(*blocks)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GaussianEncoder(nn.Module):
    """MLP mapping an input to the mean and log-variance of a diagonal Gaussian latent.

    The log-variance is clamped to [-12, 8] so a bad step cannot produce inf/NaN variances.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        latent_dim: int,
        n_layers: int = 1,
        *,
        dropout: float = 0.0,
        norm: str = "layer",
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.mlp = MLP(
            in_dim,
            hidden_dim,
            2 * latent_dim,
            n_layers,
            dropout=dropout,
            norm=norm,
            activation=activation,
        )
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.mlp(x).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw ``mu + sigma * eps`` (from torch's random state; use inside :func:`torch_seed_scope`)."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def kl_bernoulli(q_logits: torch.Tensor, prior_probability: float) -> torch.Tensor:
    """Elementwise KL(Bernoulli(sigmoid(q_logits)) || Bernoulli(prior_probability))."""
    p = min(max(float(prior_probability), EPS), 1.0 - EPS)
    q = torch.sigmoid(q_logits)
    log_q = F.logsigmoid(q_logits)
    log_1mq = F.logsigmoid(-q_logits)
    return q * (log_q - math.log(p)) + (1.0 - q) * (log_1mq - math.log1p(-p))


# ---------------------------------------------------------------------------------------
# Likelihoods: a decoder emits ``n_params * n_genes`` values; the likelihood reads them.
# ---------------------------------------------------------------------------------------
class GaussianLikelihood(nn.Module):
    """Heteroscedastic Gaussian on log-normalised expression (decoder gives mean and variance).

    The decoder output has ``2 * n_genes`` columns: the mean (optionally through softplus)
    and a raw variance turned positive by softplus, plus a floor ``min_variance``.
    """

    n_params = 2

    def __init__(
        self, n_genes: int, *, softplus_mean: bool = False, min_variance: float = MIN_VARIANCE
    ) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.softplus_mean = softplus_mean
        self.min_variance = float(min_variance)

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_var = out.split(self.n_genes, dim=-1)
        if self.softplus_mean:
            mean = F.softplus(mean)
        return mean, F.softplus(raw_var) + self.min_variance

    def nll(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Negative log-likelihood per cell (summed over genes) of ``batch['x']``."""
        mean, var = self.split(out)
        x = batch["x"]
        return 0.5 * (torch.log(2 * math.pi * var) + (x - mean).pow(2) / var).sum(dim=-1)

    def predict(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder mean (log-normalised expression)."""
        return self.split(out)[0]


class NegativeBinomialLikelihood(nn.Module):
    """Negative binomial on raw counts with scVI's parameterisation.

    The decoder emits ``n_genes`` logits; ``rho = softmax(logits)`` are expected proportions
    of the cell's library over the model's genes, the mean is ``library * rho`` and the
    inverse dispersion ``theta`` is one learned value per gene. Training reads
    ``batch['counts']`` and ``batch['library']`` (counts summed over the model's genes).

    Prediction returns log-normalised *expected* expression, comparable to ``X``:
    ``log1p(rho * size)``, where ``size = sum_g expm1(x_ctrl[g])`` is the normalised mass
    of the control cell over the model's genes (10,000 when all genes are modelled and
    ``X`` was normalised to 10,000). Note this is log of the expectation, not the
    expectation of the log.
    """

    n_params = 1

    def __init__(self, n_genes: int) -> None:
        super().__init__()
        self.n_genes = n_genes
        self.log_theta = nn.Parameter(torch.zeros(n_genes))

    def nll(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        counts = batch["counts"]
        library = batch["library"].reshape(-1, 1)
        log_rho = torch.log_softmax(out, dim=-1)
        theta = torch.exp(self.log_theta).clamp_min(EPS)
        log_mu = log_rho + torch.log(library.clamp_min(EPS))
        # log NB(x; mu, theta) = lgamma(x+theta) - lgamma(theta) - lgamma(x+1)
        #   + theta*log(theta) + x*log(mu) - (x+theta)*log(theta+mu)
        log_theta_mu = torch.logaddexp(torch.log(theta), log_mu)
        log_prob = (
            torch.lgamma(counts + theta)
            - torch.lgamma(theta)
            - torch.lgamma(counts + 1.0)
            + theta * (torch.log(theta) - log_theta_mu)
            + counts * (log_mu - log_theta_mu)
        )
        return -log_prob.sum(dim=-1)

    def predict(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rho = torch.softmax(out, dim=-1)
        size = torch.expm1(batch["x"]).sum(dim=-1, keepdim=True)
        return torch.log1p(rho * size)


def make_likelihood(name: str, n_genes: int, *, softplus_mean: bool = False) -> nn.Module:
    """``"gaussian"`` or ``"nb"`` (negative binomial on a counts layer)."""
    if name == "gaussian":
        return GaussianLikelihood(n_genes, softplus_mean=softplus_mean)
    if name == "nb":
        return NegativeBinomialLikelihood(n_genes)
    raise ConfigError(f"unknown likelihood '{name}'; choose gaussian or nb")


@contextlib.contextmanager
def torch_seed_scope(seed: int, device: str = "cpu") -> Iterator[None]:
    """Seed torch's random state for the duration of a block, then restore the caller's.

    Dropout and ``randn_like`` cannot take a generator, so training seeds torch's own
    state, but inside a fork: library code never leaves the caller's global state changed.
    """
    devices: list[int] = []
    if str(device).startswith("cuda") and torch.cuda.is_available():
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (2**63))
        yield
