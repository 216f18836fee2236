"""Disentanglement probe: what a fresh classifier recovers from a model's basal latent.

A model whose basal latent is meant to hold the cell's state *without* its perturbation
and covariates (CPA's adversary, biolord's bottleneck) can be checked only by trying to
read that information back out, never by the model's own loss (CPA's adversary can be
made confidently wrong while the information stays). After training, the probe takes the
held-out cells (the ``val`` and ``test`` parts of the split: no gradient step saw them),
computes their basal latent (:meth:`pertbench.models.base.PerturbationModel.basal_latent`)
and, per target (the perturbation label, every covariate key), cross-validates a fresh,
seeded classifier (stratified k-fold, 5 folds) *within* each combination of the other
targets (see :func:`probe_targets`). Each target's row reports

- ``accuracy``: pooled out-of-fold accuracy from the basal latent;
- ``chance``: the pooled majority-label rate of the same cells (what a classifier that
  learned nothing from the latent scores);
- ``reference_accuracy``: the same probe on a PCA of the same cells' expression with as
  many components as the latent has dimensions (the information before any model
  touched it).

A latent that removed the information scores near ``chance``; one that keeps it scores
near (or above) ``reference_accuracy``.

The classifier is L2-regularised multinomial logistic regression (``C = 1``) on
standardised features: convex, so the result depends only on the data and the folds (no
initialisation or training length to tune), fast, and the standard linear probe of
representation learning. Standardising matters: a latent whose information sits at a
tiny scale (a nearly collapsed variational posterior) still carries it.
``classifier="mlp"`` uses a one-hidden-layer perceptron (64 units, seeded) to look for
information held non-linearly.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError

PROBE_FILE = "probe.csv"
#: Columns of a probe table, in order.
PROBE_COLUMNS = [
    "target",
    "column",
    "accuracy",
    "chance",
    "reference_accuracy",
    "n_cells",
    "n_classes",
    "n_strata",
    "folds",
    "latent_dim",
    "reference_dim",
    "classifier",
    "cells",
]
PERTURBATION_TARGET = "perturbation"
#: The split parts probed by default: cells no gradient step has seen.
HELD_OUT = ("val", "test")
CLASSIFIERS = ("logistic", "mlp")
DEFAULT_FOLDS = 5
DEFAULT_MAX_CELLS = 5000


def _classifier(kind: str, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        model = LogisticRegression(C=1.0, max_iter=2000)
    elif kind == "mlp":
        model = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, random_state=seed)
    else:
        raise ConfigError(f"probe classifier must be one of {', '.join(CLASSIFIERS)}, got '{kind}'")
    return make_pipeline(StandardScaler(), model)


def probe_accuracy(
    features: np.ndarray,
    labels: np.ndarray | pd.Series,
    *,
    strata: np.ndarray | pd.Series | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    classifier: str = "logistic",
) -> tuple[float, dict[str, float]]:
    """Out-of-fold accuracy of a fresh classifier predicting ``labels`` from ``features``.

    With ``strata``, one classifier is cross-validated inside each stratum (cells sharing
    a stratum label) and the out-of-fold predictions are pooled: the accuracy says what
    the features tell about ``labels`` *beyond* the stratum. Inside a stratum, labels
    with fewer than ``folds`` cells cannot appear in every fold and are left out, and a
    stratum with fewer than two labels left is skipped. NaN when nothing is left.

    Returns
    -------
    (accuracy, info)
        ``info`` has ``chance`` (pooled majority-label rate of the cells used: the
        accuracy of a classifier that learned nothing from the features), ``n_cells``,
        ``n_classes`` (distinct labels used), ``n_strata`` and ``folds``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if folds < 2:
        raise ConfigError(f"the probe needs at least 2 folds, got {folds}")
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    strata = np.zeros(labels.size, dtype=np.int64) if strata is None else np.asarray(strata)
    if not (features.shape[0] == labels.shape[0] == strata.shape[0]):
        raise ValueError("features, labels and strata must have one row per cell")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    strata_codes, _ = pd.factorize(strata, sort=True)
    correct = majority = n_used = n_strata = 0
    used_labels: set[str] = set()
    for code in range(int(strata_codes.max()) + 1 if strata_codes.size else 0):
        rows = np.flatnonzero(strata_codes == code)  # loops over strata, not cells
        _, inverse, counts = np.unique(labels[rows], return_inverse=True, return_counts=True)
        rows = rows[counts[inverse] >= folds]
        if np.unique(labels[rows]).size < 2:
            continue
        y = labels[rows]
        with warnings.catch_warnings():
            # A probe that does not converge fully still gives a (lower) bound on what
            # the features hold; the warning would only clutter every training run.
            warnings.simplefilter("ignore", ConvergenceWarning)
            predicted = cross_val_predict(
                _classifier(classifier, seed), features[rows], y, cv=splitter
            )
        correct += int(np.sum(predicted == y))
        majority += int(np.unique(y, return_counts=True)[1].max())
        n_used += rows.size
        n_strata += 1
        used_labels.update(y.tolist())
    info = {
        "chance": majority / n_used if n_used else float("nan"),
        "n_cells": n_used,
        "n_classes": len(used_labels),
        "n_strata": n_strata,
        "folds": folds,
    }
    return (correct / n_used if n_used else float("nan")), info


