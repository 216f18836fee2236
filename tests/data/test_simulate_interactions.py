"""Genetic interaction classes of the simulator: each class departs from additivity as documented,
in the stored truth and in the simulated cells; proportions, seeds and the other draws."""

from __future__ import annotations

import numpy as np
import pytest

from pertbench.data.groups import group_cells, group_mean_var
from pertbench.data.interaction_classes import (
    NON_ADDITIVE_CLASSES,
    NORMAN2019_PAIRS,
    apportion,
    class_weights,
)
from pertbench.data.keys import PerturbationKeys
from pertbench.data.simulate import simulate, true_effects_frame
from pertbench.errors import ConfigError

EQUAL = dict.fromkeys(NON_ADDITIVE_CLASSES, 1.0)
CLASSED = dict(
    n_covariates=2,
    n_perturbations=10,
    n_combinations=10,
    n_cells_per_group=150,
    n_genes=100,
    program_size=0.1,
    library_size=5000.0,
    base_sd=1.0,
    interaction_fraction=1.0,
    interaction_classes=EQUAL,
    seed=5,
)


@pytest.fixture(scope="module")
def classed():
    return simulate(**CLASSED)


def _programs(sim, frame, combo, cov):
    """The partners' effects without their knocked-down targets (independently of the code)."""
    a, b = combo.split("+")
    out = []
    for single in (a, b):
        effect = frame.loc[f"{cov}/{single}"].to_numpy(dtype=np.float64).copy()
        effect[list(frame.columns).index(single)] = 0.0  # genetic: named after its target
        out.append(effect)
    return out


def _observed_deltas(adata):
    grouping = group_cells(adata.obs, PerturbationKeys())
    mean, var = group_mean_var(adata.X, grouping.group_codes, grouping.n_groups)
    n = grouping.groups["n_cells"].to_numpy()
    labels = grouping.group_labels().to_numpy()
    index = {label: i for i, label in enumerate(labels)}
    return mean, var, n, index


def _corr(x, y):
    # centred: renormalising proportions shifts every gene when a program gene rises a lot
    return float(np.corrcoef(x, y)[0, 1])


def test_each_class_departs_from_additivity_as_documented(classed):
    sim = classed.uns["simulation"]
    classes = list(sim["interaction_class"])
    assert sorted(classes) == sorted(NON_ADDITIVE_CLASSES * 2)  # 10 pairs, 2 of each class
    frame = true_effects_frame(classed, "true_effect")
    program = sim["program"]
    singles = list(sim["perturbations"])
    for j, (combo, kind) in enumerate(zip(sim["combinations"], classes, strict=True)):
        a, b = combo.split("+")
        for c, cov in enumerate(("CT0", "CT1")):
            deviation = (
                frame.loc[f"{cov}/{combo}"] - frame.loc[f"{cov}/{a}"] - frame.loc[f"{cov}/{b}"]
            ).to_numpy(dtype=np.float64)
            np.testing.assert_allclose(deviation, sim["interaction"][j, c], atol=1e-5)
            pa, pb = _programs(sim, frame, combo, cov)
            both = pa + pb
            if kind == "neomorphic":
                touched = program[singles.index(a)] | program[singles.index(b)]
                support = np.abs(deviation) > 1e-6
                assert support.any() and not (support & touched).any()  # only new genes
                assert support.sum() == round(0.1 * 100)  # a program of a single's size
                assert 0.2 < np.linalg.norm(deviation) / np.linalg.norm(pa) < 5.0
                continue
            if kind == "epistasis":  # one partner's program is masked
                masked = min(np.linalg.norm(deviation + pa), np.linalg.norm(deviation + pb))
                assert masked < 1e-5 * max(1.0, np.linalg.norm(deviation))
                continue
            # synergy / buffering / suppression: deviation = (c - 1) * (program A + program B)
            slope = deviation @ both / (both @ both)
            np.testing.assert_allclose(deviation, slope * both, atol=1e-5)
            low, high = {"synergy": (0.5, 1.0), "buffering": (-0.5, -0.3)}.get(kind, (-1.0, -0.7))
            assert low - 1e-6 <= slope <= high + 1e-6, (kind, slope)


