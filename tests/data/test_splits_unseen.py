"""The unseen and fewshot tasks on a hand-made design: leakage, GEARS subgroups, shots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pertbench.data import PerturbationKeys, find_leakage, make_task_split
from pertbench.errors import ConfigError

KEYS = PerturbationKeys()


def _design() -> pd.DataFrame:
    """C0 and C1 measure singles A-D; C0 also the combinations A+B, C+D and A+C."""
    rows = []
    for cov in ("C0", "C1"):
        labels = ["control", "A", "B", "C", "D"] + (["A+B", "C+D", "A+C"] if cov == "C0" else [])
        for label in labels:
            rows += [(cov, label)] * 4
    obs = pd.DataFrame(rows, columns=["cell_type", "condition"])
    obs.index = [f"c{i}" for i in range(len(obs))]
    return obs


def _roles(result) -> dict[tuple[str, str], str]:
    s = result.summary
    return {(c, p): r for c, p, r in zip(s["cell_type"], s["condition"], s["role"], strict=True)}


def _trained_parts(obs, split) -> set[str]:
    labels = obs.loc[split.to_numpy() == "train", "condition"]
    return {part for label in labels if label != "control" for part in label.split("+")}


@pytest.mark.parametrize(
    ("named", "expected"),
    [
        (["A"], {"A": "single", "A+B": "seen1", "A+C": "seen1"}),
        (["A", "C+D"], {"A": "single", "A+B": "seen1", "A+C": "seen1", "C+D": "seen2"}),
        (["A", "B"], {"A": "single", "B": "single", "A+B": "seen0", "A+C": "seen1"}),
    ],
)
def test_unseen_holds_out_everywhere_with_gears_subgroups(named, expected):
    obs = _design()
    result = make_task_split(obs, "unseen", keys=KEYS, heldout_perturbations=named, seed=0)
    held = result.heldout_pairs()
    assert dict(zip(held["condition"], held["seen"], strict=True)) == expected
    # every covariate of a held-out perturbation is held out, and none trains
    for (cov, label), role in _roles(result).items():
        if label in expected:
            assert role in ("val", "test"), (cov, label)
    trained = _trained_parts(obs, result.split)
    assert not {x for x in expected if "+" not in x} & trained
    assert result.leakage().empty
    # a perturbation goes to val or test as a whole
    for label in expected:
        assert held.loc[held["condition"] == label, "role"].nunique() == 1


def test_unseen_random_draw_is_seeded_and_leak_free():
    obs = _design()
    one = make_task_split(obs, "unseen", keys=KEYS, fraction=0.5, combo_fraction=0.0, seed=3)
    two = make_task_split(obs, "unseen", keys=KEYS, fraction=0.5, combo_fraction=0.0, seed=3)
    assert one.split.equals(two.split)
    singles = [x for x in one.params["heldout_perturbations"] if "+" not in x]
    assert len(singles) == 2  # round-half-up 0.5 of 4
    assert not set(singles) & _trained_parts(obs, one.split)
    assert one.leakage().empty


def test_perturbation_scope_leakage_catches_a_single_trained_inside_a_combination():
    obs = _design()
    result = make_task_split(obs, "unseen", keys=KEYS, heldout_perturbations=["A"], seed=0)
    split = result.split.copy()
    split[((obs["cell_type"] == "C0") & (obs["condition"] == "A+B")).to_numpy()] = "train"
    group_leak = find_leakage(obs, split, KEYS)
    assert group_leak.empty  # no (covariate, perturbation) pair is in both
    leak = find_leakage(obs, split, KEYS, scope="perturbation")
    assert set(leak["condition"]) == {"A"} and (leak["n_train"] == 4).all()


def test_fewshot_keeps_k_shots_of_the_target_only():
    obs = _design()
    result = make_task_split(obs, "fewshot", keys=KEYS, target="C1", n_shots=1, seed=0)
    roles = _roles(result)
    target = {p: r for (c, p), r in roles.items() if c == "C1" and p != "control"}
    assert sorted(target.values()).count("train") == 1
    assert set(target.values()) - {"train"} <= {"val", "test"}
    assert {r for (c, p), r in roles.items() if c == "C0" and p != "control"} == {"train"}
    assert result.params["shots"] == {"C1": [p for p, r in target.items() if r == "train"]}
    assert result.leakage().empty
    c0_controls = ((obs["cell_type"] == "C0") & (obs["condition"] == "control")).to_numpy()
    assert (result.split[c0_controls] == "train").all()
    # named shots, and clear errors
    named = make_task_split(obs, "fewshot", keys=KEYS, target="C1", shots=["B", "D"], seed=0)
    kept = _roles(named)
    assert [p for p in "ABCD" if kept[("C1", p)] == "train"] == ["B", "D"]
    with pytest.raises(ConfigError, match="n_shots must be below"):
        make_task_split(obs, "fewshot", keys=KEYS, target="C1", n_shots=4)
    with pytest.raises(ConfigError, match="not measured in C1"):
        make_task_split(obs, "fewshot", keys=KEYS, target="C1", shots=["A+B"])
    with pytest.raises(ConfigError, match="not in the data"):
        make_task_split(obs, "fewshot", keys=KEYS, target="C9")
    assert np.isin(result.split.unique(), ["train", "val", "test"]).all()
