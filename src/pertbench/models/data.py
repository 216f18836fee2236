"""Vectorised minibatches from sparse data, with matched controls.

``X`` stays sparse (CSR) from disk to the batch: a :class:`CellTable` holds the model-ready
arrays of a set of cells (expression CSR, multi-hot perturbations, covariate codes and
one-hots, optional embedding and counts) and densifies only the rows of one batch at a
time (:func:`dense_rows`, a single vectorised gather/scatter, no per-cell Python).

Matched controls (PerturBench's "control matching"): every cell is paired with a random
control cell of the *same covariates*. :class:`ControlMatcher` sorts the controls by
covariate state once; a draw is then one uniform number per cell mapped into that state's
slice via offsets and counts. :class:`BatchLoader` reshuffles and re-matches every epoch
from ``(seed, epoch)``, or keeps one fixed matching (validation, so the loss is comparable
across epochs).
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pertbench.errors import ConfigError, DataValidationError
from pertbench.models.encoding import CategoryEncoding
from pertbench.models.training import seeded_rng

# Independent random streams of one seed (see training.seeded_rng).
STREAM_SHUFFLE = 11
STREAM_MATCH = 12
STREAM_FIXED_MATCH = 13

NO_CONTROL = -1


def dense_rows(X: Any, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``rows`` of ``X`` as a dense C-contiguous float32 array.

    For CSR input the rows' stored entries are gathered and scattered into a zeroed block
    by scipy's compiled kernels (``csr_row_index``, ``csr_todense``): the cost is
    proportional to the non-zeros of the batch, no Python runs per cell, the GIL is
    released (so a prefetch thread overlaps it with training) and the full matrix is
    never densified.

    Parameters
    ----------
    X
        CSR matrix or dense 2-D array.
    rows
        Row indices (any order, repeats allowed).
    out
        Optional preallocated float32 array of shape ``(len(rows), X.shape[1])``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if not sp.issparse(X):
        dense = np.asarray(X)[rows]
        if out is None:
            return np.ascontiguousarray(dense, dtype=np.float32)
        out[...] = dense
        return out
    if out is None:
        out = np.zeros((rows.size, X.shape[1]), dtype=np.float32)
    else:
        out.fill(0.0)  # csr_todense accumulates into the buffer
    block = X[rows]
    if block.dtype != np.float32:
        block = block.astype(np.float32)
    block.toarray(out=out)
    return out


def _canonical_csr(X: Any, *, copy: bool = True) -> sp.csr_matrix:
    """CSR float32 with sorted, summed indices; a copy unless ``copy=False`` (for a matrix
    this code owns, e.g. one just read from disk)."""
    X = sp.csr_matrix(X, dtype=np.float32, copy=copy)
    X.sum_duplicates()
    X.sort_indices()
    return X


def covariate_state_codes(covariate_codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """One integer per cell for its combination of covariate values (mixed radix)."""
    covariate_codes = np.asarray(covariate_codes, dtype=np.int64)
    if covariate_codes.ndim != 2 or covariate_codes.shape[1] != len(sizes):
        raise ValueError("covariate_codes must be (n_cells, n_covariate_keys)")
    if not len(sizes):
        return np.zeros(covariate_codes.shape[0], dtype=np.int64)
    if float(np.prod([float(s) for s in sizes])) >= 2**62:
        raise ConfigError("too many covariate combinations to index; use fewer covariate keys")
    return np.ravel_multi_index(tuple(covariate_codes.T), tuple(int(s) for s in sizes)).astype(
        np.int64
    )


class CellTable:
    """Model-ready arrays of a set of cells, densified per batch.

    Parameters
    ----------
    arrays
        Named per-cell arrays with one row per cell: CSR matrices (densified per batch),
        dense 2-D arrays, or 1-D arrays.
    state_codes
        Covariate state of each cell (:func:`covariate_state_codes`), used for matching.
    is_control
        True for control cells.

    Standard names made by :meth:`from_adata`: ``x`` (log-normalised expression, CSR
    float32), ``pert`` (multi-hot or dose-valued perturbations, CSR), ``cov`` (concatenated
    one-hot covariates), ``cov_codes`` (integer code per covariate key), and optionally
    ``emb`` (an ``obsm`` embedding), ``counts`` (raw counts, CSR) and ``library`` (counts
    summed over the model's genes).
    """

    def __init__(
        self,
        arrays: Mapping[str, Any],
        *,
        state_codes: np.ndarray,
        is_control: np.ndarray,
    ) -> None:
        self.arrays = dict(arrays)
        self.state_codes = np.asarray(state_codes, dtype=np.int64)
        self.is_control = np.asarray(is_control, dtype=bool)
        n = self.state_codes.shape[0]
        for name, value in self.arrays.items():
            if value.shape[0] != n:
                raise ValueError(f"array '{name}' has {value.shape[0]} rows, expected {n}")

    @property
    def n_cells(self) -> int:
        return int(self.state_codes.shape[0])

    def width(self, name: str) -> int:
        value = self.arrays[name]
        return int(value.shape[1]) if value.ndim > 1 else 1

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_adata(
        cls,
        adata: ad.AnnData,
        encoding: CategoryEncoding,
        *,
        genes: pd.Index,
        embedding_key: str | None = None,
        counts_layer: str | None = None,
    ) -> CellTable:
        """Encode an AnnData (or view) with a fitted :class:`CategoryEncoding`.

        Parameters
        ----------
        adata
            Cells with log-normalised ``X`` and the obs columns named by the encoding's keys.
        encoding
            Vocabulary of perturbations and covariates (unknown values raise).
        genes
            Genes (in order) the model reads and predicts.
        embedding_key
            Also load ``adata.obsm[embedding_key]`` as ``emb``.
        counts_layer
            Also load raw counts from ``adata.layers[counts_layer]`` as ``counts`` and
            their per-cell sum over ``genes`` as ``library``.
        """
        table = cls.from_obs(adata.obs, encoding)
        table.arrays.update(
            matrix_arrays(
                adata, genes=genes, embedding_key=embedding_key, counts_layer=counts_layer
            )
        )
        return table

    @classmethod
    def from_obs(cls, obs: pd.DataFrame, encoding: CategoryEncoding) -> CellTable:
        """The arrays made from cell metadata alone: ``pert``, ``cov`` and ``cov_codes``.

        Out-of-core training keeps this table of every training cell in memory and reads
        the expression of a block of cells at a time (:func:`matrix_arrays`).
        """
        keys = encoding.keys
        dose = (
            obs[keys.dose_key]
            if keys.dose_key is not None and keys.dose_key in obs.columns
            else None
        )
        if keys.dose_key is not None and dose is None:
            raise DataValidationError(
                f"obs has no dose column '{keys.dose_key}'; pass the right --dose-key or none"
            )
        arrays: dict[str, Any] = {
            "pert": _canonical_csr(encoding.perturbation_matrix(obs[keys.perturbation_key], dose)),
            "cov": encoding.covariate_onehot(obs),
            "cov_codes": encoding.covariate_codes(obs),
        }
        state = covariate_state_codes(arrays["cov_codes"], encoding.covariate_sizes)
        is_control = obs[keys.perturbation_key].astype(str).to_numpy() == keys.control
        return cls(arrays, state_codes=state, is_control=is_control)

    def subset(self, rows: np.ndarray) -> CellTable:
        """A new table with the given rows (in that order)."""
        rows = np.asarray(rows, dtype=np.int64)
        return CellTable(
            {k: v[rows] for k, v in self.arrays.items()},
            state_codes=self.state_codes[rows],
            is_control=self.is_control[rows],
        )

    @staticmethod
    def concat(tables: Sequence[CellTable]) -> CellTable:
        """Stack tables with the same array names row-wise."""
        names = list(tables[0].arrays)
        arrays = {}
        for name in names:
            parts = [t.arrays[name] for t in tables]
            if sp.issparse(parts[0]):
                arrays[name] = sp.vstack(parts, format="csr")
            else:
                arrays[name] = np.concatenate(parts, axis=0)
        return CellTable(
            arrays,
            state_codes=np.concatenate([t.state_codes for t in tables]),
            is_control=np.concatenate([t.is_control for t in tables]),
        )

    # -- batches -------------------------------------------------------------------------
    def take(self, name: str, rows: np.ndarray, *, keep_sparse: bool = False) -> torch.Tensor:
        """One array's rows as a tensor (sparse arrays densified, integer codes as int64).

        With ``keep_sparse`` a CSR array's rows come as a torch sparse CSR tensor (only
        the non-zeros), to be densified on the training device by ``move_batch``.
        """
        value = self.arrays[name]
        if keep_sparse and sp.issparse(value):
            block = value[np.asarray(rows, dtype=np.int64)]
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(
                    torch.from_numpy(block.indptr.astype(np.int64)),
                    torch.from_numpy(block.indices.astype(np.int64)),
                    torch.from_numpy(block.data.astype(np.float32, copy=False)),
                    size=block.shape,
                    check_invariants=False,  # canonical scipy CSR by construction
                )
        if sp.issparse(value) or (value.ndim == 2 and value.dtype.kind == "f"):
            return torch.from_numpy(dense_rows(value, rows))
        picked = np.ascontiguousarray(value[rows])
        if picked.dtype.kind == "f":
            picked = picked.astype(np.float32, copy=False)
        return torch.from_numpy(picked)


def matrix_arrays(
    adata: ad.AnnData,
    *,
    genes: pd.Index,
    embedding_key: str | None = None,
    counts_layer: str | None = None,
    copy: bool = True,
) -> dict[str, Any]:
    """The per-cell arrays read from the matrices of ``adata`` (see :class:`CellTable`):
    ``x`` (expression of ``genes``, canonical CSR float32) and optionally ``emb``,
    ``counts`` and ``library``. ``copy=False`` may reuse (and canonicalise in place) the
    arrays of ``adata``'s matrices: only for an AnnData made from freshly read blocks."""
    from pertbench.models.base import align_genes

    arrays: dict[str, Any] = {"x": _canonical_csr(align_genes(adata, genes), copy=copy)}
    if embedding_key is not None:
        arrays["emb"] = embedding_matrix(adata, embedding_key)
    if counts_layer is not None:
        counts = counts_matrix(adata, counts_layer, genes)
        arrays["counts"] = counts
        arrays["library"] = np.asarray(counts.sum(axis=1), dtype=np.float32).ravel()
    return arrays


