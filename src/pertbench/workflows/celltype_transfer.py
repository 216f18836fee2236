"""Held-out cell-type transfer: the scGen / scPRAM tutorial workflow, with baselines.

For each held-out cell type T: split (all perturbed cells of T in test, T's controls in
train), train every model on the rest, predict T's perturbed state from T's controls,
and score the prediction against the real perturbed cells of T with the tutorial metric
set (:func:`pertbench.metrics.tutorial.tutorial_metrics`). The ``no_change`` and
``perturbation_mean`` baselines (control + mean delta of the other cell types) are always
scored beside the models, so a reader sees whether a model learned anything.

Outputs in ``out_dir``:

- ``metrics.csv``: one row per (model, cell type) with the metrics, cell counts, epochs
  and training/prediction time; rewritten atomically after every result. Rows of earlier
  runs into the same folder (other cell types or models) are kept: a rerun merges its rows
  in, replacing only those of the same (model, cell type).
- ``runs/<cell type>/<model>_history.csv``: per-epoch training/validation losses.
- ``runs/<cell type>/<model>.json``: one finished result each. A rerun skips a result
  whose settings fingerprint (data, keys, model parameters, epochs, seed, ...) matches,
  so an interrupted run resumes where it stopped; changed settings recompute.
- ``figures/<cell type>/<model>_{pca,mean_regression,edistance,de_dotplot,de_violin}.png``
  and, for scPRAM, ``<model>_attention.png``; ``attention.csv`` gathers scPRAM's mean
  attention from each held-out type to each reference type (``attention.png``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.errors import ConfigError, DataValidationError
from pertbench.utils.io import atomic_path, write_csv_atomic, write_json_atomic
from pertbench.utils.outputs import merge_table

DEFAULT_MODELS = ("scgen", "scpram")
DEFAULT_BASELINES = ("no_change", "perturbation_mean")
METRICS_FILE = "metrics.csv"
#: Columns that identify one row of ``metrics.csv`` (a rerun replaces rows with these values).
METRICS_KEY = ("model", "cell_type")
RESULT_VERSION = 1
FIGURE_KINDS = ("pca", "mean_regression", "edistance", "de_dotplot", "de_violin")
N_FIGURE_GENES = 10

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    """Default logger: say nothing."""


def safe_name(label: str) -> str:
    """A file-name-safe version of a cell type or model label (``FCGR3A+Mono`` -> ``FCGR3A_Mono``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label)).strip("._") or "unnamed"


def resolve_stimulated(adata: ad.AnnData, keys: PerturbationKeys, stimulated: str | None) -> str:
    """The perturbation label to predict: ``stimulated`` if given, else the only one present."""
    if keys.perturbation_key not in adata.obs.columns:
        raise DataValidationError(
            f"obs has no column '{keys.perturbation_key}'; pass the right --condition-key "
            f"(available: {', '.join(map(str, adata.obs.columns[:20]))})"
        )
    labels = adata.obs[keys.perturbation_key].astype(str)
    present = sorted(set(labels) - {keys.control})
    if keys.control not in set(labels):
        raise DataValidationError(
            f"no cells labelled '{keys.control}' in '{keys.perturbation_key}'; pass the right --control"
        )
    if stimulated is None:
        if len(present) != 1:
            raise ConfigError(
                f"'{keys.perturbation_key}' has {len(present)} non-control labels "
                f"({', '.join(present[:10])}); choose one with --stimulated"
            )
        return present[0]
    if str(stimulated) not in present:
        raise ConfigError(
            f"no cells labelled '{stimulated}' in '{keys.perturbation_key}'; "
            f"available: {', '.join(present[:10])}"
        )
    return str(stimulated)


def two_condition_view(adata: ad.AnnData, keys: PerturbationKeys, stimulated: str) -> ad.AnnData:
    """The control and ``stimulated`` cells only (other perturbations are not part of the task)."""
    labels = adata.obs[keys.perturbation_key].astype(str).to_numpy()
    keep = (labels == keys.control) | (labels == stimulated)
    return adata if keep.all() else adata[keep]


