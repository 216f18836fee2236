"""The one API every model follows.

A :class:`PerturbationModel` is the user-facing object: it owns hyperparameters, the gene
list and category encodings, training and save/load. Neural models keep their network in a
plain ``torch.nn.Module`` (one per model file) and train it with
:func:`pertbench.models.training.fit_module`.

Prediction is always *counterfactual*: given control cells of known covariates and a
requested perturbation per cell, return what those cells would look like perturbed. It is
deterministic given the seed and never samples latent noise. :func:`build_counterfactuals`
makes such requests from a dataset; :meth:`PerturbationModel.predict_split` does it for
every held-out group of a split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.groups import group_cells
from pertbench.data.keys import PerturbationKeys
from pertbench.data.ondisk import OnDiskData, RowReader, is_on_disk, open_h5ad
from pertbench.data.splits import LEFT_OUT, SPLIT_NAMES, check_split_values
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    InputFileError,
    ModelError,
    UnseenPerturbationError,
)
from pertbench.models.counterfactual import (  # noqa: F401  (re-exported)
    CONTROL_OBS_COLUMN,
    CounterfactualPlan,
    build_counterfactuals,
    counterfactual_plan,
    heldout_groups,
)
from pertbench.models.encoding import CategoryEncoding
from pertbench.utils.io import atomic_path, write_json_atomic
from pertbench.utils.random import resolve_device

if TYPE_CHECKING:
    from pertbench.models.blocks import BlockSampling

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
EpochCallback = Callable[[int, Mapping[str, float]], None]


@dataclass
class TrainingCells:
    """Training cells whose expression ``X`` is read by rows (a
    :class:`~pertbench.data.ondisk.RowReader`): what a model with ``streams_training`` gets
    in ``_fit`` in place of an AnnData (obs and X only) when it learns from a file on disk
    (:meth:`PerturbationModel.fit_from_reader`, or :meth:`~PerturbationModel.fit` given a
    file)."""

    obs: pd.DataFrame
    X: Any

    @property
    def n_obs(self) -> int:
        return len(self.obs)


@dataclass
class FitContext:
    """Run settings of one :meth:`PerturbationModel.fit` call (not hyperparameters)."""

    seed: int = 0
    device: str = "cpu"
    max_epochs: int | None = None
    progress: bool = True
    log_dir: Path | None = None
    epoch_callback: EpochCallback | None = None
    """Called after every epoch with the epoch's metrics (``val_loss`` among them); may
    raise (e.g. ``optuna.TrialPruned``) to stop training."""
    sampling: BlockSampling | None = None
    """Block shuffle of out-of-core training (``None``: the default :class:`BlockSampling`)."""


@dataclass
class PredictionInputs:
    """What a model receives at prediction time, aligned row by row.

    Attributes
    ----------
    X
        Control expression restricted and ordered to the training genes (CSR or dense),
        or the control cells' embedding from ``obsm`` for embedding-input models.
    perturbations
        Multi-hot CSR (n_cells x n_perturbation components) of the requested perturbation,
        or a dense (n_cells x d) feature matrix for models that encode perturbations by
        embeddings.
    covariate_codes
        (n_cells x n_covariate_keys) integer codes.
    covariate_onehot
        Concatenated one-hot covariates, float32.
    obs
        The request's obs (covariates, perturbation, control obs names, ...).
    """

    X: Any
    perturbations: Any
    covariate_codes: np.ndarray
    covariate_onehot: np.ndarray
    obs: pd.DataFrame

    @property
    def n_cells(self) -> int:
        return len(self.obs)


class PerturbationModel(ABC):
    """Base class of all models.

    Subclasses set ``name``, a ``Params`` dataclass with hyperparameters and their defaults,
    and implement :meth:`_fit` and :meth:`_predict`. Models with learned state implement
    :meth:`_state` / :meth:`_load_state` (tensors only, so loading works with
    ``torch.load(weights_only=True)``) and :meth:`_extra_config` for JSON-able facts
    needed to rebuild the network.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type] = dataclasses.make_dataclass("Params", [])
    #: ``"expression"``: prediction starts from control expression; ``"none"``: from
    #: covariates/perturbation only (decoder-only and analytic baselines).
    input_kind: ClassVar[str] = "expression"
    #: Hyperparameter distributions for tuning (see :mod:`pertbench.models.search_space`).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Cells per batch of the model's own prediction loop: chunked prediction
    #: (:meth:`predict_split_to_h5ad`) uses chunks of a multiple of it, so every batch
    #: holds the same cells as in one :meth:`predict` call and the numbers are identical.
    predict_batch_size: ClassVar[int] = 4096
    #: False when the prediction of a cell depends on the other cells of the request (or
    #: the model keeps state about the whole request): then it is predicted in one chunk.
    chunked_prediction: ClassVar[bool] = True
    #: True for models whose training reads ``train.X`` only by rows (group statistics),
    #: so that they can be fitted from a file on disk (:meth:`fit_from_reader`).
    streams_training: ClassVar[bool] = False

    def __init__(self, *, keys: PerturbationKeys | None = None, **params: Any) -> None:
        self.keys = keys if keys is not None else PerturbationKeys()
        self.params = self.make_params(params)
        self.genes: pd.Index | None = None
        self.encoding: CategoryEncoding | None = None
        self.history: pd.DataFrame | None = None
        self.seed: int = 0
        self.device: str = "cpu"
        self.fit_seconds: float | None = None
        #: Remarks about the last prediction (e.g. a baseline's fallbacks); copied into
        #: the output's ``uns['pertbench']['notes']``.
        self.prediction_notes: list[str] = []
        self.trained_perturbations: list[str] | None = None

    # -- hyperparameters -------------------------------------------------------------------
    @classmethod
    def make_params(cls, params: Mapping[str, Any]) -> Any:
        """Build the ``Params`` dataclass, rejecting unknown names and coercing types."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise ConfigError(
                f"model '{cls.name}' has no hyperparameter {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(fields)) or '(none)'}"
            )
        coerced = {}
        for key, value in params.items():
            default = fields[key].default
            coerced[key] = _coerce_like(value, default, f"{cls.name}.{key}")
        return cls.Params(**coerced)

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Params())

    # -- fitting -------------------------------------------------------------------------
    def fit(
        self,
        adata: ad.AnnData | str | os.PathLike | OnDiskData,
        split: pd.Series | None = None,
        *,
        seed: int = 0,
        device: str = "auto",
        max_epochs: int | None = None,
        progress: bool = True,
        log_dir: str | Path | None = None,
        epoch_callback: EpochCallback | None = None,
        sampling: BlockSampling | None = None,
    ) -> PerturbationModel:
        """Train on the ``train`` cells of ``split`` (validation on ``val`` when present).

        Parameters
        ----------
        adata
            The whole dataset (log-normalised ``X``); only cells marked ``train``/``val``
            are used. In memory, or on disk: a path to an ``.h5ad`` file or an AnnData
            opened with ``anndata.read_h5ad(path, backed="r")``. On disk, neural models
            train out of core, reading blocks of cells (see :mod:`pertbench.models.blocks`
            for the sampling order); the other models read their train and val cells
            into memory (only those cells). The file is validated chunk by chunk and
            never modified.
        split
            Split Series aligned to ``adata.obs_names``; ``None`` trains on all cells.
        seed
            Seeds weight initialisation, control matching and batching.
        device
            ``auto`` (GPU when present), ``cpu``, ``cuda``...
        max_epochs
            Overrides the model's default number of epochs.
        log_dir
            Where to write ``training_log.csv`` and checkpoints.
        epoch_callback
            ``f(epoch, metrics)`` after each epoch; may raise to stop (used for pruning).
        sampling
            Block size and buffer of out-of-core training (default
            :class:`~pertbench.models.blocks.BlockSampling`); ignored in memory.
        """
        if is_on_disk(adata):
            with _opened(adata, self.keys) as data:
                train_mask, val_mask = self._begin_fit(data, split, seed=seed, device=device)
                context = self._fit_context(max_epochs, progress, log_dir, epoch_callback)
                context.sampling = sampling
                start = time.perf_counter()
                self._fit_from_disk(
                    data, np.flatnonzero(train_mask), np.flatnonzero(val_mask), context
                )
        else:
            train_mask, val_mask = self._begin_fit(adata, split, seed=seed, device=device)
            train = adata[train_mask]
            val = adata[val_mask] if val_mask.any() else None
            context = self._fit_context(max_epochs, progress, log_dir, epoch_callback)
            start = time.perf_counter()
            self._fit(train, val, context)
        self.fit_seconds = time.perf_counter() - start
        return self

    def _begin_fit(
        self, adata: Any, split: pd.Series | None, *, seed: int, device: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`fit` does before learning, from obs and var only: align and check
        the split, set seed, device, genes and the category encoding. Returns the train
        and val masks."""
        split = align_split(adata, split)
        train_mask = (split == "train").to_numpy()
        val_mask = (split == "val").to_numpy()
        if not train_mask.any():
            raise ModelError("the split has no 'train' cells; check the split file")
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.genes = pd.Index(adata.var_names.astype(str), name="gene")
        if not self.genes.is_unique:
            raise DataValidationError(
                "gene names (var_names) are not unique; make them unique before training"
            )
        missing_controls = _covariates_without_controls(adata.obs[train_mask], self.keys)
        if missing_controls and self.input_kind == "expression":
            raise ModelError(
                f"training cells of covariates {', '.join(missing_controls)} have no controls; "
                "a split must keep control cells of every covariate in train"
            )
        self.encoding = CategoryEncoding.fit(adata.obs[train_mask | val_mask], self.keys)
        # what training taught: val-only perturbations are encoded (for the validation
        # loss) but not learned, so they do not count as predictable
        self.trained_perturbations = CategoryEncoding.fit(
            adata.obs[train_mask], self.keys
        ).perturbations
        return train_mask, val_mask

    def _fit_context(
        self,
        max_epochs: int | None,
        progress: bool,
        log_dir: str | Path | None,
        epoch_callback: EpochCallback | None,
    ) -> FitContext:
        context = FitContext(
            seed=self.seed,
            device=self.device,
            max_epochs=max_epochs,
            progress=progress,
            log_dir=Path(log_dir) if log_dir is not None else None,
            epoch_callback=epoch_callback,
        )
        if context.log_dir is not None:
            context.log_dir.mkdir(parents=True, exist_ok=True)
        return context

    def _fit_from_disk(
        self,
        data: OnDiskData,
        train_rows: np.ndarray,
        val_rows: np.ndarray,
        context: FitContext,
    ) -> None:
        """Learn from cells of an on-disk dataset (rows of the file).

        The default reads the train and val cells into memory and calls :meth:`_fit`;
        a model that learns from group statistics only (``streams_training``) gets its
        training cells read chunk by chunk, as in :meth:`fit_from_reader`; models that
        stream batches (every neural model) override it.
        """
        if self.streams_training:
            self._fit(_training_cells(data.obs, RowReader(data.X), train_rows), None, context)
            return
        train = data.to_memory(train_rows)
        val = data.to_memory(val_rows) if val_rows.size else None
        self._fit(train, val, context)

    def fit_from_reader(
        self, adata: ad.AnnData, split: pd.Series | None, reader: Any, *, seed: int = 0
    ) -> PerturbationModel:
        """Fit like :meth:`fit` (on CPU, without validation cells), reading expression by rows.

        Parameters
        ----------
        adata
            Gives obs and var (it may be backed, or have no X).
        split
            As for :meth:`fit`.
        reader
            A :class:`~pertbench.data.ondisk.RowReader` of ``adata``'s expression over its
            genes (e.g. a file on disk): training cells are read from it chunk by chunk.
        """
        if not self.streams_training:
            raise ModelError(
                f"model '{self.name}' cannot be trained from rows read on demand; "
                "load the data in memory and call fit()"
            )
        train_mask, _ = self._begin_fit(adata, split, seed=seed, device="cpu")
        train = _training_cells(adata.obs, reader, np.flatnonzero(train_mask))
        start = time.perf_counter()
        self._fit(train, None, FitContext(seed=self.seed, device=self.device, progress=False))
        self.fit_seconds = time.perf_counter() - start
        return self

    @abstractmethod
    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        """Learn from training cells (``val`` for early stopping, may be ``None``)."""

    @property
    def is_fitted(self) -> bool:
        return self.genes is not None and self.encoding is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ModelError(
                f"model '{self.name}' is not trained yet; call fit() or load a trained run"
            )

    # -- which perturbations can be predicted ---------------------------------------------
    @property
    def predicts_unseen_perturbations(self) -> bool:
        """True when the model can predict perturbations absent from its training cells.

        False for models that encode perturbations one-hot/multi-hot (the default); True
        for models that ignore the perturbation or read perturbation features
        (embeddings). Known before fitting; :meth:`can_predict` gives the exact answer
        of a trained model.
        """
        return False

    def can_predict(self, labels) -> np.ndarray:
        """True for each perturbation label the trained model can predict.

        The default (one-hot encodings): every component has training cells.
        """
        self._require_fitted()
        trained = self.trained_perturbations
        known = set(self.encoding.perturbations if trained is None else trained)
        return np.asarray(
            [
                all(p in known for p in self.keys.components(str(label)))
                for label in pd.Series(labels).astype(str)
            ],
            dtype=bool,
        )

    def cannot_predict_message(self, labels: list[str]) -> str:
        """One line saying why ``labels`` cannot be predicted (they are not empty)."""
        shown = ", ".join(sorted(labels)[:5]) + (" ..." if len(labels) > 5 else "")
        return (
            f"model '{self.name}' encodes perturbations one-hot and never saw {shown} in "
            "training: it cannot predict unseen perturbations (use one that reads "
            "perturbation features, e.g. linear_embedding or latent_additive with "
            "perturbation_embedding=gene)"
        )

    def unpredictable_reason(self, labels) -> str | None:
        """``None`` when every label can be predicted, else the one-line reason."""
        unique = pd.unique(pd.Series(labels).astype(str))
        can = self.can_predict(unique)
        if can.all():
            return None
        return self.cannot_predict_message([str(u) for u in unique[~can]])

    def check_predictable(self, labels) -> None:
        """Raise :class:`~pertbench.errors.UnseenPerturbationError` (one line) unless every
        label can be predicted."""
        reason = self.unpredictable_reason(labels)
        if reason is not None:
            raise UnseenPerturbationError(reason)

    # -- prediction ------------------------------------------------------------------------
    def predict(self, counterfactual: ad.AnnData, *, seed: int | None = None) -> ad.AnnData:
        """Predict perturbed expression for each row of a counterfactual request.

        Parameters
        ----------
        counterfactual
            One row per control cell to perturb: ``X`` its expression (any gene order; all
            training genes must be present), obs with the covariate columns and, in the
            perturbation column, the requested perturbation. Build it with
            :func:`build_counterfactuals`.
        seed
            Seed for any randomness at prediction time (defaults to the training seed).

        Returns
        -------
        AnnData
            Predicted log-normalised expression over the training genes, obs copied from
            the request, ``uns['pertbench']`` describing the prediction.
        """
        self._require_fitted()
        inputs = self.prepare_inputs(counterfactual)
        seed = self.seed if seed is None else int(seed)
        self.prediction_notes = []
        values = self._predict(inputs, seed=seed)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (inputs.n_cells, len(self.genes)):
            raise RuntimeError(
                f"{self.name} returned shape {values.shape}, expected {(inputs.n_cells, len(self.genes))}"
            )
        if not np.isfinite(values).all():
            raise ModelError(
                f"model '{self.name}' produced NaN/inf predictions; training diverged (try a lower lr)"
            )
        out = ad.AnnData(X=values, obs=inputs.obs.copy(), var=pd.DataFrame(index=self.genes.copy()))
        out.uns["pertbench"] = self.prediction_uns(seed)
        if self.prediction_notes:
            out.uns["pertbench"]["notes"] = list(self.prediction_notes)
        return out

    def prepare_inputs(self, counterfactual: ad.AnnData) -> PredictionInputs:
        """Check a counterfactual request and encode it for :meth:`_predict`."""
        self._require_fitted()
        obs = counterfactual.obs
        for key in (self.keys.perturbation_key, *self.keys.covariate_keys):
            if key not in obs.columns:
                raise DataValidationError(f"counterfactual obs has no column '{key}'")
        self.check_predictable(obs[self.keys.perturbation_key])
        perturbations = self._perturbation_inputs(obs)
        cov_codes = self.encoding.covariate_codes(obs)
        cov_onehot = self.encoding.covariate_onehot(obs)
        X = self._input_matrix(counterfactual) if self.input_kind == "expression" else None
        return PredictionInputs(
            X=X,
            perturbations=perturbations,
            covariate_codes=cov_codes,
            covariate_onehot=cov_onehot,
            obs=obs.copy(),
        )

    def _perturbation_inputs(self, obs: pd.DataFrame):
        """The perturbation input of each request row: multi-hot (dose-valued) by default."""
        return self.encoding.perturbation_matrix(
            obs[self.keys.perturbation_key],
            dose=obs[self.keys.dose_key]
            if self.keys.dose_key and self.keys.dose_key in obs
            else None,
        )

    def _input_matrix(self, adata: ad.AnnData):
        """Control expression restricted to the training genes, in training order."""
        return align_genes(adata, self.genes)

    def basal_latent(self, adata: ad.AnnData) -> np.ndarray | None:
        """The model's basal (cell-state) latent of ``adata``'s cells, or ``None``.

        Models with a latent space return one row per cell (deterministic: encoder
        means, no sampling) of the cells *as observed* (their own perturbation and
        covariates in obs); the disentanglement probe
        (:func:`pertbench.models.probe.disentanglement_probe`) reads it. Models without
        one (analytic baselines, linear, decoder_only) return ``None``.
        """
        self._require_fitted()
        return None

    @abstractmethod
    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        """Return a dense (n_cells x n_genes) array of predicted log expression."""

    def predict_split(
        self,
        adata: ad.AnnData | str | os.PathLike | OnDiskData,
        split: pd.Series,
        *,
        on: str = "test",
        seed: int | None = None,
    ) -> ad.AnnData:
        """Predict every held-out group of ``split[on]`` from its covariates' control cells.

        One predicted cell per control cell. Controls are those of the same covariates in
        the ``on`` split; a covariate with none there (e.g. the cell-type task, whose
        controls stay in train) uses all of its control cells. ``adata`` may be on disk
        (a path or a backed AnnData): only the control cells are read. To write the
        predictions to a file chunk by chunk, in bounded memory, use
        :meth:`predict_split_to_h5ad`.
        """
        with _opened(adata, self.keys) as data:
            plan = self.split_plan(data, split, on=on)
            counterfactual = plan.cells(data)
        pred = self.predict(counterfactual, seed=seed)
        pred.uns["pertbench"]["split"] = on
        return pred

    def split_plan(self, adata: Any, split: pd.Series, *, on: str = "test") -> CounterfactualPlan:
        """The counterfactual rows :meth:`predict_split` predicts (from obs alone)."""
        if on not in SPLIT_NAMES:
            raise ConfigError(f"--on must be one of {', '.join(SPLIT_NAMES)}, got '{on}'")
        split = align_split(adata, split)
        requests = heldout_groups(adata, split, self.keys, on=on)
        if requests.empty:
            raise ModelError(f"the split has no perturbed '{on}' cells to predict")
        return counterfactual_plan(
            adata.obs, requests, self.keys, control_split=split, prefer_split=on
        )

    def predict_split_to_h5ad(
        self,
        adata: ad.AnnData | str | os.PathLike | OnDiskData,
        split: pd.Series,
        out: str | os.PathLike,
        *,
        on: str = "test",
        seed: int | None = None,
        chunk_cells: int | None = None,
        uns: dict[str, Any] | None = None,
    ) -> Path:
        """:meth:`predict_split` written to ``out`` chunk by chunk (bounded memory, atomic).

        Reads of the input and the predicted cells held in memory are bounded by one
        chunk of ``chunk_cells`` cells (default 16,384); the file is identical to writing
        :meth:`predict_split`'s result (see :mod:`pertbench.models.chunked`). ``uns``
        entries are added to ``uns['pertbench']``.
        """
        from pertbench.models.chunked import write_predictions

        self._require_fitted()
        seed = self.seed if seed is None else int(seed)
        with _opened(adata, self.keys) as data:
            plan = self.split_plan(data, split, on=on)
            return write_predictions(
                self,
                data,
                plan,
                out,
                seed=seed,
                chunk_cells=chunk_cells,
                uns={**self.prediction_uns(seed), "split": on, **(uns or {})},
            )

    def prediction_uns(self, seed: int) -> dict[str, Any]:
        """What a prediction records in ``uns['pertbench']``."""
        return {"model": self.name, "prediction": "counterfactual", "seed": seed}

    # -- persistence ---------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        """JSON-able facts (beyond params/genes/encoding) needed to rebuild the model."""
        return {}

    def _state(self) -> dict[str, Any]:
        """Learned state as a (nested) dict of tensors."""
        return {}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:  # noqa: B027
        """Rebuild networks from ``extra`` and load ``state`` (no-op for stateless models)."""

    def save(self, path: str | Path) -> Path:
        """Save to a directory: ``config.json`` (readable) and ``weights.pt`` (tensors only)."""
        import torch

        from pertbench import __version__

        self._require_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = _to_cpu(self._state())
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            torch.save(state, tmp)
        config = {
            "model": self.name,
            "model_class": f"{type(self).__module__}:{type(self).__qualname__}",
            "pertbench_version": __version__,
            "params": _jsonable(dataclasses.asdict(self.params)),
            "keys": self.keys.to_dict(),
            "genes": self.genes.tolist(),
            "encoding": self.encoding.to_dict(),
            "trained_perturbations": self.trained_perturbations,
            "seed": self.seed,
            "fit_seconds": self.fit_seconds,
            "extra": _jsonable(self._extra_config()),
        }
        write_json_atomic(path / CONFIG_FILE, config)
        if self.history is not None:
            from pertbench.utils.io import write_csv_atomic

            write_csv_atomic(path / "history.csv", self.history)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, device: str = "auto", model_class: Any = None
    ) -> PerturbationModel:
        """Load a model saved with :meth:`save`.

        The class is the registered model the config names; a model that is not
        registered (neither pertbench's nor an installed package's entry point) is only
        loaded with ``model_class`` (the class, or ``package.module:ClassName``) given
        explicitly: a run folder never makes pertbench import the code it names.
        """
        import torch

        from pertbench.models.registry import model_class_for_run

        path = Path(path)
        config_path = path / CONFIG_FILE
        if not config_path.is_file():
            raise InputFileError(f"'{path}' is not a saved model: {CONFIG_FILE} is missing")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputFileError(f"cannot parse {config_path}: {exc}") from exc
        model_cls = model_class_for_run(
            str(config.get("model", "")), where=str(path), model_class=model_class
        )
        if cls is not PerturbationModel and not issubclass(model_cls, cls):
            raise ModelError(f"'{path}' holds a '{config['model']}' model, not '{cls.name}'")
        keys = PerturbationKeys.from_dict(config["keys"])
        model = model_cls(keys=keys, **config["params"])
        model.genes = pd.Index(config["genes"], name="gene")
        model.encoding = CategoryEncoding.from_dict(config["encoding"])
        trained = config.get("trained_perturbations")
        model.trained_perturbations = list(trained) if trained is not None else None
        model.seed = int(config.get("seed", 0))
        model.fit_seconds = config.get("fit_seconds")
        model.device = resolve_device(device)
        weights = path / WEIGHTS_FILE
        state = (
            torch.load(weights, map_location=model.device, weights_only=True)
            if weights.is_file()
            else {}
        )
        model._load_state(state, config.get("extra", {}))
        history = path / "history.csv"
        if history.is_file():
            model.history = pd.read_csv(history)
        return model


