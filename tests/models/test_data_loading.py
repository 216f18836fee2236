"""Batching from sparse X and vectorised matched controls, checked against direct computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pertbench.data import PerturbationKeys
from pertbench.models.data import (
    NO_CONTROL,
    BatchLoader,
    CellTable,
    ControlMatcher,
    covariate_state_codes,
    dense_rows,
)
from pertbench.models.encoding import CategoryEncoding


def test_dense_rows_matches_scipy_for_any_row_order():
    rng = np.random.default_rng(0)
    X = sp.random(200, 37, density=0.1, format="csr", random_state=1, dtype=np.float32)
    keep = np.ones(200)
    keep[5] = 0  # an empty row
    X = sp.csr_matrix(sp.diags(keep.astype(np.float32)) @ X)
    X.eliminate_zeros()
    assert X[5].nnz == 0
    rows = rng.integers(0, 200, size=300)  # repeats and arbitrary order
    rows[:3] = [5, 5, 199]
    dense = X.toarray()  # the reference: densify everything, then index
    np.testing.assert_array_equal(dense_rows(X, rows), dense[rows])
    out = np.full((rows.size, 37), 7.0, dtype=np.float32)  # stale buffer is cleared
    np.testing.assert_array_equal(dense_rows(X, rows, out=out), dense[rows])
    assert dense_rows(X.astype(np.float64), rows).dtype == np.float32
    np.testing.assert_array_equal(dense_rows(dense, rows), dense[rows])
    assert dense_rows(X, np.array([], dtype=np.int64)).shape == (0, 37)


def test_state_codes_are_unique_per_combination():
    codes = np.array([[0, 0], [0, 1], [1, 0], [1, 2], [0, 1]])
    state = covariate_state_codes(codes, [2, 3])
    assert state.tolist() == [0, 1, 3, 5, 1]
    assert covariate_state_codes(np.zeros((4, 0), dtype=np.int64), []).tolist() == [0] * 4


def test_matcher_draws_only_controls_of_the_same_state_uniformly():
    rng = np.random.default_rng(0)
    pool_states = np.array([2, 0, 2, 1, 0, 2, 2])
    pool_rows = np.array([10, 11, 12, 13, 14, 15, 16])
    matcher = ControlMatcher(pool_states, pool_rows)
    queries = np.repeat([0, 1, 2, 3, 9], 4000)
    drawn = matcher.draw(queries, rng)
    lookup = dict(zip(pool_rows, pool_states, strict=True))
    for state in (0, 1, 2):
        got = drawn[queries == state]
        assert {lookup[r] for r in got} == {state}
        expected = set(pool_rows[pool_states == state])
        assert set(got) == expected  # every control of the state can be drawn
        # uniform: each candidate about 1/k of the draws (k <= 4, 4000 draws)
        freq = pd.Series(got).value_counts(normalize=True)
        assert np.allclose(freq.to_numpy(), 1 / len(expected), atol=0.03)
    assert (drawn[(queries == 3) | (queries == 9)] == NO_CONTROL).all()
    # same generator state -> same draws
    again = matcher.draw(queries, np.random.default_rng(0))
    np.testing.assert_array_equal(again, drawn)


def _table(adata):
    keys = PerturbationKeys()
    enc = CategoryEncoding.fit(adata.obs, keys)
    genes = pd.Index(adata.var_names)
    return CellTable.from_adata(adata, enc, genes=genes, counts_layer="counts"), enc


def test_cell_table_encodes_like_the_encoding(toy_adata):
    table, enc = _table(toy_adata)
    assert sp.isspmatrix_csr(table.arrays["x"]) or sp.issparse(table.arrays["x"])
    rows = np.array([0, 100, 599])
    np.testing.assert_allclose(
        table.take("x", rows).numpy(), toy_adata.X[rows].toarray(), rtol=1e-6
    )
    pert = table.take("pert", rows).numpy()
    expected = enc.perturbation_matrix(toy_adata.obs.condition.iloc[rows]).toarray()
    np.testing.assert_array_equal(pert, expected)
    lib = table.take("library", rows).numpy()
    np.testing.assert_allclose(
        lib, np.asarray(toy_adata.layers["counts"][rows].sum(axis=1)).ravel()
    )
    assert table.take("cov_codes", rows).dtype == torch.int64
    assert table.is_control.sum() == (toy_adata.obs.condition == "control").sum()


def test_loader_matches_controls_of_same_covariates_and_resamples(toy_adata):
    table, _ = _table(toy_adata)
    loader = BatchLoader(
        table,
        batch_size=64,
        seed=3,
        fields=("x", "cov_codes"),
        controls=table,
        control_fields={"ctrl": "x"},
        shuffle=True,
    )
    order0, ctrl0 = loader.epoch_plan(0)
    order1, ctrl1 = loader.epoch_plan(1)
    assert sorted(order0.tolist()) == list(range(table.n_cells))  # a permutation
    assert table.is_control[ctrl0].all()
    np.testing.assert_array_equal(table.state_codes[ctrl0], table.state_codes[order0])
    assert not np.array_equal(order0, order1)  # reshuffled every epoch
    # re-matched every epoch: the same cell gets other controls
    pos0 = np.argsort(order0)
    pos1 = np.argsort(order1)
    assert (ctrl0[pos0] != ctrl1[pos1]).mean() > 0.5
    # the batches carry exactly those rows, densified
    batches = list(loader(0))
    assert sum(b["x"].shape[0] for b in batches) == table.n_cells
    first = batches[0]
    np.testing.assert_allclose(first["x"].numpy(), toy_adata.X[order0[:64]].toarray(), rtol=1e-6)
    np.testing.assert_allclose(first["ctrl"].numpy(), toy_adata.X[ctrl0[:64]].toarray(), rtol=1e-6)
    # same seed -> identical plan; another seed -> different
    again = BatchLoader(
        table,
        batch_size=64,
        seed=3,
        fields=("x",),
        controls=table,
        control_fields={"ctrl": "x"},
    ).epoch_plan(0)
    np.testing.assert_array_equal(again[1], ctrl0)
    other = BatchLoader(
        table,
        batch_size=64,
        seed=4,
        fields=("x",),
        controls=table,
        control_fields={"ctrl": "x"},
    ).epoch_plan(0)
    assert not np.array_equal(other[0], order0)


def test_fixed_loader_is_identical_every_epoch_and_drops_unmatched(toy_adata):
    table, _ = _table(toy_adata)
    c0_controls = np.flatnonzero(table.is_control & (table.state_codes == 0))
    pool = table.subset(c0_controls)  # only controls of the first cell type
    with pytest.warns(UserWarning, match="no control of the same covariates"):
        loader = BatchLoader(
            table,
            batch_size=50,
            seed=0,
            fields=("x",),
            controls=pool,
            control_fields={"ctrl": "x"},
            shuffle=False,
        )
    assert loader.n_dropped == int((table.state_codes != 0).sum())
    a = [b["ctrl"] for b in loader(0)]
    b = [b["ctrl"] for b in loader(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_prefetched_batches_are_identical_and_errors_propagate(toy_adata):
    from pertbench.models.data import prefetched

    table, _ = _table(toy_adata)
    kwargs = dict(
        batch_size=50, seed=1, fields=("x", "pert"), controls=table, control_fields={"ctrl": "x"}
    )
    inline = list(BatchLoader(table, **kwargs)(2))
    ahead = list(BatchLoader(table, prefetch=2, **kwargs)(2))
    assert len(inline) == len(ahead) == -(-table.n_cells // 50)
    for a, b in zip(inline, ahead, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def failing():
        yield 1
        raise ValueError("boom")

    it = prefetched(failing(), depth=1)
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    # stopping early joins the producer instead of leaving it blocked
    import threading

    gen = prefetched(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()
    assert not any(t.name == "pertbench-prefetch" for t in threading.enumerate())


def test_device_side_densification_gives_the_same_batches(toy_adata):
    from pertbench.models.training import move_batch

    table, _ = _table(toy_adata)
    kwargs = dict(
        batch_size=64,
        seed=2,
        fields=("x", "pert", "cov_codes"),
        controls=table,
        control_fields={"ctrl": "x"},
    )
    dense = list(BatchLoader(table, **kwargs)(0))
    shipped = list(BatchLoader(table, densify_on_device=True, **kwargs)(0))
    assert shipped[0]["x"].layout == torch.sparse_csr  # only the non-zeros travel
    assert shipped[0]["cov_codes"].layout == torch.strided
    for a, b in zip(dense, shipped, strict=True):
        b = move_batch(b, "cpu")
        assert all(torch.equal(a[k], b[k]) for k in a)
