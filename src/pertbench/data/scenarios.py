"""Benchmark scenarios: data imbalance, the tutorial's downsampling, and data scaling.

* :func:`imbalance_by_entropy` - PerturBench section 5.5 / table 7: subsample the
  perturbations of every covariate but a reference one until the normalised entropy of
  "perturbations per covariate" reaches a target (1 = balanced).
* :func:`downsample_perturbed` - the tutorial's unbalanced dataset: keep all controls and a
  fraction of the perturbed (stimulated) cells of every cell type.
* :func:`data_scaling_splits` - PerturBench section 5.4: nested training sets with more
  and more covariates, all sharing the same val/test sets.

Each returns the new data (with ``uns['pertbench_scenario']``) or the splits, and reports
the entropy of the result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import LEFT_OUT, SplitResult, find_leakage, make_split, split_transfer
from pertbench.errors import ConfigError, SplitError

log = logging.getLogger(__name__)

SCENARIO_KEY = "pertbench_scenario"


def normalized_entropy(counts: Sequence[float] | np.ndarray) -> float:
    """Normalised Shannon entropy ``H = -sum(p_k log p_k) / log K`` of class counts.

    ``K`` is the number of classes (entries of ``counts``, zeros included: an empty class
    is maximal imbalance). One class is balanced by definition (1.0).

    Raises
    ------
    ConfigError
        When counts are negative, not finite, or all zero.
    """
    counts = np.asarray(counts, dtype=np.float64).ravel()
    if counts.size == 0:
        raise ConfigError("normalized_entropy needs at least one count")
    if not np.all(np.isfinite(counts)) or (counts < 0).any():
        raise ConfigError("counts must be finite and non-negative")
    total = counts.sum()
    if total <= 0:
        raise ConfigError("counts are all zero: entropy is undefined")
    if counts.size == 1:
        return 1.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(counts.size))


def perturbations_per_covariate(obs: pd.DataFrame, keys: PerturbationKeys) -> pd.Series:
    """Number of distinct non-control perturbations measured in each covariate combination."""
    g = group_cells(obs, keys)
    groups = g.groups[~g.groups["is_control"]]
    counts = np.bincount(groups["covariate_code"], minlength=len(g.covariates))
    return pd.Series(counts, index=g.covariates["label"].to_numpy(), name="n_perturbations")


def scenario_entropy(obs: pd.DataFrame, keys: PerturbationKeys) -> dict[str, float]:
    """Entropies that describe the balance of a dataset.

    ``perturbation_entropy``: normalised entropy of the number of perturbations per
    covariate combination (PerturBench table 7). ``cell_entropy``: normalised entropy of
    the cells over (covariates, perturbation) groups, controls included (how evenly the
    cells are spread, the quantity the tutorial's downsampling changes).
    """
    g = group_cells(obs, keys)
    per_cov = perturbations_per_covariate(obs, keys)
    return {
        "perturbation_entropy": normalized_entropy(per_cov.to_numpy())
        if per_cov.sum() > 0
        else 1.0,
        "cell_entropy": normalized_entropy(g.groups["n_cells"].to_numpy()),
    }


def _record(adata: ad.AnnData, info: dict[str, Any]) -> None:
    adata.uns[SCENARIO_KEY] = info
    log.info(
        "%s scenario: perturbation entropy %.3f, cell entropy %.3f",
        info["scenario"],
        info["perturbation_entropy"],
        info["cell_entropy"],
    )


def imbalance_by_entropy(
    adata: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    target_entropy: float,
    reference_covariate: str | None = None,
    min_perturbations: int = 30,
    n_candidates: int = 20_000,
    seed: int = 0,
) -> ad.AnnData:
    """Subsample perturbations per covariate to reach a target normalised entropy.

    As in PerturBench (appendix D.4, table 7): the reference covariate keeps all of its
    perturbations; for every other covariate a number of perturbations between
    ``min_perturbations`` and what it has is chosen so that the normalised entropy of
    "perturbations per covariate" is as close as possible to ``target_entropy`` (the best
    of ``n_candidates`` seeded random draws plus the extreme corners), then that many of
    its perturbations are drawn at random. All control cells are kept.

    Parameters
    ----------
    target_entropy
        In (0, 1]; PerturBench used 1, 0.9, 0.8 and 0.7.
    reference_covariate
        Covariate label that keeps everything (default: the one with most perturbations,
        the first in sorted order on ties).
    min_perturbations
        Fewest perturbations a covariate keeps (capped by what it has).

    Returns
    -------
    AnnData
        A copy with the kept cells; ``uns['pertbench_scenario']`` holds the target and
        achieved entropy and the perturbations kept per covariate.
    """
    keys = keys if keys is not None else PerturbationKeys()
    target = float(target_entropy)
    if not 0 < target <= 1:
        raise ConfigError(f"target_entropy must be in (0, 1], got {target_entropy}")
    if min_perturbations < 1:
        raise ConfigError("min_perturbations must be at least 1")
    g = group_cells(adata.obs, keys)
    labels = g.covariates["label"].astype(str).to_numpy()
    groups = g.groups
    non_control = groups[~groups["is_control"]]
    available = np.bincount(non_control["covariate_code"], minlength=len(labels))
    if len(labels) < 2:
        raise ConfigError("imbalance needs at least two covariate combinations")
    if reference_covariate is None:
        ref = int(np.argmax(available))
    else:
        hits = np.flatnonzero(labels == str(reference_covariate))
        if not len(hits):
            raise ConfigError(
                f"reference covariate '{reference_covariate}' not found; available: "
                f"{', '.join(labels)}"
            )
        ref = int(hits[0])
    rng_counts, rng_pick = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2)
    )
    others = [c for c in range(len(labels)) if c != ref]
    low = np.minimum(min_perturbations, available[others])
    high = available[others]
    draws = rng_counts.integers(low, high + 1, size=(int(n_candidates), len(others)))
    candidates = draws
    if len(others) <= 12:  # add the extreme corners (2^(K-1) of them) when few
        corners = (
            np.array(
                np.meshgrid(*[[lo, hi] for lo, hi in zip(low, high, strict=True)], indexing="ij")
            )
            .reshape(len(others), -1)
            .T
        )
        candidates = np.vstack([corners, draws])
    full = np.empty((len(candidates), len(labels)), dtype=np.float64)
    full[:, ref] = available[ref]
    full[:, others] = candidates
    p = full / full.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1) / np.log(len(labels))
    best = int(np.argmin(np.abs(h - target)))
    chosen = full[best].astype(np.int64)
    achieved = float(h[best])
    lo_h, hi_h = float(h.min()), float(h.max())
    if abs(achieved - target) > 0.02:
        raise ConfigError(
            f"target entropy {target} cannot be reached with min_perturbations="
            f"{min_perturbations}: this data allows {lo_h:.3f}..{hi_h:.3f}"
        )
    keep_group = groups["is_control"].to_numpy().copy()
    for c in range(len(labels)):
        members = non_control.index[non_control["covariate_code"].to_numpy() == c].to_numpy()
        members = np.sort(members)
        keep = members if c == ref else rng_pick.choice(members, size=chosen[c], replace=False)
        keep_group[keep] = True
    cell_mask = keep_group[g.group_codes]
    out = adata[cell_mask].copy()
    ent = scenario_entropy(out.obs, keys)
    kept = perturbations_per_covariate(out.obs, keys)
    _record(
        out,
        {
            "scenario": "imbalance",
            "target_entropy": target,
            "perturbation_entropy": ent["perturbation_entropy"],
            "cell_entropy": ent["cell_entropy"],
            "reference_covariate": str(labels[ref]),
            "perturbations_per_covariate": {str(k): int(v) for k, v in kept.items()},
            "min_perturbations": int(min_perturbations),
            "seed": int(seed),
        },
    )
    return out


def downsample_perturbed(
    adata: ad.AnnData,
    *,
    keys: PerturbationKeys | None = None,
    fraction: float = 0.2,
    min_cells: int = 1,
    seed: int = 0,
) -> ad.AnnData:
    """The tutorial's unbalanced dataset: keep all controls, ``fraction`` of perturbed cells.

    Sampling is stratified: within every (covariates, perturbation) group, round-half-up
    ``fraction * n`` cells are kept (at least ``min_cells``, at most ``n``), so every cell
    type keeps the same share of its stimulated cells.

    Returns
    -------
    AnnData
        A copy; ``uns['pertbench_scenario']`` records the fraction and the entropies.
    """
    keys = keys if keys is not None else PerturbationKeys()
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction}")
    g = group_cells(adata.obs, keys)
    rng = np.random.default_rng(int(seed))
    keep = g.is_control.copy()
    codes = g.group_codes
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(g.n_groups + 1))
    for gi in np.flatnonzero(~g.groups["is_control"].to_numpy()):
        cells = order[bounds[gi] : bounds[gi + 1]]
        n = len(cells)
        n_keep = min(n, max(int(min_cells), int(np.floor(n * fraction + 0.5))))
        keep[rng.choice(cells, size=n_keep, replace=False)] = True
    out = adata[keep].copy()
    before = scenario_entropy(adata.obs, keys)
    after = scenario_entropy(out.obs, keys)
    _record(
        out,
        {
            "scenario": "downsample",
            "fraction": fraction,
            "perturbation_entropy": after["perturbation_entropy"],
            "cell_entropy": after["cell_entropy"],
            "cell_entropy_before": before["cell_entropy"],
            "n_cells_before": int(adata.n_obs),
            "n_cells_after": int(out.n_obs),
            "seed": int(seed),
        },
    )
    return out


def data_scaling_splits(
    adata: Any,
    *,
    keys: PerturbationKeys | None = None,
    heldout_covariates: str | list[str],
    levels: Sequence[Sequence[str]] | None = None,
    n_levels: int = 3,
    fraction: float = 0.7,
    val_fraction: float = 0.5,
    seed: int = 0,
) -> dict[str, SplitResult]:
    """Nested training sets with more and more covariates, all sharing val and test.

    First a :func:`~pertbench.data.splits.split_transfer` split holds out ``fraction`` of
    the perturbations of each ``heldout_covariates`` (their val/test sets are then fixed).
    Training level 1 contains the held-out covariates' training groups plus the first
    block of extra covariates; every next level adds the next block, and the last level
    has every covariate (PerturBench's small/medium/large McFalineFigueroa23 subsets).
    Cells of covariates outside a level are left out (``""``).

    Parameters
    ----------
    heldout_covariates
        Covariate labels whose perturbations are held out.
    levels
        Explicit blocks of extra covariates added at each level; by default the other
        covariates are shuffled (seeded) and cut into ``n_levels`` nearly equal blocks.
    n_levels
        Number of nested levels when ``levels`` is not given.

    Returns
    -------
    dict
        ``level1``, ``level2``, ... -> :class:`SplitResult` (``params`` hold the training
        covariates, the entropy of perturbations per training covariate and how many
        held-out pairs lack a training covariate for their perturbation).
    """
    keys = keys if keys is not None else PerturbationKeys()
    base = split_transfer(
        adata,
        keys=keys,
        fraction=fraction,
        heldout_covariates=heldout_covariates,
        val_fraction=val_fraction,
        seed=seed,
    )
    obs = base.obs
    g = group_cells(obs, keys)
    labels = g.covariates["label"].astype(str).to_numpy()
    held_labels = list(base.params["heldout_covariates"])
    others = [lab for lab in labels if lab not in held_labels]
    if levels is None:
        if n_levels < 1:
            raise ConfigError("n_levels must be at least 1")
        rng = np.random.default_rng(np.random.SeedSequence(int(seed)).spawn(4)[3])
        shuffled = [others[i] for i in rng.permutation(len(others))]
        blocks = [list(b) for b in np.array_split(np.array(shuffled, dtype=object), n_levels)]
    else:
        blocks = [list(map(str, b)) for b in levels]
        unknown = sorted({x for b in blocks for x in b} - set(labels))
        if unknown:
            raise ConfigError(f"level covariate(s) {', '.join(unknown)} not in the data")
        clash = sorted({x for b in blocks for x in b} & set(held_labels))
        if clash:
            raise ConfigError(
                f"covariate(s) {', '.join(clash)} are held out; remove them from levels"
            )
    cell_labels = labels[g.covariate_codes]
    base_split = base.split.to_numpy(dtype=object)
    out: dict[str, SplitResult] = {}
    train_covs = list(held_labels)
    for i, block in enumerate(blocks, start=1):
        train_covs = train_covs + [b for b in block if b not in train_covs]
        in_level = np.isin(cell_labels, train_covs)
        values = np.where((base_split == "train") & ~in_level, LEFT_OUT, base_split)
        split = make_split(obs.index.astype(str), values)
        counts = pd.DataFrame({"label": cell_labels, "split": values})
        summary = base.summary.copy()
        group_cov = labels[g.groups["covariate_code"].to_numpy()]
        out_of_level = (
            ~np.isin(group_cov, train_covs) & summary["role"].isin(["train", "control"]).to_numpy()
        )
        summary.loc[out_of_level, "left_out"] += summary.loc[out_of_level, "train"]
        summary.loc[out_of_level, "train"] = 0
        summary.loc[out_of_level, "role"] = LEFT_OUT
        # support: held-out perturbations seen in at least one training covariate
        train_groups = summary[summary["role"] == "train"]
        trained_perts = set(train_groups[keys.perturbation_key].astype(str))
        held = summary[summary["role"].isin(["val", "test"])]
        unsupported = int((~held[keys.perturbation_key].astype(str).isin(trained_perts)).sum())
        per_cov = (
            train_groups.groupby([*keys.covariate_keys], observed=True, sort=True).size()
            if keys.covariate_keys
            else pd.Series([len(train_groups)])
        )
        entropy = normalized_entropy(per_cov.to_numpy()) if per_cov.sum() else 1.0
        notes = list(base.notes)
        if unsupported:
            notes.append(
                f"{unsupported} held-out pair(s) have a perturbation that no training "
                "covariate of this level measures"
            )
        res = SplitResult(
            split=split,
            summary=summary,
            unplaced=base.unplaced,
            task="transfer",
            params={
                **base.params,
                "scenario": "data_scaling",
                "level": i,
                "training_covariates": list(train_covs),
                "perturbation_entropy": entropy,
                "n_train_cells": int((counts["split"] == "train").sum()),
                "unsupported_heldout_pairs": unsupported,
            },
            seed=base.seed,
            keys=keys,
            obs=obs,
            heldout_on=base.heldout_on,
            notes=notes,
        )
        leak = find_leakage(obs, split, keys)
        if len(leak):  # cannot happen by construction; guard the invariant anyway
            raise SplitError(f"data scaling level {i} leaks {len(leak)} held-out pair(s)")
        out[f"level{i}"] = res
    return out
