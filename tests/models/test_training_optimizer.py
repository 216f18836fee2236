"""The shared Adam factory: fused where possible, the same update as the reference Adam."""

from __future__ import annotations

import torch

from pertbench.models.training import adam


def _train(make_optimizer, steps: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    opt = make_optimizer(net.parameters())
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_adam_factory_matches_reference_adam():
    settings = {"lr": 1e-2, "weight_decay": 1e-3, "eps": 1e-2}
    ours = _train(lambda params: adam(params, **settings))
    reference = _train(lambda params: torch.optim.Adam(params, **settings))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The update really moved the weights (a no-op optimiser would also "match").
    untouched = _train(lambda params: torch.optim.SGD(params, lr=0.0))
    assert any(not torch.allclose(a, b) for a, b in zip(ours, untouched, strict=True))


def test_adam_factory_keeps_settings_and_uses_fused_kernel_on_cpu():
    opt = adam([torch.nn.Parameter(torch.zeros(3))], lr=0.5, weight_decay=0.1, eps=0.2)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"]) == (0.5, 0.1, 0.2)
    assert group["fused"] is True  # this torch build has a CPU fused kernel
