"""Pieces shared by the latent-arithmetic models (scGen, scPRAM).

Both models are VAEs trained on all training cells; prediction moves the latent mean of a
query control cell by a shift learned from *reference* cells (training cells whose
covariates were observed both as controls and perturbed). This module holds what they
share: seeded dense mini-batches from sparse ``X``, the store of reference latents a
trained model keeps (so prediction works after save/load without the training data), the
cell-type-balanced latent mean difference, and a prediction-input builder that tolerates
covariate values never seen in training (cross-study transfer predicts cells of a study the
model was not trained on; these models do not use covariates as network inputs).
"""

from __future__ import annotations

import contextlib
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pertbench.data.groups import COVARIATE_LABEL_SEP
from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, DataValidationError, ModelError, UnknownCategoryError
from pertbench.models.base import FitContext, PerturbationModel, PredictionInputs, align_genes
from pertbench.models.training import TrainingConfig, fit_module, seeded_rng

# Stream numbers of seeded_rng(seed, stream): one independent generator per purpose.
STREAM_BATCHES = 1
STREAM_VALIDATION = 2
STREAM_REFERENCE = 3
STREAM_BALANCE = 4


def covariate_labels(obs: pd.DataFrame, keys: PerturbationKeys) -> np.ndarray:
    """Per cell, the covariate combination as one label (values joined by ``/``).

    With no covariate keys every cell gets the label ``"all"`` (one biological state).
    """
    if not keys.covariate_keys:
        return np.full(len(obs), "all", dtype=object)
    missing = [k for k in keys.covariate_keys if k not in obs.columns]
    if missing:
        raise DataValidationError(
            f"obs has no covariate column {', '.join(map(repr, missing))}; pass the right covariate keys"
        )
    frame = obs.loc[:, list(keys.covariate_keys)].astype(str)
    if frame.shape[1] == 1:
        return frame.iloc[:, 0].to_numpy(dtype=object)
    return frame.agg(COVARIATE_LABEL_SEP.join, axis=1).to_numpy(dtype=object)


def dense_rows(X, rows: np.ndarray | slice) -> np.ndarray:
    """Rows of a CSR or dense matrix as a dense float32 array (densify per batch only)."""
    block = X[rows]
    if sp.issparse(block):
        return block.toarray().astype(np.float32, copy=False)
    return np.asarray(block, dtype=np.float32)


