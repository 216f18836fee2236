"""Task splitters: properties checked with independent pandas computations, real data tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pertbench.data.keys import PerturbationKeys
from pertbench.data.splits import (
    find_leakage,
    make_split,
    make_task_split,
    read_split,
    split_celltype,
    split_combo,
    split_combo_inverse,
    split_custom,
    split_transfer,
    write_split,
)
from pertbench.errors import ConfigError, DataValidationError, SplitError

KEYS = PerturbationKeys()
GLIOMA = ["A172", "T98G", "U87MG"]


def _frame(adata, split) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cov": adata.obs["cell_type"].astype(str).to_numpy(),
            "pert": adata.obs["condition"].astype(str).to_numpy(),
            "split": split.to_numpy(),
        }
    )


def _pairs(frame: pd.DataFrame, which: set[str]) -> set[tuple[str, str]]:
    sub = frame[frame["split"].isin(which) & (frame["pert"] != "control")]
    return set(zip(sub["cov"], sub["pert"], strict=True))


def _check_no_leakage_by_hand(frame, heldout=("val", "test")):
    assert not (_pairs(frame, {"train"}) & _pairs(frame, set(heldout)))


def _check_controls(frame):
    """Every covariate keeps train controls, and has controls wherever it is evaluated."""
    ctrl = frame[frame["pert"] == "control"]
    for cov in frame["cov"].unique():
        c = ctrl[ctrl["cov"] == cov]
        assert (c["split"] == "train").any(), cov
        for s in ("val", "test"):
            if ((frame["cov"] == cov) & (frame["split"] == s) & (frame["pert"] != "control")).any():
                assert (c["split"] == s).any(), (cov, s)


# -- transfer ------------------------------------------------------------------------------


def test_transfer_properties_on_toy(make_toy):
    adata = make_toy(n_covariates=4, n_perturbations=12)
    res = split_transfer(adata, keys=KEYS, fraction=0.3, seed=3)
    frame = _frame(adata, res.split)
    _check_no_leakage_by_hand(frame)
    _check_controls(frame)
    assert res.leakage().empty
    held = _pairs(frame, {"val", "test"})
    # every held-out perturbation is trained in another covariate
    trained = _pairs(frame, {"train"})
    for cov, pert in held:
        assert any(p == pert and c != cov for c, p in trained)
    # round-half-up(0.3 * 12) = 4 per covariate would need 16 > 12 perturbations: each
    # perturbation is held out at most once, so the 12 spread evenly (3 per covariate)
    per_cov = pd.Series([c for c, _ in held]).value_counts()
    assert per_cov.to_dict() == {f"C{i}": 3 for i in range(4)}
    assert pd.Series([p for _, p in held]).value_counts().max() == 1
    # val/test stratified per covariate: 3 held out -> 1 val, 2 test
    val = pd.Series([c for c, _ in _pairs(frame, {"val"})]).value_counts()
    assert set(val.to_numpy()) == {1}
    # whole groups move together
    by_group = frame[frame.pert != "control"].groupby(["cov", "pert"])["split"].nunique()
    assert (by_group == 1).all()


def test_transfer_notes_name_the_rule_that_stopped_the_quota(make_toy):
    # 12 perturbations measured in all 4 covariates; 0.3 asks for 4 per covariate (16), but
    # each is held out in at most one covariate: the shortfall is max_heldout_covariates.
    adata = make_toy(n_covariates=4, n_perturbations=12)
    res = split_transfer(adata, keys=KEYS, fraction=0.3, seed=3)
    assert len(res.notes) == 4
    for note in res.notes:
        assert "held out 3 of the 4 perturbations asked for" in note
        assert "9 already held out in 1 other covariate(s) (max_heldout_covariates=1)" in note
        assert "min_train_covariates" not in note
    # requiring 3 training covariates leaves 4 - 3 = 1 covariate to hold each one out in;
    # (the same shortfall); requiring 4 leaves no covariate to hold anything out in
    res = split_transfer(
        adata, keys=KEYS, fraction=0.3, seed=3, max_heldout_covariates=2, min_train_covariates=3
    )
    assert all("would keep fewer than 3 training covariate(s)" in n for n in res.notes)
    res = split_transfer(adata, keys=KEYS, fraction=0.3, seed=3, min_train_covariates=4)
    per_covariate = [n for n in res.notes if n.startswith("covariate ")]
    assert len(per_covariate) == 4
    assert all("12 not measured in 4 other covariate(s)" in n for n in per_covariate)


def test_transfer_reproducible_and_seed_dependent(make_toy):
    adata = make_toy(n_covariates=3, n_perturbations=12)
    a = split_transfer(adata, seed=11).split
    b = split_transfer(adata, seed=11).split
    c = split_transfer(adata, seed=12).split
    pd.testing.assert_series_equal(a, b)
    assert not a.equals(c)


def test_transfer_respects_heldout_covariates_and_limits(make_toy):
    adata = make_toy(n_covariates=3, n_perturbations=6)
    res = split_transfer(
        adata, heldout_covariates="C1", fraction=1.0, min_train_covariates=2, seed=0
    )
    frame = _frame(adata, res.split)
    held = _pairs(frame, {"val", "test"})
    assert {c for c, _ in held} == {"C1"} and len(held) == 6
    res = split_transfer(adata, heldout_covariates=["C1", "C2"], fraction=1.0, seed=0)
    held = _pairs(_frame(adata, res.split), {"val", "test"})
    # each perturbation held out in at most one covariate, so C1+C2 share the 6
    assert len(held) == 6


def test_transfer_reports_unreachable_quota(make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=4)
    res = split_transfer(adata, fraction=1.0, min_train_covariates=1, seed=0)
    assert any("held out" in n and "asked for" in n for n in res.notes)


def test_transfer_bad_options(toy_adata):
    with pytest.raises(ConfigError, match="fraction must be between 0 and 1"):
        split_transfer(toy_adata, fraction=1.5)
    with pytest.raises(ConfigError, match="covariate 'C9' is not in the data"):
        split_transfer(toy_adata, heldout_covariates="C9")
    with pytest.raises(ConfigError, match="min_train_covariates must be at least 1"):
        split_transfer(toy_adata, min_train_covariates=0)
    with pytest.raises(ConfigError, match="must be below 1"):
        split_transfer(toy_adata, control_val_fraction=0.5, control_test_fraction=0.5)


def test_split_rejects_data_without_controls(toy_adata):
    toy_adata.obs["condition"] = toy_adata.obs["condition"].replace({"control": "ctrl"})
    with pytest.raises(DataValidationError, match="no control cells"):
        split_transfer(toy_adata)


def test_norman_transfer_holds_out_glioma_perturbations(norman_adata, tmp_path):
    res = make_task_split(
        norman_adata, "transfer", keys=KEYS, heldout_covariates=GLIOMA, fraction=0.3, seed=0
    )
    frame = _frame(norman_adata, res.split)
    held = _pairs(frame, {"val", "test"})
    assert held and {c for c, _ in held} == set(GLIOMA)
    # 30% of 9 perturbations per glioma line, rounded half up -> 3 each
    assert pd.Series([c for c, _ in held]).value_counts().to_dict() == dict.fromkeys(GLIOMA, 3)
    _check_no_leakage_by_hand(frame)
    assert res.leakage().empty
    trained = _pairs(frame, {"train"})
    for cov, pert in held:
        assert any(p == pert and c != cov for c, p in trained), (cov, pert)
    _check_controls(frame)
    path = res.write(tmp_path / "split.csv")
    pd.testing.assert_series_equal(read_split(path, norman_adata.obs_names), res.split)


def test_norman_combo_uses_combinations_with_measured_singles(norman_adata):
    res = split_combo(norman_adata, keys=KEYS, seed=0)
    frame = _frame(norman_adata, res.split)
    eligible = {"KLF1+MAP2K6", "MAP2K3+SLC38A2", "KLF1+TGFBR2", "MAPK1+TGFBR2", "MAP2K3+MAP2K6"}
    used = {p for c, p in _pairs(frame, {"train", "val", "test"}) if "+" in p}
    assert used == eligible
    held = {p for _, p in _pairs(frame, {"val", "test"})}
    assert held <= eligible and len(held) == 4  # round-half-up(0.7 * 5)
    # held-out combinations have all their singles in train
    trained = {p for c, p in _pairs(frame, {"train"}) if c == "k562"}
    for combo in held:
        assert set(combo.split("+")) <= trained
    # the other 10 are reported with the reason and left out
    assert len(res.unplaced) == 10
    assert set(res.unplaced["condition"]).isdisjoint(eligible)
    assert res.unplaced["reason"].str.contains("not measured in k562").all()
    left = frame[frame["pert"].isin(res.unplaced["condition"])]
    assert (left["split"] == "").all()
    assert (
        "SGK1+TBX3" in res.to_text()
        and "TBX3" in res.unplaced.set_index("condition").loc["SGK1+TBX3", "reason"]
    )
    assert res.leakage().empty
    _check_controls(frame)


def test_norman_combo_inverse(norman_adata):
    res = split_combo_inverse(norman_adata, keys=KEYS, seed=0)
    frame = _frame(norman_adata, res.split)
    held = _pairs(frame, {"val", "test"})
    assert held and all("+" not in p for _, p in held)
    trained = _pairs(frame, {"train"})
    for cov, single in held:
        # some trained combination contains it, with all partners trained as singles
        combos = [p.split("+") for c, p in trained if c == cov and single in p.split("+")]
        assert any(all((cov, q) in trained for q in parts if q != single) for parts in combos)
    assert res.leakage().empty


def test_combo_on_toy_fraction_and_unplaced(make_toy):
    adata = make_toy(n_perturbations=6, combos=((0, 1), (2, 3), (4, 5), (0, 2)))
    adata = adata[
        ~((adata.obs.condition == "P5") & (adata.obs.cell_type == "C0")).to_numpy()
    ].copy()
    res = split_combo(adata, fraction=0.5, seed=1)
    frame = _frame(adata, res.split)
    assert res.unplaced[["cell_type", "condition"]].values.tolist() == [["C0", "P4+P5"]]
    held = _pairs(frame, {"val", "test"})
    per_cov = pd.Series([c for c, _ in held]).value_counts().to_dict()
    assert per_cov == {"C0": 2, "C1": 2}  # round-half-up(0.5 * 3) and (0.5 * 4)


# -- celltype ------------------------------------------------------------------------------


def test_kang_celltype_holds_out_one_types_stimulated_cells(kang_adata):
    res = make_task_split(kang_adata, "celltype", keys=KEYS, heldout="CD4T", seed=0)
    frame = _frame(kang_adata, res.split)
    test = frame[frame["split"] == "test"]
    assert set(zip(test["cov"], test["pert"], strict=True)) == {("CD4T", "stimulated")}
    n_cd4_stim = ((frame["cov"] == "CD4T") & (frame["pert"] == "stimulated")).sum()
    assert len(test) == n_cd4_stim == 356
    cd4_ctrl = frame[(frame["cov"] == "CD4T") & (frame["pert"] == "control")]
    assert (cd4_ctrl["split"] == "train").all()
    others = frame[frame["cov"] != "CD4T"]
    assert set(others["split"]) == {"train", "val"}
    assert res.leakage().empty
    # val is ~10% of each training group, cell-level
    val_share = others.groupby(["cov", "pert"])["split"].apply(lambda s: (s == "val").mean())
    assert val_share.between(0.05, 0.15).all()


def test_celltype_errors(toy_adata):
    with pytest.raises(ConfigError, match="'C7' is not a value of 'cell_type'"):
        split_celltype(toy_adata, heldout="C7")
    with pytest.raises(ConfigError, match="needs a covariate key"):
        split_celltype(toy_adata, keys=PerturbationKeys(covariate_keys=()), heldout="C0")


# -- custom, leakage, dispatch ---------------------------------------------------------------


def test_custom_split_reports_leakage(toy_adata, tmp_path):
    values = np.where(toy_adata.obs.condition == "P0", "test", "train").astype(object)
    values[np.flatnonzero((toy_adata.obs.condition == "P0").to_numpy())[:2]] = "train"
    path = write_split(make_split(toy_adata.obs_names, values), tmp_path / "s.csv")
    res = split_custom(toy_adata, path)
    leak = res.leakage()
    assert leak[["cell_type", "condition"]].values.tolist() == [["C0", "P0"]]
    assert leak["n_train"].tolist() == [2]
    assert any("also have cells in train" in n for n in res.notes)
    by_hand = find_leakage(toy_adata.obs, res.split, KEYS)
    pd.testing.assert_frame_equal(by_hand, leak)


def test_make_task_split_dispatch_errors(toy_adata):
    with pytest.raises(ConfigError, match="unknown task 'cross'"):
        make_task_split(toy_adata, "cross")
    with pytest.raises(ConfigError, match="task 'combo' has no option heldout_covariates"):
        make_task_split(toy_adata, "combo", heldout_covariates="C0")
    with pytest.raises(ConfigError, match="needs path"):
        make_task_split(toy_adata, "custom")


def test_summary_counts_match_groupby(make_toy):
    adata = make_toy(n_covariates=3)
    res = split_transfer(adata, seed=5)
    frame = _frame(adata, res.split)
    expected = frame.groupby(["cov", "pert"])["split"].value_counts().unstack(fill_value=0)
    summary = res.summary.set_index(["cell_type", "condition"])
    for col in ("train", "val", "test"):
        got = summary[col]
        exp = expected[col].reindex(got.index, fill_value=0) if col in expected else 0 * got
        assert (got.to_numpy() == np.asarray(exp)).all()


def test_leakage_check_raises_type_on_bad_values(toy_adata):
    split = make_split(toy_adata.obs_names, "train")
    split.iloc[0] = "training"
    with pytest.raises(SplitError):
        find_leakage(toy_adata.obs, split, KEYS)


def test_heldout_covariate_value_of_one_key(make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=6)
    adata.obs["treatment"] = np.where(np.arange(adata.n_obs) % 2 == 0, "drug", "none")
    keys = PerturbationKeys(covariate_keys=("cell_type", "treatment"))
    res = split_transfer(adata, keys=keys, heldout_covariates="drug", fraction=0.5, seed=0)
    assert res.params["heldout_covariates"] == ["C0/drug", "C1/drug"]
    held = res.heldout_pairs()
    assert set(held["treatment"]) == {"drug"} and len(held) == 6
    res = split_transfer(adata, keys=keys, heldout_covariates="C1/none", fraction=0.5, seed=0)
    assert res.params["heldout_covariates"] == ["C1/none"]


def test_nothing_held_out_is_reported(toy_adata):
    res = split_transfer(toy_adata, fraction=0.0)
    assert set(res.split) == {"train"}
    assert any("no group was held out" in n for n in res.notes)


def test_other_keys_and_delimiter(make_toy):
    adata = make_toy(n_perturbations=4, combos=((0, 1), (2, 3)))
    obs = adata.obs.rename(columns={"condition": "drug", "cell_type": "line"})
    obs["drug"] = obs["drug"].str.replace("+", "_", regex=False).replace({"control": "DMSO"})
    keys = PerturbationKeys(
        perturbation_key="drug", control="DMSO", delimiter="_", covariate_keys=("line",)
    )
    res = split_combo(obs, keys=keys, fraction=1.0, seed=0)
    held = res.heldout_pairs()
    assert sorted(held["drug"].unique()) == ["P0_P1", "P2_P3"] and res.unplaced.empty
    ctrl = obs["drug"] == "DMSO"
    assert set(res.split[ctrl.to_numpy()]) == {"train", "val", "test"}
