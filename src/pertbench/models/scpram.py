"""scPRAM: VAE latents, optimal transport and per-cell attention over reference shifts.

Training fits a denoising VAE on all training cells. Prediction for a query control cell q
(e.g. a control of the held-out cell type) and a perturbation p:

1. Reference cells: latent means of the training controls and of the training cells with
   p, restricted to the cell types observed in both conditions (in the held-out cell-type
   task these are exactly the *other* cell types: the held-out type has no perturbed
   training cells).
2. Optimal transport between the perturbed and control reference latents (Euclidean
   cost, uniform weights; exact EMD by default, entropic Sinkhorn as an option).
3. Each reference control i is matched to the perturbed cell receiving most of its mass;
   its shift is ``delta_i = z_stim(match(i)) - z_ctrl(i)``.
4. Attention, for EACH query cell: the top-k reference controls by cosine similarity of
   latents, ``k = ceil(ratio * n_reference)``, weights proportional to the similarities
   (or a softmax with a temperature); ``delta_q = sum_i w_qi delta_i``.
5. Prediction ``Dec(z_q + delta_q)``.

All query cells are handled with matrix operations (chunked over queries; top-k by
``argpartition``); the attention weights are kept as a sparse (query x reference) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from pertbench.errors import ConfigError, ModelError
from pertbench.models._latent_arithmetic import (
    LatentVAEModel,
    top_k_count,
)
from pertbench.models.base import (
    PredictionInputs,
    params_field,
)
from pertbench.models.training import adam

QUERY_CHUNK = 2048


class ScPRAMVAE(nn.Module):
    """The denoising VAE of scPRAM.

    Encoder ``in -> hidden -> hidden -> (mu, logvar)`` with ReLU; decoder
    ``latent -> hidden -> hidden -> out`` with ReLU after every layer, the output included
    (log-normalised expression is non-negative). Training adds ``noise * N(0, 1)`` to the
    input and reconstructs the clean cell. Loss: mean over cells of
    ``0.5 * SSE + 0.5 * kl_weight * KL``.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        n_hidden: int = 1000,
        n_latent: int = 100,
        noise: float = 0.1,
        kl_weight: float = 5e-4,
        lr: float = 5e-4,
        weight_decay: float = 1e-5,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(n_genes, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden), nn.ReLU()
        )
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)
        self.decoder = nn.Sequential(
            nn.Linear(n_latent, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_hidden),
            nn.ReLU(),
            nn.Linear(n_hidden, n_genes),
            nn.ReLU(),
        )
        self.noise = noise
        self.kl_weight = kl_weight
        self.lr = lr
        self.weight_decay = weight_decay

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mean(h), self.log_var(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss_terms(self, x: torch.Tensor, *, train: bool) -> dict[str, torch.Tensor]:
        x_in = x + self.noise * torch.randn_like(x) if train and self.noise > 0 else x
        mu, log_var = self.encode(x_in)
        # Validation uses the latent mean (deterministic number for early stopping).
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu) if train else mu
        x_hat = self.decode(z)
        sse = ((x_hat - x) ** 2).sum(dim=1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1.0).sum(dim=1)
        loss = (0.5 * sse + 0.5 * self.kl_weight * kl).mean()
        return {"loss": loss, "reconstruction": sse.mean(), "kl": kl.mean()}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)]

    def training_step(self, batch, optimizers, step: int) -> dict[str, float]:
        (opt,) = optimizers
        terms = self.loss_terms(batch["x"], train=True)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def validation_step(self, batch) -> dict[str, torch.Tensor]:
        return self.loss_terms(batch["x"], train=False)