# ---------------------------------------------------------------------------------------
# Helpers shared by models, the CLI and the benchmark runner
# ---------------------------------------------------------------------------------------
def align_split(adata: ad.AnnData, split: pd.Series | None) -> pd.Series:
    """Return ``split`` aligned to ``adata.obs_names`` (all ``train`` when ``None``)."""
    if split is None:
        return pd.Series("train", index=adata.obs_names.astype(str), name="split", dtype=object)
    check_split_values(split)
    names = pd.Index(adata.obs_names.astype(str))
    idx = pd.Index(split.index.astype(str))
    if not idx.equals(names):
        unknown = idx.difference(names)
        if len(unknown):
            raise ConfigError(
                f"the split names {len(unknown)} cell(s) not in the data (e.g. {unknown[0]!r}); "
                "was it made for another dataset?"
            )
        split = pd.Series(split.to_numpy(), index=idx).reindex(names, fill_value=LEFT_OUT)
    return split


def align_genes(adata: ad.AnnData, genes: pd.Index):
    """``adata.X`` with columns reordered to ``genes`` (CSR stays CSR); missing genes are an error."""
    names = pd.Index(adata.var_names.astype(str))
    if names.equals(genes):
        X = adata.X
    else:
        idx = names.get_indexer(genes)
        if (idx < 0).any():
            missing = genes[idx < 0]
            raise DataValidationError(
                f"{len(missing)} training gene(s) are missing from the input, e.g. {', '.join(missing[:5])}"
            )
        X = adata.X[:, idx]
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float32)
    return np.asarray(X, dtype=np.float32)


