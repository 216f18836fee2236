"""An ``.h5ad`` file read by rows, never loaded whole (out-of-core training and prediction).

:func:`open_h5ad` opens a file (or wraps an AnnData opened with
``anndata.read_h5ad(path, backed="r")``) as an :class:`OnDiskData`: ``obs`` and ``var``
are read into memory (they are small: a few columns per cell), while ``X``, the layers and
``obsm`` stay on disk as :class:`OnDiskMatrix` objects that read contiguous row ranges.
The file is opened read-only and never modified.

Why backed ``.h5ad`` and no other store: a CSR matrix in an ``.h5ad`` file is three HDF5
datasets (``data``, ``indices``, ``indptr``), so the rows ``a:b`` are one slice of
``indptr`` and one contiguous slice of ``data`` and ``indices``: the cost of a block read
is proportional to its non-zeros, with no per-cell work and no conversion step or second
copy of the data. :func:`pertbench.data.simulate_to_h5ad` and ``AnnData.write_h5ad``
write such files. Row reads of a column-compressed (CSC) matrix would read the whole
matrix each time, so CSC is refused with the fix.

Scattered rows (:meth:`OnDiskMatrix.take`) are read as a few contiguous windows: rows that
lie close together (gaps of at most ``max_gap`` unrequested rows, windows of at most
``window_rows`` rows) are read in one slice and the unrequested rows dropped.
:class:`RowReader` is the one interface to the rows of any expression matrix, in memory
or on disk: rows in any order (repeats allowed), restricted to chosen columns, read
through :meth:`OnDiskMatrix.take` in bounded windows; values come back exactly as stored,
so a computation on rows read from disk gives the same bits as on the matrix in memory.

Files written by old anndata versions (obs as a structured array, X in the ``h5sparse``
layout) are opened through anndata's own backed reader, which also reads their obsm and
uns; their X is still read by rows.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import DataValidationError, InputFileError

#: ``pertbench train/predict`` read a file out of core (by blocks of rows) when the
#: matrices an in-memory read would load (X and every layer) take at least this many
#: bytes in memory.
OUT_OF_CORE_BYTES = 1 << 30
#: Most rows read in one contiguous slice.
WINDOW_ROWS = 65_536
#: Unrequested rows a window may span between two requested ones (read and dropped):
#: one more HDF5 read costs about as much as reading a few dozen rows.
MAX_GAP = 64
#: Stored values scanned per chunk when validating (the scan's temporaries stay ~50 MB).
SCAN_VALUES = 4_000_000
#: Most rows one :class:`RowReader` read spans: bounds what a read of scattered rows holds
#: beyond the rows returned (the evaluator's memory bound rests on it).
READER_WINDOW_ROWS = 4096


class ColumnCompressedError(DataValidationError):
    """A matrix is stored column-compressed (CSC): it cannot be read by rows."""


class OnDiskMatrix:
    """A cells x features matrix of an ``.h5ad`` file, read by rows.

    Parameters
    ----------
    source
        The stored matrix: an HDF5 group holding a CSR matrix, a 2-D HDF5 dataset, or an
        in-memory array or sparse matrix (the layers of a backed AnnData are in memory).
    name
        Where it lives in the file (``X``, ``layers/counts``, ``obsm/X_pca``), for messages.
    """

    def __init__(self, source: Any, *, name: str) -> None:
        self.name = name
        self.in_memory = isinstance(source, np.ndarray) or sp.issparse(source)
        if not self.in_memory:
            source = getattr(source, "group", source)  # anndata's backed sparse dataset
        self.source = source
        self._indptr_cache: np.ndarray | None = None
        if self.in_memory:
            self.format = source.format if sp.issparse(source) else "dense"
            if self.format == "csc":
                self.source = sp.csr_matrix(source)
                self.format = "csr"
            self.shape = tuple(int(s) for s in source.shape)
            return
        import h5py

        if isinstance(source, h5py.Group):
            encoding, shape = _sparse_layout(source)
            if encoding == "csc_matrix":
                raise ColumnCompressedError(
                    f"{name} is stored column-compressed (CSC), which cannot be read by rows; "
                    f"rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))"
                )
            if encoding != "csr_matrix":
                raise DataValidationError(
                    f"{name} is stored as '{encoding}', not a matrix; store a dense or CSR "
                    "cells x features matrix there"
                )
            self.format = "csr"
            self.shape = shape
        elif isinstance(source, h5py.Dataset) and source.ndim == 2:
            self.format = "dense"
            self.shape = tuple(int(s) for s in source.shape)
        else:
            raise DataValidationError(
                f"{name} is not a cells x features matrix; store a dense or CSR matrix there"
            )

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        if self.format == "csr" and not self.in_memory:
            return np.dtype(self.source["data"].dtype)
        return np.dtype(self.source.dtype)

    @property
    def nnz(self) -> int:
        """Stored values (CSR: the non-zeros; dense: every entry)."""
        if self.format == "dense":
            return int(np.prod(self.shape))
        return int(self.source.nnz if self.in_memory else self.source["data"].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes the whole matrix would take in memory."""
        if self.format == "dense":
            return int(np.prod(self.shape)) * self.dtype.itemsize
        if self.in_memory:
            m = self.source
            return int(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes)
        group = self.source
        return int(
            sum(group[k].size * group[k].dtype.itemsize for k in ("data", "indices", "indptr"))
        )

    def read(self, start: int, stop: int) -> Any:
        """Rows ``start:stop``: a CSR matrix (sparse storage) or an array (dense), as stored."""
        start, stop = int(start), max(int(start), int(stop))
        if self.in_memory or self.format == "dense":
            block = self.source[start:stop]
            return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        return self.take(np.arange(start, stop, dtype=np.int64))

    def take(
        self, rows: np.ndarray, *, window_rows: int = WINDOW_ROWS, max_gap: int = MAX_GAP
    ) -> Any:
        """The given strictly increasing rows, read in contiguous windows.

        A CSR matrix is assembled straight into its output arrays: each window's stored
        values are one slice of ``data`` and ``indices`` (found from ``indptr``, read
        once and kept), read in place when the window has no unrequested rows.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or rows[-1] >= self.n_rows):
            raise ValueError("take() needs strictly increasing row indices inside the matrix")
        if self.in_memory:
            block = self.source[rows]
            return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)
        windows = list(_windows(rows, window_rows, max_gap)) if rows.size else []
        if self.format == "dense":
            parts = [np.asarray(self.source[rows[lo] : rows[hi - 1] + 1]) for lo, hi in windows]
            parts = [
                part if hi - lo == part.shape[0] else part[rows[lo:hi] - rows[lo]]
                for part, (lo, hi) in zip(parts, windows, strict=True)
            ]
            if not parts:
                return np.zeros((0, self.shape[1]), dtype=self.dtype)
            return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        indptr = self._indptr()
        counts = indptr[rows + 1] - indptr[rows]
        out_indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        data_ds, indices_ds = self.source["data"], self.source["indices"]
        data = np.empty(int(out_indptr[-1]), dtype=data_ds.dtype)
        indices = np.empty(int(out_indptr[-1]), dtype=indices_ds.dtype)
        for lo, hi in windows:
            first, last = int(rows[lo]), int(rows[hi - 1]) + 1
            a, b = int(indptr[first]), int(indptr[last])
            out = int(out_indptr[lo])
            if hi - lo == last - first:  # every row of the window is wanted
                if b > a:
                    data_ds.read_direct(data, np.s_[a:b], np.s_[out : out + b - a])
                    indices_ds.read_direct(indices, np.s_[a:b], np.s_[out : out + b - a])
                continue
            wanted = np.zeros(last - first, dtype=bool)
            wanted[rows[lo:hi] - first] = True
            keep = np.repeat(wanted, np.diff(indptr[first : last + 1]))
            n = int(out_indptr[hi]) - out
            data[out : out + n] = data_ds[a:b][keep]
            indices[out : out + n] = indices_ds[a:b][keep]
        return sp.csr_matrix((data, indices, out_indptr), shape=(rows.size, self.shape[1]))

    def _indptr(self) -> np.ndarray:
        """The whole ``indptr`` (8 bytes a cell), read on first use."""
        if self._indptr_cache is None:
            self._indptr_cache = np.asarray(self.source["indptr"][:], dtype=np.int64)
        return self._indptr_cache

    def stored_values(self, chunk: int = SCAN_VALUES) -> Iterator[np.ndarray]:
        """Every stored value (CSR: the non-zeros; dense: all entries), chunk by chunk."""
        if self.format == "csr":
            data = self.source.data if self.in_memory else self.source["data"]
            for i in range(0, int(data.shape[0]), chunk):
                yield np.asarray(data[i : i + chunk])
            return
        rows = max(1, chunk // max(self.shape[1], 1))
        for i in range(0, self.n_rows, rows):
            yield np.asarray(self.source[i : i + rows]).reshape(-1)


class RowReader:
    """Chosen rows (and columns) of an expression matrix, in memory or on disk.

    Callers ask for any rows in any order (repeats allowed) and get an in-memory matrix
    (CSR for sparse storage, an array for dense storage) restricted to the chosen
    columns; only those rows are read. On disk, the distinct rows are read in increasing
    order through :meth:`OnDiskMatrix.take` (windows of at most ``window_rows`` rows, gaps
    of at most ``max_gap`` rows merged; restricted to the columns one window at a time)
    and put back in the requested order: memory is bounded by the rows returned plus one
    window. Values are exactly as stored (same dtype, same sparse structure).

    Parameters
    ----------
    X
        A NumPy array, a SciPy sparse matrix, an :class:`OnDiskMatrix`, or the on-disk
        ``X`` of an AnnData opened with ``anndata.read_h5ad(path, backed="r")``.
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
        window_rows: int = READER_WINDOW_ROWS,
        max_gap: int = MAX_GAP,
    ) -> None:
        self.on_disk = not (isinstance(X, np.ndarray) or sp.issparse(X))
        if self.on_disk and not isinstance(X, OnDiskMatrix):
            X = OnDiskMatrix(X, name="X")
        self.X = X
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
        self.format = X.format if self.on_disk or sp.issparse(X) else "dense"
        self.window_rows = max(1, int(window_rows))
        self.max_gap = max(0, int(max_gap))

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
        """The given rows (any order, repeats allowed), restricted to the columns."""
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
        sub = sp.csr_matrix(X[rows]) if sp.issparse(X) else np.asarray(X[rows])
        return sub if self.columns is None else sub[:, self.columns]

    def _read_sorted(self, rows: np.ndarray) -> Any:
        """Increasing unique rows from disk; columns restricted window by window."""
        options = {"window_rows": self.window_rows, "max_gap": self.max_gap}
        if self.columns is None:
            return self.X.take(rows, **options)
        parts = [
            self.X.take(rows[lo:hi], **options)[:, self.columns]
            for lo, hi in _windows(rows, self.window_rows, self.max_gap)
        ]
        if len(parts) == 1:
            return parts[0]
        if sp.issparse(parts[0]):
            return sp.vstack(parts, format="csr")
        return np.concatenate(parts, axis=0)