@dataclass
class ScPRAMParams:
    n_hidden: int = params_field(1000, "Width of the two hidden layers.")
    n_latent: int = params_field(100, "Latent dimensions.")
    noise: float = params_field(0.1, "Std of the Gaussian noise added to inputs in training.")
    kl_weight: float = params_field(5e-4, "Weight of the KL term.")
    lr: float = params_field(5e-4, "Adam learning rate.")
    weight_decay: float = params_field(1e-5, "Adam weight decay.")
    batch_size: int = params_field(128, "Cells per mini-batch.")
    max_epochs: int = params_field(16, "Maximum epochs (early stopping may end sooner).")
    patience: int = params_field(5, "Epochs without validation improvement before stopping.")
    val_fraction: float = params_field(
        0.1, "Share of training cells held out for early stopping when the split has no 'val'."
    )
    ot: str = params_field("emd", "Optimal transport solver: 'emd' (exact) or 'sinkhorn'.")
    epsilon: float = params_field(
        0.05, "Sinkhorn entropic regularisation, relative to the largest transport cost."
    )
    ratio: float = params_field(0.05, "Share of reference controls attended per query cell.")
    attention: str = params_field("cosine", "Weights: 'cosine' (normalised) or 'softmax'.")
    temperature: float = params_field(0.1, "Softmax temperature (attention='softmax').")
    reference_cells_per_group: int = params_field(
        2000,
        "Reference latents kept per (cell type, perturbation) group (seeded subsample; bounds the OT cost).",
    )


@dataclass
class ReferenceShifts:
    """The per-reference-control shifts for one perturbation (result of steps 1-3)."""

    control_latent: np.ndarray
    shifts: np.ndarray
    control_covariate: np.ndarray
    cell_types: list[str] = field(default_factory=list)


@dataclass
class Attention:
    """Per-cell attention of query cells over reference controls.

    Attributes
    ----------
    weights
        Sparse CSR (n_query x n_reference): each row holds the top-k weights, summing to 1.
    reference_covariate
        Cell type (covariate label) of each reference control (columns of ``weights``).
    query_obs
        obs of the query cells (rows of ``weights``).
    perturbation
        Perturbation label of each query row.
    """

    weights: sp.csr_matrix
    reference_covariate: np.ndarray
    query_obs: pd.DataFrame
    perturbation: np.ndarray

    def by_reference_type(self, query_groups: np.ndarray | None = None) -> pd.DataFrame:
        """Mean attention weight from each query group to each reference cell type.

        Parameters
        ----------
        query_groups
            Per query row, its group label (default: every row in one group ``"query"``).

        Returns
        -------
        pandas.DataFrame
            Rows = query groups, columns = reference cell types; each row sums to 1.
        """
        from pertbench.data.groups import group_mean, indicator_matrix

        codes, types = pd.factorize(self.reference_covariate, sort=True)
        per_type = self.weights @ indicator_matrix(codes, len(types)).T  # query x types
        if query_groups is None:
            query_groups = np.full(self.weights.shape[0], "query", dtype=object)
        qcodes, qnames = pd.factorize(np.asarray(query_groups), sort=True)
        means = group_mean(per_type, qcodes, len(qnames))
        return pd.DataFrame(means, index=pd.Index(qnames, name="query"), columns=list(types))


