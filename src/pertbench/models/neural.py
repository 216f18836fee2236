"""What every neural model shares: hyperparameters of training, fitting, prediction, save/load.

A neural model is two small pieces:

- a network, subclass of :class:`LossModule`: ``loss_terms(batch)`` (``"loss"`` among
  them) and ``predict_batch(batch)`` (log-normalised expression). Models that need more
  than one optimiser (CPA's adversary) override ``configure_optimizers`` and
  ``training_step``;
- a :class:`NeuralModel` subclass with a ``Params`` dataclass and ``_build_module(dims)``.

Everything else is written once here and in :mod:`pertbench.models.training`: sparse
batching with matched controls (:mod:`pertbench.models.data`), seeding, the training loop
with early stopping on validation loss, checkpoints, CSV log and progress bar, batched
deterministic prediction in eval mode, and save/load of the weights.

Batches are dicts of tensors: ``x`` (the cell's log-normalised expression, dense),
``pert`` (multi-hot or dose-valued perturbations), ``cov`` (one-hot covariates),
``cov_codes`` (integer covariate codes), ``counts``/``library`` (raw counts, when a count
likelihood is used) and, for matched-control models, ``ctrl`` (the matched control's
input: expression or embedding). At prediction time ``x`` and ``ctrl`` are both the
control cell being perturbed.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import torch
from torch import nn

from pertbench.data.ondisk import OnDiskData
from pertbench.errors import ConfigError, ModelError
from pertbench.models.base import FitContext, PerturbationModel, PredictionInputs, params_field
from pertbench.models.blocks import BlockLoader, BlockSampling, DiskCells
from pertbench.models.data import BatchLoader, CellTable, MatchedLoader
from pertbench.models.layers import torch_seed_scope
from pertbench.models.training import TrainingConfig, adam, fit_module, move_batch, optimizer_step


@dataclass
class NeuralParams:
    """Training hyperparameters shared by all neural models."""

    lr: float = params_field(1e-3, "Learning rate of the Adam optimiser.")
    wd: float = params_field(1e-8, "Weight decay (L2 penalty) of the Adam optimiser.")
    batch_size: int = params_field(256, "Cells per training minibatch.")
    max_epochs: int = params_field(100, "Maximum number of training epochs (--epochs overrides).")
    patience: int = params_field(
        10, "Stop after this many epochs without validation-loss improvement (0: never stop early)."
    )
    gradient_clip: float = params_field(
        0.0, "Clip the gradient norm to this value (0: no clipping)."
    )


class LossModule(nn.Module):
    """Base network: one Adam optimiser on all parameters, loss from :meth:`loss_terms`."""

    #: Set by the training loop from ``TrainingConfig.gradient_clip``.
    gradient_clip: float | None = None

    def __init__(self, *, lr: float, wd: float) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        if wd < 0:
            raise ConfigError(f"wd must be non-negative, got {wd}")
        self.lr = float(lr)
        self.wd = float(wd)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [adam(self.parameters(), lr=self.lr, weight_decay=self.wd)]

    @abstractmethod
    def loss_terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms of a batch; ``"loss"`` is minimised and used for early stopping."""

    @abstractmethod
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted log-normalised expression (n_cells x n_genes), deterministic in eval."""

    # Networks with a basal (cell-state) latent also define
    #     basal_latent(batch) -> Tensor (n_cells x n_latent)
    # the deterministic encoding of each cell as observed; NeuralModel.basal_latent
    # exposes it to the disentanglement probe (pertbench.models.probe).

    def epoch_start(self, epoch: int) -> None:
        """Called by the training loop before each training epoch (weight schedules)."""

    def training_step(
        self, batch: dict[str, torch.Tensor], optimizers: list[torch.optim.Optimizer], step: int
    ) -> dict[str, float]:
        terms = self.loss_terms(batch)
        optimizer_step(terms["loss"], optimizers[0], gradient_clip=self.gradient_clip)
        return {k: float(v.detach()) for k, v in terms.items()}

    def validation_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in self.loss_terms(batch).items()}


class NeuralModel(PerturbationModel):
    """A :class:`PerturbationModel` whose learned state is one :class:`LossModule`.

    Subclasses set ``Params`` (deriving from :class:`NeuralParams`) and implement
    :meth:`_build_module`. Class switches:

    ``uses_matched_controls``
        Batches pair every training cell with a random control of the same covariates
        (``ctrl``), resampled each epoch; validation uses one fixed seeded matching.
    """

    Params: ClassVar[type] = NeuralParams
    uses_matched_controls: ClassVar[bool] = False

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.module: LossModule | None = None
        self.dims: dict[str, Any] | None = None

    # -- hooks ---------------------------------------------------------------------------
    def _embedding_key(self) -> str | None:
        """obsm key whose rows replace expression as the model's input (None: expression)."""
        return getattr(self.params, "embedding_key", None) or None

    def _counts_layer(self) -> str | None:
        """Layer of raw counts the likelihood reads (None: the model fits ``X``)."""
        if getattr(self.params, "likelihood", "gaussian") == "nb":
            return self.params.counts_layer
        return None

    def _perturbation_width(self) -> int:
        """Width of the ``pert`` input (the multi-hot vocabulary unless overridden)."""
        return self.encoding.n_perturbations

    @abstractmethod
    def _build_module(self, dims: dict[str, Any]) -> LossModule:
        """Create the network from data dimensions (also used when loading)."""

    # -- fitting -------------------------------------------------------------------------
    def _table(self, adata: ad.AnnData) -> CellTable:
        return CellTable.from_adata(
            adata,
            self.encoding,
            genes=self.genes,
            embedding_key=self._embedding_key(),
            counts_layer=self._counts_layer(),
        )

    def _fields(self) -> tuple[str, ...]:
        fields = ["x", "pert", "cov", "cov_codes"]
        if self._counts_layer() is not None:
            fields += ["counts", "library"]
        return tuple(fields)

    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        self._check_learnable()
        train_table = self._table(train)
        val_table = self._table(val) if val is not None and val.n_obs else None
        self._fit_loaders(
            train_table,
            val_table,
            loader=BatchLoader,
            controls=lambda table: table.subset(np.flatnonzero(table.is_control)),
            context=context,
        )

    def _fit_from_disk(
        self,
        data: OnDiskData,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        context: FitContext,
    ) -> None:
        """Train reading the cells from disk block by block (see :mod:`pertbench.models.blocks`)."""
        self._check_learnable()
        options = {
            "genes": self.genes,
            "embedding_key": self._embedding_key(),
            "counts_layer": self._counts_layer(),
        }
        train_cells = DiskCells(data, train_rows, self.encoding, **options)
        val_cells = DiskCells(data, val_rows, self.encoding, **options) if val_rows.size else None
        self._fit_loaders(
            train_cells,
            val_cells,
            loader=functools.partial(BlockLoader, sampling=context.sampling or BlockSampling()),
            controls=lambda cells: cells.controls(),
            context=context,
        )

    def _check_learnable(self) -> None:
        if self.encoding.n_perturbations == 0:
            raise ModelError(
                "the training cells contain no perturbation (only controls); nothing to learn"
            )

    def _fit_loaders(
        self,
        train: Any,
        val: Any | None,
        *,
        loader: Callable[..., MatchedLoader],
        controls: Callable[[Any], CellTable],
        context: FitContext,
    ) -> None:
        """Build the network and the loaders of ``train``/``val`` cells (tables in memory
        or cells on disk: ``loader`` and ``controls`` know which) and train."""
        p = self.params
        emb = self._embedding_key()
        dims = {
            "n_genes": len(self.genes),
            "n_perts": self._perturbation_width(),
            "n_cov": self.encoding.n_covariate_columns,
            "covariate_sizes": list(self.encoding.covariate_sizes),
            "n_input": train.width("emb") if emb else len(self.genes),
            "n_train_cells": train.n_cells,
        }
        matched = self.uses_matched_controls
        # On a GPU the next batches are densified by a background thread while the
        # current one trains; on CPU the cores are busy computing, so build inline.
        on_gpu = str(context.device).startswith("cuda")
        options = {
            "seed": context.seed,
            "fields": self._fields(),
            "control_fields": {"ctrl": "emb" if emb else "x"},
            "prefetch": 2 if on_gpu else 0,
            "pin_memory": on_gpu,
            # There, expression travels as its non-zeros and is densified on the device.
            "densify_on_device": on_gpu,
        }
        with torch_seed_scope(context.seed, context.device):
            module = self._build_module(dims)
            train_controls = controls(train) if matched else None
            train_loader = loader(
                train, batch_size=p.batch_size, controls=train_controls, shuffle=True, **options
            )
            if train_loader.n_cells == 0:
                raise ModelError("no training cell has a control of the same covariates")
            val_loader = None
            if val is not None:
                # Validation cells are matched with controls of their covariates from val
                # and train alike (they are model inputs, never targets).
                pool = CellTable.concat([controls(val), train_controls]) if matched else None
                val_loader = loader(
                    val,
                    batch_size=max(p.batch_size, 1024),
                    controls=pool,
                    shuffle=False,
                    **options,
                )
                if val_loader.n_cells == 0:
                    val_loader = None
            config = TrainingConfig(
                max_epochs=int(p.max_epochs if context.max_epochs is None else context.max_epochs),
                patience=int(p.patience) if p.patience and p.patience > 0 else None,
                gradient_clip=float(p.gradient_clip) if p.gradient_clip > 0 else None,
                progress=context.progress,
                description=self.name,
                log_dir=context.log_dir,
                epoch_callback=context.epoch_callback,
            )
            if config.max_epochs < 1:
                raise ConfigError(f"max_epochs must be >= 1, got {config.max_epochs}")
            history = fit_module(
                module,
                train_loader,
                (lambda: val_loader(0)) if val_loader is not None else None,
                config,
                device=context.device,
            )
        self.module = module.eval()
        self.dims = dims
        self.history = history

    # -- prediction ----------------------------------------------------------------------
    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        if self.module is None:
            raise ModelError(f"model '{self.name}' has no trained network")
        return self._run_batches(
            inputs, self.module.predict_batch, seed=seed, empty_width=len(self.genes)
        )

    def basal_latent(self, adata: ad.AnnData) -> np.ndarray | None:
        """Encoder means of ``adata``'s cells: the network's ``basal_latent(batch)``."""
        self._require_fitted()
        if self.module is None or not hasattr(self.module, "basal_latent"):
            return None
        inputs = self.prepare_inputs(adata)
        return self._run_batches(inputs, self.module.basal_latent, seed=self.seed)

    def _run_batches(
        self,
        inputs: PredictionInputs,
        compute: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        *,
        seed: int,
        empty_width: int = 0,
    ) -> np.ndarray:
        """``compute(batch)`` over the cells of ``inputs`` in eval mode, rows concatenated.

        Each cell is its own control (``ctrl`` = ``x``), as in a counterfactual request.
        """
        arrays: dict[str, Any] = {
            "pert": inputs.perturbations,
            "cov": inputs.covariate_onehot,
            "cov_codes": inputs.covariate_codes,
        }
        if inputs.X is not None:
            arrays["x"] = inputs.X
        n = inputs.n_cells
        table = CellTable(
            arrays, state_codes=np.zeros(n, dtype=np.int64), is_control=np.ones(n, dtype=bool)
        )
        out = np.empty((0, empty_width), dtype=np.float32)
        self.module.eval()
        with torch.no_grad(), torch_seed_scope(seed, self.device):
            for start in range(0, n, self.predict_batch_size):
                rows = np.arange(start, min(start + self.predict_batch_size, n))
                batch = {name: table.take(name, rows) for name in arrays}
                if "x" in batch:
                    batch["ctrl"] = batch["x"]
                batch = move_batch(batch, self.device)
                block = compute(batch).float().cpu().numpy()
                if start == 0:  # the output's width is known from the first batch
                    out = np.empty((n, block.shape[1]), dtype=np.float32)
                out[rows] = block
        return out

    # -- persistence ---------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        return {"dims": self.dims}

    def _state(self) -> dict[str, Any]:
        if self.module is None:
            return {}
        return {"module": self.module.state_dict()}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        if "dims" not in extra or "module" not in state:
            raise ModelError(f"saved '{self.name}' model lacks its network; retrain it")
        self.dims = dict(extra["dims"])
        with torch_seed_scope(self.seed, self.device):
            module = self._build_module(self.dims)
        module.load_state_dict(state["module"])
        self.module = module.to(self.device).eval()
