"""Building blocks against independent computations (scipy, torch.distributions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from pertbench.errors import ConfigError
from pertbench.models.layers import (
    MLP,
    GaussianLikelihood,
    NegativeBinomialLikelihood,
    kl_bernoulli,
    kl_standard_normal,
    make_likelihood,
    torch_seed_scope,
)


def test_mlp_structure_and_errors():
    mlp = MLP(10, 16, 3, 2, dropout=0.2)
    kinds = [type(m).__name__ for m in mlp.net]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert mlp(torch.zeros(4, 10)).shape == (4, 3)
    assert [type(m).__name__ for m in MLP(10, 16, 3, 0).net] == ["Linear"]
    batch_norm = MLP(5, 8, 2, 1, norm="batch", activation="leaky_relu", dropout=0.0)
    assert [type(m).__name__ for m in batch_norm.net] == [
        "Linear",
        "BatchNorm1d",
        "LeakyReLU",
        "Linear",
    ]
    with pytest.raises(ConfigError, match="dropout"):
        MLP(3, 3, 3, 1, dropout=1.0)
    with pytest.raises(ConfigError, match="unknown activation"):
        MLP(3, 3, 3, 1, activation="swish2")
    with pytest.raises(ConfigError, match="unknown norm"):
        MLP(3, 3, 3, 1, norm="group")


def test_gaussian_nll_matches_scipy():
    rng = np.random.default_rng(0)
    mean, raw = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    x = rng.normal(size=(5, 4))
    lik = GaussianLikelihood(4)
    out = torch.tensor(np.hstack([mean, raw]), dtype=torch.float64)
    nll = lik.nll(out, {"x": torch.tensor(x)}).numpy()
    var = np.log1p(np.exp(raw)) + 1e-2  # softplus + the variance floor
    expected = -stats.norm.logpdf(x, loc=mean, scale=np.sqrt(var)).sum(axis=1)
    np.testing.assert_allclose(nll, expected, rtol=1e-10)
    np.testing.assert_allclose(lik.predict(out, {"x": torch.tensor(x)}).numpy(), mean)


def test_negative_binomial_nll_and_prediction_match_scipy():
    rng = np.random.default_rng(1)
    counts = rng.poisson(3.0, size=(6, 5)).astype(np.float64)
    counts[0] = 0  # a cell with an empty library
    logits = rng.normal(size=(6, 5))
    lik = NegativeBinomialLikelihood(5).double()
    with torch.no_grad():
        lik.log_theta.copy_(torch.tensor(rng.normal(size=5)))
    library = counts.sum(axis=1)
    batch = {
        "counts": torch.tensor(counts),
        "library": torch.tensor(library),
        "x": torch.tensor(np.log1p(rng.uniform(0, 50, size=(6, 5)))),
    }
    nll = lik.nll(torch.tensor(logits), batch).detach().numpy()
    rho = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    mu = np.maximum(library[:, None], 1e-6) * rho
    theta = np.exp(lik.log_theta.detach().numpy())
    expected = -stats.nbinom.logpmf(counts, theta, theta / (theta + mu)).sum(axis=1)
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    assert np.isfinite(nll).all()
    # prediction: log1p(rho * normalised mass of the control cell)
    size = np.expm1(batch["x"].numpy()).sum(axis=1, keepdims=True)
    pred = lik.predict(torch.tensor(logits), batch).detach().numpy()
    np.testing.assert_allclose(pred, np.log1p(rho * size), rtol=1e-10)
    assert isinstance(make_likelihood("nb", 5), NegativeBinomialLikelihood)
    with pytest.raises(ConfigError, match="unknown likelihood"):
        make_likelihood("zinb", 5)


def test_kl_helpers_match_torch_distributions():
    rng = np.random.default_rng(2)
    mu = torch.tensor(rng.normal(size=(3, 4)))
    logvar = torch.tensor(rng.normal(size=(3, 4)))
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(
        kl_standard_normal(mu, logvar), torch.distributions.kl_divergence(q, p).sum(-1)
    )
    logits = torch.tensor(rng.normal(size=(3, 4)) * 3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Bernoulli(logits=logits),
        torch.distributions.Bernoulli(probs=torch.full_like(logits, 0.01)),
    )
    torch.testing.assert_close(kl_bernoulli(logits, 0.01), expected)


def test_seed_scope_is_reproducible_and_restores_global_state():
    before = torch.random.get_rng_state()
    with torch_seed_scope(3):
        a = torch.randn(5)
    with torch_seed_scope(3):
        b = torch.randn(5)
    assert torch.equal(a, b)
    assert torch.equal(torch.random.get_rng_state(), before)