class ScPRAM(LatentVAEModel):
    """scPRAM (Jiang et al. 2024): VAE + optimal transport + per-cell attention.

    After :meth:`predict`, :attr:`last_attention` holds the attention weights of the
    prediction (see :class:`Attention`); :meth:`attention` computes them for any cells.
    """

    name: ClassVar[str] = "scpram"
    description: ClassVar[str] = "scPRAM VAE with optimal transport and per-cell attention"
    Params: ClassVar[type] = ScPRAMParams
    # last_attention describes a whole request, so a request is predicted in one piece.
    chunked_prediction: ClassVar[bool] = False
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "n_latent": {"type": "categorical", "choices": [32, 64, 100, 128]},
        "n_hidden": {"type": "categorical", "choices": [256, 512, 1000]},
        "ratio": {"type": "float", "low": 0.01, "high": 0.2, "log": True},
        "noise": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        "lr": {"type": "float", "low": 1e-4, "high": 2e-3, "log": True},
    }

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.last_attention: Attention | None = None

    def _check_params(self) -> None:
        p = self.params
        if p.n_hidden < 1 or p.n_latent < 1 or p.batch_size < 2:
            raise ConfigError("scpram needs n_hidden >= 1, n_latent >= 1 and batch_size >= 2")
        if p.ot not in ("emd", "sinkhorn"):
            raise ConfigError(f"scpram ot must be 'emd' or 'sinkhorn', got '{p.ot}'")
        if p.attention not in ("cosine", "softmax"):
            raise ConfigError(
                f"scpram attention must be 'cosine' or 'softmax', got '{p.attention}'"
            )
        if p.epsilon <= 0 or p.temperature <= 0:
            raise ConfigError("scpram epsilon and temperature must be positive")
        top_k_count(p.ratio, 1)  # validates the ratio

    # -- training ---------------------------------------------------------------------------
    def _build_module(self, n_genes: int) -> ScPRAMVAE:
        p = self.params
        return ScPRAMVAE(
            n_genes,
            n_hidden=p.n_hidden,
            n_latent=p.n_latent,
            noise=p.noise,
            kl_weight=p.kl_weight,
            lr=p.lr,
            weight_decay=p.weight_decay,
        )

    # -- steps 1-3: reference shifts by optimal transport -------------------------------------
    def reference_shifts(self, perturbation: str) -> ReferenceShifts:
        """Per-reference-control latent shifts for ``perturbation`` (OT matching, cached)."""
        self._require_fitted()
        ref = self.reference
        assert ref is not None
        ref.require_perturbation(perturbation, self.name)
        p = self.params
        key = (perturbation, p.ot, p.epsilon)
        if key in self._shift_cache:
            return self._shift_cache[key]
        types = ref.paired_types(perturbation, self.keys.control)
        if not types:
            raise ModelError(
                f"no cell type has both control and '{perturbation}' training cells; "
                "scpram needs such reference types"
            )
        in_types = np.isin(ref.covariate, np.asarray(types, dtype=object))
        ctrl = np.flatnonzero(in_types & (ref.perturbation == self.keys.control))
        stim = np.flatnonzero(in_types & (ref.perturbation == perturbation))
        z_ctrl = ref.latent[ctrl].astype(np.float64)
        z_stim = ref.latent[stim].astype(np.float64)
        plan = transport_plan(z_stim, z_ctrl, method=p.ot, epsilon=p.epsilon)
        match = np.asarray(plan.argmax(axis=0)).ravel()  # stimulated partner of each control
        shifts = ReferenceShifts(
            control_latent=z_ctrl,
            shifts=z_stim[match] - z_ctrl,
            control_covariate=ref.covariate[ctrl],
            cell_types=types,
        )
        self._shift_cache[key] = shifts
        return shifts

    # -- step 4: attention -------------------------------------------------------------------
    def _attention_weights(self, z_query: np.ndarray, z_reference: np.ndarray) -> sp.csr_matrix:
        p = self.params
        return attention_weights(
            z_query,
            z_reference,
            ratio=p.ratio,
            kind=p.attention,
            temperature=p.temperature,
        )

    def attention(self, adata: ad.AnnData, perturbation: str | None = None) -> Attention:
        """Attention weights of ``adata``'s cells over the reference controls of ``perturbation``.

        ``perturbation`` may be omitted when training saw exactly one.
        """
        self._require_fitted()
        perturbation = self._single_perturbation(perturbation)
        shifts = self.reference_shifts(perturbation)
        weights = self._attention_weights(self.latent(adata), shifts.control_latent)
        return Attention(
            weights=weights,
            reference_covariate=shifts.control_covariate,
            query_obs=adata.obs.copy(),
            perturbation=np.full(adata.n_obs, perturbation, dtype=object),
        )

    def _single_perturbation(self, perturbation: str | None) -> str:
        assert self.reference is not None
        if perturbation is not None:
            return str(perturbation)
        perts = sorted(set(self.reference.perturbation.tolist()) - {self.keys.control})
        if len(perts) != 1:
            raise ModelError(
                f"training saw {len(perts)} perturbations; name one of {', '.join(perts[:10])}"
            )
        return perts[0]

    # -- prediction ---------------------------------------------------------------------------
    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        labels = inputs.obs[self.keys.perturbation_key].astype(str).to_numpy()
        Z = self._encode(inputs.X).astype(np.float64)
        out = np.empty_like(Z)
        codes, uniques = pd.factorize(labels, sort=True)
        blocks, columns, covariates = [], [], []
        offset = 0
        for code, perturbation in enumerate(uniques):  # one pass per perturbation, not per cell
            rows = np.flatnonzero(codes == code)
            shifts = self.reference_shifts(str(perturbation))
            weights = self._attention_weights(Z[rows], shifts.control_latent)
            out[rows] = Z[rows] + weights @ shifts.shifts
            blocks.append((rows, weights))
            columns.append(offset)
            covariates.append(shifts.control_covariate)
            offset += weights.shape[1]
        self.last_attention = _stack_attention(blocks, columns, offset, covariates, inputs, labels)
        return self._decode(out.astype(np.float32))