def training_batches(
    X, batch_size: int, seed: int, epoch: int, *, min_batch: int = 2
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled mini-batches ``{"x": tensor}`` for one epoch, reproducible from ``(seed, epoch)``.

    A trailing batch smaller than ``min_batch`` is skipped for this epoch (BatchNorm needs
    at least two cells in training mode); the next epoch's shuffle includes those cells.
    """
    n = X.shape[0]
    order = seeded_rng(seed, STREAM_BATCHES, epoch).permutation(n)
    for start in range(0, n, batch_size):
        rows = np.sort(order[start : start + batch_size])  # sorted rows slice CSR faster
        if rows.size < min_batch:
            continue
        yield {"x": torch.from_numpy(dense_rows(X, rows))}


def sequential_batches(X, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Mini-batches in row order (validation and inference)."""
    for start in range(0, X.shape[0], batch_size):
        yield {"x": torch.from_numpy(dense_rows(X, slice(start, start + batch_size)))}


def validation_holdout(n_cells: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of cells held out for early stopping when the split has no ``val`` cells."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}")
    n_val = round(fraction * n_cells)
    mask = np.zeros(n_cells, dtype=bool)
    if n_val >= 2 and n_cells - n_val >= 2:
        mask[seeded_rng(seed, STREAM_VALIDATION).choice(n_cells, size=n_val, replace=False)] = True
    return mask


@contextlib.contextmanager
def private_torch_seed(seed: int, device: str) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state after.

    Weight initialisation, dropout masks and reparameterisation noise draw from torch's
    global generator; forking it keeps training reproducible from ``seed`` without
    changing the random state of the user's own code.
    """
    devices: list[int] = []
    if device.startswith("cuda") and torch.cuda.is_available():
        devices = [torch.device(device).index or 0]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % (2**63))
        yield


def subsample_per_group(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Indices (sorted) keeping at most ``cap`` cells of every label, chosen at random (seeded)."""
    if cap <= 0:
        raise ConfigError(f"reference_cells_per_group must be positive, got {cap}")
    codes, uniques = pd.factorize(labels)
    counts = np.bincount(codes, minlength=len(uniques))
    if counts.size == 0 or counts.max() <= cap:
        return np.arange(labels.shape[0])
    rng = seeded_rng(seed, STREAM_REFERENCE)
    # Random priority per cell; keep the `cap` lowest priorities of each group (vectorised).
    priority = rng.random(labels.shape[0])
    order = np.lexsort((priority, codes))
    sorted_codes = codes[order]
    starts = np.searchsorted(sorted_codes, np.arange(len(uniques)))
    rank = np.arange(order.size) - starts[sorted_codes]
    return np.sort(order[rank < cap])


@dataclass
class ReferenceLatents:
    """Latent means of the reference cells a trained model keeps for prediction.

    Attributes
    ----------
    latent
        (n_cells x n_latent) float32 latent means (mu) of training (and validation) cells.
    covariate
        Per cell, its covariate combination label.
    perturbation
        Per cell, its perturbation label (the control label for controls).
    """

    latent: np.ndarray
    covariate: np.ndarray
    perturbation: np.ndarray

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """Tensors for ``weights.pt`` and JSON-able category lists for ``config.json``."""
        cov_codes, cov_uniques = pd.factorize(self.covariate, sort=True)
        pert_codes, pert_uniques = pd.factorize(self.perturbation, sort=True)
        tensors = {
            "latent": torch.from_numpy(np.ascontiguousarray(self.latent, dtype=np.float32)),
            "covariate_codes": torch.from_numpy(cov_codes.astype(np.int64)),
            "perturbation_codes": torch.from_numpy(pert_codes.astype(np.int64)),
        }
        extra = {
            "covariates": [str(v) for v in cov_uniques],
            "perturbations": [str(v) for v in pert_uniques],
        }
        return tensors, extra

    @classmethod
    def from_state(
        cls, tensors: dict[str, torch.Tensor], extra: dict[str, list[str]]
    ) -> ReferenceLatents:
        covs = np.asarray(extra["covariates"], dtype=object)
        perts = np.asarray(extra["perturbations"], dtype=object)
        return cls(
            latent=tensors["latent"].cpu().numpy().astype(np.float32),
            covariate=covs[tensors["covariate_codes"].cpu().numpy()],
            perturbation=perts[tensors["perturbation_codes"].cpu().numpy()],
        )

    def cell_types(self) -> list[str]:
        """Sorted covariate labels present among the reference cells."""
        return sorted(pd.unique(self.covariate).tolist())

    def paired_types(self, perturbation: str, control: str) -> list[str]:
        """Covariate labels observed both as controls and with ``perturbation``."""
        stim = set(self.covariate[self.perturbation == perturbation].tolist())
        ctrl = set(self.covariate[self.perturbation == control].tolist())
        return sorted(stim & ctrl)

    def require_perturbation(self, perturbation: str, model_name: str) -> None:
        if not np.any(self.perturbation == perturbation):
            seen = sorted(set(self.perturbation.tolist()))
            raise UnknownCategoryError(
                f"{model_name} saw no training cells with perturbation '{perturbation}'; "
                f"it predicts only perturbations observed in training ({', '.join(seen[:10])})"
            )

    def check_types(self, types: tuple[str, ...] | list[str], option: str) -> None:
        known = set(self.covariate.tolist())
        unknown = [t for t in types if t not in known]
        if unknown:
            raise ConfigError(
                f"{option} names cell type(s) {', '.join(unknown)} not among the training cells; "
                f"known: {', '.join(sorted(known)[:20])}"
            )


def fit_vae(
    build_module: Callable[[], torch.nn.Module],
    train: ad.AnnData,
    val: ad.AnnData | None,
    genes: list[str],
    *,
    batch_size: int,
    max_epochs: int,
    patience: int,
    val_fraction: float,
    context: FitContext,
    description: str,
) -> tuple[torch.nn.Module, pd.DataFrame]:
    """Train a latent-arithmetic VAE on every training cell; returns (module, history).

    Early stopping watches the split's ``val`` cells, or, when the split has fewer than
    two, a seeded ``val_fraction`` of the training cells. The module is built and trained
    inside :func:`private_torch_seed`, so weights are reproducible from ``context.seed``.
    """
    X_train = align_genes(train, genes)
    if val is not None and val.n_obs >= 2:
        X_fit, X_val = X_train, align_genes(val, genes)
    else:
        hold = validation_holdout(X_train.shape[0], val_fraction, context.seed)
        X_fit, X_val = X_train[~hold], (X_train[hold] if hold.any() else None)
    config = TrainingConfig(
        max_epochs=context.max_epochs if context.max_epochs is not None else max_epochs,
        patience=patience,
        progress=context.progress,
        description=description,
        log_dir=context.log_dir,
        epoch_callback=context.epoch_callback,
    )
    with private_torch_seed(context.seed, context.device):
        module = build_module()
        history = fit_module(
            module,
            lambda epoch: training_batches(X_fit, batch_size, context.seed, epoch),
            (lambda: sequential_batches(X_val, 1024)) if X_val is not None else None,
            config,
            device=context.device,
        )
    return module, history


def encode_means(module: torch.nn.Module, X, device: str, n_latent: int) -> np.ndarray:
    """Latent means (float32, cells x n_latent) of the rows of ``X`` (training gene order)."""
    module.eval()
    out = []
    with torch.no_grad():
        for batch in sequential_batches(X, 1024):
            mu, _ = module.encode(batch["x"].to(device))
            out.append(mu.cpu().numpy())
    if not out:
        return np.zeros((0, n_latent), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def decode_latents(module: torch.nn.Module, Z: np.ndarray, device: str, n_genes: int) -> np.ndarray:
    """Decoded expression (cells x n_genes) of the latent points ``Z``, in batches."""
    module.eval()
    out = []
    with torch.no_grad():
        for start in range(0, Z.shape[0], 1024):
            z = torch.from_numpy(np.ascontiguousarray(Z[start : start + 1024], np.float32))
            out.append(module.decode(z.to(device)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, n_genes), np.float32)


def encode_reference(
    adata: ad.AnnData,
    keys: PerturbationKeys,
    encode: Callable[[object], np.ndarray],
    genes: list[str],
    *,
    cells_per_group: int,
    seed: int,
) -> ReferenceLatents:
    """Latent means of at most ``cells_per_group`` cells (seeded) of every
    (covariates, perturbation) group of ``adata``, with their labels."""
    cov = covariate_labels(adata.obs, keys)
    pert = adata.obs[keys.perturbation_key].astype(str).to_numpy(dtype=object)
    group = np.char.add(np.char.add(cov.astype(str), "\x00"), pert.astype(str))
    keep = subsample_per_group(group, cells_per_group, seed)
    latent = encode(align_genes(adata, genes)[keep])
    return ReferenceLatents(latent=latent, covariate=cov[keep], perturbation=pert[keep])


def balanced_delta(
    latent: np.ndarray,
    covariate: np.ndarray,
    is_control: np.ndarray,
    is_stimulated: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """scGen's cell-type-balanced latent shift from control to stimulated.

    Each cell type is resampled with replacement to the size of the largest type,
    separately among control and among stimulated cells; then both pools are subsampled
    without replacement to the same size, and the shift is the difference of their means.
    In expectation this is the mean over types of each type's stimulated mean minus the
    mean over types of each type's control mean (every type weighted equally).

    Parameters
    ----------
    latent
        (n_cells x n_latent) latent means.
    covariate
        Per cell, its cell type (covariate label).
    is_control, is_stimulated
        Boolean masks of the two conditions (cells in neither are ignored).
    rng
        Source of the resampling (seeded by the caller).

    Returns
    -------
    numpy.ndarray
        The (n_latent,) shift vector, float64.
    """
    pools = []
    for mask in (is_control, is_stimulated):
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            raise ModelError("cannot compute a latent shift: no cells of one condition")
        codes, _ = pd.factorize(covariate[idx])
        counts = np.bincount(codes)
        target = int(counts.max())
        # Resample every type to `target` cells with replacement, vectorised over types:
        # draw `target` uniform positions inside each type's block of sorted indices.
        order = np.argsort(codes, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        offsets = np.floor(rng.random((counts.size, target)) * counts[:, None]).astype(np.int64)
        pools.append(idx[order[(starts[:, None] + offsets).ravel()]])
    size = min(pools[0].size, pools[1].size)
    ctrl = rng.choice(pools[0], size=size, replace=False) if pools[0].size > size else pools[0]
    stim = rng.choice(pools[1], size=size, replace=False) if pools[1].size > size else pools[1]
    latent = np.asarray(latent, dtype=np.float64)
    return latent[stim].mean(axis=0) - latent[ctrl].mean(axis=0)


def tolerant_prediction_inputs(
    counterfactual: ad.AnnData, keys: PerturbationKeys, genes: pd.Index, encoding
) -> PredictionInputs:
    """Like :meth:`PerturbationModel.prepare_inputs`, but unseen covariate values are allowed.

    The requested perturbations must have been seen in training (they select the latent
    shift); covariates only label the query cells, so the covariate encodings are left
    empty (codes -1) instead of rejecting a study or cell type the model never saw.
    """
    obs = counterfactual.obs
    for key in (keys.perturbation_key, *keys.covariate_keys):
        if key not in obs.columns:
            raise DataValidationError(f"counterfactual obs has no column '{key}'")
    labels = obs[keys.perturbation_key].astype(str)
    if (labels == keys.control).any():
        raise DataValidationError(
            f"a counterfactual request asks for the control '{keys.control}'; "
            "request a perturbation for every row"
        )
    perturbations = encoding.perturbation_matrix(labels)
    n = counterfactual.n_obs
    return PredictionInputs(
        X=align_genes(counterfactual, genes),
        perturbations=perturbations,
        covariate_codes=np.full((n, len(keys.covariate_keys)), -1, dtype=np.int64),
        covariate_onehot=np.zeros((n, 0), dtype=np.float32),
        obs=obs.copy(),
    )


def top_k_count(ratio: float, n_reference: int) -> int:
    """k = ceil(ratio * n_reference), at least 1 and at most ``n_reference``."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio must be in (0, 1], got {ratio}")
    return int(min(max(math.ceil(ratio * n_reference), 1), n_reference))


class LatentVAEModel(PerturbationModel):
    """What scGen and scPRAM share around their VAE.

    Fitting trains the VAE on every training cell (:func:`fit_vae`) and keeps the latent
    means of the observed non-test cells (:func:`encode_reference`), so prediction, the
    public :meth:`latent` and save/load need no training data. Subclasses give the network
    (:meth:`_build_module`), validate their hyperparameters (:meth:`_check_params`) and
    compute their per-perturbation latent shifts, which they may memoise in
    ``_shift_cache`` (emptied whenever the weights or references change).
    """

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self._check_params()
        self.module: torch.nn.Module | None = None
        self.reference: ReferenceLatents | None = None
        self._shift_cache: dict[tuple, Any] = {}

    @abstractmethod
    def _check_params(self) -> None:
        """Raise :class:`ConfigError` for an invalid hyperparameter combination."""

    @abstractmethod
    def _build_module(self, n_genes: int) -> torch.nn.Module:
        """A fresh, untrained VAE for ``n_genes`` genes."""

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        p = self.params
        self.module, self.history = fit_vae(
            lambda: self._build_module(len(self.genes)),
            train,
            val,
            self.genes,
            batch_size=p.batch_size,
            max_epochs=p.max_epochs,
            patience=p.patience,
            val_fraction=p.val_fraction,
            context=context,
            description=self.name,
        )
        # Reference latents: every observed non-test cell (train and val) keeps its latent
        # mean, so the shifts need no training data after save/load.
        reference = ad.concat([train, val]) if val is not None else train
        self.reference = encode_reference(
            reference,
            self.keys,
            self._encode,
            self.genes,
            cells_per_group=p.reference_cells_per_group,
            seed=context.seed,
        )
        self._shift_cache.clear()

    # -- latent space -----------------------------------------------------------------------
    def _encode(self, X) -> np.ndarray:
        """Latent means of the rows of ``X`` (already in training gene order)."""
        assert self.module is not None
        return encode_means(self.module, X, self.device, self.params.n_latent)

    def _decode(self, Z: np.ndarray) -> np.ndarray:
        assert self.module is not None
        return decode_latents(self.module, Z, self.device, len(self.genes))

    def latent(self, adata: ad.AnnData) -> np.ndarray:
        """Latent means (mu) of ``adata``'s cells, shape (n_cells x n_latent).

        All training genes must be present in ``adata`` (any order).
        """
        self._require_fitted()
        return self._encode(align_genes(adata, self.genes))

    def basal_latent(self, adata: ad.AnnData) -> np.ndarray:
        """The latent space these models shift: :meth:`latent` (encoder means)."""
        return self.latent(adata)

    def prepare_inputs(self, counterfactual: ad.AnnData) -> PredictionInputs:
        self._require_fitted()
        return tolerant_prediction_inputs(counterfactual, self.keys, self.genes, self.encoding)

    # -- persistence -------------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        assert self.reference is not None
        _, extra = self.reference.to_state()
        return {"reference": extra, "n_genes": len(self.genes)}

    def _state(self) -> dict[str, Any]:
        assert self.module is not None and self.reference is not None
        tensors, _ = self.reference.to_state()
        return {"module": self.module.state_dict(), "reference": tensors}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        self.module = self._build_module(int(extra["n_genes"]))
        self.module.load_state_dict(state["module"])
        self.module.to(self.device).eval()
        self.reference = ReferenceLatents.from_state(state["reference"], extra["reference"])
        self._shift_cache.clear()
