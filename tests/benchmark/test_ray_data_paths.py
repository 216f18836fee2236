"""The Ray backend ships paths, not data: every worker reads the dataset from the shared path."""

from __future__ import annotations

import json
import os
import pickle

import anndata as ad
import numpy as np
import pytest

import pertbench.data.loading
from bench_helpers import SleepyShift, small_config
from pertbench.benchmark.config import parse_config
from pertbench.benchmark.materialize import read_manifest
from pertbench.benchmark.runner import build_jobs, run_benchmark
from pertbench.data.ondisk import OnDiskMatrix
from pertbench.data.simulate import simulate_to_h5ad
from pertbench.data.splits import read_split

WORKER_FILE = "worker.json"


class WorkerProbe(SleepyShift):
    """SleepyShift that writes down which process trained it, on how much data."""

    name = "worker_probe"

    def _fit(self, train, val, context) -> None:
        super()._fit(train, val, context)
        record = {"pid": os.getpid(), "n_obs": int(train.n_obs), "nnz": int(train.X.nnz)}
        (context.log_dir / WORKER_FILE).write_text(json.dumps(record))


PROBE = f"{__name__}:WorkerProbe"


@pytest.mark.ray
def test_ray_workers_read_the_dataset_from_its_path(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    shared = tmp_path / "shared" / "screen.h5ad"  # a dataset on the shared file system
    simulate_to_h5ad(shared, n_covariates=2, n_perturbations=6, n_cells_per_group=30, seed=1)
    config = parse_config(
        small_config(
            datasets={"screen": {"path": str(shared)}},
            models={"probe": {"model": PROBE}},
            tasks={"transfer": {"task": "transfer", "options": {"fraction": 0.5}}},
            seeds=[0, 1],
        ),
        base_dir=tmp_path,
    )
    # The driver (this process) must never load an expression matrix.
    loaded: list[str] = []
    read_h5ad, take = ad.read_h5ad, OnDiskMatrix.take

    def spy_read(filename, *args, **kwargs):  # backed mode too: it loads the layers
        loaded.append(f"anndata.read_h5ad({filename})")
        return read_h5ad(filename, *args, **kwargs)

    def spy_take(self, rows, **kwargs):
        loaded.append(f"rows of {self.name}")
        return take(self, rows, **kwargs)

    monkeypatch.setattr(ad, "read_h5ad", spy_read)
    monkeypatch.setattr(pertbench.data.loading.ad, "read_h5ad", spy_read)
    monkeypatch.setattr(OnDiskMatrix, "take", spy_take)
    out = tmp_path / "bench"
    try:
        result = run_benchmark(
            config, out=out, workers=2, backend="ray", report=False, log=lambda _: None
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert (result.results["status"] == "ok").all()
    assert loaded == []

    # Jobs carry the dataset's path (in place, not copied), never its arrays.
    manifest = read_manifest(out)
    assert manifest["datasets"]["screen"]["path"] == str(shared.resolve())
    jobs, _ = build_jobs(config, out, manifest, threads=1)
    sizes = [len(pickle.dumps(job)) for job in jobs.values()]
    assert len(jobs) == len(list(out.glob("cells/**/done.json")))  # every job ran
    assert all(job.data_path == str(shared.resolve()) for job in jobs.values())
    assert max(sizes) < 4096 < shared.stat().st_size / 50

    # Each probe cell was trained in a Ray worker, on the training cells read from the file.
    truth = read_h5ad(shared)
    split = read_split(manifest["splits"]["screen|transfer|full"]["path"], truth.obs_names)
    train = (split == "train").to_numpy()
    records = [json.loads(p.read_text()) for p in out.glob(f"cells/**/{WORKER_FILE}")]
    assert len(records) == 2
    assert all(r["pid"] != os.getpid() for r in records)
    assert all(r["n_obs"] == int(train.sum()) for r in records)
    assert all(r["nnz"] == truth.X[np.flatnonzero(train)].nnz for r in records)