def is_backed_matrix(X: Any) -> bool:
    """True for a matrix stored on disk: an :class:`OnDiskMatrix`, or the ``X`` of a
    backed AnnData (an HDF5 dataset or anndata's sparse dataset)."""
    if isinstance(X, OnDiskMatrix):
        return True
    if X is None or isinstance(X, np.ndarray) or sp.issparse(X):
        return False
    return type(getattr(X, "group", X)).__module__.startswith("h5py")


class OnDiskData:
    """Cell and gene metadata in memory, matrices on disk (see :func:`open_h5ad`).

    Attributes
    ----------
    path
        The file (``None`` for a wrapped in-memory AnnData).
    obs, var
        Cell and gene metadata.
    X
        The expression matrix.
    """

    def __init__(
        self,
        *,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        X: OnDiskMatrix,
        layers: dict[str, Any],
        obsm: dict[str, Any],
        path: Path | None = None,
        handle: Any = None,
    ) -> None:
        self.obs = obs
        self.var = var
        self.X = X
        self._layers = layers
        self._obsm = obsm
        self.path = path
        self._handle = handle

    # -- AnnData-like metadata ---------------------------------------------------------------
    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def n_vars(self) -> int:
        return len(self.var)

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def var_names(self) -> pd.Index:
        return self.var.index

    @property
    def layer_names(self) -> list[str]:
        return list(self._layers)

    @property
    def obsm_names(self) -> list[str]:
        return list(self._obsm)

    def layer(self, name: str) -> OnDiskMatrix:
        return _member(self._layers, name, "layers", "add it or change the setting that names it")

    def obsm(self, key: str) -> OnDiskMatrix:
        return _member(
            self._obsm, key, "obsm", "compute it first or drop the embedding_key setting"
        )

    def matrices_nbytes(self) -> int:
        """Bytes X and every layer would take in memory (what an in-memory read loads)."""
        return self.X.nbytes + sum(self.layer(name).nbytes for name in self._layers)

    # -- reading -----------------------------------------------------------------------------
    def to_memory(self, rows: np.ndarray, *, layers: bool = True, obsm: bool = True) -> ad.AnnData:
        """An in-memory AnnData of the given (increasing) rows: X, obs, var, layers, obsm."""
        rows = np.asarray(rows, dtype=np.int64)
        out = ad.AnnData(X=self.X.take(rows), obs=self.obs.iloc[rows].copy(), var=self.var.copy())
        for name in self._layers if layers else ():
            out.layers[name] = self.layer(name).take(rows)
        for key in self._obsm if obsm else ():
            out.obsm[key] = self.obsm(key).take(rows)
        return out

    def close(self) -> None:
        """Close the file this object opened (a wrapped backed AnnData stays open)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> OnDiskData:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_on_disk(data: Any) -> bool:
    """True for a path to an ``.h5ad`` file, a backed AnnData or an :class:`OnDiskData`."""
    if isinstance(data, (str, os.PathLike, OnDiskData)):
        return True
    return isinstance(data, ad.AnnData) and bool(data.isbacked)


def open_h5ad(
    data: str | os.PathLike | ad.AnnData | OnDiskData,
    *,
    keys: PerturbationKeys | None = None,
    validate: bool = True,
    expect: Literal["log", "any"] = "log",
) -> OnDiskData:
    """Open an ``.h5ad`` file for reading by rows (obs and var in memory, matrices on disk).

    Parameters
    ----------
    data
        A path, an AnnData (backed: its file is read; in memory: wrapped as it is), or an
        :class:`OnDiskData` (returned unchanged).
    keys
        Which obs columns hold perturbation, covariates and dose (for validation).
    validate
        Check the data contract without loading X: obs as :func:`validate_obs`, unique
        names, and the values of X scanned chunk by chunk.
    expect
        ``"log"``: X must hold log-normalised values (raw counts cannot be normalised on
        the fly: run ``pertbench preprocess``); ``"any"``: counts are accepted (for uses
        that read only obs, such as splitting).

    Returns
    -------
    OnDiskData
        Close it (or use it as a context manager) when done.
    """
    if isinstance(data, OnDiskData):
        return data
    if isinstance(data, ad.AnnData):
        out = _wrap_anndata(data)
    else:
        out = _open_file(Path(data))
    if validate:
        try:
            validate_on_disk(out, keys=keys, expect=expect)
        except BaseException:
            out.close()
            raise
    return out


def read_obs(
    path: str | os.PathLike, *, keys: PerturbationKeys | None = None, validate: bool = True
) -> ad.AnnData:
    """The cells and genes of an ``.h5ad`` file as an AnnData without X, for what needs
    only metadata (splits, scenarios): X is never loaded, only scanned chunk by chunk when
    ``validate`` (raw counts accepted)."""
    with open_h5ad(path, keys=keys, validate=validate, expect="any") as data:
        return ad.AnnData(obs=data.obs, var=data.var)


def h5ad_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(cells, genes) of an ``.h5ad`` file, from the lengths of its obs and var indexes:
    no matrix or table is loaded (anndata's backed mode would load the layers)."""
    import h5py

    from pertbench.data.loading import check_h5ad_file

    path = check_h5ad_file(path)
    try:
        with h5py.File(path, "r") as handle:
            return _table_length(handle["obs"]), _table_length(handle["var"])
    except (KeyError, OSError) as exc:
        raise InputFileError(f"cannot read the shape of '{path}': {exc}") from exc


