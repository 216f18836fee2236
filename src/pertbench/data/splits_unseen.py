"""Splits that ask for what training never showed: ``unseen`` and ``fewshot``.

- ``unseen`` (GEARS / Norman / Replogle style): hold out perturbations *entirely*; a
  held-out perturbation has no training cell in any covariate. A held-out single is also
  absent from training as a part of a combination (combinations containing it are held out
  with it), so one-hot models cannot know it at all. Each held-out group is labelled with
  GEARS' subgroup: ``single`` for a single, ``seen0``/``seen1``/``seen2`` for a combination
  with that many of its parts measured as singles in training.
- ``fewshot`` (Virtual Cell Challenge style): a target covariate keeps ``n_shots`` of its
  perturbations (chosen, or seeded random) in training; its other perturbations are held out
  to val/test; every other covariate stays in training whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import (
    SplitResult,
    _check_control_fractions,
    _check_fraction,
    _rngs,
    _round_half_up,
    _SplitBuilder,
    _val_test_counts,
)
from pertbench.errors import ConfigError

SEEN_COLUMN = "seen"


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


def split_unseen(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    fraction: float = 0.3,
    combo_fraction: float | None = None,
    heldout_perturbations: str | list[str] | None = None,
    candidates: str | list[str] | None = None,
    val_fraction: float = 0.5,
    control_val_fraction: float = 0.25,
    control_test_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """Unseen perturbations: held-out perturbations appear in NO training covariate.

    Round-half-up ``fraction`` of the single perturbations (of ``candidates`` when given)
    are drawn at random and held out in every covariate, together with every combination
    that contains one of them. Of the remaining combinations, round-half-up
    ``combo_fraction`` (default: ``fraction``) are held out too. ``heldout_perturbations``
    names the held-out perturbations instead of drawing them (combinations containing a
    named single still follow it). Held-out perturbations go to val (``val_fraction``) or
    test *as a whole* (all their covariates together), stratified by subgroup; the summary's
    ``seen`` column gives each held-out group's subgroup (``single``, ``seen0``, ``seen1``,
    ``seen2``: how many of a combination's parts are measured as singles in training).

    The leakage check is per perturbation: a held-out single must not be part of any
    training perturbation and a held-out combination must not be trained in any covariate.
    """
    fraction = _check_fraction("fraction", fraction)
    combo_fraction = fraction if combo_fraction is None else float(combo_fraction)
    combo_fraction = _check_fraction("combo_fraction", combo_fraction)
    val_fraction = _check_fraction("val_fraction", val_fraction)
    _check_control_fractions(control_val_fraction, control_test_fraction)
    b = _SplitBuilder(adata, keys, "unseen", seed)
    rng_pick, rng_combo, rng_valtest, rng_ctrl = _rngs(seed, 4)
    keys = b.keys
    non_control = b.non_control()
    labels = b.groups[b.pert_col].astype(str).to_numpy()
    measured = sorted(set(labels[non_control]))
    singles = [x for x in measured if not keys.is_combination(x)]
    combos = [x for x in measured if keys.is_combination(x)]

    named = _as_list(heldout_perturbations)
    if named is not None:
        unknown = sorted(set(named) - set(measured))
        if unknown:
            raise ConfigError(
                f"heldout_perturbations {', '.join(unknown[:5])} are not measured; "
                f"available: {', '.join(measured[:20])}"
            )
        held = set(named)
    else:
        pool = _as_list(candidates)
        if pool is not None:
            unknown = sorted(set(pool) - set(singles))
            if unknown:
                raise ConfigError(
                    f"candidates {', '.join(unknown[:5])} are not measured single "
                    "perturbations; list singles to draw the held-out ones from"
                )
        pool = sorted(set(pool)) if pool is not None else singles
        n_hold = _round_half_up(fraction * len(pool))
        held = {pool[i] for i in rng_pick.permutation(len(pool))[:n_hold]}
    held_singles = {x for x in held if not keys.is_combination(x)}
    forced = {c for c in combos if held_singles & set(keys.components(c))}
    held |= forced
    if named is None:
        rest = [c for c in combos if c not in held]
        n_combo = _round_half_up(combo_fraction * len(rest))
        held |= {rest[i] for i in rng_combo.permutation(len(rest))[:n_combo]}

    train_singles = set(singles) - held
    subgroup = {
        label: (
            "single"
            if not keys.is_combination(label)
            else f"seen{sum(p in train_singles for p in keys.components(label))}"
        )
        for label in held
    }
    is_held = np.isin(labels, sorted(held))
    b.role[non_control] = "train"
    # val/test per perturbation (all its covariates together), stratified by subgroup
    for name in sorted(set(subgroup.values())):
        members = sorted(x for x, s in subgroup.items() if s == name)
        members = [members[i] for i in rng_valtest.permutation(len(members))]
        n_val, _ = _val_test_counts(len(members), val_fraction)
        for i, label in enumerate(members):
            b.role[labels == label] = "val" if i < n_val else "test"
    b.apply_group_roles()
    b.split_controls(control_val_fraction, control_test_fraction, rng_ctrl)
    if forced - set(named or []):
        b.notes.append(
            f"{len(forced)} combination(s) contain a held-out single and are held out with it"
        )
    params = {
        "fraction": fraction,
        "combo_fraction": combo_fraction,
        "heldout_perturbations": sorted(held),
        "val_fraction": val_fraction,
        "control_val_fraction": control_val_fraction,
        "control_test_fraction": control_test_fraction,
    }
    result = b.result(params)
    result.leak_scope = "perturbation"
    result.summary[SEEN_COLUMN] = [
        subgroup.get(label, "") if held_group else ""
        for label, held_group in zip(labels, is_held, strict=True)
    ]
    return result


def split_fewshot(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    target: str | list[str],
    n_shots: int = 3,
    shots: str | list[str] | None = None,
    val_fraction: float = 0.5,
    control_val_fraction: float = 0.25,
    control_test_fraction: float = 0.25,
    seed: int = 0,
) -> SplitResult:
    """Few-shot context: a target covariate keeps ``n_shots`` perturbations in training.

    In each target covariate combination (``target``: a label as in ``transfer``'s
    ``heldout_covariates``), ``shots`` (the named perturbations, each must be measured
    there) or ``n_shots`` perturbations drawn at random stay in train; its other
    perturbations are held out to val (``val_fraction``) or test. Every other covariate
    stays in training whole, controls included; the target's controls are split as in every
    task. Held-out perturbations of the target that no other covariate measures are
    reported in ``notes`` (only models with perturbation features can predict them).
    """
    val_fraction = _check_fraction("val_fraction", val_fraction)
    _check_control_fractions(control_val_fraction, control_test_fraction)
    if int(n_shots) < 0:
        raise ConfigError(f"n_shots must be at least 0, got {n_shots}")
    b = _SplitBuilder(adata, keys, "fewshot", seed)
    if target is None or not _as_list(target):
        raise ConfigError("the fewshot task needs target=<covariate> (e.g. --target A172)")
    targets = b.resolve_covariates(target)
    rng_pick, rng_valtest, rng_ctrl = _rngs(seed, 3)
    groups = b.groups
    cov = groups["covariate_code"].to_numpy()
    labels = groups[b.pert_col].astype(str).to_numpy()
    non_control = b.non_control()
    b.role[non_control] = "train"
    named = _as_list(shots)
    held: list[int] = []
    kept: dict[str, list[str]] = {}
    for c in targets:
        members = non_control[cov[non_control] == c]
        if named is not None:
            missing = sorted(set(named) - set(labels[members]))
            if missing:
                raise ConfigError(
                    f"shots {', '.join(missing[:5])} are not measured in {b.cov_label(c)}"
                )
            keep = members[np.isin(labels[members], named)]
        else:
            if int(n_shots) >= len(members):
                raise ConfigError(
                    f"target {b.cov_label(c)} has {len(members)} perturbation(s); n_shots "
                    f"must be below that to hold any out, got {n_shots}"
                )
            keep = np.sort(members[rng_pick.permutation(len(members))[: int(n_shots)]])
        kept[b.cov_label(c)] = sorted(labels[keep].tolist())
        held.extend(sorted(set(members.tolist()) - set(keep.tolist())))
    b.assign_heldout(np.asarray(held, dtype=np.int64), val_fraction, rng_valtest)
    b.apply_group_roles()
    b.split_controls(control_val_fraction, control_test_fraction, rng_ctrl)
    trained_elsewhere = set(labels[non_control[~np.isin(cov[non_control], targets)]])
    alone = sorted(set(labels[held]) - trained_elsewhere)
    if alone:
        b.notes.append(
            f"{len(alone)} held-out perturbation(s) of the target are measured in no other "
            f"covariate ({', '.join(alone[:5])}): only models with perturbation features "
            "can predict them"
        )
    params = {
        "target": [b.cov_label(c) for c in targets],
        "n_shots": int(n_shots),
        "shots": kept,
        "val_fraction": val_fraction,
        "control_val_fraction": control_val_fraction,
        "control_test_fraction": control_test_fraction,
    }
    return b.result(params)


__all__ = ["SEEN_COLUMN", "split_fewshot", "split_unseen"]