def embedding_matrix(adata: ad.AnnData, key: str) -> np.ndarray:
    """``adata.obsm[key]`` as a finite dense float32 array, or a clear error."""
    if key not in adata.obsm:
        available = ", ".join(adata.obsm.keys()) or "none"
        raise DataValidationError(
            f"obsm has no embedding '{key}' (available: {available}); compute it first or "
            "drop the embedding_key setting"
        )
    value = adata.obsm[key]
    value = value.toarray() if sp.issparse(value) else np.asarray(value)
    value = np.ascontiguousarray(value, dtype=np.float32)
    if value.ndim != 2:
        raise DataValidationError(f"obsm['{key}'] must be a 2-D (cells x dims) array")
    if not np.isfinite(value).all():
        raise DataValidationError(f"obsm['{key}'] contains NaN or inf values")
    return value


def counts_matrix(adata: ad.AnnData, layer: str, genes: pd.Index) -> sp.csr_matrix:
    """Raw counts of ``genes`` from ``adata.layers[layer]`` (CSR float32), validated."""
    if layer not in adata.layers:
        available = ", ".join(adata.layers.keys()) or "none"
        raise DataValidationError(
            f"the negative-binomial likelihood needs raw counts in layers['{layer}'] "
            f"(available layers: {available}); set counts_layer or use likelihood=gaussian"
        )
    names = pd.Index(adata.var_names.astype(str))
    idx = names.get_indexer(genes)
    counts = adata.layers[layer]
    counts = counts[:, idx] if not names.equals(genes) else counts
    counts = _canonical_csr(counts)
    if counts.nnz and (not np.isfinite(counts.data).all() or counts.data.min() < 0):
        raise DataValidationError(f"layers['{layer}'] must hold finite non-negative counts")
    return counts


