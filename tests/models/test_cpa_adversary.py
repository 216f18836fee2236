"""CPA's adversary: own optimiser, classifier updates before each autoencoder update, a
bounded objective (confusion) or the unbounded one (maximize), CPA's weight schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_helpers import SMALL, transfer_split

from pertbench.models import create_model
from pertbench.models.cpa import adversary_schedule
from pertbench.models.data import CellTable
from pertbench.models.layers import torch_seed_scope
from pertbench.models.training import optimizer_step


@pytest.fixture
def cpa_setup(make_toy):
    adata = make_toy(n_perturbations=6, n_cells=30, n_controls=40, n_genes=40)
    split = transfer_split(adata)
    model = create_model(
        "cpa", **SMALL["cpa"], adv_weight=2.0, adv_steps=3, penalty_weight=10.0, adv_ramp_epochs=0
    )
    model.fit(adata, split, max_epochs=1, progress=False)
    table = CellTable.from_adata(adata, model.encoding, genes=model.genes)
    rows = np.arange(table.n_cells)
    batch = {name: table.take(name, rows) for name in ("x", "pert", "cov", "cov_codes")}
    return model, model.module, batch


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, snapshot):
    return [not torch.equal(p.detach(), s) for p, s in zip(params, snapshot, strict=True)]


def _adam_steps(optimizer) -> int:
    return max(int(state["step"]) for state in optimizer.state.values())


def test_two_disjoint_optimisers_and_classifiers_update_first(cpa_setup):
    _, module, batch = cpa_setup
    optimizers = module.configure_optimizers()
    assert len(optimizers) == 2
    ae_ids = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    adv_ids = {id(p) for g in optimizers[1].param_groups for p in g["params"]}
    assert not ae_ids & adv_ids
    assert ae_ids | adv_ids == {id(p) for p in module.parameters()}
    assert adv_ids == {id(p) for p in module.adversary_parameters()}
    assert optimizers[1].param_groups[0]["lr"] == module.adv_lr != module.lr

    ae, adv = module.autoencoder_parameters(), module.adversary_parameters()
    module.train()
    with torch_seed_scope(0):
        ae0, adv0 = _snapshot(ae), _snapshot(adv)
        terms = module.training_step(batch, optimizers, step=0)
    assert {"nll", "kl", "adv_confusion", "adv_ce", "adv_penalty", "loss"} <= set(terms)
    assert all(_changed(adv, adv0))
    assert sum(_changed(ae, ae0)) >= len(ae) - 1  # all but possibly unused params
    # adv_steps=3: two classifier updates, then one autoencoder update, every step
    assert _adam_steps(optimizers[1]) == 2 and _adam_steps(optimizers[0]) == 1


def test_classifier_loss_responds_to_its_own_optimiser(cpa_setup):
    _, module, batch = cpa_setup
    optimizers = module.configure_optimizers()
    module.train()
    ae = module.autoencoder_parameters()
    ae0 = _snapshot(ae)

    def adversary_step():
        terms = module.adversary_terms(batch)
        optimizer_step(terms["adv_loss"], optimizers[1])
        return terms

    with torch_seed_scope(1):
        # Without the penalty the classifiers' cross-entropy falls: the encoder is not
        # updated on classifier updates, so the basal latent keeps revealing the cell type
        # and the perturbation, and the classifiers learn to read them.
        module.penalty_weight = 0.0
        first = adversary_step()["adv_ce"]
        for _ in range(60):
            last = adversary_step()["adv_ce"]
        assert last < 0.7 * first
        # With it, the adversary's full objective (cross-entropy + penalty) falls too.
        module.penalty_weight = 10.0
        first = adversary_step()
        for _ in range(60):
            last = adversary_step()
        assert last["adv_loss"] < 0.7 * first["adv_loss"]
    assert not any(_changed(ae, ae0))


def _grads(module, loss):
    enc = list(module.encoder.parameters())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, enc)])


@pytest.mark.parametrize("objective", ["confusion", "maximize"])
def test_autoencoder_gradient_is_the_generative_one_plus_the_adversarial_term(cpa_setup, objective):
    _, module, batch = cpa_setup
    module.eval().double()  # no dropout, float64: three deterministic forward passes
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    module.adv_objective, module.adv_scale = objective, 0.5  # half-way up the ramp

    def ae_loss(with_adversary):
        terms = module.autoencoder_terms(batch, sample=False, with_adversary=with_adversary)
        return terms["loss"]

    with_adv, without = _grads(module, ae_loss(True)), _grads(module, ae_loss(False))
    z_basal, _ = module.basal(batch, sample=False)
    if objective == "confusion":
        term = _grads(module, module.confusion_loss(z_basal, batch))
        sign = 1.0  # the encoder minimises the classifiers' distance from knowing nothing
    else:
        term = _grads(module, module.adversary_loss(z_basal, batch)[0])
        sign = -1.0  # the encoder maximises the classifiers' cross-entropy
    assert term.norm() > 0
    # d(loss_AE)/d(encoder) = d(NLL + KL)/d(encoder) + sign * scale * adv_weight * d(term)
    torch.testing.assert_close(with_adv - without, sign * 0.5 * 2.0 * term, rtol=1e-7, atol=1e-10)


def _set_output(head, weight: float, bias: torch.Tensor) -> None:
    last = head.net[-1]
    with torch.no_grad():
        last.weight.fill_(weight)
        last.bias.copy_(bias)


def test_confusion_is_zero_when_the_classifiers_know_nothing_and_bounded_below(cpa_setup):
    _, module, batch = cpa_setup
    module.eval()
    z_basal, _ = module.basal(batch, sample=False)
    targets = module.adversary_targets(batch)
    heads = [module.pert_classifier, *module.cov_classifiers.values()]
    # Classifiers that ignore the latent and predict the label frequencies: confusion 0,
    # while their cross-entropy is the entropy of the frequencies (not 0).
    entropies = []
    for head, target in zip(heads, targets, strict=True):
        freq = target.mean(dim=0)
        _set_output(head, 0.0, torch.log(freq.clamp_min(1e-12)))
        entropies.append(float(-(freq * torch.log(freq.clamp_min(1e-12))).sum()))
    with torch.no_grad():
        assert float(module.confusion_loss(z_basal, batch)) == pytest.approx(0.0, abs=1e-5)
        ce = float(module.adversary_loss(z_basal, batch)[0])
    assert ce == pytest.approx(sum(entropies), rel=1e-5)
    # Confidently wrong classifiers (all mass on one class the cells mostly are not):
    # the unbounded objective rewards the encoder without limit (-CE very negative), the
    # confusion term penalises it as much as confidently right ones.
    for head, target in zip(heads, targets, strict=True):
        rare = int(target.sum(dim=0).argmin())
        bias = torch.full((target.shape[1],), -20.0)
        bias[rare] = 20.0
        _set_output(head, 0.0, bias)
    with torch.no_grad():
        wrong_confusion = float(module.confusion_loss(z_basal, batch))
        wrong_ce = float(module.adversary_loss(z_basal, batch)[0])
    assert wrong_ce > 10 * sum(entropies)  # what "maximize" would reward
    assert wrong_confusion > 10.0


def test_adversary_schedule_warms_up_then_ramps():
    assert [adversary_schedule(e, 2, 4) for e in range(8)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [adversary_schedule(e, 0, 0) for e in range(3)] == [1, 1, 1]
    assert [adversary_schedule(e, 1, 0) for e in range(3)] == [0, 1, 1]


def test_gradient_penalty_matches_autograd_by_hand(cpa_setup):
    _, module, batch = cpa_setup
    module.eval()
    terms = module.adversary_terms(batch)
    with torch.no_grad():
        z, _ = module.basal(batch, sample=False)
    z = z.clone().requires_grad_(True)
    expected = 0.0
    for block in module.adversary_logits(z):
        (g,) = torch.autograd.grad(block.sum(), z, retain_graph=True)
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
    expected = {"train_loss", "train_adv_ce", "train_adv_confusion", "val_loss", "val_adv_ce"}
    assert expected <= cols
    noadv = create_model("cpa_noadv", **SMALL["cpa_noadv"]).fit(
        adata, split, max_epochs=1, progress=False
    )
    assert not any("adv" in c for c in noadv.history.columns)
    assert len(noadv.module.configure_optimizers()) == 1
    assert not hasattr(noadv.module, "pert_classifier")