@contextlib.contextmanager
def _opened(adata: Any, keys: PerturbationKeys) -> Iterator[Any]:
    """``adata`` itself when in memory, else the file opened by rows (closed afterwards)."""
    if not is_on_disk(adata):
        yield adata
        return
    data = open_h5ad(adata, keys=keys)
    try:
        yield data
    finally:
        if data is not adata:
            data.close()


def _training_cells(obs: pd.DataFrame, reader: RowReader, rows: np.ndarray) -> TrainingCells:
    return TrainingCells(obs=obs.iloc[rows], X=reader.subset(rows))


def _covariates_without_controls(obs: pd.DataFrame, keys: PerturbationKeys) -> list[str]:
    grouping = group_cells(obs, keys)
    has_ctrl = np.zeros(len(grouping.covariates), dtype=bool)
    has_ctrl[np.unique(grouping.covariate_codes[grouping.is_control])] = True
    return grouping.covariates.loc[~has_ctrl, "label"].tolist()


def _coerce_like(value: Any, default: Any, name: str) -> Any:
    """Coerce CLI strings (``--set lr=1e-3``) to the type of the default."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return int(value)
        if isinstance(default, tuple) and isinstance(value, list):
            return tuple(value)
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low in {"true", "1", "yes"}:
                return True
            if low in {"false", "0", "no"}:
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (tuple, list)):
            return type(default)(json.loads(value))
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {value!r} as {type(default).__name__}") from exc
    return value


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _to_cpu(state: Any) -> Any:
    import torch

    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(state))
    return state


def params_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A ``Params`` dataclass field with a help text (shown by ``pertbench models``)."""
    return field(default=default, metadata={"help": help, **kwargs})