def test_the_cells_show_each_class(classed):
    """The interaction is visible in the simulated cells (log-normalised group means)."""
    sim = classed.uns["simulation"]
    mean, var, n, index = _observed_deltas(classed)
    for j, (combo, kind) in enumerate(
        zip(sim["combinations"], sim["interaction_class"], strict=True)
    ):
        a, b = combo.split("+")
        for cov in ("CT0", "CT1"):
            ctrl = mean[index[f"{cov}:control"]]
            rows = [index[f"{cov}:{x}"] for x in (combo, a, b)]
            d_ab, d_a, d_b = (mean[r] - ctrl for r in rows)
            gi = d_ab - d_a - d_b
            # far beyond the sampling noise of the four group means it is made of
            noise = sum(var[r] / n[r] for r in [*rows, index[f"{cov}:control"]])
            assert gi @ gi > 2 * noise.sum(), (combo, kind)  # about 1 under additivity
            if kind == "synergy":
                assert _corr(gi, d_a + d_b) > 0.5
            elif kind in ("buffering", "suppression"):
                assert _corr(gi, d_a + d_b) < -0.5
            elif kind == "epistasis":
                coefficients = sim["interaction_coefficients"][j]
                masked = d_a if coefficients[0] < coefficients[1] else d_b
                assert _corr(gi, -masked) > 0.5
            else:  # neomorphic: the change sits on genes neither partner touches
                new = np.abs(sim["interaction"][j]).max(axis=0) > 0
                assert (gi[new] ** 2).mean() > 10 * (gi[~new] ** 2).mean()


def test_class_counts_follow_the_proportions():
    adata = simulate(n_covariates=1, n_perturbations=8, n_combinations=12, n_genes=40, seed=2)
    classes = list(adata.uns["simulation"]["interaction_class"])
    # default: 82% of 12 pairs interact (10), split like Norman 2019's labelled pairs
    assert classes.count("additive") == 2
    expected = apportion(10, class_weights(None))
    assert {k: classes.count(k) for k in NON_ADDITIVE_CLASSES} == expected
    # the default weights are the labelled pair counts
    labelled = sum(NORMAN2019_PAIRS[k] for k in NON_ADDITIVE_CLASSES)
    assert class_weights(None) == pytest.approx(
        {k: NORMAN2019_PAIRS[k] / labelled for k in NON_ADDITIVE_CLASSES}
    )
    # largest remainder: 10 x (30, 8, 12, 9, 13) / 72 = 4.17, 1.11, 1.67, 1.25, 1.81
    assert expected == {
        "synergy": 4,
        "buffering": 1,
        "suppression": 2,
        "epistasis": 1,
        "neomorphic": 2,
    }


def test_interactions_leave_the_other_draws_unchanged():
    options = dict(
        n_covariates=2, n_perturbations=8, n_combinations=6, n_genes=60, n_studies=2, seed=4
    )
    a = simulate(**options)
    b = simulate(**options, interaction_fraction=0.0)
    c = simulate(**options, interaction_classes={"epistasis": 1.0})
    sa, sb, sc = (x.uns["simulation"] for x in (a, b, c))
    assert a.obs.equals(b.obs) and a.obs.equals(c.obs)
    singles = ~sa["groups"]["condition"].str.contains("+", regex=False).to_numpy()
    for key in ("true_effect", "true_log_expression"):
        np.testing.assert_array_equal(sa[key][singles], sb[key][singles])
    np.testing.assert_array_equal(sa["study_shift"], sb["study_shift"])
    assert not np.array_equal(sa["true_effect"][~singles], sb["true_effect"][~singles])
    # changing the proportions changes classes, not which pairs interact
    interacting = sa["interaction_class"] != "additive"
    np.testing.assert_array_equal(interacting, sc["interaction_class"] != "additive")
    assert set(sc["interaction_class"][interacting]) == {"epistasis"}


def test_strength_zero_is_additive_and_cell_seed_is_a_replicate():
    additive = simulate(**{**CLASSED, "n_cells_per_group": 5, "interaction_strength": 0.0})
    assert np.abs(additive.uns["simulation"]["interaction"]).max() < 1e-6
    base = dict(n_covariates=2, n_perturbations=5, n_combinations=3, n_genes=40, seed=1)
    first = simulate(**base)
    again = simulate(**base, cell_seed=9)
    replicate = simulate(**base, cell_seed=9)
    assert (again.X != replicate.X).nnz == 0  # a cell seed is reproducible
    assert first.obs.equals(again.obs)  # same design, groups and sizes
    np.testing.assert_array_equal(
        first.uns["simulation"]["true_log_expression"],
        again.uns["simulation"]["true_log_expression"],
    )
    assert (first.X != again.X).nnz > 0  # but fresh cells


def test_bad_interaction_knobs():
    with pytest.raises(ConfigError, match="unknown interaction class"):
        simulate(interaction_classes={"synergistic": 1.0})
    with pytest.raises(ConfigError, match="interaction_fraction must be between 0 and 1"):
        simulate(interaction_fraction=1.5)
    with pytest.raises(ConfigError, match="at least one class needs a positive weight"):
        simulate(interaction_classes={"synergy": 0})
    with pytest.raises(ConfigError, match="interaction_strength must be >= 0"):
        simulate(interaction_strength=-1.0)
