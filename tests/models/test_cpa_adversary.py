"""CPA's adversary is really adversarial: own optimiser, alternating steps, opposite sign."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import SMALL, transfer_split

from pertbench.models import create_model
from pertbench.models.data import CellTable
from pertbench.models.layers import torch_seed_scope


@pytest.fixture
def cpa_setup(make_toy):
    adata = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40)
    split = transfer_split(adata)
    model = create_model("cpa", **SMALL["cpa"], adv_weight=2.0, adv_steps=3)
    model.fit(adata, split, max_epochs=1, progress=False)
    table = CellTable.from_adata(adata, model.encoding, genes=model.genes)
    rows = np.arange(table.n_cells)
    batch = {name: table.take(name, rows) for name in ("x", "pert", "cov", "cov_codes")}
    return model, model.module, batch


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, snapshot):
    return [not torch.equal(p.detach(), s) for p, s in zip(params, snapshot, strict=True)]


def test_two_disjoint_optimisers_and_alternating_schedule(cpa_setup):
    _, module, batch = cpa_setup
    optimizers = module.configure_optimizers()
    assert len(optimizers) == 2
    ae_ids = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    adv_ids = {id(p) for g in optimizers[1].param_groups for p in g["params"]}
    assert not ae_ids & adv_ids
    assert ae_ids | adv_ids == {id(p) for p in module.parameters()}
    assert adv_ids == {id(p) for p in module.adversary_parameters()}
    # adv_steps=3: two adversary steps, then one autoencoder step
    assert [module.is_adversary_step(s) for s in range(6)] == [False, True, True] * 2

    ae, adv = module.autoencoder_parameters(), module.adversary_parameters()
    module.train()
    with torch_seed_scope(0):
        ae0, adv0 = _snapshot(ae), _snapshot(adv)
        terms = module.training_step(batch, optimizers, step=1)  # adversary step
        assert set(terms) == {"adv_ce", "adv_penalty", "adv_loss"}
        assert all(_changed(adv, adv0)) and not any(_changed(ae, ae0))
        ae0, adv0 = _snapshot(ae), _snapshot(adv)
        terms = module.training_step(batch, optimizers, step=3)  # autoencoder step
        assert {"nll", "kl", "adv_ce", "loss"} <= set(terms)
        assert not any(_changed(adv, adv0))
        assert sum(_changed(ae, ae0)) >= len(ae) - 1  # all but possibly unused params


def test_classifier_loss_responds_to_its_own_optimiser(cpa_setup):
    _, module, batch = cpa_setup
    optimizers = module.configure_optimizers()
    module.train()
    penalty_weight = module.penalty_weight
    with torch_seed_scope(1):
        # Without the penalty the classifiers' cross-entropy falls: the encoder is not
        # updated on adversary steps, so the basal latent keeps revealing the cell type
        # and the perturbation, and the classifiers learn to read them.
        module.penalty_weight = 0.0
        first = module.training_step(batch, optimizers, step=1)["adv_ce"]
        for _ in range(60):
            last = module.training_step(batch, optimizers, step=1)["adv_ce"]
        assert last < 0.9 * first
        # With it, the adversary's full objective (cross-entropy + penalty) falls too.
        module.penalty_weight = penalty_weight
        first = module.training_step(batch, optimizers, step=1)
        for _ in range(60):
            last = module.training_step(batch, optimizers, step=1)
        assert last["adv_loss"] < 0.5 * first["adv_loss"]


def test_autoencoder_gradient_opposes_the_adversary(cpa_setup):
    _, module, batch = cpa_setup
    module.eval().double()  # no dropout, float64: three deterministic forward passes
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    enc = list(module.encoder.parameters())

    def grads(loss):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, enc)])

    with_adv = grads(module.autoencoder_terms(batch, sample=False, with_adversary=True)["loss"])
    without = grads(module.autoencoder_terms(batch, sample=False, with_adversary=False)["loss"])
    z_basal, _ = module.basal(batch, sample=False)
    adv_ce = grads(module.adversary_loss(z_basal, batch)[0])
    assert adv_ce.norm() > 0
    # d(loss_AE)/d(encoder) = d(NLL + KL)/d(encoder) - adv_weight * d(CE_adv)/d(encoder)
    torch.testing.assert_close(with_adv - without, -2.0 * adv_ce, rtol=1e-7, atol=1e-10)
    assert torch.dot(with_adv - without, adv_ce) < 0


def test_gradient_penalty_matches_autograd_by_hand(cpa_setup):
    _, module, batch = cpa_setup
    module.eval()
    with torch_seed_scope(0):
        terms = module.adversary_terms(batch)
    with torch.no_grad(), torch_seed_scope(0):
        z, _ = module.basal(batch, sample=True)
    z = z.clone().requires_grad_(True)
    expected = 0.0
    heads = [module.pert_classifier, *module.cov_classifiers.values()]
    for head in heads:
        (g,) = torch.autograd.grad(head(z).sum(), z)
        expected += float(g.pow(2).sum(dim=1).mean())
    assert float(terms["adv_penalty"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(terms["adv_loss"].detach()) == pytest.approx(
        float(terms["adv_ce"].detach()) + module.penalty_weight * expected, rel=1e-5
    )


def test_training_log_reports_both_players_and_noadv_has_none(make_toy):
    adata = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40)
    split = transfer_split(adata)
    cpa = create_model("cpa", **SMALL["cpa"], batch_size=64).fit(
        adata, split, max_epochs=2, progress=False
    )
    cols = set(cpa.history.columns)
    assert {"train_loss", "train_adv_ce", "train_adv_penalty", "val_loss", "val_adv_ce"} <= cols
    noadv = create_model("cpa_noadv", **SMALL["cpa_noadv"]).fit(
        adata, split, max_epochs=1, progress=False
    )
    assert not any("adv" in c for c in noadv.history.columns)
    assert len(noadv.module.configure_optimizers()) == 1
    assert not hasattr(noadv.module, "pert_classifier")