def _table_length(node: Any) -> int:
    import h5py

    if isinstance(node, h5py.Dataset):  # a legacy (structured array) table
        return int(node.shape[0])
    return int(node[_attr(node, "_index") or "_index"].shape[0])


def _open_file(path: Path) -> OnDiskData:
    import h5py
    from anndata.io import read_elem

    from pertbench.data.loading import check_h5ad_file

    path = check_h5ad_file(path)
    handle = h5py.File(path, "r")
    if any(_attr(handle[key], "encoding-type") != "dataframe" for key in ("obs", "var")):
        handle.close()  # an old anndata layout: anndata's own backed reader understands it
        return _open_legacy(path)
    try:
        if "X" not in handle:
            raise DataValidationError(f"'{path}' has no X; store the expression matrix in X")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="anndata")
            obs = read_elem(handle["obs"])
            var = read_elem(handle["var"])
        layers = dict(handle["layers"].items()) if "layers" in handle else {}
        obsm = dict(handle["obsm"].items()) if "obsm" in handle else {}
        X = OnDiskMatrix(handle["X"], name="X")
    except DataValidationError:
        handle.close()
        raise
    except Exception as exc:  # an old or damaged layout
        handle.close()
        raise InputFileError(
            f"cannot read '{path}' by rows: {type(exc).__name__}: {exc}; rewrite it with a "
            "current anndata (anndata.read_h5ad(path).write_h5ad(new_path))"
        ) from exc
    return OnDiskData(obs=obs, var=var, X=X, layers=layers, obsm=obsm, path=path, handle=handle)


