"""Block-shuffled minibatches read from an on-disk dataset, with matched controls.

Out-of-core training keeps in memory only what is small: the metadata-derived arrays of
every training cell (perturbation, covariates; a :class:`~pertbench.models.data.CellTable`
without expression), the control cells the targets are matched with (a few percent of a
screen) and one *buffer* of cells read from disk. Expression is read from the file in
contiguous row windows (:class:`pertbench.data.ondisk.OnDiskMatrix`).

Sampling order of one training epoch (``BlockSampling(block_size=B, buffer_blocks=K)``):

1. The training cells that have a control of their covariates, in file order, are cut
   into blocks of ``B`` consecutive cells (the last block may be shorter).
2. The blocks are permuted, seeded by ``(seed, epoch)``.
3. Consecutive runs of ``K`` permuted blocks form a buffer; a buffer's cells are read
   from disk in file order, then permuted (one generator per epoch, drawn buffer after
   buffer) and matched with random controls of their covariates (one uniform draw per
   cell, as in memory, from one generator per epoch).
4. Batches are cut from the concatenated stream of buffers, so every batch but the last
   holds ``batch_size`` cells and every cell appears once per epoch.

A batch therefore mixes cells of at most ``K + 1`` blocks (a batch may straddle two
buffers), which is what makes the order differ from an in-memory shuffle: when a file is
sorted by perturbation, a buffer sees the perturbations of its ``K`` blocks only. When
one buffer covers every training cell (``B * K >= n``) the buffer is all cells in file
order and steps 3-4 are exactly the in-memory :class:`~pertbench.models.data.BatchLoader`:
same permutation, same matched controls, hence the same trained weights for the same seed.
Validation batches (no shuffling, one fixed matching) are identical to the in-memory ones
for every block size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from pertbench.data.ondisk import OnDiskData
from pertbench.errors import ConfigError
from pertbench.models.data import (
    STREAM_MATCH,
    STREAM_SHUFFLE,
    CellTable,
    MatchedLoader,
    matrix_arrays,
)
from pertbench.models.encoding import CategoryEncoding
from pertbench.models.training import seeded_rng

#: Random stream of the block permutation (see training.seeded_rng).
STREAM_BLOCKS = 14


@dataclass(frozen=True)
class BlockSampling:
    """How out-of-core training reads and shuffles cells (see the module docstring).

    Attributes
    ----------
    block_size
        Consecutive training cells per block: the unit of the shuffle of blocks.
    buffer_blocks
        Blocks read into memory together and shuffled cell by cell; memory holds about
        ``block_size * buffer_blocks`` cells' expression at a time.
    """

    block_size: int = 1024
    buffer_blocks: int = 64

    def __post_init__(self) -> None:
        for name in ("block_size", "buffer_blocks"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def buffer_cells(self) -> int:
        return int(self.block_size) * int(self.buffer_blocks)


class DiskCells:
    """A set of cells of an on-disk dataset, encoded for a model.

    The metadata-derived arrays (``pert``, ``cov``, ``cov_codes``) of all cells are built
    once and kept in memory (:attr:`meta`); :meth:`load` reads the expression (and
    embedding or counts, when the model uses them) of chosen cells from disk.

    Parameters
    ----------
    data
        The open dataset.
    file_rows
        Increasing rows of the file holding these cells.
    encoding, genes, embedding_key, counts_layer
        As for :meth:`CellTable.from_adata`.
    """

    def __init__(
        self,
        data: OnDiskData,
        file_rows: np.ndarray,
        encoding: CategoryEncoding,
        *,
        genes: pd.Index,
        embedding_key: str | None = None,
        counts_layer: str | None = None,
    ) -> None:
        self.data = data
        self.file_rows = np.asarray(file_rows, dtype=np.int64)
        self.genes = genes
        self.embedding_key = embedding_key
        self.counts_layer = counts_layer
        self.meta = CellTable.from_obs(data.obs.iloc[self.file_rows], encoding)
        # A missing embedding or counts layer is reported by matrix_arrays, as in memory.
        self._embedding = data.obsm(embedding_key) if embedding_key in data.obsm_names else None
        self._counts = data.layer(counts_layer) if counts_layer in data.layer_names else None
        self._var = pd.DataFrame(index=pd.Index(data.var_names.astype(str)))

    @property
    def n_cells(self) -> int:
        return self.meta.n_cells

    @property
    def is_control(self) -> np.ndarray:
        return self.meta.is_control

    def width(self, name: str) -> int:
        """Width of the array ``name`` (``emb``: the embedding's dimensions)."""
        if name == "emb":
            return int(self.data.obsm(self.embedding_key).shape[1])
        if name in ("x", "counts"):
            return len(self.genes)
        return self.meta.width(name)

    def load(self, positions: np.ndarray) -> CellTable:
        """A full :class:`CellTable` of the cells at increasing ``positions``, read from disk."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = self.file_rows[positions]
        block = ad.AnnData(X=self.data.X.take(rows), var=self._var)
        if self._counts is not None:
            block.layers[self.counts_layer] = self._counts.take(rows)
        if self._embedding is not None:
            block.obsm[self.embedding_key] = self._embedding.take(rows)
        meta = self.meta.subset(positions)
        meta.arrays.update(
            matrix_arrays(
                block,
                genes=self.genes,
                embedding_key=self.embedding_key,
                counts_layer=self.counts_layer,
                copy=False,  # the block was just read: nobody else holds its arrays
            )
        )
        return meta

    def controls(self) -> CellTable:
        """All control cells of the set, read from disk (in file order)."""
        return self.load(np.flatnonzero(self.meta.is_control))


class BlockLoader(MatchedLoader):
    """Seeded minibatches over :class:`DiskCells`, read block by block from disk.

    Same interface, parameters and batches as :class:`~pertbench.models.data.BatchLoader`
    (a call with an epoch number returns that epoch's batches), plus ``sampling``; the
    order is the block shuffle of this module's docstring.
    """

    def __init__(self, cells: DiskCells, *, sampling: BlockSampling, **options: Any) -> None:
        super().__init__(cells.meta, **options)
        self.cells = cells
        self.sampling = sampling

    def buffers(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """Each buffer of an epoch as ``(positions, order, controls)``.

        ``positions``: the buffer's cells (increasing positions in :attr:`cells`, read in
        one pass); ``order``: indices into ``positions`` in batch order; ``controls``: the
        matched control rows (into ``controls``) aligned with ``order``, or ``None``.
        """
        n = self.n_cells
        size, per_buffer = int(self.sampling.block_size), int(self.sampling.buffer_blocks)
        n_blocks = -(-n // size)
        if self.shuffle:
            block_order = seeded_rng(self.seed, STREAM_BLOCKS, epoch).permutation(n_blocks)
            shuffle_rng = seeded_rng(self.seed, STREAM_SHUFFLE, epoch)
            match_rng = seeded_rng(self.seed, STREAM_MATCH, epoch)
        else:
            block_order = np.arange(n_blocks)
        offsets = np.arange(size, dtype=np.int64)
        for first in range(0, n_blocks, per_buffer):
            blocks = np.sort(block_order[first : first + per_buffer])
            index = (blocks[:, None] * size + offsets).ravel()
            index = index[index < n]
            positions = self.rows[index]
            if self.shuffle:
                order = shuffle_rng.permutation(index.size)
                controls = self.match(positions[order], match_rng)
            else:
                order = np.arange(index.size)
                fixed = self._fixed_controls
                controls = None if fixed is None else fixed[index]
            yield positions, order, controls

    def __call__(self, epoch: int = 0) -> Iterator[dict[str, Any]]:
        return self._maybe_prefetched(self._batches(epoch))

    def _batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        size = self.batch_size
        carry: tuple[CellTable, np.ndarray | None] | None = None  # a partial batch
        for positions, order, controls in self.buffers(epoch):
            table = self.cells.load(positions)
            start = 0
            if carry is not None:  # complete the partial batch with this buffer's first cells
                start = min(size - carry[0].n_cells, order.size)
                mixed = CellTable.concat([carry[0], table.subset(order[:start])])
                carry = (mixed, _join(carry[1], _part(controls, 0, start)))
                if mixed.n_cells == size:
                    yield self.make_batch(np.arange(size), carry[1], table=mixed)
                    carry = None
            stop = start + (order.size - start) // size * size
            for begin in range(start, stop, size):
                yield self.make_batch(
                    order[begin : begin + size], _part(controls, begin, begin + size), table=table
                )
            if stop < order.size:  # (a carried partial batch was completed above)
                carry = (table.subset(order[stop:]), _part(controls, stop, order.size))
            del table  # the next buffer is read only once this one is released
        if carry is not None:
            yield self.make_batch(np.arange(carry[0].n_cells), carry[1], table=carry[0])


def _part(values: np.ndarray | None, start: int, stop: int) -> np.ndarray | None:
    return None if values is None else values[start:stop]


def _join(first: np.ndarray | None, second: np.ndarray | None) -> np.ndarray | None:
    if first is None or second is None:
        return second if first is None else first
    return np.concatenate([first, second])
