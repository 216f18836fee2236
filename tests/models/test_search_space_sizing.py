"""Search spaces sized for the data and the machine (docs/benchmark.md, "Search spaces")."""

from __future__ import annotations

from pertbench.models.cpa import CPA
from pertbench.models.latent_additive import LatentAdditive
from pertbench.models.scgen import ScGen
from pertbench.models.search_space import size_space, space_limits


def test_norman_sized_space_on_a_cpu():
    # the Norman subset: 500 genes, ~4,000 training cells
    space, changes = size_space(
        LatentAdditive.search_space, n_genes=500, n_train_cells=4000, device="cpu"
    )
    # widths 256..5376 in steps of 1024 leave only 256 below 2 x 500: a log range instead
    assert space["encoder_width"] == {"type": "int", "low": 256, "high": 1000, "log": True}
    assert space["n_layers"] == {"type": "int", "low": 1, "high": 3, "step": 2}
    assert changes == ["n_layers <= 3", "encoder_width <= 1000"]
    untouched = set(LatentAdditive.search_space) - {"encoder_width", "n_layers"}
    assert all(space[k] == LatentAdditive.search_space[k] for k in untouched)


def test_categorical_widths_and_depths_of_other_models():
    space, _ = size_space(ScGen.search_space, n_genes=300, n_train_cells=2000, device="cpu")
    assert space["n_hidden"]["choices"] == [256, 512]  # 800 and 1024 exceed 2 x 300
    space, changes = size_space(CPA.search_space, n_genes=500, n_train_cells=4000, device="cpu")
    assert space["n_layers_pert_emb"]["high"] == 3 and space["adv_classifier_n_layers"]["high"] == 3
    assert space["hidden_dim"]["high"] == 1000
    assert space["adv_classifier_hidden_dim"] == {
        "type": "int",
        "low": 128,
        "high": 1000,
        "log": True,
    }
    assert len(changes) == 5


def test_large_data_on_a_gpu_keeps_the_published_ranges():
    space, changes = size_space(
        LatentAdditive.search_space, n_genes=5000, n_train_cells=200_000, device="cuda"
    )
    assert space == LatentAdditive.search_space and changes == []
    assert space_limits(n_genes=5000, n_train_cells=200_000, device="cpu")["width"] == 1024


def test_parameters_the_user_gave_are_kept():
    space, changes = size_space(
        LatentAdditive.search_space,
        n_genes=500,
        n_train_cells=4000,
        device="cpu",
        keep={"encoder_width"},
    )
    assert space["encoder_width"] == LatentAdditive.search_space["encoder_width"]
    assert changes == ["n_layers <= 3"]
