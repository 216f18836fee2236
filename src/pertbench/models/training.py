"""One training loop for every neural model.

A model's network implements three methods and the loop does the rest (device placement,
epochs, early stopping on validation loss, best-weights restore, checkpoints, CSV log,
progress bar, pruning callback):

- ``configure_optimizers() -> list[torch.optim.Optimizer]``
- ``training_step(batch, optimizers, step) -> dict[str, float]``: computes the loss, calls
  ``backward`` and steps the optimizers itself (so adversarial models can alternate;
  :func:`optimizer_step` does zero-grad/backward/clip/step, reading
  ``module.gradient_clip`` which the loop sets from ``TrainingConfig.gradient_clip``);
  returns floats for logging, ``"loss"`` among them.
- ``validation_step(batch) -> dict[str, float | Tensor]``: the loss terms on a batch
  (``"loss"`` is used for early stopping), computed under ``torch.no_grad``.

Optionally ``epoch_start(epoch)``, called before each training epoch (weight schedules such
as CPA's adversarial warm-up).

Batches are dicts of tensors made by a callable per epoch, so the data side stays
vectorised and model-specific (see :mod:`pertbench.models.data`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pertbench.utils.io import atomic_path, write_csv_atomic

Batch = Mapping[str, torch.Tensor]


@dataclass
class TrainingConfig:
    """How long and how carefully to train."""

    max_epochs: int = 100
    patience: int | None = 10
    """Stop after this many epochs without validation improvement (None: never)."""
    min_delta: float = 0.0
    gradient_clip: float | None = None
    progress: bool = True
    description: str = "training"
    log_dir: Path | None = None
    epoch_callback: Callable[[int, Mapping[str, float]], None] | None = None


def move_batch(batch: Batch, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Move every tensor of a batch to ``device`` (non-blocking when pinned).

    Sparse CSR tensors are densified after the move: a loader may ship the non-zeros of
    a batch and let the device expand them (see ``BatchLoader(densify_on_device=True)``).
    """
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.layout == torch.sparse_csr:
                v = v.to_dense()
        out[k] = v
    return out


def _batch_size(batch: Batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return 1


def evaluate_loss(
    module: torch.nn.Module, batches: Iterable[Batch], device: str
) -> dict[str, float]:
    """Cell-weighted mean of each validation term over all batches."""
    module.eval()
    totals: dict[str, float] = {}
    n_total = 0
    with torch.no_grad():
        for batch in batches:
            batch = move_batch(batch, device)
            n = _batch_size(batch)
            terms = module.validation_step(batch)
            for key, value in terms.items():
                totals[key] = totals.get(key, 0.0) + float(value) * n
            n_total += n
    return {k: v / max(n_total, 1) for k, v in totals.items()}


def fit_module(
    module: torch.nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    val_batches: Callable[[], Iterable[Batch]] | None,
    config: TrainingConfig,
    *,
    device: str = "cpu",
) -> pd.DataFrame:
    """Train ``module`` in place and return the per-epoch history.

    Parameters
    ----------
    module
        Network implementing the three methods described in this module's docstring.
    train_batches
        ``f(epoch)`` returning the epoch's training batches (a fresh, seeded shuffle).
    val_batches
        ``f()`` returning validation batches, or ``None`` (then no early stopping and the
        last weights are kept).
    config
        Epochs, patience, logging.
    device
        Where to train.

    Returns
    -------
    pandas.DataFrame
        One row per epoch: ``epoch``, ``train_<term>`` and ``val_<term>`` columns.
    """
    from tqdm.auto import tqdm

    module.to(device)
    if config.gradient_clip is not None:
        # training_step steps its optimizers itself, so clipping must happen inside it
        # (between backward and step, see optimizer_step); the loop only passes the limit.
        module.gradient_clip = float(config.gradient_clip)
    optimizers = module.configure_optimizers()
    history: list[dict[str, Any]] = []
    best_loss = math.inf
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = -1
    epochs_without_improvement = 0
    step = 0
    bar = tqdm(
        range(config.max_epochs), desc=config.description, disable=not config.progress, leave=False
    )
    for epoch in bar:
        module.train()
        if hasattr(module, "epoch_start"):  # weight schedules (CPA's adversary warm-up)
            module.epoch_start(epoch)
        # Each term is averaged over the cells of the steps that reported it: alternating
        # models (CPA) report adversary terms on some steps and autoencoder terms on others.
        sums: dict[str, float] = {}
        cells: dict[str, int] = {}
        for batch in train_batches(epoch):
            batch = move_batch(batch, device)
            n = _batch_size(batch)
            terms = module.training_step(batch, optimizers, step)
            step += 1
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value) * n
                cells[key] = cells.get(key, 0) + n
        row: dict[str, Any] = {"epoch": epoch}
        row.update({f"train_{k}": v / max(cells[k], 1) for k, v in sums.items()})
        if val_batches is not None:
            val_terms = evaluate_loss(module, val_batches(), device)
            row.update({f"val_{k}": v for k, v in val_terms.items()})
            monitored = val_terms.get("loss", math.nan)
        else:
            monitored = row.get("train_loss", math.nan)
        if not math.isfinite(monitored):
            history.append(row)
            _write_history(config, history)
            raise FloatingPointError(
                f"{config.description}: loss became {monitored} at epoch {epoch}; lower the learning rate"
            )
        history.append(row)
        improved = monitored < best_loss - config.min_delta
        if improved:
            best_loss = monitored
            best_epoch = epoch
            epochs_without_improvement = 0
            if val_batches is not None:
                best_state = copy.deepcopy(module.state_dict())
                _write_checkpoint(config, best_state)
        else:
            epochs_without_improvement += 1
        _write_history(config, history)
        bar.set_postfix(
            {k: f"{v:.4g}" for k, v in row.items() if k != "epoch" and k.endswith("loss")}
        )
        if config.epoch_callback is not None:
            metrics = {k: float(v) for k, v in row.items()}
            metrics["val_loss"] = float(monitored)
            config.epoch_callback(epoch, metrics)
        if (
            val_batches is not None
            and config.patience is not None
            and epochs_without_improvement >= config.patience
        ):
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    frame = pd.DataFrame(history)
    frame["best"] = frame["epoch"] == best_epoch
    return frame


def optimizer_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    gradient_clip: float | None = None,
) -> None:
    """Zero the optimizer's gradients, backpropagate ``loss``, clip, and step.

    Clipping (``clip_grad_norm_`` over the optimizer's own parameters) happens between
    ``backward`` and ``step``, the only place where it has an effect.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if gradient_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip)
    optimizer.step()


def _write_history(config: TrainingConfig, history: list[dict[str, Any]]) -> None:
    if config.log_dir is not None:
        write_csv_atomic(config.log_dir / "training_log.csv", pd.DataFrame(history))


def _write_checkpoint(config: TrainingConfig, state: dict[str, torch.Tensor]) -> None:
    if config.log_dir is not None:
        with atomic_path(config.log_dir / "best_checkpoint.pt") as tmp:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)


def adam(
    params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0, eps: float = 1e-8
) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch build has one.

    On CPU the per-parameter (for-loop) implementation spends most of a step streaming the
    optimizer state through memory: for scGen's 12.5M parameters it took ~70 ms against
    ~10 ms fused, several times the forward and backward pass. Same update rule either way.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps)


def torch_generator(seed: int) -> torch.Generator:
    """A CPU torch Generator seeded deterministically."""
    gen = torch.Generator()
    gen.manual_seed(int(seed) % (2**63))
    return gen


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent NumPy generator for a named stream of one seed (e.g. batching vs matching)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, stream)]))