def data_fingerprint(adata: ad.AnnData) -> str:
    """A cheap identity of a dataset: shape, cell and gene names, and a checksum of X."""
    h = hashlib.sha256()
    h.update(f"{adata.n_obs}x{adata.n_vars}".encode())
    h.update("\x00".join(map(str, adata.obs_names)).encode())
    h.update("\x00".join(map(str, adata.var_names)).encode())
    X = adata.X
    data = X.data if sp.issparse(X) else np.asarray(X)
    h.update(np.float64(np.sum(data, dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def resolved_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Every hyperparameter of model ``name`` (defaults filled in), JSON-able.

    Part of a result's settings, so a changed default also invalidates a stored result.
    """
    from pertbench.models.registry import get_model_class

    cls = get_model_class(name)
    values = dataclasses.asdict(cls.make_params(dict(params)))
    return json.loads(json.dumps(values, default=str))


def _settings_hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


@dataclasses.dataclass
class TransferOptions:
    """Settings of one cell-type transfer run (everything that changes its numbers)."""

    models: tuple[str, ...] = DEFAULT_MODELS
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    model_params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    epochs: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    imbalance: float | None = None
    n_bootstrap: int = 100
    figures: bool = True
    device: str = "auto"
    progress: bool = False

    def validate(self) -> None:
        from pertbench.models.registry import MODEL_PATHS

        names = [*self.models, *self.baselines]
        if not names:
            raise ConfigError("no models to run; pass --models")
        unknown = [m for m in names if m not in MODEL_PATHS]
        if unknown:
            raise ConfigError(
                f"unknown model(s) {', '.join(unknown)}; available: {', '.join(MODEL_PATHS)}"
            )
        if len(set(names)) != len(names):
            raise ConfigError(f"a model is listed twice: {', '.join(names)}")
        stray = set(self.model_params) - set(names)
        if stray:
            raise ConfigError(f"parameters given for model(s) not run: {', '.join(sorted(stray))}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.imbalance is not None and not 0 < self.imbalance <= 1:
            raise ConfigError(f"--imbalance must be in (0, 1], got {self.imbalance}")
        if self.n_bootstrap < 1:
            raise ConfigError(f"n_bootstrap must be at least 1, got {self.n_bootstrap}")


def celltype_transfer(
    adata: ad.AnnData,
    *,
    out_dir: str | Path,
    keys: PerturbationKeys | None = None,
    cell_types: str | Sequence[str] = "all",
    stimulated: str | None = None,
    options: TransferOptions | None = None,
    resume: bool = True,
    log: Log = _quiet,
) -> pd.DataFrame:
    """Hold out each requested cell type in turn; train, predict and score every model.

    Parameters
    ----------
    adata
        Log-normalised data with control and perturbed cells of several cell types.
    out_dir
        Output folder (see the module docstring for its layout).
    keys
        Perturbation column, control label and the cell-type column (the FIRST covariate
        key is the cell type that is held out).
    cell_types
        ``"all"`` (every type with control and perturbed cells) or a list of types.
    stimulated
        Perturbation label to predict; may be omitted when only one is present.
    options
        Models, parameters, epochs, seed, ... (:class:`TransferOptions`).
    resume
        Keep finished results whose settings match; ``False`` recomputes everything.
    log
        Receives one line per step (the CLI prints them).

    Returns
    -------
    pandas.DataFrame
        The ``metrics.csv`` table: this run's rows merged into those of earlier runs.
    """
    keys = keys if keys is not None else PerturbationKeys()
    options = options if options is not None else TransferOptions()
    options.validate()
    if not keys.covariate_keys:
        raise ConfigError("the cell-type task needs a cell-type column (--cell-type-key)")
    cell_key = keys.covariate_keys[0]
    stimulated = resolve_stimulated(adata, keys, stimulated)
    data = two_condition_view(adata, keys, stimulated)
    if cell_key not in data.obs.columns:
        raise DataValidationError(
            f"obs has no column '{cell_key}'; pass the right --cell-type-key "
            f"(available: {', '.join(map(str, data.obs.columns[:20]))})"
        )
    types = _heldout_types(data, keys, stimulated, cell_types)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reduced = None
    if options.imbalance is not None:
        from pertbench.data.scenarios import downsample_perturbed

        reduced = downsample_perturbed(
            data, keys=keys, fraction=options.imbalance, seed=options.seed
        ).obs_names
    base_settings = {
        "version": RESULT_VERSION,
        "data": data_fingerprint(data),
        "keys": keys.to_dict(),
        "stimulated": stimulated,
        "epochs": options.epochs,
        "seed": options.seed,
        "val_fraction": options.val_fraction,
        "imbalance": options.imbalance,
        "n_bootstrap": options.n_bootstrap,
    }
    write_json_atomic(
        out_dir / "settings.json",
        {**base_settings, "models": list(options.models), "baselines": list(options.baselines)},
    )
    rows: list[dict[str, Any]] = []
    attention_rows: list[pd.DataFrame] = []
    for cell_type in types:
        task = _HeldOutTask.build(data, keys, stimulated, cell_type, options, reduced)
        for name in (*options.models, *options.baselines):
            params = dict(options.model_params.get(name, {}))
            settings = {
                **base_settings,
                "model": name,
                "params": resolved_params(name, params),
                "cell_type": cell_type,
            }
            path = out_dir / "runs" / safe_name(cell_type) / f"{safe_name(name)}.json"
            done = _load_result(path, settings) if resume else None
            if done is not None:
                log(f"{cell_type} / {name}: kept the finished result")
                rows.append(done["row"])
            else:
                log(f"{cell_type} / {name}: training and scoring")
                result = task.run(
                    name, params, options, out_dir, is_baseline=name in options.baselines
                )
                write_json_atomic(path, {"settings": settings, **result})
                rows.append(result["row"])
                done = result
                log(f"{cell_type} / {name}: " + _headline(result["row"]))
            if done.get("attention"):
                attention_rows.append(pd.DataFrame(done["attention"]).set_index("query"))
            table = merge_table(out_dir / METRICS_FILE, _metrics_table(rows), key=METRICS_KEY)
            write_csv_atomic(out_dir / METRICS_FILE, table)
    if attention_rows:
        _write_attention_summary(attention_rows, out_dir, options.figures)
    return merge_table(out_dir / METRICS_FILE, _metrics_table(rows), key=METRICS_KEY)


def _heldout_types(
    data: ad.AnnData, keys: PerturbationKeys, stimulated: str, cell_types: str | Sequence[str]
) -> list[str]:
    cell_key = keys.covariate_keys[0]
    obs = data.obs
    labels = obs[keys.perturbation_key].astype(str).to_numpy()
    cells = obs[cell_key].astype(str).to_numpy()
    with_stim = set(cells[labels == stimulated])
    with_ctrl = set(cells[labels == keys.control])
    eligible = sorted(with_stim & with_ctrl)
    if isinstance(cell_types, str):
        cell_types = [c.strip() for c in cell_types.split(",") if c.strip()]
    if not cell_types or list(cell_types) == ["all"]:
        if len(eligible) < 2:
            raise DataValidationError(
                f"need at least two cell types with both control and '{stimulated}' cells; "
                f"found {len(eligible)}"
            )
        return eligible
    known = sorted(set(cells))
    out = []
    for c in cell_types:
        if c not in known:
            raise ConfigError(
                f"cell type '{c}' is not in '{cell_key}'; available: {', '.join(known[:20])}"
            )
        if c not in eligible:
            raise DataValidationError(
                f"cell type '{c}' has no {'control' if c not in with_ctrl else repr(stimulated)} "
                "cells; it cannot be held out and scored"
            )
        out.append(c)
    if len(set(out)) != len(out):
        raise ConfigError("a cell type is listed twice")
    if len(eligible) < 2:
        raise DataValidationError("need at least one other cell type with both conditions")
    return out


@dataclasses.dataclass
class _HeldOutTask:
    """One held-out cell type: its dataset, split, truth and controls."""

    data: ad.AnnData
    keys: PerturbationKeys
    cell_type: str
    split: pd.Series
    truth: ad.AnnData
    controls: ad.AnnData
    top_genes: list[str]

    @classmethod
    def build(
        cls,
        data: ad.AnnData,
        keys: PerturbationKeys,
        stimulated: str,
        cell_type: str,
        options: TransferOptions,
        reduced: pd.Index | None,
    ) -> _HeldOutTask:
        from pertbench.data.splits import split_celltype
        from pertbench.pl.celltype import top_de_genes

        cell_key = keys.covariate_keys[0]
        obs = data.obs
        labels = obs[keys.perturbation_key].astype(str).to_numpy()
        in_type = obs[cell_key].astype(str).to_numpy() == cell_type
        if reduced is not None:
            # The imbalanced scenario thins the TRAINING data only: the held-out type keeps
            # all its real perturbed cells, so both scenarios are scored on the same truth.
            keep = data.obs_names.isin(reduced) | (in_type & (labels == stimulated))
            data = data[keep]
            obs = data.obs
            labels = obs[keys.perturbation_key].astype(str).to_numpy()
            in_type = obs[cell_key].astype(str).to_numpy() == cell_type
        result = split_celltype(
            data,
            keys=keys,
            heldout=cell_type,
            covariate_key=cell_key,
            val_fraction=options.val_fraction,
            seed=options.seed,
        )
        split = result.split.reindex(data.obs_names.astype(str))
        truth = data[(split == "test").to_numpy()]
        controls = data[in_type & (labels == keys.control)]
        genes = top_de_genes(controls, truth, n=N_FIGURE_GENES) if options.figures else []
        return cls(data, keys, cell_type, split, truth, controls, genes)

    def run(
        self,
        name: str,
        params: dict[str, Any],
        options: TransferOptions,
        out_dir: Path,
        *,
        is_baseline: bool,
    ) -> dict[str, Any]:
        from pertbench.metrics.tutorial import tutorial_metrics
        from pertbench.models.registry import create_model

        model = create_model(name, keys=self.keys, **params)
        start = time.perf_counter()
        model.fit(
            self.data,
            self.split,
            seed=options.seed,
            device=options.device,
            max_epochs=None if is_baseline else options.epochs,
            progress=options.progress,
        )
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        pred = model.predict_split(self.data, self.split, on="test")
        predict_seconds = time.perf_counter() - start
        metrics = tutorial_metrics(
            self.truth, pred, self.controls, n_bootstrap=options.n_bootstrap, seed=options.seed
        )
        history = getattr(model, "history", None)
        if history is not None:  # per-epoch losses, to judge convergence and early stopping
            write_csv_atomic(
                out_dir / "runs" / safe_name(self.cell_type) / f"{safe_name(name)}_history.csv",
                history,
            )
        row: dict[str, Any] = {
            "model": name,
            "cell_type": self.cell_type,
            "n_train": int((self.split == "train").sum()),
            "n_val": int((self.split == "val").sum()),
            "n_truth": int(self.truth.n_obs),
            "n_controls": int(self.controls.n_obs),
            "epochs": len(history) if history is not None else 0,
            "train_seconds": round(train_seconds, 3),
            "predict_seconds": round(predict_seconds, 3),
            **{k: float(v) for k, v in metrics.items()},
        }
        result: dict[str, Any] = {"row": row}
        table = attention_by_type(model, self.keys)
        if table is not None:
            result["attention"] = table.reset_index().to_dict("list")
        if options.figures and not is_baseline:
            self.figures(name, pred, attention_table=table, out_dir=out_dir, seed=options.seed)
        return result

    def figures(
        self,
        name: str,
        pred: ad.AnnData,
        *,
        attention_table: pd.DataFrame | None,
        out_dir: Path,
        seed: int,
    ) -> None:
        from pertbench import pl
        from pertbench.pl import celltype as cpl

        folder = out_dir / "figures" / safe_name(self.cell_type)
        title = f"{name}: {self.cell_type}"
        figs = {
            "pca": cpl.condition_pca(self.controls, self.truth, pred, seed=seed, title=title),
            "mean_regression": pl.mean_scatter(
                self.truth, pred, controls=self.controls, title=title
            ),
            "edistance": cpl.edistance_heatmap(
                self.controls, self.truth, pred, seed=seed, title=f"E-distance, {title}"
            ),
            "de_dotplot": cpl.de_dotplot(self.controls, self.truth, pred, self.top_genes),
            "de_violin": cpl.de_violins(
                self.controls, self.truth, pred, self.top_genes, title=title
            ),
        }
        if attention_table is not None:
            figs["attention"] = cpl.attention_heatmap(
                attention_table, title=f"{name} attention, held-out {self.cell_type}"
            )
        for kind, fig in figs.items():
            save_figure(fig, folder / f"{safe_name(name)}_{kind}.png")


def attention_by_type(model, keys: PerturbationKeys) -> pd.DataFrame | None:
    """Mean attention of the last prediction from each query cell type to each reference type.

    ``None`` for models without attention (everything but scPRAM).
    """
    attention = getattr(model, "last_attention", None)
    if attention is None:
        return None
    groups = attention.query_obs[keys.covariate_keys[0]].astype(str).to_numpy()
    return attention.by_reference_type(groups)


def save_figure(fig, path: Path, *, dpi: int = 90) -> Path:
    """Write a matplotlib figure atomically (format from the suffix)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    return path


def _load_result(path: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged result is recomputed
    if _settings_hash(stored.get("settings", {})) != _settings_hash(
        json.loads(json.dumps(settings, default=str))
    ):
        return None
    return stored


def _metrics_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    if not rows:
        return pd.DataFrame(columns=["model", "cell_type"])
    return pd.DataFrame(rows).reset_index(drop=True)


def _headline(row: Mapping[str, Any]) -> str:
    parts = [
        f"{k}={row[k]:.3f}"
        for k in ("r2", "pearson_delta", "edistance", "jaccard_top100")
        if k in row
    ]
    return ", ".join(parts) + f" ({row['train_seconds']:.1f}s training)"


def _write_attention_summary(tables: list[pd.DataFrame], out_dir: Path, figures: bool) -> None:
    summary = pd.concat(tables).groupby(level=0, sort=True).mean()
    summary = summary.reindex(columns=sorted(summary.columns))
    write_csv_atomic(
        out_dir / "attention.csv", summary.reset_index().rename(columns={"index": "query"})
    )
    if figures:
        from pertbench.pl.celltype import attention_heatmap

        fig = attention_heatmap(summary, title="scPRAM attention by held-out type")
        save_figure(fig, out_dir / "attention.png")
