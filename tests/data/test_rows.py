"""RowReader: rows of X from memory or from a file on disk, identical to plain indexing; files
opened by rows read obs and var only."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from pertbench.data.loading import scan_values
from pertbench.data.ondisk import RowReader, _windows, is_backed_matrix, open_h5ad
from pertbench.metrics.aggregations import group_stats


def _dense(M):
    return M.toarray() if sp.issparse(M) else np.asarray(M)


@pytest.fixture
def stored(make_toy, tmp_path):
    """The same toy data as CSR and as dense, in memory and backed on disk."""
    toy = make_toy(n_covariates=2, n_perturbations=4, n_genes=25)
    dense = toy.copy()
    dense.X = toy.X.toarray()
    out = {}
    for name, adata in (("csr", toy), ("dense", dense)):
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        out[name] = (adata, ad.read_h5ad(path, backed="r"))
    return out


@pytest.mark.parametrize("kind", ["csr", "dense"])
def test_rows_in_any_order_with_repeats_and_columns(stored, kind):
    memory, backed = stored[kind]
    assert is_backed_matrix(backed.X) and not is_backed_matrix(memory.X)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, memory.n_obs, size=300)  # unsorted, with repeats
    columns = rng.permutation(memory.n_vars)[:10]
    expected = _dense(memory.X)[rows][:, columns]
    for X in (memory.X, backed.X):
        for window, gap in ((4096, 64), (7, 0), (1, 3)):  # one slice, many small windows
            reader = RowReader(X, columns=columns, window_rows=window, max_gap=gap)
            got = reader.read(rows)
            assert sp.issparse(got) == (kind == "csr")
            assert got.dtype == memory.X.dtype
            np.testing.assert_array_equal(_dense(got), expected)
    sub = RowReader(backed.X, rows=rows[::-1], columns=columns)  # a row-mapped reader
    assert sub.shape == (300, 10)
    np.testing.assert_array_equal(_dense(sub.read(np.arange(5))), expected[::-1][:5])
    assert RowReader(backed.X).read(np.array([], dtype=int)).shape == (0, memory.n_vars)


def test_windows_cover_every_row_once_and_respect_the_bounds():
    rows = np.array([0, 1, 2, 10, 11, 50, 51, 52, 53, 54, 200])
    spans = list(_windows(rows, window_rows=3, max_gap=8))
    assert [r for lo, hi in spans for r in rows[lo:hi]] == rows.tolist()
    for lo, hi in spans:
        assert rows[hi - 1] - rows[lo] < 3  # at most window_rows rows read per slice
        assert np.all(np.diff(rows[lo:hi]) <= 9)  # gaps of at most max_gap rows merged


def test_group_stats_and_scan_values_from_disk_equal_in_memory(stored):
    memory, backed = stored["csr"]
    codes = np.random.default_rng(1).integers(-1, 5, size=memory.n_obs)
    for chunk in (60, 2_000_000):  # many small reads, one read
        a = group_stats(memory.X, codes, 5, chunk_elements=chunk)
        b = group_stats(RowReader(backed.X), codes, 5, chunk_elements=chunk)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    for kind in ("csr", "dense"):
        in_memory, on_disk = (scan_values(M.X) for M in stored[kind])
        assert in_memory == on_disk


def test_open_h5ad_reads_obs_and_var_only_and_x_by_rows(make_toy, tmp_path, kang_path, kang_adata):
    toy = make_toy(n_covariates=2, n_perturbations=3, n_genes=12)  # has a counts layer
    toy.write_h5ad(tmp_path / "toy.h5ad")
    with open_h5ad(tmp_path / "toy.h5ad", validate=False) as opened:
        # layers and X stay on disk (HDF5 objects), only obs and var are in memory
        assert not opened.X.in_memory and not opened.layer("counts").in_memory
        assert opened.obs.equals(toy.obs) and opened.var_names.equals(toy.var_names)
        np.testing.assert_array_equal(
            RowReader(opened.X).read(np.arange(5)).toarray(), toy.X[:5].toarray()
        )
    # an old layout (obs as a structured array, X in the h5sparse layout): anndata's own
    # backed reader, X still read by rows
    with open_h5ad(kang_path, validate=False) as legacy:
        assert legacy.n_obs == 1975 and not legacy.X.in_memory and legacy.X.format == "csr"
        rows = np.array([1900, 3, 3, 700])
        np.testing.assert_array_equal(
            RowReader(legacy.X).read(rows).toarray(), kang_adata.X[rows].toarray()
        )
