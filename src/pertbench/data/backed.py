"""Row access to an expression matrix in memory or on disk (backed ``.h5ad``).

:class:`RowReader` gives one interface to the rows of ``adata.X`` whatever its storage:
a NumPy array, a SciPy sparse matrix, or the on-disk matrix of an AnnData opened with
``anndata.read_h5ad(path, backed="r")`` (an HDF5 dataset, dense or CSR). Callers ask for
any rows in any order (repeats allowed) and get them as an in-memory matrix restricted to
chosen columns; only those rows are ever read.

On disk, HDF5 wants increasing indices and reads contiguous ranges fastest. The reader
sorts the requested rows, merges rows that lie close together into windows of bounded
size (at most ``window_rows`` rows, gaps of at most ``max_gap`` unrequested rows), reads
each window as one contiguous slice, keeps the requested rows and puts them back in the
requested order. Memory is bounded by the rows returned plus one window.

Values are returned exactly as stored (same dtype, same sparse structure), so a
computation on rows read from disk gives the same bits as on the in-memory matrix.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import scipy.sparse as sp

#: Most rows read in one contiguous slice from disk.
DEFAULT_WINDOW_ROWS = 4096
#: Unrequested rows a window may span between two requested ones (read and dropped).
DEFAULT_MAX_GAP = 64


def read_backed(path) -> Any:
    """Open an .h5ad with ``X`` left on disk and only obs and var read into memory.

    ``anndata.read_h5ad(path, backed="r")`` keeps X on disk but loads everything else,
    layers included (a raw-count layer is as large as X); this reads obs and var only.
    Files in anndata's legacy layouts fall back to ``anndata.read_h5ad(backed="r")``.
    """
    import warnings

    import anndata as ad
    import h5py
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        current = all(
            isinstance(f.get(key), h5py.Group) and f[key].attrs.get("encoding-type") == "dataframe"
            for key in ("obs", "var")
        )
        if current:
            obs, var = read_elem(f["obs"]), read_elem(f["var"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", getattr(ad, "OldFormatWarning", FutureWarning))
        if not current:
            return ad.read_h5ad(path, backed="r")
        return ad.AnnData(obs=obs, var=var, filename=path, filemode="r")


def is_backed_matrix(X: Any) -> bool:
    """True for the on-disk ``X`` of a backed AnnData (HDF5/zarr dataset)."""
    if isinstance(X, np.ndarray) or sp.issparse(X):
        return False
    try:
        from anndata.abc import CSCDataset, CSRDataset
    except ImportError:  # pragma: no cover - anndata < 0.11
        CSCDataset = CSRDataset = ()
    if isinstance(X, (CSRDataset, CSCDataset)):
        return True
    return hasattr(X, "shape") and hasattr(X, "dtype") and type(X).__module__.startswith("h5py")


class RowReader:
    """Read chosen rows (and columns) of an expression matrix, in memory or on disk.

    Parameters
    ----------
    X
        ``adata.X``: dense array, SciPy sparse matrix, or the on-disk matrix of a backed
        AnnData (HDF5 dense dataset or CSR/CSC sparse dataset).
    columns
        Column indices to keep, in this order (``None``: all columns).
    rows
        Rows of ``X`` that this reader exposes, in this order (``None``: all): reader row
        i is row ``rows[i]`` of ``X`` (e.g. the training cells of a file).
    window_rows, max_gap
        On-disk reads: the largest contiguous slice and the widest gap merged into it.
    """

    def __init__(
        self,
        X: Any,
        *,
        columns: np.ndarray | None = None,
        rows: np.ndarray | None = None,
        window_rows: int = DEFAULT_WINDOW_ROWS,
        max_gap: int = DEFAULT_MAX_GAP,
    ) -> None:
        self.X = X
        self.on_disk = is_backed_matrix(X)
        n_rows, n_cols = (int(s) for s in X.shape)
        if columns is not None:
            columns = np.asarray(columns, dtype=np.int64)
            if columns.size == n_cols and np.array_equal(columns, np.arange(n_cols)):
                columns = None
        self.columns = columns
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        if self.rows is not None:
            n_rows = int(self.rows.size)
        self.shape = (n_rows, n_cols if columns is None else int(columns.size))
        self.format = _storage_format(X)
        self.window_rows = max(1, int(window_rows))
        self.max_gap = max(0, int(max_gap))
        if self.on_disk and self.format == "csc":
            # Row reads of a column-compressed file would read the whole matrix each
            # time; load it once as CSR instead (noted by the caller through `loaded`).
            self.X = sp.csr_matrix(X.to_memory())
            self.on_disk = False
            self.format = "csr"
            self.loaded = True
        else:
            self.loaded = False

    def subset(self, rows: np.ndarray) -> RowReader:
        """A reader of some of this reader's rows (reader row i = row ``rows[i]`` here)."""
        out = RowReader.__new__(RowReader)
        out.__dict__.update(self.__dict__)
        rows = np.asarray(rows, dtype=np.int64)
        out.rows = rows if self.rows is None else self.rows[rows]
        out.shape = (int(rows.size), self.shape[1])
        return out

    @property
    def is_sparse(self) -> bool:
        return self.format in ("csr", "csc")

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.X.dtype)

    def read(self, rows: np.ndarray) -> Any:
        """The given rows (any order, repeats allowed), restricted to the columns.

        Returns a CSR matrix for sparse storage, a NumPy array for dense storage.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if self.rows is not None:
            rows = self.rows[rows]
        if rows.size == 0:
            empty = np.zeros((0, self.shape[1]), dtype=self.dtype)
            return sp.csr_matrix(empty) if self.is_sparse else empty
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self._read_sorted(unique) if self.on_disk else self._take(unique)
        if unique.size != rows.size or not np.array_equal(unique, rows):
            block = block[inverse.ravel()]
        return block

    def _take(self, rows: np.ndarray) -> Any:
        X = self.X
        if sp.issparse(X):
            sub = sp.csr_matrix(X[rows])
            return sub if self.columns is None else sub[:, self.columns]
        sub = np.asarray(X[rows])
        return sub if self.columns is None else sub[:, self.columns]

    def _read_sorted(self, rows: np.ndarray) -> Any:
        """Read increasing unique rows from disk in bounded contiguous windows."""
        parts = []
        for lo, hi in _windows(rows, self.window_rows, self.max_gap):
            start, stop = int(rows[lo]), int(rows[hi - 1]) + 1
            chunk = self._slice(start, stop)
            wanted = rows[lo:hi] - start
            if wanted.size != stop - start:
                chunk = chunk[wanted]
            if self.columns is not None:
                chunk = chunk[:, self.columns]
            parts.append(chunk)
        if len(parts) == 1:
            return parts[0]
        if sp.issparse(parts[0]):
            return sp.vstack(parts, format="csr")
        return np.concatenate(parts, axis=0)

    def _slice(self, start: int, stop: int) -> Any:
        """Rows ``start:stop`` from disk, as stored (CSR arrays read directly: anndata's
        own indexing re-validates its arguments on every call, which costs more than
        the read for small windows)."""
        if self.format != "csr":
            return np.asarray(self.X[start:stop])
        group = self.X.group
        indptr = np.asarray(group["indptr"][start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix(
            (group["data"][lo:hi], group["indices"][lo:hi], indptr - lo),
            shape=(stop - start, int(self.X.shape[1])),
        )


def _storage_format(X: Any) -> str:
    if sp.issparse(X):
        return X.format
    fmt = getattr(X, "format", None)
    if isinstance(fmt, str) and fmt in ("csr", "csc"):
        return fmt
    return "dense"


def _windows(rows: np.ndarray, window_rows: int, max_gap: int):
    """(lo, hi) positions in sorted ``rows`` of runs read as one slice each.

    A new window starts where the gap to the previous row exceeds ``max_gap`` or where the
    window would span more than ``window_rows`` rows.
    """
    n = rows.size
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    bounds = np.concatenate([[0], breaks, [n]])
    for lo, hi in itertools.pairwise(bounds):
        lo, hi = int(lo), int(hi)
        while lo < hi:  # split long runs so that one slice spans at most window_rows rows
            limit = rows[lo] + window_rows
            stop = lo + int(np.searchsorted(rows[lo:hi], limit, side="left"))
            stop = max(stop, lo + 1)
            yield lo, stop
            lo = stop