def _open_legacy(path: Path) -> OnDiskData:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings(
                "ignore", category=getattr(ad, "OldFormatWarning", FutureWarning)
            )
            adata = ad.read_h5ad(path, backed="r")
    except Exception as exc:  # a damaged file of an old layout
        raise InputFileError(
            f"cannot read '{path}' as AnnData: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        data = _wrap_anndata(adata)
    except BaseException:
        adata.file.close()
        raise
    data._handle = adata.file
    return data


def _wrap_anndata(adata: ad.AnnData) -> OnDiskData:
    if adata.isbacked and adata.is_view:
        raise DataValidationError(
            "a view of a backed AnnData cannot be read by rows; pass the whole backed AnnData "
            "(and a split saying which cells to use)"
        )
    X = adata.X
    if X is None:
        raise DataValidationError("X is empty (None); store log-normalised expression in X")
    return OnDiskData(
        obs=adata.obs,
        var=adata.var,
        X=OnDiskMatrix(X, name="X"),
        layers=dict(adata.layers.items()),
        obsm=dict(adata.obsm.items()),
        path=Path(adata.filename) if adata.isbacked else None,
    )


def validate_on_disk(
    data: OnDiskData,
    *,
    keys: PerturbationKeys | None = None,
    expect: Literal["log", "any"] = "log",
    raise_errors: bool = True,
):
    """Check an :class:`OnDiskData` against the data contract, reading X chunk by chunk.

    ``expect`` as for :func:`open_h5ad`. Returns the
    :class:`~pertbench.data.loading.ValidationReport`; raises
    :class:`~pertbench.errors.DataValidationError` on a fatal problem (with
    ``raise_errors``; else the problems are in the report).
    """
    from pertbench.data.loading import (
        ValidationReport,
        _check_names,
        _check_obs,
        _check_values,
    )

    keys = keys if keys is not None else PerturbationKeys()
    report = ValidationReport(n_cells=data.n_obs, n_genes=data.n_vars)
    report.has_counts_layer = "counts" in data.layer_names
    report.x_format = data.X.format
    stats = scan_matrix(data.X)
    if raise_errors and expect == "log" and stats.value_type == "counts" and not stats.n_negative:
        raise DataValidationError(
            f"X holds raw counts (integers up to {stats.maximum:.0f}); reading by rows uses X "
            "as stored: normalise it first (pertbench preprocess) or read it in memory"
        )
    _check_values(report, stats, expect=expect)
    _check_names(report, data.var_names, data.obs_names)
    _check_obs(data.obs, keys, report)
    if raise_errors:
        report.raise_if_errors()
    return report


def scan_matrix(matrix: OnDiskMatrix):
    """:func:`~pertbench.data.loading.scan_values` of a whole matrix, chunk by chunk."""
    from pertbench.data.loading import ValueStats, scan_values

    total = ValueStats(minimum=np.inf, maximum=-np.inf)
    stored = 0
    for values in matrix.stored_values():
        part = scan_values(values)
        stored += values.size
        total.n_nan += part.n_nan
        total.n_posinf += part.n_posinf
        total.n_neginf += part.n_neginf
        total.n_negative += part.n_negative
        total.nnz += part.nnz
        total.all_integer &= part.all_integer
        if part.n_nan + part.n_posinf + part.n_neginf < values.size:  # has finite values
            total.minimum = min(total.minimum, part.minimum)
            total.maximum = max(total.maximum, part.maximum)
    total.size = int(np.prod(matrix.shape))
    if stored < total.size:  # implicit zeros of sparse storage
        total.minimum = min(total.minimum, 0.0)
        total.maximum = max(total.maximum, 0.0)
    if not np.isfinite(total.minimum):
        total.minimum = total.maximum = 0.0
    return total


def prefer_out_of_core(path: str | os.PathLike, *, threshold: int | None = None) -> bool:
    """The rule of ``pertbench train/predict`` without ``--out-of-core/--in-memory``.

    True when X and the layers of the file would take at least ``threshold`` bytes
    (default :data:`OUT_OF_CORE_BYTES`, 1 GiB) in memory: their sizes uncompressed, read
    from the file's metadata.
    """
    threshold = OUT_OF_CORE_BYTES if threshold is None else int(threshold)
    with open_h5ad(path, validate=False) as data:
        return data.matrices_nbytes() >= threshold


def _member(store: dict[str, Any], key: str, where: str, fix: str) -> OnDiskMatrix:
    if key not in store:
        available = ", ".join(store) or "none"
        raise DataValidationError(f"{where} has no entry '{key}' (available: {available}); {fix}")
    return OnDiskMatrix(store[key], name=f"{where}/{key}")


def _sparse_layout(group: Any) -> tuple[str, tuple[int, ...]]:
    """(encoding, shape) of a sparse matrix group, in the current layout
    (``encoding-type``, ``shape``) or the old ``h5sparse`` one."""
    legacy = _attr(group, "h5sparse_format")
    if legacy and not _attr(group, "encoding-type"):
        return f"{legacy}_matrix", tuple(int(s) for s in group.attrs["h5sparse_shape"])
    shape = group.attrs.get("shape")
    return _attr(group, "encoding-type"), tuple(int(s) for s in shape) if shape is not None else ()


def _attr(node: Any, name: str) -> str:
    value = node.attrs.get(name, "")
    return value.decode() if isinstance(value, bytes) else str(value)


def _windows(rows: np.ndarray, window_rows: int, max_gap: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) positions in increasing ``rows`` of the runs read as one slice each."""
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    bounds = np.concatenate([[0], breaks, [rows.size]])
    for lo, hi in itertools.pairwise(bounds.tolist()):
        while lo < hi:  # a run spans at most window_rows rows
            stop = lo + int(np.searchsorted(rows[lo:hi], rows[lo] + window_rows, side="left"))
            stop = max(stop, lo + 1)
            yield lo, stop
            lo = stop
