"""RO-Crate packaging: metadata parsed back by the rocrate library, checksums, re-runnable config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from rocrate.rocrate import ROCrate

from bench_helpers import SLEEPY, small_config, small_run
from pertbench.benchmark import paths
from pertbench.benchmark.config import load_config, parse_config
from pertbench.benchmark.runner import run_benchmark
from pertbench.report.crate import CRATE_FILE


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("bench"))


def test_crate_parses_back_and_lists_everything(run):
    out = run.out_dir
    assert run.crate == out / CRATE_FILE
    crate = ROCrate(out)  # the library reads and validates the JSON-LD graph
    ids = {e.id for e in crate.get_entities()}
    for rel in (
        paths.CONFIG_FILE,
        paths.MANIFEST_FILE,
        paths.RESULTS_PARQUET,
        paths.RESULTS_CSV,
        paths.REPORT_FILE,
        "datasets/sim.h5ad",
        "cells/",
    ):
        assert rel in ids, rel
    splits = [e for e in crate.data_entities if e.id.startswith("splits/")]
    assert len(splits) == 2
    for entity in crate.data_entities:
        if "sha256" in entity.properties():
            assert entity["sha256"] == _sha256(out / entity.id), entity.id
    dataset = crate.dereference("datasets/sim.h5ad")
    assert dataset["sha256"] == _sha256(out / "datasets" / "sim.h5ad")
    assert "simulated by pertbench.data.simulate" in dataset["description"]
    software = {e["name"]: e["version"] for e in crate.get_by_type("SoftwareApplication")}
    import optuna
    import torch

    from pertbench import __version__

    assert software["pertbench"] == __version__
    assert (
        software["torch"] == torch.__version__.split("+")[0]
        or software["torch"] == torch.__version__
    )
    assert software["optuna"] == optuna.__version__
    actions = crate.get_by_type("CreateAction")
    assert len(actions) == 1
    action = actions[0]
    assert action["instrument"].id == "#software-pertbench"
    assert {e.id for e in action["object"]} >= {paths.CONFIG_FILE, "datasets/sim.h5ad"}
    assert {e.id for e in action["result"]} >= {paths.RESULTS_PARQUET, paths.REPORT_FILE}
    assert crate.mainEntity.id == paths.CONFIG_FILE


def test_config_in_the_crate_reruns_the_same_benchmark(run, tmp_path):
    """DIR/config.yaml is self-contained: it parses to the run's config from anywhere."""
    moved = tmp_path / "elsewhere" / "config.yaml"
    moved.parent.mkdir()
    moved.write_text((run.out_dir / paths.CONFIG_FILE).read_text())
    original = parse_config(small_config(), base_dir=tmp_path)
    assert load_config(moved).to_dict() == original.to_dict()


def test_external_dataset_is_referenced_with_its_checksum(tmp_path, make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=4, n_cells=12, n_controls=20, n_genes=20)
    data = tmp_path / "inputs" / "toy.h5ad"
    data.parent.mkdir()
    adata.write_h5ad(data)
    raw = small_config(
        datasets={"toy": {"path": str(data)}},
        tasks={"transfer": {"task": "transfer", "options": {"fraction": 0.5}}},
        models={"shift": {"model": SLEEPY}},
        seeds=[0],
    )
    result = run_benchmark(
        parse_config(raw, base_dir=tmp_path), out=tmp_path / "run", log=lambda m: None
    )
    crate = ROCrate(result.out_dir)
    entity = crate.dereference(data.as_uri())
    assert entity is not None, "the input file is referenced by absolute URI"
    assert entity["sha256"] == _sha256(data)
    assert not (result.out_dir / "datasets").exists()  # read in place, never copied
    metadata = json.loads((result.out_dir / CRATE_FILE).read_text())
    assert metadata["@context"].startswith("https://w3id.org/ro/crate/1.")
    config = yaml.safe_load((result.out_dir / paths.CONFIG_FILE).read_text())
    assert config["datasets"]["toy"]["path"] == str(data)
