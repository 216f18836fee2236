"""One-hot models on the unseen task: one clear line, and a skipped (not failed) cell."""

from __future__ import annotations

import pandas as pd
import pytest

from bench_helpers import SLEEPY, small_config
from pertbench.benchmark import paths
from pertbench.benchmark.config import parse_config
from pertbench.benchmark.runner import run_benchmark
from pertbench.data import make_task_split
from pertbench.data.simulate import simulate
from pertbench.errors import UnseenPerturbationError
from pertbench.models import create_model


def test_one_hot_model_says_it_cannot_predict_unseen_perturbations():
    adata = simulate(n_covariates=2, n_perturbations=6, n_cells_per_group=8, n_genes=30, seed=1)
    split = make_task_split(adata, "unseen", fraction=0.4, seed=0).split
    held = sorted(adata.obs.loc[split.to_numpy() == "test", "condition"].astype(str).unique())
    model = create_model("linear", batch_size=64).fit(
        adata, split, max_epochs=1, progress=False, device="cpu"
    )
    with pytest.raises(UnseenPerturbationError) as info:
        model.predict_split(adata, split, on="test")
    message = str(info.value)
    assert "\n" not in message and "cannot predict unseen perturbations" in message
    trained = {
        part
        for label in adata.obs.loc[split.to_numpy() == "train", "condition"].astype(str)
        for part in label.split("+")
    }
    unseen = [x for x in held if any(part not in trained for part in x.split("+"))]
    assert unseen and all(label in message for label in unseen[:5])
    seen2 = [x for x in held if x not in unseen]  # both singles trained: predictable
    assert not any(label in message for label in seen2)


def test_benchmark_cell_of_a_one_hot_model_on_unseen_is_skipped_with_its_reason(tmp_path):
    raw = small_config(
        tasks={"unseen": {"task": "unseen", "options": {"fraction": 0.4, "combo_fraction": 0.0}}},
        models={"shift": {"model": SLEEPY}},
        seeds=[0],
        evaluation={"metrics": ["rmse_average"], "save_predictions": "none"},
    )
    result = run_benchmark(
        parse_config(raw, base_dir=tmp_path), out=tmp_path / "b", report=False, log=lambda m: None
    )
    status = result.results.drop_duplicates("model").set_index("model")
    # one-hot and delta baselines cannot, embedding and perturbation-agnostic ones can
    skipped = {"shift", "perturbation_mean", "additive_within"}
    assert set(status.index[status["status"] == "skipped"]) == skipped
    assert set(status.index[status["status"] == "failed"]) == set()
    assert status.loc["shift", "error"].startswith("model 'sleepy_shift' encodes perturbations")
    assert "no training delta" in status.loc["perturbation_mean", "error"]
    ok = result.results[result.results["status"] == "ok"]
    assert {"linear_embedding", "nearest_perturbation", "no_change"} <= set(ok["model"])
    failures = pd.read_csv(tmp_path / "b" / paths.FAILURES_CSV)
    assert set(failures["model"]) == skipped and set(failures["status"]) == {"skipped"}
    # skipped before training: no training log, and a resumed run keeps the decision
    cell = paths.cell_dir(tmp_path / "b", "sim", "unseen", "full", "shift", 0)
    assert (cell / paths.DONE_FILE).is_file() and not (cell / "training").exists()
    again = run_benchmark(
        parse_config(raw, base_dir=tmp_path),
        out=tmp_path / "b",
        resume=True,
        report=False,
        log=lambda m: None,
    )
    assert result.n_cells == again.n_skipped