class ControlMatcher:
    """Draw, for each query cell, a random control of the same covariate state.

    Parameters
    ----------
    state_codes
        Covariate state of each candidate control.
    rows
        Row index (into the control table) of each candidate control.
    """

    def __init__(self, state_codes: np.ndarray, rows: np.ndarray) -> None:
        state_codes = np.asarray(state_codes, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(state_codes, kind="stable")
        self.sorted_rows = rows[order]
        n_states = int(state_codes.max()) + 1 if state_codes.size else 0
        self.counts = np.bincount(state_codes, minlength=n_states).astype(np.int64)
        self.offsets = np.cumsum(self.counts) - self.counts

    def available(self, query_states: np.ndarray) -> np.ndarray:
        """True where the query state has at least one control."""
        query_states = np.asarray(query_states, dtype=np.int64)
        inside = query_states < self.counts.size
        out = np.zeros(query_states.shape, dtype=bool)
        out[inside] = self.counts[query_states[inside]] > 0
        return out

    def draw(self, query_states: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Control rows, one uniform draw per query; ``NO_CONTROL`` (-1) where none exists."""
        query_states = np.asarray(query_states, dtype=np.int64)
        ok = self.available(query_states)
        u = rng.random(query_states.shape[0])
        result = np.full(query_states.shape[0], NO_CONTROL, dtype=np.int64)
        states = query_states[ok]
        pick = np.minimum((u[ok] * self.counts[states]).astype(np.int64), self.counts[states] - 1)
        result[ok] = self.sorted_rows[self.offsets[states] + pick]
        return result


class MatchedLoader:
    """What every minibatch loader shares: targets, matched controls, batch assembly.

    ``table`` holds the target cells' matching metadata (``state_codes``, and for
    in-memory loading every array); ``controls`` the candidate controls (its
    ``is_control`` rows are used). Cells whose covariates have no control are left out
    with a warning. Without shuffling, one matching is drawn once (seeded), so a
    validation loss is comparable across epochs. See :class:`BatchLoader` for the
    parameters.
    """

    def __init__(
        self,
        table: CellTable,
        *,
        batch_size: int,
        seed: int,
        fields: Sequence[str],
        controls: CellTable | None = None,
        control_fields: Mapping[str, str] | None = None,
        shuffle: bool = True,
        prefetch: int = 0,
        pin_memory: bool = False,
        densify_on_device: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.table = table
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.fields = tuple(fields)
        self.controls = controls
        self.control_fields = dict(control_fields or {})
        self.shuffle = shuffle
        self.prefetch = max(int(prefetch), 0)
        self.pin_memory = bool(pin_memory)
        self.densify_on_device = bool(densify_on_device)
        self.rows = np.arange(table.n_cells, dtype=np.int64)
        self.matcher: ControlMatcher | None = None
        self.n_dropped = 0
        if controls is not None:
            control_rows = np.flatnonzero(controls.is_control)
            self.matcher = ControlMatcher(controls.state_codes[control_rows], control_rows)
            ok = self.matcher.available(table.state_codes)
            self.n_dropped = int((~ok).sum())
            if self.n_dropped:
                warnings.warn(
                    f"{self.n_dropped} cell(s) have no control of the same covariates and are "
                    "left out of matched batches",
                    stacklevel=2,
                )
            self.rows = self.rows[ok]
        self._fixed_controls: np.ndarray | None = None
        if self.matcher is not None and not shuffle:
            self._fixed_controls = self.matcher.draw(
                table.state_codes[self.rows], seeded_rng(self.seed, STREAM_FIXED_MATCH)
            )

    @property
    def n_cells(self) -> int:
        """Cells per epoch (after dropping cells without a matching control)."""
        return int(self.rows.size)

    def __len__(self) -> int:
        return -(-self.n_cells // self.batch_size)

    def match(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
        """Matched control rows (into ``controls``) of the target ``rows`` (None: no matching)."""
        if self.matcher is None:
            return None
        return self.matcher.draw(self.table.state_codes[rows], rng)

    def make_batch(
        self,
        rows: np.ndarray,
        control_rows: np.ndarray | None,
        *,
        table: CellTable | None = None,
    ) -> dict[str, Any]:
        """Densify one batch: the target fields of ``table`` (default: the loader's), then
        the matched-control fields."""
        table = self.table if table is None else table
        sparse = self.densify_on_device
        batch = {name: table.take(name, rows, keep_sparse=sparse) for name in self.fields}
        if control_rows is not None and self.controls is not None:
            for out_name, name in self.control_fields.items():
                batch[out_name] = self.controls.take(name, control_rows, keep_sparse=sparse)
        if self.pin_memory:
            batch = {
                k: v if v.layout != torch.strided else v.pin_memory() for k, v in batch.items()
            }
        return batch

    def _maybe_prefetched(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.prefetch:
            return prefetched(batches, depth=self.prefetch)
        return iter(batches)


class BatchLoader(MatchedLoader):
    """Seeded minibatches over an in-memory :class:`CellTable`, optionally with matched controls.

    Calling the loader with an epoch number returns that epoch's batches (dicts of
    tensors). With ``shuffle=True`` the order and the control matching are redrawn from
    ``(seed, epoch)``; with ``shuffle=False`` the order is the table's and the matching is
    drawn once (the validation setting).

    Parameters
    ----------
    table
        Cells to iterate over (the targets).
    batch_size
        Cells per batch (the last batch may be smaller).
    seed
        Seed of shuffling and matching.
    fields
        Names of ``table`` arrays to put in each batch.
    controls
        Table of candidate controls (its ``is_control`` rows are used); ``None`` disables
        matching.
    control_fields
        ``{batch_name: array_name}`` taken from the matched control rows, e.g.
        ``{"ctrl": "x"}``.
    shuffle
        Reshuffle and re-match every epoch (training) or keep one fixed order/matching.
    prefetch
        Build this many batches ahead in a background thread (0: build inline). The
        densification kernels release the GIL, so on a GPU the next batch is prepared
        while the current one trains. Batches and their order are the same either way.
    pin_memory
        Pin dense batch tensors (faster, asynchronous host-to-GPU copies).
    densify_on_device
        Ship sparse arrays (expression) as their non-zeros and densify them on the
        training device (``move_batch``): on a GPU this moves a fraction of the bytes
        and leaves the host only the row gather.
    """

    def epoch_plan(self, epoch: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        """Target rows in batch order and their matched control rows for one epoch."""
        if self.shuffle:
            order = self.rows[
                seeded_rng(self.seed, STREAM_SHUFFLE, epoch).permutation(self.n_cells)
            ]
            return order, self.match(order, seeded_rng(self.seed, STREAM_MATCH, epoch))
        return self.rows, self._fixed_controls

    def __call__(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
        order, controls = self.epoch_plan(epoch)
        batches = (
            self.make_batch(
                order[start : start + self.batch_size],
                None if controls is None else controls[start : start + self.batch_size],
            )
            for start in range(0, order.size, self.batch_size)
        )
        return self._maybe_prefetched(batches)


_DONE = object()


def prefetched(items: Iterable[Any], *, depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` produced by a background thread, at most ``depth`` ahead.

    Order is preserved; an exception in the producer is re-raised in the consumer; when
    the consumer stops early the producer is told to stop and joined.
    """
    buffer: queue.Queue = queue.Queue(maxsize=max(int(depth), 1))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as exc:  # forwarded to the consumer
            put(exc)

    worker = threading.Thread(target=produce, name="pertbench-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:  # unblock a producer waiting on a full buffer
                buffer.get_nowait()
            except queue.Empty:
                pass
            worker.join(timeout=0.05)