def expression_pca(X: Any, n_components: int, *, seed: int = 0) -> np.ndarray:
    """PCA scores of the rows of ``X`` (CSR stays sparse: ARPACK on the implicit centring)."""
    from sklearn.decomposition import PCA

    n_components = int(min(n_components, min(X.shape) - 1))
    if n_components < 1:
        return np.zeros((X.shape[0], 0))
    pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed)
    return pca.fit_transform(X)


def probe_targets(
    obs: pd.DataFrame, keys: PerturbationKeys
) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """``{target: (obs column, labels, strata)}`` for the perturbation and each covariate key.

    The perturbation target is the full label (a combination is its own class, controls
    are a class: the basal latent should tell neither which perturbation a cell got nor
    whether it got one), probed within each covariate combination. A covariate is probed
    within each (perturbation, other covariates) combination. Conditioning on the other
    targets keeps one target's information from passing for another's where a split
    confounds them (in a transfer split's held-out cells every perturbation is measured
    in one cell type only, so a latent that knows the cell type would otherwise appear
    to know the perturbation).
    """
    columns = {PERTURBATION_TARGET: keys.perturbation_key}
    for key in keys.covariate_keys:
        columns[key if key != PERTURBATION_TARGET else f"covariate:{key}"] = key
    values = {col: obs[col].astype(str).to_numpy() for col in columns.values()}
    out = {}
    for target, column in columns.items():
        others = [values[c] for c in columns.values() if c != column]
        strata = (
            pd.Series(list(zip(*others, strict=True))).astype(str).to_numpy()
            if others
            else np.zeros(len(obs), dtype=np.int64)
        )
        out[target] = (column, values[column], strata)
    return out


def probe_cells(
    adata: ad.AnnData,
    split: pd.Series | None,
    *,
    on: str | Sequence[str] = HELD_OUT,
    max_cells: int | None = DEFAULT_MAX_CELLS,
    seed: int = 0,
) -> np.ndarray:
    """Indices (sorted) of the cells the probe reads: those in the split parts ``on``.

    Without a split every cell is used. A set larger than ``max_cells`` is subsampled
    uniformly (seeded).
    """
    if split is None:
        idx = np.arange(adata.n_obs)
    else:
        from pertbench.models.base import align_split

        parts = [on] if isinstance(on, str) else list(on)
        idx = np.flatnonzero(np.isin(align_split(adata, split).to_numpy(), parts))
    if max_cells is not None and idx.size > max_cells:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x70B3]))
        idx = np.sort(rng.choice(idx, size=int(max_cells), replace=False))
    return idx