def _stack_attention(blocks, columns, n_columns, covariates, inputs, labels) -> Attention:
    """Place each perturbation's (rows x its references) block into one sparse matrix."""
    n = inputs.n_cells
    rows_all, cols_all, vals_all = [], [], []
    for (rows, weights), offset in zip(blocks, columns, strict=True):
        coo = weights.tocoo()
        rows_all.append(rows[coo.row])
        cols_all.append(coo.col + offset)
        vals_all.append(coo.data)
    weights = sp.csr_matrix(
        (np.concatenate(vals_all), (np.concatenate(rows_all), np.concatenate(cols_all))),
        shape=(n, n_columns),
    )
    return Attention(
        weights=weights,
        reference_covariate=np.concatenate(covariates),
        query_obs=inputs.obs.copy(),
        perturbation=labels,
    )


def transport_plan(
    source: np.ndarray, target: np.ndarray, *, method: str = "emd", epsilon: float = 0.05
) -> np.ndarray:
    """Optimal transport plan (n_source x n_target) between two latent point clouds.

    Uniform weights on both sides and Euclidean cost. ``method="emd"`` solves the exact
    problem (POT's network simplex); ``"sinkhorn"`` the entropic one, in the log domain for
    stability, with ``epsilon`` relative to the largest cost (the cost matrix is divided by
    its maximum, so the regularisation means the same on any latent scale).
    """
    import ot  # POT, a core dependency; imported here to keep module import light

    a = np.full(source.shape[0], 1.0 / source.shape[0])
    b = np.full(target.shape[0], 1.0 / target.shape[0])
    cost = ot.dist(source, target, metric="euclidean")
    if method == "emd":
        return ot.emd(a, b, cost, numItermax=max(100000, 50 * cost.size))
    if method == "sinkhorn":
        scale = cost.max()
        cost = cost / scale if scale > 0 else cost
        return ot.sinkhorn(a, b, cost, reg=epsilon, method="sinkhorn_log", numItermax=5000)
    raise ConfigError(f"unknown optimal transport method '{method}'; use emd or sinkhorn")


def attention_weights(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    ratio: float = 0.05,
    kind: str = "cosine",
    temperature: float = 0.1,
) -> sp.csr_matrix:
    """Per-query top-k attention over reference cells, as a sparse row-stochastic matrix.

    For every query row: cosine similarity to all reference rows, the ``k =
    ceil(ratio * n_reference)`` most similar kept (``argpartition``, ties broken by
    reference order), weights = similarities clipped at 0 and normalised to sum 1 (all
    zero: uniform over the k), or ``softmax(similarity / temperature)`` over the k.
    Computed in chunks of queries, never one cell at a time.

    Returns
    -------
    scipy.sparse.csr_matrix
        (n_query x n_reference), k non-zeros per row (fewer when weights are exactly 0).
    """
    n_q, n_r = query.shape[0], reference.shape[0]
    if n_r == 0:
        raise ModelError("attention needs at least one reference cell")
    k = top_k_count(ratio, n_r)
    ref_unit = _unit_rows(np.asarray(reference, dtype=np.float64))
    indptr = np.arange(n_q + 1, dtype=np.int64) * k
    indices = np.empty(n_q * k, dtype=np.int64)
    data = np.empty(n_q * k, dtype=np.float64)
    for start in range(0, n_q, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, n_q)
        sim = _unit_rows(np.asarray(query[start:stop], dtype=np.float64)) @ ref_unit.T
        if k < n_r:
            top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(n_r), (stop - start, n_r))
        top = np.sort(top, axis=1)  # canonical column order within each row
        s = np.take_along_axis(sim, top, axis=1)
        if kind == "softmax":
            e = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
            w = e / e.sum(axis=1, keepdims=True)
        elif kind == "cosine":
            w = np.clip(s, 0.0, None)
            total = w.sum(axis=1, keepdims=True)
            w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / k)
        else:
            raise ConfigError(f"unknown attention '{kind}'; use cosine or softmax")
        indices[start * k : stop * k] = top.ravel()
        data[start * k : stop * k] = w.ravel()
    weights = sp.csr_matrix((data, indices, indptr), shape=(n_q, n_r))
    weights.eliminate_zeros()
    return weights


def _unit_rows(M: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(M, axis=1, keepdims=True)
    return M / np.where(norms > 0, norms, 1.0)
