"""Predictions of a split written chunk by chunk into an ``.h5ad`` file.

:func:`write_predictions` (behind ``PerturbationModel.predict_split_to_h5ad`` and
``pertbench predict --out-of-core``) predicts the rows of the counterfactual request
(:class:`~pertbench.models.counterfactual.CounterfactualPlan`) a chunk at a time and
writes each chunk's predicted cells into the output's ``X`` before the next is made.
Memory holds the request's obs and one chunk: the chunk's control cells (read from disk
when the data are on disk) and its predictions. The file is built beside the target and
renamed into place when complete.

The file is the one :meth:`~pertbench.models.base.PerturbationModel.predict_split`'s
result would give written with ``write_h5ad``: same obs, var, uns and values, because
obs/var/uns are written by anndata itself and every chunk is a whole number of the model's
prediction batches (``predict_batch_size``), so each batch holds the same cells as in one
call. A model whose prediction of a cell depends on the rest of the request, or that keeps
a record of the whole request (``chunked_prediction = False``: scPRAM's attention,
additive_within's fallbacks, nearest_perturbation's neighbours, and their notes), is
predicted in one chunk. The notes of a prediction (``uns['pertbench']['notes']``) are
those of its chunks, each once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.ondisk import OnDiskData
from pertbench.errors import ConfigError
from pertbench.utils.io import atomic_path

if TYPE_CHECKING:
    from pertbench.models.base import PerturbationModel
    from pertbench.models.counterfactual import CounterfactualPlan

#: Predicted cells per chunk by default (16,384 x 2,000 genes of float32 = 131 MB).
DEFAULT_CHUNK_CELLS = 16_384


def chunk_rows(model: PerturbationModel, n_cells: int, chunk_cells: int | None = None) -> int:
    """Rows per chunk: ``chunk_cells`` rounded up to whole prediction batches of the model
    (the whole request for a model that is not predicted by chunks)."""
    chunk_cells = DEFAULT_CHUNK_CELLS if chunk_cells is None else int(chunk_cells)
    if chunk_cells < 1:
        raise ConfigError(f"the prediction chunk must hold at least one cell, got {chunk_cells}")
    if not model.chunked_prediction:
        return max(int(n_cells), 1)
    batch = max(int(model.predict_batch_size), 1)
    return -(-chunk_cells // batch) * batch


def write_predictions(
    model: PerturbationModel,
    data: ad.AnnData | OnDiskData,
    plan: CounterfactualPlan,
    out: str | os.PathLike,
    *,
    seed: int,
    chunk_cells: int | None = None,
    uns: dict[str, Any] | None = None,
) -> Path:
    """Predict the rows of ``plan`` and write them into ``out`` chunk by chunk.

    Parameters
    ----------
    model
        A trained model.
    data
        The dataset holding the control cells: in memory or opened by rows
        (:func:`pertbench.data.ondisk.open_h5ad`).
    plan
        The counterfactual rows (e.g. ``model.split_plan(data, split, on="test")``).
    out
        The ``.h5ad`` file to write (atomically: a temporary file renamed on success).
    seed
        Prediction seed.
    chunk_cells
        Predicted cells per chunk (rounded up to whole prediction batches).
    uns
        ``uns['pertbench']`` of the output.

    Returns
    -------
    Path
        ``out``.
    """
    import h5py
    from anndata.io import write_elem

    n_cells, n_genes = plan.n_cells, len(model.genes)
    step = chunk_rows(model, n_cells, chunk_cells)
    header = ad.AnnData(obs=plan.obs(data.obs_names), var=pd.DataFrame(index=model.genes.copy()))
    notes: list[str] = []
    with atomic_path(out, suffix=".h5ad") as tmp:
        header.write_h5ad(tmp)  # obs and var encoded by anndata itself
        del header
        with h5py.File(tmp, "r+") as handle:
            X = handle.create_dataset("X", shape=(n_cells, n_genes), dtype=np.float32)
            X.attrs["encoding-type"] = "array"
            X.attrs["encoding-version"] = "0.2.0"
            for start in range(0, n_cells, step):
                stop = min(start + step, n_cells)
                predicted = model.predict(plan.cells(data, start, stop), seed=seed)
                X[start:stop] = np.asarray(predicted.X, dtype=np.float32)
                chunk_notes = predicted.uns["pertbench"].get("notes", [])
                notes += [note for note in chunk_notes if note not in notes]
            # uns last: the model's notes about the prediction are known only now
            record = dict(uns or {})
            if notes:
                record["notes"] = notes
            del handle["uns"]
            write_elem(handle, "uns", {"pertbench": record})
    return Path(out)
