"""Genetic interaction classes of the simulator: how a pair's effect departs from additivity.

Norman et al. (2019) describe a combination's expression change by a linear model of its
singles, ``delta_AB ~ c1 * delta_A + c2 * delta_B`` (plus what the model cannot explain),
and name the pairs by its coefficients: synergy (both larger than 1), buffering and
suppression (smaller than 1), epistasis (one partner dominates, the other is masked) and
neomorphic (changes in genes neither single touches). The simulator draws each measured
pair's class and builds its effect, per covariate ``c``, on the partners' *programs*
(their effects without the knocked-down target genes, which stay knocked down whatever
the class)::

    effect[A+B, c] = target[A] + target[B] + c1 * program[A, c] + c2 * program[B, c]
                     + novel[A+B, c]

======================  ==============================  =====================================
class                   coefficients (c1, c2)           deviation from additivity
======================  ==============================  =====================================
``additive``            (1, 1)                          none
``synergy``             (1 + s, 1 + s), s in [.5, 1]    ``s * (program A + program B)``
``buffering``           (1 - b, 1 - b), b in [.3, .5]   ``-b * (...)``: about one single's size
``suppression``         (q, q), q in [0, .3]            ``-(1 - q) * (...)``: weaker than either
``epistasis``           (1, 0) or (0, 1)                the masked partner's program, negated
``neomorphic``          (1, 1) + a new program          a program on genes neither touches
======================  ==============================  =====================================

The ranges are for ``interaction_strength = 1``; the strength scales ``s``, ``b``,
``1 - q``, the masking of the epistatic partner (``c = max(0, 1 - strength)``) and the
size of the new program. Every pair draws the same random numbers whatever its class, so
changing the class proportions changes classes, not the strengths of the other pairs.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pertbench.errors import ConfigError

ADDITIVE = "additive"
INTERACTION_CLASSES = (ADDITIVE, "synergy", "buffering", "suppression", "epistasis", "neomorphic")
NON_ADDITIVE_CLASSES = INTERACTION_CLASSES[1:]

#: Pairs per class among the 88 of Norman et al. 2019's 131 measured pairs that carry a class
#: label in GEARS' code (``gears/inference.py``, ``GIs``: its transcription of Norman's
#: interaction map), with GEARS' potentiation and both synergy groups counted as synergy and
#: its "redundant" group as buffering. Approximate by construction: see docs/data.md.
NORMAN2019_PAIRS = {
    ADDITIVE: 16,
    "synergy": 30,
    "buffering": 8,
    "suppression": 12,
    "epistasis": 9,
    "neomorphic": 13,
}
#: Default share of measured pairs that interact (72 of the 88 labelled pairs).
DEFAULT_INTERACTION_FRACTION = 0.82
#: Default relative weights of the non-additive classes (the labelled pair counts).
DEFAULT_CLASS_WEIGHTS = {name: float(NORMAN2019_PAIRS[name]) for name in NON_ADDITIVE_CLASSES}


def class_weights(spec: Mapping[str, Any] | None) -> dict[str, float]:
    """Normalised weights of the non-additive classes (``None``: Norman 2019's).

    Raises
    ------
    ConfigError
        An unknown class name, a negative or non-numeric weight, or all weights zero.
    """
    if spec is None:
        spec = DEFAULT_CLASS_WEIGHTS
    if not isinstance(spec, Mapping):
        raise ConfigError(
            "interaction_classes must map class names to weights, e.g. {synergy: 2, epistasis: 1}"
        )
    unknown = sorted(set(map(str, spec)) - set(NON_ADDITIVE_CLASSES))
    if unknown:
        raise ConfigError(
            f"unknown interaction class(es) {', '.join(unknown)}; choose from "
            f"{', '.join(NON_ADDITIVE_CLASSES)} (the additive share is 1 - interaction_fraction)"
        )
    weights = {}
    for name in NON_ADDITIVE_CLASSES:
        value = spec.get(name, 0.0)
        # numbers.Real also admits numpy scalars, as read back from a file's uns
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ConfigError(f"interaction_classes.{name} must be a number >= 0, got {value!r}")
        weights[name] = float(value)
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("interaction_classes: at least one class needs a positive weight")
    return {name: w / total for name, w in weights.items()}


def apportion(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``n`` items over classes in proportion to ``weights`` (largest remainder).

    Exact counts, not random draws, so a small number of pairs still shows the proportions
    as closely as integers allow; remainders tie-break in class order.
    """
    names = list(weights)
    quotas = np.array([weights[k] for k in names], dtype=np.float64) * n
    counts = np.floor(quotas + 1e-9).astype(int)
    short = n - int(counts.sum())
    order = sorted(range(len(names)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return dict(zip(names, counts.tolist(), strict=True))


@dataclass
class PairInteractions:
    """The drawn interaction of every measured pair."""

    classes: np.ndarray  # (n_pairs,) class names
    coefficients: np.ndarray  # (n_pairs, 2) c1, c2 on the first and second partner's program
    novel: np.ndarray  # (n_pairs, n_covariates, n_genes) new program (neomorphic pairs)


def draw_interactions(
    pairs: list[tuple[int, int]],
    *,
    programs: np.ndarray,
    n_covariates: int,
    fraction: float,
    weights: Mapping[str, float],
    strength: float,
    program_genes: int,
    effect_scale: float,
    modulation_sd: float,
    gene_modulation_sd: float,
    rng: np.random.Generator,
) -> PairInteractions:
    """Draw the class, coefficients and new program of every pair.

    Parameters
    ----------
    pairs
        Indices of the two singles of each pair.
    programs
        (n_singles, n_genes) bool: the genes each single changes (its target included).
    fraction
        Share of pairs with a non-additive class (rounded half up to a count).
    weights
        Normalised weights of the non-additive classes (:func:`class_weights`).
    strength
        Scale of every departure from additivity (0: all pairs additive).
    program_genes, effect_scale, modulation_sd, gene_modulation_sd
        Size and spread of a neomorphic program, drawn like a single's program.
    rng
        The simulator's interaction stream (no other stream is touched).
    """
    n_pairs, n_genes = len(pairs), programs.shape[1]
    # every pair draws the same numbers whatever its class (see the module docstring)
    interacting = rng.permutation(n_pairs)
    order = rng.permutation(n_pairs)
    u = rng.random(n_pairs)
    first_dominates = rng.random(n_pairs) < 0.5
    gene_keys = rng.random((n_pairs, n_genes))
    novel_beta = rng.normal(0.0, effect_scale, size=(n_pairs, n_genes))
    novel_amp = np.exp(rng.normal(0.0, modulation_sd, size=(n_pairs, n_covariates)))
    novel_mod = np.exp(rng.normal(0.0, gene_modulation_sd, size=(n_pairs, n_covariates, n_genes)))

    n_int = int(np.floor(fraction * n_pairs + 0.5 + 1e-9))
    counts = apportion(n_int, weights)
    labels = np.concatenate([np.repeat(name, c) for name, c in counts.items()] or [[]])
    classes = np.full(n_pairs, ADDITIVE, dtype=object)
    chosen = interacting[:n_int]
    classes[chosen] = labels[order[order < n_int]] if n_int else labels

    coefficients = np.ones((n_pairs, 2))
    novel = np.zeros((n_pairs, n_covariates, n_genes))
    for j, (a, b) in enumerate(pairs):  # loops over pairs, not cells
        kind = classes[j]
        if kind == "synergy":
            coefficients[j] = 1.0 + strength * (0.5 + 0.5 * u[j])
        elif kind == "buffering":
            coefficients[j] = 1.0 - min(1.0, strength * (0.3 + 0.2 * u[j]))
        elif kind == "suppression":
            coefficients[j] = max(0.0, 1.0 - strength * (0.7 + 0.3 * u[j]))
        elif kind == "epistasis":
            masked = 1 if first_dominates[j] else 0
            coefficients[j, masked] = max(0.0, 1.0 - strength)
        elif kind == "neomorphic":
            # new genes: outside both partners' programs and targets
            free = ~(programs[a] | programs[b])
            keys = np.where(free, gene_keys[j], np.inf)
            genes = np.argsort(keys, kind="stable")[: min(program_genes, int(free.sum()))]
            novel[j][:, genes] = (
                strength * novel_beta[j, genes] * novel_amp[j][:, None] * novel_mod[j][:, genes]
            )
    return PairInteractions(classes=classes, coefficients=coefficients, novel=novel)


def pair_departure(
    effect_a: np.ndarray,
    effect_b: np.ndarray,
    target_a: int,
    target_b: int,
    coefficients: np.ndarray,
    novel: np.ndarray,
) -> np.ndarray:
    """(n_covariates, n_genes) departure of a pair's effect from ``effect_a + effect_b``.

    ``(c1 - 1) * program_a + (c2 - 1) * program_b + novel``, the programs being the
    singles' effects without their target genes (a target index below 0, as for chemical
    perturbations, means no target). Exactly 0 for coefficients (1, 1) without a new
    program.
    """
    program_a, program_b = effect_a.copy(), effect_b.copy()
    for t, program in ((target_a, program_a), (target_b, program_b)):
        if t >= 0:  # the knocked-down target is not part of the program
            program[:, t] = 0.0
    return (coefficients[0] - 1.0) * program_a + (coefficients[1] - 1.0) * program_b + novel


__all__ = [
    "ADDITIVE",
    "DEFAULT_CLASS_WEIGHTS",
    "DEFAULT_INTERACTION_FRACTION",
    "INTERACTION_CLASSES",
    "NON_ADDITIVE_CLASSES",
    "NORMAN2019_PAIRS",
    "PairInteractions",
    "apportion",
    "class_weights",
    "draw_interactions",
    "pair_departure",
]
