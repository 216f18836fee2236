"""Model diagnostics of every benchmark cell: the disentanglement probe and the collapse check.

A cell writes, next to its metrics, ``probe.csv`` (models with a basal latent, see
:mod:`pertbench.models.probe`) and ``collapse.csv`` (every model, see
:mod:`pertbench.metrics.collapse`), both labelled with the cell's dataset, task,
scenario, model and seed. The runner collects them into ``DIR/probe.csv`` and
``DIR/collapse.csv``, which the report reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pertbench.benchmark import paths
from pertbench.metrics.collapse import COLLAPSE_COLUMNS, COLLAPSE_FILE, collapse_from_cells
from pertbench.models.probe import PROBE_COLUMNS, PROBE_FILE, disentanglement_probe
from pertbench.utils.io import write_csv_atomic

LABEL_COLUMNS = ["dataset", "task", "scenario", "model", "seed"]
#: ``(file, columns)`` of each diagnostic table, per cell and for the whole run.
TABLES = {
    "probe": (PROBE_FILE, [*LABEL_COLUMNS, *PROBE_COLUMNS]),
    "collapse": (COLLAPSE_FILE, [*LABEL_COLUMNS, *COLLAPSE_COLUMNS]),
}


def write_cell_diagnostics(
    model: Any,
    adata: Any,
    split: pd.Series,
    pred: Any,
    *,
    directory: Path,
    labels: Mapping[str, Any],
    keys: Any,
    on: str,
    seed: int,
) -> dict[str, Any]:
    """Probe ``model``'s basal latent and check ``pred`` for collapse; write both tables.

    Returns facts for the cell's record: ``probe`` (whether a probe table was written)
    and, when the probe could not run on these cells, ``probe_error``.
    """
    from pertbench.errors import PertbenchError

    record: dict[str, Any] = {"probe": False}
    try:
        probe = disentanglement_probe(model, adata, split, seed=seed)
    except PertbenchError as exc:  # e.g. held-out cells of a perturbation it cannot encode
        probe = None
        record["probe_error"] = str(exc).splitlines()[0]
    if probe is not None:
        write_csv_atomic(directory / PROBE_FILE, _labelled(probe, labels, "probe"))
        record["probe"] = True
    stats = collapse_from_cells(adata, pred, split, keys=keys, on=on)
    write_csv_atomic(
        directory / COLLAPSE_FILE, _labelled(pd.DataFrame([stats]), labels, "collapse")
    )
    return record


def _labelled(table: pd.DataFrame, labels: Mapping[str, Any], kind: str) -> pd.DataFrame:
    out = table.copy()
    for key in LABEL_COLUMNS:
        out[key] = labels[key]
    return out[TABLES[kind][1]]


def _read(path: Path) -> pd.DataFrame:
    # Labels are text: a model called "NA" stays "NA" (as in the results table).
    return pd.read_csv(path, keep_default_na=False, na_values=["", "nan", "NaN"])


def collect_diagnostics(cell_dirs: Iterable[Path], out: Path) -> dict[str, pd.DataFrame]:
    """Concatenate the cells' diagnostic tables into ``out/probe.csv`` and ``out/collapse.csv``.

    Cells without a table (models without a latent, cells that failed or ran before the
    diagnostics existed) contribute nothing; an empty table still gets its header.
    """
    cell_dirs = [Path(d) for d in cell_dirs]
    tables = {}
    for kind, (filename, columns) in TABLES.items():
        frames = [
            _read(d / filename)
            for d in cell_dirs
            if (d / paths.DONE_FILE).is_file() and (d / filename).is_file()
        ]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        table = table.reindex(columns=columns)
        write_csv_atomic(out / filename, table)
        tables[kind] = table
    return tables


def read_diagnostics(out: Path) -> dict[str, pd.DataFrame]:
    """The run's diagnostic tables (empty ones for a run that has none)."""
    tables = {}
    for kind, (filename, columns) in TABLES.items():
        file = Path(out) / filename
        frame = _read(file) if file.is_file() else pd.DataFrame(columns=columns)
        for key in ("dataset", "task", "scenario", "model"):
            frame[key] = frame[key].astype(str)
        tables[kind] = frame
    return tables
