"""The tutorial notebooks in docs/tutorials run top to bottom, and are stored without outputs.

They need the shared real data (../shared/data beside the repository); without it the
execution tests skip with a reason. Each notebook runs in its own kernel with
docs/tutorials as the working directory, the way a user opens it in Jupyter.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import REPO_ROOT, SHARED_DATA

TUTORIALS = REPO_ROOT / "docs" / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
#: Wall-clock limit of one cell, generous for a loaded 2-core CI machine.
CELL_TIMEOUT_S = 600


def test_the_four_tutorials_exist():
    names = [p.stem for p in NOTEBOOKS]
    assert names == [
        "01_scgen_heldout_cd4t",
        "02_scpram_attention",
        "03_benchmarking_imbalance_optuna",
        "04_bring_your_own_model",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(path):
    book = json.loads(path.read_text())
    code = [c for c in book["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    for cell in code:
        assert cell.get("outputs") == [], f"{path.name}: a cell has stored outputs"
        assert cell.get("execution_count") is None, f"{path.name}: a cell has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, capsys):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the tutorials read the shared data at {SHARED_DATA}, which is absent")
    nbformat = pytest.importorskip("nbformat", reason="needs the 'notebooks' extra")
    nbclient = pytest.importorskip("nbclient", reason="needs the 'notebooks' extra")
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    seconds = time.perf_counter() - start
    errors = [
        out
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    # every code cell ran, in order
    counts = [c.execution_count for c in book.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    with capsys.disabled():
        print(f"\n{path.name}: executed in {seconds:.1f} s")
