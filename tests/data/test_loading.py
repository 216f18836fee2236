"""Loading and validation: every bad input of the data contract gives its one-line message."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.data.loading import (
    DataWarning,
    normalize_log1p,
    read_h5ad,
    scan_values,
    validate_adata,
    validate_obs,
)
from pertbench.errors import ConfigError, DataValidationError, InputFileError


def _write(adata: ad.AnnData, path) -> str:
    adata.write_h5ad(path)
    return str(path)


def _counts_adata(toy) -> ad.AnnData:
    return ad.AnnData(X=toy.layers["counts"].copy(), obs=toy.obs.copy(), var=toy.var.copy())


# -- files --------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match=r"does not exist; check the path"):
        read_h5ad(tmp_path / "nope.h5ad")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(InputFileError, match="is a folder"):
        read_h5ad(tmp_path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "table.h5ad"
    path.write_text("cell,condition\nc1,control\n")
    with pytest.raises(InputFileError, match=r"not an AnnData \.h5ad file \(not HDF5\)"):
        read_h5ad(path)


def test_hdf5_but_not_anndata(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(3)
    with pytest.raises(InputFileError, match="HDF5 file but not an AnnData"):
        read_h5ad(path)


def test_truncated_file_is_unreadable(tmp_path, toy_adata):
    good = tmp_path / "good.h5ad"
    toy_adata.write_h5ad(good)
    data = good.read_bytes()
    bad = tmp_path / "bad.h5ad"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputFileError, match="cannot read"):
        read_h5ad(bad)


def test_old_kang_layout_loads_quietly(kang_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (FutureWarning from anndata) fails
        adata = read_h5ad(kang_path)
    assert adata.shape == (1975, 6998)
    assert "distances" in adata.obsp  # the neighbours graph was migrated from uns


def test_clean_data_reports_counts(toy_adata, tmp_path):
    adata = read_h5ad(_write(toy_adata, tmp_path / "toy.h5ad"))
    report = validate_adata(adata, keys=PerturbationKeys())
    assert report.ok and report.value_type == "log"
    assert report.n_controls == 120 and report.n_perturbations == 6
    assert report.n_covariate_combinations == 2
    expected = toy_adata.obs.groupby(["cell_type", "condition"], observed=True).size()
    got = report.groups.set_index(["cell_type", "condition"])["n_cells"]
    assert got.to_dict() == expected.to_dict()
    assert report.controls_per_covariate["n_controls"].tolist() == [60, 60]
    assert "problems: none found" in report.to_text()


# -- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, r"X contains 1 NaN value\(s\); remove or impute"),
        (np.inf, r"X contains 1 infinite value\(s\)"),
        (-0.5, r"X contains 1 negative value\(s\) \(min -0.5\)"),
    ],
)
def test_bad_values(toy_adata, tmp_path, value, message):
    X = toy_adata.X.toarray()
    X[3, 7] = value
    toy_adata.X = sp.csr_matrix(X)
    path = _write(toy_adata, tmp_path / "bad.h5ad")
    with pytest.raises(DataValidationError, match=message) as info:
        read_h5ad(path)
    assert "\n" not in str(info.value)


def test_scan_values_matches_numpy(toy_adata):
    X = toy_adata.X.toarray()
    X[0, 0] = np.nan
    X[1, 1] = -2.0
    for matrix in (X, sp.csr_matrix(X)):
        stats = scan_values(matrix)
        finite = X[np.isfinite(X)]
        assert stats.n_nan == 1 and stats.n_negative == 1
        assert stats.minimum == pytest.approx(finite.min())
        assert stats.maximum == pytest.approx(finite.max())
        assert not stats.all_integer


def test_counts_normalized_with_warning(toy_adata, tmp_path):
    raw = _counts_adata(toy_adata)
    path = _write(raw, tmp_path / "counts.h5ad")
    with pytest.warns(DataWarning, match="raw counts; normalised to 1e4 per cell"):
        adata = read_h5ad(path)
    counts = raw.X.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(adata.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(adata.layers["counts"].toarray(), counts)
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32


def test_counts_refused_with_the_fix(toy_adata, tmp_path):
    path = _write(_counts_adata(toy_adata), tmp_path / "counts.h5ad")
    with pytest.raises(DataValidationError, match=r"holds raw counts in X.*pertbench preprocess"):
        read_h5ad(path, on_counts="error")


def test_counts_allowed_as_is(toy_adata, tmp_path):
    raw = _counts_adata(toy_adata)
    adata = read_h5ad(_write(raw, tmp_path / "counts.h5ad"), on_counts="allow")
    np.testing.assert_array_equal(adata.X.toarray(), raw.X.toarray())
    with pytest.raises(DataValidationError, match=r"raw counts .* where log-normalised"):
        validate_adata(adata, keys=PerturbationKeys(), expect="log")
    assert validate_adata(adata, keys=PerturbationKeys(), expect="counts").ok


def test_log_values_where_counts_expected(toy_adata):
    with pytest.raises(DataValidationError, match="not integer-valued but raw counts are expected"):
        validate_adata(toy_adata, expect="counts")


def test_bad_on_counts_option(toy_adata, tmp_path):
    with pytest.raises(ConfigError, match="on_counts must be"):
        read_h5ad(_write(toy_adata, tmp_path / "t.h5ad"), on_counts="maybe")


def test_normalize_keeps_empty_cells_at_zero():
    X = sp.csr_matrix(np.array([[0, 0, 0], [1, 3, 0]], dtype=np.float32))
    adata = normalize_log1p(ad.AnnData(X=X))
    np.testing.assert_allclose(
        adata.X.toarray(), [[0, 0, 0], [np.log1p(2500), np.log1p(7500), 0]], rtol=1e-6
    )


# -- metadata -----------------------------------------------------------------------------


def test_duplicated_gene_names(toy_adata):
    toy_adata.var_names = ["G0", *toy_adata.var_names[:-1]]
    with pytest.raises(DataValidationError, match=r"1 gene name\(s\) are duplicated \('G0'\)"):
        validate_adata(toy_adata)


def test_duplicated_cell_names(toy_adata):
    toy_adata.obs_names = ["cellX"] * 2 + list(toy_adata.obs_names[2:])
    with pytest.raises(DataValidationError, match=r"cell name.*duplicated.*obs_names_make_unique"):
        validate_adata(toy_adata)


def test_missing_key(toy_adata):
    with pytest.raises(
        DataValidationError, match=r"obs has no column 'drug' \(available: condition, cell_type\)"
    ):
        validate_adata(toy_adata, keys=PerturbationKeys(perturbation_key="drug"))
    with pytest.raises(DataValidationError, match="no column 'dose'"):
        validate_adata(toy_adata, keys=PerturbationKeys(dose_key="dose"))


def test_no_controls_overall(toy_adata):
    toy_adata.obs["condition"] = toy_adata.obs["condition"].replace({"control": "ctrl"})
    with pytest.raises(
        DataValidationError,
        match=r"no control cells: no cell has 'condition' == 'control'.*pass --control",
    ):
        validate_adata(toy_adata)
    assert validate_adata(toy_adata, keys=PerturbationKeys(control="ctrl")).ok


def test_no_controls_for_a_covariate(toy_adata):
    drop = (toy_adata.obs.condition == "control") & (toy_adata.obs.cell_type == "C1")
    adata = toy_adata[~drop.to_numpy()].copy()
    with pytest.raises(
        DataValidationError, match=r"covariate combination\(s\) 'C1' have no control cells"
    ):
        validate_adata(adata)


def test_empty_combination_part(toy_adata):
    labels = toy_adata.obs["condition"].astype(str).to_numpy()
    labels[:3] = "P0++P1"
    labels[3:5] = "P2+"
    toy_adata.obs["condition"] = labels
    with pytest.raises(
        DataValidationError, match=r"label\(s\) 'P0\+\+P1', 'P2\+' have an empty part"
    ):
        validate_adata(toy_adata)


def test_missing_covariate_values(toy_adata):
    values = toy_adata.obs["cell_type"].astype(object).to_numpy()
    values[[0, 5]] = np.nan
    values[9] = ""
    toy_adata.obs["cell_type"] = values
    with pytest.raises(
        DataValidationError, match=r"3 cell\(s\) have no value in covariate 'cell_type'"
    ):
        validate_adata(toy_adata)


def test_missing_perturbation_values(toy_adata):
    values = toy_adata.obs["condition"].astype(object).to_numpy()
    values[4] = None
    toy_adata.obs["condition"] = values
    with pytest.raises(DataValidationError, match=r"1 cell\(s\) have no value in 'condition'"):
        validate_obs(toy_adata.obs)


def test_bad_dose(toy_adata):
    toy_adata.obs["dose"] = "1"
    toy_adata.obs.loc[toy_adata.obs.index[toy_adata.obs.condition == "P1"], "dose"] = "high"
    with pytest.raises(DataValidationError, match=r"dose value\(s\) 'P1:high' are not numeric"):
        validate_adata(toy_adata, keys=PerturbationKeys(dose_key="dose"))


def test_every_problem_listed_on_one_line(toy_adata):
    toy_adata.var_names = ["G0", *toy_adata.var_names[:-1]]
    X = toy_adata.X.toarray()
    X[0, 0] = np.nan
    toy_adata.X = sp.csr_matrix(X)
    report = validate_adata(toy_adata, raise_errors=False)
    assert len(report.errors) == 2
    with pytest.raises(DataValidationError) as info:
        report.raise_if_errors()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message == f"2 problems: (1) {report.errors[0]}; (2) {report.errors[1]}"


def test_small_groups_are_a_warning(make_toy):
    adata = make_toy(n_cells=3)
    report = validate_adata(adata)
    assert report.ok
    assert any("fewer than 5 cells" in w for w in report.warnings)
