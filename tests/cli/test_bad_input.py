"""Every class of bad input, through the command line: exit status 2, exactly one ``error:``
line on stderr (never a traceback, never a file's contents), and nothing the user had
changed or added (every file under the test folder is hashed before and after).

The commands run in-process (``pertbench.cli.main.main``), which is what the ``pertbench``
executable calls; only the signal tests elsewhere need subprocesses.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench_helpers import SLEEPY
from pertbench.cli.main import main
from pertbench.data.splits import make_task_split
from pertbench.tuning import TuneSettings, tune

SECRET = "root:$6$do-not-print-me:19000:0:99999:7:::"


def _readonly_folder(root: Path) -> Path | None:
    """A folder nobody can write to: chmod 555, or (as root, which ignores the mode bits)
    /sys, where even root cannot create files."""
    folder = root / "readonly"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        (folder / ".probe").touch()
    except OSError:
        return folder
    (folder / ".probe").unlink()
    sys_folder = Path("/sys")
    try:
        (sys_folder / ".pertbench-probe").touch()
    except OSError:
        return sys_folder
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_toy_module):
    """Inputs and earlier outputs, made once: the cases must not change any of them."""
    root = tmp_path_factory.mktemp("bad_input")
    adata = make_toy_module(
        n_covariates=2, n_perturbations=8, n_cells=20, n_controls=30, n_genes=30
    )
    data = root / "data.h5ad"
    adata.write_h5ad(data)
    split = make_task_split(adata, "transfer", seed=0, fraction=0.5).write(root / "split.csv")
    adata[:0].copy().write_h5ad(root / "no_cells.h5ad")
    adata[:, :0].copy().write_h5ad(root / "no_genes.h5ad")
    (root / "secret.txt").write_text(SECRET + "\nbin:*:19000:0:99999:7:::\n")
    (root / "notes.txt").write_text("obs_name;split\nnot a split\n")
    (root / "bad.yaml").write_text("a: [1, 2\n")
    (root / "existing.csv").write_text("obs_name,split\n")
    (root / "existing.h5ad").write_bytes(data.read_bytes())
    (root / "afile").write_text("a file, not a folder\n")
    (root / "folder").mkdir()
    (root / "folder" / "mine.txt").write_text("the user's own file\n")
    run = root / "run"
    train = ["train", str(data), "--model", "linear", "--split", str(split), "--out", str(run)]
    assert main([*train, "--epochs", "1", "--no-progress", "--device", "cpu"]) == 0
    # a tuning study to resume with other settings
    settings = TuneSettings(model=SLEEPY, n_trials=1, stability_seeds=0, seed=1)
    tune(data, split, out=root / "study", settings=settings, log=lambda m: None)
    # benchmark configs: a dataset that is not an .h5ad, a custom split that is any file
    base = {"tasks": {"t": {"task": "transfer"}}, "models": {"linear": {}}}
    not_h5ad = {**base, "datasets": {"d": {"path": str(root / "notes.txt")}}}
    (root / "not_h5ad.yaml").write_text(yaml.safe_dump(not_h5ad))
    secret_split = {
        **base,
        "datasets": {"d": {"path": str(data)}},
        "tasks": {"t": {"task": "custom", "split": str(root / "secret.txt")}},
    }
    (root / "secret_split.yaml").write_text(yaml.safe_dump(secret_split))
    # raw files that are not the norman19 source
    wrong = adata.copy()
    wrong.obs = wrong.obs.rename(columns={"condition": "perturbation"})
    wrong.X = wrong.layers.pop("counts")
    wrong.write_h5ad(root / "no_cell_line.h5ad")
    logged = wrong.copy()
    logged.obs["cell_line"] = "K562"
    logged.X = logged.X.log1p()
    logged.write_h5ad(root / "log_values.h5ad")
    # a dataset already in the cache, curated from data.h5ad (the scGen layout of kang18)
    make_toy_module(n_covariates=2, n_perturbations=2, seed=1).write_h5ad(root / "other.h5ad")
    fetch = ["datasets", "fetch", "kang18", "--from-file", str(data)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERTBENCH_CACHE", str(root / "cache"))
        assert main(fetch) == 0
        assert main(fetch) == 0  # the same file again: the cached curation is reused
    return root


@pytest.fixture(scope="module")
def make_toy_module():
    from conftest import make_toy_adata

    return make_toy_adata


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _d(root: Path) -> list[str]:
    return [str(root / "data.h5ad")]


def _tune(root: Path, *, data="data.h5ad", split="split.csv", out="new_tune", model="linear"):
    """A ``pertbench tune`` command line on files of the test folder."""
    return [
        "tune",
        str(root / data),
        "--model",
        model,
        "--split",
        str(root / split),
        "--out",
        str(root / out),
    ]


def _train(root: Path, *, data="data.h5ad", out="new_run"):
    """A ``pertbench train`` command line on files of the test folder."""
    return [
        "train",
        str(root / data),
        "--model",
        "linear",
        "--split",
        str(root / "split.csv"),
        "--out",
        str(root / out),
    ]


# Each case: the command line (built from the test folder) and words the error must contain.
CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    # -- the output policy: nothing existing is replaced, inputs never -------------------
    "split --out is the input dataset": (
        lambda r: ["split", str(r / "data.h5ad"), "--out", str(r / "data.h5ad")],
        "is also an input",
    ),
    "split --out exists": (
        lambda r: ["split", *_d(r), "--out", str(r / "existing.csv")],
        "already exists; pass --overwrite",
    ),
    "split --out is a folder": (
        lambda r: ["split", *_d(r), "--out", str(r / "folder")],
        "is a folder; give the path of a file",
    ),
    "split --out inside a file": (
        lambda r: ["split", *_d(r), "--out", str(r / "afile" / "split.csv")],
        "is a file, so --out",
    ),
    "preprocess --out is the input": (
        lambda r: ["preprocess", *_d(r), "--out", str(r / "data.h5ad")],
        "is also an input",
    ),
    "preprocess --out exists": (
        lambda r: ["preprocess", *_d(r), "--out", str(r / "existing.h5ad")],
        "already exists; pass --overwrite",
    ),
    "scenario downsample --out exists": (
        lambda r: ["scenario", "downsample", *_d(r), "--out", str(r / "existing.h5ad")],
        "already exists; pass --overwrite",
    ),
    "scenario imbalance --out is the input": (
        lambda r: [
            "scenario",
            "imbalance",
            *_d(r),
            "--out",
            str(r / "data.h5ad"),
            "--target-entropy",
            "0.9",
        ],
        "is also an input",
    ),
    "scenario scaling --out-dir exists": (
        lambda r: [
            "scenario",
            "scaling",
            *_d(r),
            "--out-dir",
            str(r / "folder"),
            "--heldout-covariates",
            "C0",
        ],
        "already exists and is not empty; pass --overwrite",
    ),
    "simulate --out exists": (
        lambda r: ["simulate", "--out", str(r / "existing.h5ad"), "--n-genes", "20"],
        "already exists; pass --overwrite",
    ),
    "train --out exists": (
        lambda r: _train(r, out="folder"),
        "already exists and is not empty; pass --overwrite",
    ),
    "predict --out exists": (
        lambda r: ["predict", str(r / "run"), "--data", *_d(r), "--out", str(r / "existing.h5ad")],
        "already exists; pass --overwrite",
    ),
    "predict --out inside the run folder": (
        lambda r: ["predict", str(r / "run"), "--data", *_d(r), "--out", str(r / "run" / "p.h5ad")],
        "lies inside the input folder",
    ),
    "evaluate --out exists": (
        lambda r: ["evaluate", "--pred", *_d(r), "--truth", *_d(r), "--out", str(r / "folder")],
        "already exists and is not empty; pass --overwrite",
    ),
    "evaluate --out is a file": (
        lambda r: ["evaluate", "--pred", *_d(r), "--truth", *_d(r), "--out", str(r / "afile")],
        "is a file; give the path of a folder",
    ),
    "tune --out is a file": (
        lambda r: _tune(r, out="afile"),
        "is a file; give the path of a folder",
    ),
    "benchmark --out is a file": (
        lambda r: ["benchmark", "--default", "--out", str(r / "afile")],
        "is a file; give the path of a folder",
    ),
    "benchmark --resume and --overwrite": (
        lambda r: ["benchmark", "--default", "--out", str(r / "new"), "--resume", "--overwrite"],
        "not both",
    ),
    "celltype-transfer --out is a file": (
        lambda r: ["celltype-transfer", *_d(r), "--cell-type", "C0", "--out", str(r / "afile")],
        "is a file; give the path of a folder",
    ),
    "sensitivity --out is the input": (
        lambda r: ["sensitivity", *_d(r), "--out", str(r / "data.h5ad")],
        "is also an input",
    ),
    "tune resumed with other settings": (
        lambda r: [*_tune(r, out="study", model=SLEEPY), "--n-trials", "1", "--seed", "2"],
        "was run with a different seed; resume with the same settings, pass --overwrite",
    ),
    # -- bad data ----------------------------------------------------------------------------
    "info on a dataset with no cells": (
        lambda r: ["info", str(r / "no_cells.h5ad")],
        "the data have no cells",
    ),
    "split of a dataset with no cells": (
        lambda r: ["split", str(r / "no_cells.h5ad"), "--out", str(r / "s.csv")],
        "the data have no cells",
    ),
    "train on a dataset with no cells": (
        lambda r: _train(r, data="no_cells.h5ad"),
        "the data have no cells",
    ),
    "tune on a dataset with no cells": (
        lambda r: _tune(r, data="no_cells.h5ad"),
        "the data have no cells",
    ),
    "evaluate against a dataset with no cells": (
        lambda r: [
            "evaluate",
            "--pred",
            *_d(r),
            "--truth",
            str(r / "no_cells.h5ad"),
            "--out",
            str(r / "new_eval"),
        ],
        "the data have no cells",
    ),
    "celltype-transfer on a dataset with no cells": (
        lambda r: [
            "celltype-transfer",
            str(r / "no_cells.h5ad"),
            "--cell-type",
            "C0",
            "--out",
            str(r / "new_ct"),
        ],
        "the data have no cells",
    ),
    "split of a dataset with no genes": (
        lambda r: ["split", str(r / "no_genes.h5ad"), "--out", str(r / "s.csv")],
        "the data have no genes",
    ),
    "an input that is not an .h5ad": (
        lambda r: ["split", str(r / "notes.txt"), "--out", str(r / "s.csv")],
        "is not an AnnData .h5ad file",
    ),
    "benchmark dataset that is not an .h5ad": (
        lambda r: ["benchmark", str(r / "not_h5ad.yaml"), "--out", str(r / "new_bench")],
        "dataset 'd': ",
    ),
    # -- files whose contents must never be printed ----------------------------------------
    "split --split-file is any file": (
        lambda r: [
            "split",
            *_d(r),
            "--task",
            "custom",
            "--split-file",
            str(r / "secret.txt"),
            "--out",
            str(r / "s.csv"),
        ],
        "does not start with the header 'obs_name,split'",
    ),
    "tune --split is any file": (
        lambda r: _tune(r, split="secret.txt"),
        "does not start with the header 'obs_name,split'",
    ),
    "benchmark config is any file": (
        lambda r: ["benchmark", str(r / "secret.txt"), "--out", str(r / "new_bench")],
        "unknown key <a ",
    ),
    "benchmark custom split is any file": (
        lambda r: ["benchmark", str(r / "secret_split.yaml"), "--out", str(r / "new_bench")],
        "does not start with the header 'obs_name,split'",
    ),
    "tune --space is any file": (
        lambda r: [*_tune(r), "--space", str(r / "secret.txt")],
        "unknown hyperparameter <a ",
    ),
    "tune --space is not valid YAML": (
        lambda r: [*_tune(r), "--space", str(r / "bad.yaml")],
        "is not valid YAML (line 2)",
    ),
    # -- dataset curation ------------------------------------------------------------------
    "datasets fetch norman19 from a file without cell_line": (
        lambda r: ["datasets", "fetch", "norman19", "--from-file", str(r / "no_cell_line.h5ad")],
        "norman19: the raw file lacks obs column(s) cell_line",
    ),
    "datasets fetch over a cached dataset from another file": (
        lambda r: ["datasets", "fetch", "kang18", "--from-file", str(r / "other.h5ad")],
        "kang18 is already cached (",
    ),
    "datasets fetch norman19 from log-normalised values": (
        lambda r: ["datasets", "fetch", "norman19", "--from-file", str(r / "log_values.h5ad")],
        "there is no layers['counts'], but the source publishes raw counts",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_exit_2_one_line_and_changes_nothing(case, files, capsys, monkeypatch):
    monkeypatch.setenv("PERTBENCH_CACHE", str(files / "cache"))  # nothing may be cached
    build, expected = CASES[case]
    before = _snapshot(files)
    code = main(build(files))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    # every other line is a one-line warning or progress, never a traceback
    assert "Traceback" not in err and "internal error" not in err
    assert "do-not-print-me" not in err and "bin:*" not in err
    assert _snapshot(files) == before


def test_read_only_output_folder(files, capsys, tmp_path):
    folder = _readonly_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder here is read-only for this user")
    before = _snapshot(files)
    for out in (folder / "split.csv", folder / "new" / "split.csv"):
        assert main(["split", *_d(files), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot write to folder '{folder}'") and "\n" not in err
    assert main(_tune(files, out=str(folder / "t"))) == 2
    assert "cannot write to folder" in capsys.readouterr().err
    assert _snapshot(files) == before


def test_library_warnings_become_one_warning_line(files, capsys, tmp_path):
    import anndata as ad

    adata = ad.read_h5ad(files / "data.h5ad")
    adata.obs_names = ["same"] * adata.n_obs  # anndata warns on reading, then we refuse
    path = tmp_path / "duplicated.h5ad"
    adata.write_h5ad(path)
    assert main(["info", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith(("warning: ", "error: ")) for line in lines), lines
    assert any("UserWarning from anndata" in line for line in lines), lines
    assert sum(line.startswith("error: ") for line in lines) == 1


def test_overwrite_replaces_and_the_input_still_cannot_be_the_output(files, capsys, tmp_path):
    out = tmp_path / "split.csv"
    out.write_text("old\n")
    args = ["split", *_d(files), "--out", str(out)]
    assert main(args) == 2 and out.read_text() == "old\n"
    assert main([*args, "--overwrite"]) == 0
    assert out.read_text().startswith("obs_name,split")
    data = tmp_path / "data.h5ad"
    data.write_bytes((files / "data.h5ad").read_bytes())
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert main(["split", str(data), "--out", str(data), "--overwrite"]) == 2
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest
    capsys.readouterr()


def test_failed_first_run_leaves_no_folder(files, capsys, tmp_path):
    """A run that fails before any result removes the folder it created (no lock files
    left to block the next run); an existing folder is left as it was."""
    out = tmp_path / "new" / "out"
    for command in (
        _tune(files, data="no_cells.h5ad", out=str(out)),
        ["benchmark", str(files / "not_h5ad.yaml"), "--out", str(out)],
        ["celltype-transfer", str(files / "no_cells.h5ad"), "--cell-type", "C0", "--out", str(out)],
    ):
        assert main(command) == 2
        assert not out.exists(), command
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    assert main(_tune(files, data="no_cells.h5ad", out=str(mine))) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no lock file left
    capsys.readouterr()