def disentanglement_probe(
    model: Any,
    adata: ad.AnnData,
    split: pd.Series | None = None,
    *,
    on: str | Sequence[str] = HELD_OUT,
    folds: int = DEFAULT_FOLDS,
    classifier: str = "logistic",
    max_cells: int | None = DEFAULT_MAX_CELLS,
    seed: int = 0,
) -> pd.DataFrame | None:
    """Probe a trained model's basal latent on held-out cells (see the module docstring).

    Parameters
    ----------
    model
        A fitted :class:`~pertbench.models.base.PerturbationModel`.
    adata
        The dataset (log-normalised ``X``) holding the held-out cells.
    split
        Split aligned to ``adata.obs_names`` (``None``: probe every cell).
    on
        The split part(s) whose cells are probed: by default ``val`` and ``test``, the
        cells the model never took a gradient step on.
    folds
        Cross-validation folds (stratified, shuffled with ``seed``).
    classifier
        ``logistic`` (default) or ``mlp``.
    max_cells
        Subsample the probed cells to at most this many (seeded); ``None``: all.
    seed
        Seeds the subsample, the folds, the PCA and the MLP.

    Returns
    -------
    pandas.DataFrame or None
        One row per target with :data:`PROBE_COLUMNS`; ``None`` when the model has no
        basal latent.
    """
    if classifier not in CLASSIFIERS:
        raise ConfigError(
            f"probe classifier must be one of {', '.join(CLASSIFIERS)}, got '{classifier}'"
        )
    idx = probe_cells(adata, split, on=on, max_cells=max_cells, seed=seed)
    if idx.size == 0:
        raise ConfigError(f"the split has no {_describe(on)} cells to probe; choose other parts")
    # an on-disk dataset (out-of-core training) reads only the probed rows
    from pertbench.data.ondisk import OnDiskData

    cells = adata.to_memory(idx) if isinstance(adata, OnDiskData) else adata[idx]
    latent = model.basal_latent(cells)
    if latent is None:
        return None
    from pertbench.models.base import align_genes

    latent = np.asarray(latent, dtype=np.float64)
    expression = align_genes(cells, model.genes)
    targets = probe_targets(cells.obs, model.keys)
    key = _reference_key(
        expression, cells.obs_names, model.genes, targets, latent.shape[1], folds, classifier, seed
    )
    references = _REFERENCE_CACHE.get(key)
    if references is None:
        # the expression reference depends on the cells, not on the model: a benchmark
        # probes many models on the same held-out cells and computes it once per process
        reference = expression_pca(expression, latent.shape[1], seed=seed)
        references = {
            target: probe_accuracy(
                reference, labels, strata=strata, folds=folds, seed=seed, classifier=classifier
            )[0]
            for target, (_, labels, strata) in targets.items()
        }
        references[_REFERENCE_DIM] = int(reference.shape[1])
        _REFERENCE_CACHE[key] = references
        while len(_REFERENCE_CACHE) > _REFERENCE_CACHE_SIZE:
            _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
    rows = []
    for target, (column, labels, strata) in targets.items():
        options = {"strata": strata, "folds": folds, "seed": seed, "classifier": classifier}
        accuracy, info = probe_accuracy(latent, labels, **options)
        reference_accuracy = references[target]
        rows.append(
            {
                "target": target,
                "column": column,
                "accuracy": accuracy,
                "reference_accuracy": reference_accuracy,
                **info,
                "latent_dim": int(latent.shape[1]),
                "reference_dim": references[_REFERENCE_DIM],
                "classifier": classifier,
                "cells": _describe(on) if split is not None else "all",
            }
        )
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


#: Expression-reference accuracies of recent probes (key: the probed cells' content).
_REFERENCE_CACHE: dict[tuple, dict[str, Any]] = {}
_REFERENCE_CACHE_SIZE = 16
_REFERENCE_DIM = "\x00dim"  # the entry holding the reference's dimension


def _reference_key(X, cells, genes, targets, dim, folds, classifier, seed) -> tuple:
    """Identifies the expression reference by what it is computed from: the probed cells'
    expression (a hash of its values), their labels and strata, and the probe options."""
    import hashlib

    digest = hashlib.sha1()
    if sp.issparse(X):
        X = sp.csr_matrix(X)
        for part in (X.data, X.indices, X.indptr):
            digest.update(np.ascontiguousarray(part).tobytes())
    else:
        digest.update(np.ascontiguousarray(X).tobytes())
    digest.update("\x1f".join(map(str, cells)).encode())
    digest.update("\x1f".join(map(str, genes)).encode())
    for target, (column, labels, strata) in targets.items():
        digest.update(f"{target}\x1e{column}".encode())
        digest.update("\x1f".join(map(str, np.asarray(labels))).encode())
        digest.update("\x1f".join(map(str, np.asarray(strata))).encode())
    return (digest.hexdigest(), int(dim), int(folds), str(classifier), int(seed))


def _describe(on: str | Sequence[str]) -> str:
    return on if isinstance(on, str) else "+".join(on)
