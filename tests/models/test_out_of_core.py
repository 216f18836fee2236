"""Out-of-core training and chunked prediction from an on-disk .h5ad file."""

from __future__ import annotations

import json

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from model_helpers import SMALL

from pertbench.cli.main import main
from pertbench.data import ondisk
from pertbench.data.ondisk import open_h5ad, prefer_out_of_core
from pertbench.data.simulate import simulate_to_h5ad
from pertbench.data.splits import make_task_split, read_split, write_split
from pertbench.errors import DataValidationError
from pertbench.models import create_model
from pertbench.models.blocks import BlockLoader, BlockSampling, DiskCells
from pertbench.models.encoding import CategoryEncoding

FIELDS = ("x", "pert", "cov", "cov_codes")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small simulated file (controls of every covariate, raw counts in a layer) and a split."""
    folder = tmp_path_factory.mktemp("ooc")
    path = folder / "sim.h5ad"
    simulate_to_h5ad(
        path,
        n_covariates=2,
        n_perturbations=6,
        n_combinations=2,
        n_cells_per_group=12,
        n_genes=40,
        seed=3,
    )
    adata = ad.read_h5ad(path)
    split = make_task_split(adata, "transfer", seed=0).split
    split_path = write_split(split, folder / "split.csv")
    return path, adata, split, split_path


def _fit(model, params, data, split, sampling=None, epochs=2):
    estimator = create_model(model, **SMALL[model], **params, batch_size=32, max_epochs=epochs)
    return estimator.fit(data, split, seed=1, device="cpu", progress=False, sampling=sampling)


def _same_weights(a, b) -> bool:
    left, right = a.module.state_dict(), b.module.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize(
    "model, params",
    [("latent_additive", {}), ("cpa_noadv", {"likelihood": "nb"})],  # matched controls; counts
)
def test_training_equals_in_memory_when_one_buffer_covers_the_data(dataset, model, params):
    path, adata, split, _ = dataset
    in_memory = _fit(model, params, adata, split)
    # many small blocks, all in one buffer: the buffer is every cell in file order
    covering = BlockSampling(block_size=16, buffer_blocks=1000)
    from_path = _fit(model, params, path, split, covering)
    assert _same_weights(in_memory, from_path)
    pd.testing.assert_frame_equal(in_memory.history, from_path.history, check_exact=True)
    backed = ad.read_h5ad(path, backed="r")
    assert _same_weights(in_memory, _fit(model, params, backed, split, covering))
    # smaller buffers reorder the cells: another (valid) training run
    shuffled = _fit(model, params, path, split, BlockSampling(block_size=8, buffer_blocks=2))
    assert np.isfinite(shuffled.history["train_loss"]).all()
    assert not _same_weights(in_memory, shuffled)


def test_block_order_batches_and_matched_controls(dataset):
    path, adata, split, _ = dataset
    train_rows = np.flatnonzero(split.to_numpy() == "train")
    encoding = CategoryEncoding.fit(adata.obs.iloc[train_rows], create_model("linear").keys)
    genes = pd.Index(adata.var_names)
    sampling = BlockSampling(block_size=7, buffer_blocks=3)  # buffers end mid-batch
    with open_h5ad(path) as data:
        cells = DiskCells(data, train_rows, encoding, genes=genes)
        pool = cells.controls()
        loader = BlockLoader(
            cells,
            sampling=sampling,
            batch_size=10,
            seed=5,
            fields=FIELDS,
            controls=pool,
            control_fields={"ctrl": "x"},
        )
        matched = {}
        for epoch in (0, 1):
            buffers = list(loader.buffers(epoch))
            stream = np.concatenate([pos[order] for pos, order, _ in buffers])
            controls = np.concatenate([ctrl for _, _, ctrl in buffers])
            # every training cell once per epoch; a buffer spans at most buffer_blocks blocks
            np.testing.assert_array_equal(np.sort(stream), loader.rows)
            assert all(
                np.unique(pos // sampling.block_size).size <= sampling.buffer_blocks
                for pos, _, _ in buffers
            )
            # matched controls: control cells of the same covariates as their targets
            assert pool.is_control[controls].all()
            targets = adata.obs.iloc[train_rows[stream]]["cell_type"].to_numpy()
            pool_rows = train_rows[np.flatnonzero(cells.is_control)][controls]
            np.testing.assert_array_equal(adata.obs["cell_type"].to_numpy()[pool_rows], targets)
            matched[epoch] = (stream, pool_rows)
            # the batches hold exactly these cells, cut across buffer boundaries
            batches = list(loader(epoch))
            assert [len(b["x"]) for b in batches[:-1]] == [10] * (len(batches) - 1)
            dense = adata.X.toarray()
            np.testing.assert_array_equal(
                torch.cat([b["x"] for b in batches]).numpy(), dense[train_rows[stream]]
            )
            np.testing.assert_array_equal(
                torch.cat([b["ctrl"] for b in batches]).numpy(), dense[pool_rows]
            )
        # reshuffled and re-matched every epoch
        assert not np.array_equal(matched[0][0], matched[1][0])
        order = np.argsort(matched[0][0])
        again = np.argsort(matched[1][0])
        assert (matched[0][1][order] != matched[1][1][again]).any()


def test_chunked_prediction_equals_in_memory_exactly(dataset, tmp_path):
    path, adata, split, _ = dataset
    model = _fit("latent_additive", {}, adata, split, epochs=1)
    model.predict_batch_size = 2  # several batches and chunks on this small request
    expected = model.predict_split(adata, split)
    expected.write_h5ad(tmp_path / "memory.h5ad")
    out = model.predict_split_to_h5ad(path, split, tmp_path / "chunked.h5ad", chunk_cells=3)
    assert model.split_plan(adata, split).n_cells > 2 * 4  # chunks of 4 rows (2 batches)
    want, got = ad.read_h5ad(tmp_path / "memory.h5ad"), ad.read_h5ad(out)
    np.testing.assert_array_equal(got.X, want.X)
    pd.testing.assert_frame_equal(got.obs, want.obs)
    pd.testing.assert_frame_equal(got.var, want.var)
    assert got.uns["pertbench"] == want.uns["pertbench"]
    # a baseline trained from the file (its cells read into memory) agrees too; it notes a
    # fallback about the whole request, so it is predicted in one chunk, notes kept
    baseline = create_model("additive_within").fit(path, split, progress=False)
    reference = create_model("additive_within").fit(adata, split, progress=False)
    reference.predict_split(adata, split).write_h5ad(tmp_path / "baseline_memory.h5ad")
    baseline.predict_split_to_h5ad(path, split, tmp_path / "baseline.h5ad", chunk_cells=1)
    want, got = (
        ad.read_h5ad(tmp_path / "baseline_memory.h5ad"),
        ad.read_h5ad(tmp_path / "baseline.h5ad"),
    )
    np.testing.assert_array_equal(got.X, want.X)
    assert list(got.uns["pertbench"]["notes"]) == list(want.uns["pertbench"]["notes"])
    assert "G19 in CT0" in want.uns["pertbench"]["notes"][0]


def test_take_reads_scattered_rows_in_windows(tmp_path):
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.4, size=(300, 25)).astype(np.float32)
    adata = ad.AnnData(X=sp.csr_matrix(dense), layers={"dense": dense})
    adata.write_h5ad(tmp_path / "m.h5ad")
    rows = np.sort(rng.choice(300, size=120, replace=False))
    with open_h5ad(tmp_path / "m.h5ad", validate=False) as data:
        for matrix in (data.X, data.layer("dense")):
            got = matrix.take(rows, window_rows=17, max_gap=2)  # many windows, with gaps
            got = got.toarray() if sp.issparse(got) else got
            np.testing.assert_array_equal(got, dense[rows])
            assert matrix.read(250, 300).shape == (50, 25)


def test_file_checks_and_the_out_of_core_rule(dataset, tmp_path, monkeypatch):
    path, adata, _, _ = dataset
    csc = adata.copy()
    csc.X = sp.csc_matrix(csc.X)
    csc.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(DataValidationError, match="column-compressed"):
        open_h5ad(tmp_path / "csc.h5ad")
    counts = ad.AnnData(X=adata.layers["counts"], obs=adata.obs, var=adata.var)
    counts.write_h5ad(tmp_path / "counts.h5ad")
    with pytest.raises(DataValidationError, match="raw counts"):
        open_h5ad(tmp_path / "counts.h5ad")
    with open_h5ad(tmp_path / "counts.h5ad", expect="any") as data:  # fine for obs-only uses
        assert data.n_obs == adata.n_obs
    bad = adata.copy()
    bad.X = bad.X.toarray()
    bad.X[3, 2] = np.nan
    bad.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(DataValidationError, match="1 NaN value"):
        open_h5ad(tmp_path / "nan.h5ad")
    # the rule: X and layers (counts) at their uncompressed size against the threshold
    with h5py.File(path, "r") as handle:
        stored = sum(
            handle[m][k].size * handle[m][k].dtype.itemsize
            for m in ("X", "layers/counts")
            for k in ("data", "indices", "indptr")
        )
    assert prefer_out_of_core(path, threshold=stored)
    assert not prefer_out_of_core(path, threshold=stored + 1)
    assert not prefer_out_of_core(path)  # a small file stays in memory by default


def test_cli_train_and_predict_out_of_core(dataset, tmp_path, monkeypatch):
    path, adata, _, split_path = dataset
    common = ["--model", "latent_additive", "--split", str(split_path), "--epochs", "1"]
    common += ["--set", "encoder_width=32", "--set", "latent_dim=8", "--no-progress"]
    assert main(["train", str(path), *common, "--out", str(tmp_path / "mem"), "--in-memory"]) == 0
    monkeypatch.setattr(ondisk, "OUT_OF_CORE_BYTES", 0)  # the automatic rule picks disk
    disk_args = ["train", str(path), *common, "--out", str(tmp_path / "disk")]
    assert main([*disk_args, "--block-size", "4096", "--buffer-blocks", "1"]) == 0
    run = json.loads((tmp_path / "disk" / "run.json").read_text())
    assert run["data_loading"] == {"out_of_core": True, "block_size": 4096, "buffer_blocks": 1}
    for name, mode in (("mem", ["--in-memory"]), ("disk", [])):  # disk: chunk by chunk
        out = ["--out", str(tmp_path / f"{name}.h5ad"), *mode]
        assert main(["predict", str(tmp_path / name), "--data", str(path), *out]) == 0
    memory, disk = ad.read_h5ad(tmp_path / "mem.h5ad"), ad.read_h5ad(tmp_path / "disk.h5ad")
    np.testing.assert_array_equal(memory.X, disk.X)  # same weights, same predictions
    pd.testing.assert_frame_equal(memory.obs, disk.obs)
    # split reads only obs of a large file: the same split as in memory
    assert main(["split", str(path), "--task", "transfer", "--out", str(tmp_path / "s.csv")]) == 0
    pd.testing.assert_series_equal(
        read_split(tmp_path / "s.csv", adata.obs_names), read_split(split_path, adata.obs_names)
    )
