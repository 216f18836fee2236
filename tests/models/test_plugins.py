"""Model plug-ins through the ``pertbench.models`` entry-point group, and run folders that
name code which is not registered."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from model_helpers import transfer_split

from pertbench.cli.main import main
from pertbench.errors import ModelError
from pertbench.models import PerturbationModel, create_model
from pertbench.models.registry import available_models

DOCS = __import__("pathlib").Path(__file__).resolve().parents[2] / "docs" / "models.md"


def _documented_example() -> str:
    text = DOCS.read_text(encoding="utf-8").split("### Example plug-in", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install the documented example as a package with an entry point (a dist-info)."""
    root = tmp_path / "site"
    (root / "my_models").mkdir(parents=True)
    (root / "my_models" / "__init__.py").write_text("")
    (root / "my_models" / "shift.py").write_text(_documented_example())
    info = root / "my_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[pertbench.models]\nshift_plugin = my_models.shift:ShiftModel\n"
    )
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in [m for m in sys.modules if m.startswith("my_models")]:
        del sys.modules[name]


def test_entry_point_model_is_listed_trained_saved_and_loaded(plugin, make_toy, tmp_path, capsys):
    assert "shift_plugin" in available_models()
    assert main(["models"]) == 0
    assert "shift_plugin: Control + scale x mean training delta" in capsys.readouterr().out
    adata = make_toy(n_perturbations=4, n_cells=12, n_controls=20, n_genes=15)
    split = transfer_split(adata)
    model = create_model("shift_plugin", scale=0.5).fit(adata, split, progress=False)
    pred = model.predict_split(adata, split)
    # the documented model's arithmetic: control + 0.5 x the single's mean training delta,
    # i.e. half of perturbation_mean's (checked by hand in tests/metrics/test_baselines.py)
    control = adata[pred.obs["control_obs_name"]].X.toarray()
    reference = create_model("perturbation_mean").fit(adata, split, progress=False)
    full = reference.predict_split(adata, split).X - control
    np.testing.assert_allclose(pred.X - control, 0.5 * full, rtol=1e-4, atol=1e-5)
    assert np.abs(full).max() > 0.1
    model.save(tmp_path / "run")
    loaded = PerturbationModel.load(tmp_path / "run", device="cpu")
    np.testing.assert_array_equal(loaded.predict_split(adata, split).X, pred.X)


def test_run_folder_naming_unregistered_code_is_refused_without_importing_it(
    tmp_path, make_toy, monkeypatch, capsys
):
    adata = make_toy(n_perturbations=3, n_cells=10, n_controls=20, n_genes=10)
    split = transfer_split(adata)
    run = tmp_path / "run"
    create_model("no_change").fit(adata, split, progress=False).save(run)
    marker = tmp_path / "imported.txt"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from pertbench.models.baselines import NoChange\n"
        "class Thing(NoChange):\n    name = 'evil_mod:Thing'\n"
    )
    monkeypatch.syspath_prepend(str(evil))
    config = json.loads((run / "config.json").read_text())
    config["model"] = "evil_mod:Thing"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not registered; pertbench does not import code"):
        PerturbationModel.load(run, device="cpu")
    data = tmp_path / "toy.h5ad"
    adata.write_h5ad(data)
    code = main(["predict", str(run), "--data", str(data), "--out", str(tmp_path / "p.h5ad")])
    assert code == 2 and "--model-class" in capsys.readouterr().err
    assert not marker.exists() and "evil_mod" not in sys.modules
    # the user may pass the class explicitly
    loaded = PerturbationModel.load(run, device="cpu", model_class="evil_mod:Thing")
    assert type(loaded).__name__ == "Thing" and marker.exists()
    del sys.modules["evil_mod"]
