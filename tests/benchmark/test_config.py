"""Benchmark config validation: every mistake is a one-line ConfigError naming key and fix."""

from __future__ import annotations

import pytest
import yaml

from pertbench.benchmark.config import (
    FULL_SCENARIO,
    default_config_path,
    dump_config,
    load_config,
    parse_config,
)
from pertbench.errors import ConfigError, InputFileError

SIM = {"simulate": {"n_covariates": 3, "n_perturbations": 6, "n_genes": 40, "seed": 1}}


def minimal(**changes):
    raw = {
        "name": "t",
        "datasets": {"sim": dict(SIM)},
        "tasks": {"transfer": {"task": "transfer"}},
        "models": {"linear": {"params": {"lr": 0.001}}},
        "seeds": [0, 1],
    }
    raw.update(changes)
    return raw


def test_minimal_config_fills_defaults_and_baselines(tmp_path):
    config = parse_config(minimal(), base_dir=tmp_path)
    assert list(config.models)[:1] == ["linear"]
    assert {"no_change", "perturbation_mean", "covariate_mean"} <= set(config.models)
    assert config.models["no_change"].is_baseline
    assert config.seeds == (0, 1)
    assert config.on == "test"
    assert config.tasks["transfer"].datasets == ("sim",)
    assert config.scenario_names("transfer") == [FULL_SCENARIO]
    assert config.datasets["sim"].keys.covariate_keys == ("cell_type",)


def test_canonical_form_round_trips(tmp_path):
    raw = minimal(
        scenarios={"imbalance": {"entropy": [0.9, 0.8], "options": {"min_perturbations": 2}}},
        models={"lin": {"model": "linear", "tune": {"n_trials": 3}}, "latent_additive": None},
    )
    config = parse_config(raw, base_dir=tmp_path)
    text = dump_config(config)
    again = parse_config(yaml.safe_load(text), base_dir=tmp_path)
    assert again.to_dict() == config.to_dict()
    assert config.scenario_names("transfer") == ["full", "imbalance_0.9", "imbalance_0.8"]
    assert config.models["lin"].tune.n_trials == 3
    assert config.models["latent_additive"].model == "latent_additive"
    assert config.models["latent_additive"].params == {}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"modles": {}}, "unknown key 'modles'; did you mean 'models'"),
        ({"models": {"foo": {}}}, r"models.foo.model: unknown model 'foo'"),
        (
            {"models": {"linear": {"params": {"nope": 1}}}},
            r"models.linear.params: model 'linear' has no hyperparameter nope",
        ),
        ({"models": {"linear": {"tune": {"n_trial": 3}}}}, r"did you mean 'n_trials'"),
        ({"models": {"no_change": {"tune": {}}}}, "no hyperparameters to search"),
        (
            {"tasks": {"t": {"task": "transfr"}}},
            r"tasks.t.task: unknown task 'transfr'; did you mean 'transfer'",
        ),
        ({"tasks": {"t": {"task": "transfer", "datasets": ["other"]}}}, "unknown dataset 'other'"),
        ({"tasks": {"t": {"task": "custom"}}}, "needs 'split: path/to/split.csv'"),
        ({"datasets": {"d": {"path": "missing.h5ad"}}}, "does not exist"),
        (
            {"datasets": {"d": {"simulate": {"n_cell": 3}}}},
            r"datasets.d.simulate: unknown key 'n_cell'",
        ),
        ({"datasets": {"d": {"registry": "normann19"}}}, "unknown dataset 'normann19'"),
        ({"datasets": {"d": {"simulate": {}, "path": "x.h5ad"}}}, "exactly one of"),
        ({"seeds": [0, 0]}, "distinct integers"),
        ({"seeds": ["a"]}, "expected an integer"),
        ({"scenarios": {"imbalance": {"entropy": [1.5]}}}, r"outside \[0.0, 1.0\]"),
        ({"scenarios": {"imbalanced": {}}}, "did you mean 'imbalance'"),
        ({"scenarios": {"data_scaling": {"n_levels": 2}}}, "heldout_covariates"),
        ({"evaluation": {"split": "train"}}, "must be val or test"),
        ({"training": {"max_epochs": 0}}, "at least 1"),
        ({"keys": {"control": "ctl+x"}}, "keys: control label"),
    ],
)
def test_config_errors_are_one_line(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match) as info:
        parse_config(minimal(**change), base_dir=tmp_path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("config ")


def test_yaml_problems(tmp_path):
    with pytest.raises(InputFileError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("datasets: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "empty.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path, toy_adata):
    (tmp_path / "data").mkdir()
    toy_adata.write_h5ad(tmp_path / "data" / "toy.h5ad")
    raw = minimal(datasets={"toy": {"path": "data/toy.h5ad"}})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(tmp_path / "c.yaml")
    assert config.datasets["toy"].path == (tmp_path / "data" / "toy.h5ad").resolve()
    assert config.to_dict()["datasets"]["toy"]["path"] == str(
        (tmp_path / "data" / "toy.h5ad").resolve()
    )


def test_shipped_default_config_is_valid():
    config = load_config(default_config_path())
    tasks = {t.task for t in config.tasks.values()}
    assert {"transfer", "combo"} <= tasks
    trained = [m for m in config.models.values() if not m.is_baseline]
    assert len(trained) >= 4
    assert all(ds.kind == "simulate" for ds in config.datasets.values())
