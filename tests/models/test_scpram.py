"""scPRAM: optimal-transport matching, per-cell attention, determinism, save/load."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from model_helpers import LATENT_VAE_SMALL as SMALL
from model_helpers import celltype_split

from conftest import make_toy_adata
from pertbench.errors import ConfigError, ModelError
from pertbench.models._latent_arithmetic import ReferenceLatents
from pertbench.models.base import PerturbationModel, build_counterfactuals
from pertbench.models.scpram import ScPRAM, attention_weights, transport_plan


@pytest.fixture(scope="module")
def stim_data():
    return make_toy_adata(n_covariates=3, n_perturbations=1, n_cells=40, n_controls=40, n_genes=30)


@pytest.fixture(scope="module")
def fitted(stim_data):
    split = celltype_split(stim_data, "C2")
    model = ScPRAM(**SMALL).fit(stim_data, split, seed=3, device="cpu", progress=False)
    return model, stim_data, split


def brute_force_attention(query, reference, k):
    """One query at a time, full sort, cosine weights clipped at 0 and normalised."""
    out = np.zeros((len(query), len(reference)))
    for q, zq in enumerate(query):
        sims = np.array([zq @ zr / (np.linalg.norm(zq) * np.linalg.norm(zr)) for zr in reference])
        top = np.argsort(-sims, kind="stable")[:k]
        w = np.clip(sims[top], 0, None)
        out[q, top] = w / w.sum()
    return out


def test_attention_matches_per_cell_brute_force():
    gen = np.random.default_rng(0)
    reference = gen.normal(size=(200, 6))
    query = gen.normal(size=(37, 6))
    k = math.ceil(0.05 * 200)
    weights = attention_weights(query, reference, ratio=0.05)
    assert weights.shape == (37, 200) and (np.diff(weights.indptr) == k).all()
    np.testing.assert_allclose(
        weights.toarray(), brute_force_attention(query, reference, k), atol=1e-12
    )
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)).ravel(), 1.0)
    soft = attention_weights(query, reference, ratio=0.05, kind="softmax", temperature=0.2)
    rows = soft.toarray()
    for q in range(3):  # softmax over the same top-k set
        top = np.flatnonzero(rows[q])
        sims = (
            reference[top]
            @ query[q]
            / (np.linalg.norm(reference[top], axis=1) * np.linalg.norm(query[q]))
        )
        expected = np.exp(sims / 0.2) / np.exp(sims / 0.2).sum()
        np.testing.assert_allclose(rows[q, top], expected, rtol=1e-10)
    with pytest.raises(ConfigError, match="ratio"):
        attention_weights(query, reference, ratio=0.0)


def test_transport_recovers_a_known_matching():
    gen = np.random.default_rng(2)
    controls = gen.normal(scale=3.0, size=(40, 5))
    perm = gen.permutation(40)
    stimulated = controls[perm] + 0.01 * gen.normal(size=(40, 5))  # stim j is control perm[j]
    for method, kwargs in (("emd", {}), ("sinkhorn", {"epsilon": 1e-3})):
        plan = transport_plan(stimulated, controls, method=method, **kwargs)
        match = plan.argmax(axis=0)  # partner of each control
        np.testing.assert_array_equal(perm[match], np.arange(40))
        np.testing.assert_allclose(plan.sum(axis=1), 1 / 40, atol=1e-6)


def hand_made_reference() -> ReferenceLatents:
    """Two reference types in different directions, each with its own shift.

    Type A controls lie along +x and are shifted by (0, 0, +1) when stimulated; type B
    controls lie along +y and are shifted by (0, 0, -1). The held-out type H has controls
    only (no stimulated cells), so it must not be among the references.
    """
    gen = np.random.default_rng(4)
    a_ctrl = np.column_stack([10 + gen.normal(size=20), gen.normal(size=20) * 0.1, np.zeros(20)])
    b_ctrl = np.column_stack([gen.normal(size=20) * 0.1, 10 + gen.normal(size=20), np.zeros(20)])
    h_ctrl = np.column_stack([np.full(5, -10.0), np.zeros(5), np.zeros(5)])
    latent = np.vstack(
        [a_ctrl, a_ctrl + np.array([0, 0, 1]), b_ctrl, b_ctrl + np.array([0, 0, -1]), h_ctrl]
    )
    cov = np.array(["A"] * 40 + ["B"] * 40 + ["H"] * 5, dtype=object)
    pert = np.array(
        ["control"] * 20 + ["P0"] * 20 + ["control"] * 20 + ["P0"] * 20 + ["control"] * 5,
        dtype=object,
    )
    return ReferenceLatents(latent=latent.astype(np.float32), covariate=cov, perturbation=pert)


def test_attention_is_per_cell(fitted):
    model = copy.deepcopy(fitted[0])
    model.reference = hand_made_reference()
    model._shift_cache.clear()
    shifts = model.reference_shifts("P0")
    assert shifts.cell_types == ["A", "B"]  # the held-out type H is not a reference
    a_rows = shifts.control_covariate == "A"
    np.testing.assert_allclose(shifts.shifts[a_rows], [[0, 0, 1]] * 20, atol=0.05)
    np.testing.assert_allclose(shifts.shifts[~a_rows], [[0, 0, -1]] * 20, atol=0.05)
    # two query cells with different neighbours (near A, near B) get different deltas
    query = np.array([[9.0, 0.5, 0.0], [0.5, 9.0, 0.0]])
    weights = model._attention_weights(query, shifts.control_latent)
    deltas = weights @ shifts.shifts
    np.testing.assert_allclose(deltas[0], [0, 0, 1], atol=0.05)
    np.testing.assert_allclose(deltas[1], [0, 0, -1], atol=0.05)
    assert set(shifts.control_covariate[weights[0].indices]) == {"A"}
    assert set(shifts.control_covariate[weights[1].indices]) == {"B"}


def test_prediction_is_decoded_attended_shift(fitted):
    model, adata, split = fitted
    pred = model.predict_split(adata, split)
    controls = adata[pred.obs["control_obs_name"].to_numpy()]
    z = model.latent(controls).astype(np.float64)
    shifts = model.reference_shifts("P0")
    assert "C2" not in shifts.cell_types and set(shifts.cell_types) == {"C0", "C1"}
    k = math.ceil(model.params.ratio * len(shifts.control_latent))
    weights = brute_force_attention(z, shifts.control_latent, k)
    with torch.no_grad():
        expected = model.module.decode(
            torch.from_numpy((z + weights @ shifts.shifts).astype(np.float32))
        )
    np.testing.assert_allclose(pred.X, expected.numpy(), rtol=1e-5, atol=1e-5)
    att = model.last_attention
    assert att.weights.shape == (pred.n_obs, len(shifts.control_latent))
    per_type = att.by_reference_type(att.query_obs["cell_type"].to_numpy())
    np.testing.assert_allclose(per_type.sum(axis=1), 1.0)
    manual = [weights[:, shifts.control_covariate == t].sum(1).mean() for t in per_type.columns]
    np.testing.assert_allclose(per_type.loc["C2"].to_numpy(), manual, atol=1e-10)


def test_same_seed_identical_predictions(stim_data):
    split = celltype_split(stim_data, "C2")
    preds = []
    for seed in (5, 5, 6):
        model = ScPRAM(**SMALL).fit(stim_data, split, seed=seed, device="cpu", progress=False)
        preds.append(model.predict_split(stim_data, split).X)
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.array_equal(preds[0], preds[2])


def test_save_load_identity_and_sinkhorn(fitted, tmp_path):
    model, adata, split = fitted
    before = model.predict_split(adata, split).X
    model.save(tmp_path / "m")
    loaded = PerturbationModel.load(tmp_path / "m", device="cpu")
    assert isinstance(loaded, ScPRAM)
    np.testing.assert_array_equal(loaded.predict_split(adata, split).X, before)
    loaded.params.ot = "sinkhorn"
    sink = loaded.predict_split(adata, split).X
    assert sink.shape == before.shape and np.isfinite(sink).all()


def test_bad_parameters_and_requests(fitted):
    for bad in ({"ot": "exact"}, {"attention": "dot"}, {"ratio": 2.0}, {"temperature": 0.0}):
        with pytest.raises(ConfigError):
            ScPRAM(**bad)
    model, adata, _ = fitted
    with pytest.raises(ModelError, match="not trained"):
        ScPRAM().attention(adata)
    req = pd.DataFrame({"cell_type": ["C2"], "condition": ["control"]})
    cf = build_counterfactuals(adata, req, model.keys)
    with pytest.raises(Exception, match="control"):
        model.predict(cf)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["scgen", "scpram"])
def test_trains_on_gpu_and_loads_on_cpu(stim_data, tmp_path, name):
    from pertbench.models.registry import create_model

    split = celltype_split(stim_data, "C2")
    model = create_model(name, **SMALL).fit(stim_data, split, seed=0, device="cuda", progress=False)
    assert model.device.startswith("cuda")
    on_gpu = model.predict_split(stim_data, split).X
    model.save(tmp_path / "m")
    on_cpu = PerturbationModel.load(tmp_path / "m", device="cpu").predict_split(stim_data, split).X
    np.testing.assert_allclose(on_cpu, on_gpu, rtol=1e-4, atol=1e-4)
