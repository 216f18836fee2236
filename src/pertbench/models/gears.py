"""``gears``: adapter to the published GEARS package (optional extra ``pertbench[gears]``).

GEARS (Roohani et al., 2023) is a graph neural network over a gene-ontology graph of
perturbations and a co-expression graph of genes. It is used through its own package
(``cell-gears``, which needs ``torch_geometric``); this module only converts data in and
predictions out, so that GEARS trains on our splits and predicts through our API:

- **Data in.** Train and val cells become a GEARS ``PertData``: conditions are renamed to
  GEARS' convention (control -> ``ctrl``, a single ``A`` -> ``A+ctrl``, combinations
  ``A+B`` unchanged), ``var['gene_name']`` holds the genes, and our split becomes a GEARS
  ``custom`` split (``{'train': [...], 'val': [...]}`` of conditions).
- **Graphs.** GEARS downloads its gene-ontology files from the internet; pertbench never
  does. Put them in a folder and pass it as ``go_dir``: ``gene2go_all.pkl``,
  ``essential_all_data_pert_genes.pkl`` and ``go_essential_all/go_essential_all.csv``
  (the files GEARS' ``PertData`` and ``GEARS.model_initialize`` fetch into their data
  folder). Every perturbed gene must be a node of that graph.
- **Predictions out.** GEARS' own ``predict`` averages 300 random control cells; here the
  trained network is applied to each requested control cell (one prediction per control
  cell, in order, in eval mode: deterministic).

GEARS has no covariate input: it is trained on one covariate state (e.g. Norman19's
K562 combination task). PerturBench also ran it only there (appendix D.5). GEARS' own
code draws from the global NumPy/torch random state; fitting seeds them inside a scope
and restores the caller's state afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.errors import ConfigError, ModelError, require
from pertbench.models.base import FitContext, PerturbationModel, PredictionInputs, params_field
from pertbench.models.layers import torch_seed_scope

GO_FILES = (
    "gene2go_all.pkl",
    "essential_all_data_pert_genes.pkl",
    "go_essential_all/go_essential_all.csv",
)
GEARS_CONTROL = "ctrl"
PURPOSE = "the 'gears' model"


def _gears():
    """Import GEARS and torch_geometric, or raise MissingDependencyError."""
    require("torch_geometric", "gears", PURPOSE)
    return require("gears", "gears", PURPOSE)


@dataclass
class GEARSParams:
    go_dir: str = params_field(
        "",
        "Folder with GEARS' gene-ontology files (gene2go_all.pkl, "
        "essential_all_data_pert_genes.pkl, go_essential_all/go_essential_all.csv).",
    )
    hidden_size: int = params_field(64, "Width of the gene and perturbation embeddings.")
    num_go_gnn_layers: int = params_field(1, "GNN layers over the perturbation (GO) graph.")
    num_gene_gnn_layers: int = params_field(1, "GNN layers over the gene co-expression graph.")
    decoder_hidden_size: int = params_field(16, "Width of the gene-specific decoder.")
    num_similar_genes_go_graph: int = params_field(
        20, "Neighbouring perturbations per node in the GO graph."
    )
    num_similar_genes_co_express_graph: int = params_field(
        20, "Neighbouring genes per node in the co-expression graph."
    )
    coexpress_threshold: float = params_field(
        0.4, "Minimum Pearson correlation for a co-expression edge."
    )
    direction_lambda: float = params_field(0.1, "Weight of GEARS' direction loss.")
    lr: float = params_field(1e-3, "Learning rate (GEARS' Adam, halved every epoch).")
    wd: float = params_field(5e-4, "Weight decay.")
    batch_size: int = params_field(32, "Cells per training minibatch.")
    max_epochs: int = params_field(20, "Training epochs (GEARS keeps the best on val).")


@contextlib.contextmanager
def _global_seed_scope(seed: int, device: str):
    """Seed Python/NumPy/torch global state (GEARS uses it) and restore it afterwards."""
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 (third-party code uses global state)
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002
    try:
        with torch_seed_scope(seed, device):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def gears_condition(label: str, keys) -> str:
    """Our perturbation label in GEARS' naming: ``ctrl``, ``A+ctrl`` or ``A+B``."""
    parts = keys.components(label)
    if not parts:
        return GEARS_CONTROL
    if len(parts) == 1:
        return f"{parts[0]}+{GEARS_CONTROL}"
    if len(parts) == 2:
        return "+".join(parts)
    raise ModelError(f"GEARS handles single and double perturbations, not '{label}'")


def check_go_dir(go_dir: str) -> Path:
    """The folder of GEARS' gene-ontology files, or a ConfigError saying what is missing."""
    if not go_dir:
        raise ConfigError(
            "gears needs its gene-ontology files (GEARS downloads them; pertbench does not): "
            f"put {', '.join(GO_FILES)} in a folder and pass --set go_dir=FOLDER"
        )
    folder = Path(go_dir)
    missing = [name for name in GO_FILES if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"go_dir '{folder}' lacks {', '.join(missing)}; see 'pertbench models gears'"
        )
    return folder


class _SeriesIndexableCSR(sp.csr_matrix):
    """CSR matrix that also accepts pandas boolean Series as row masks.

    GEARS 0.1.2 indexes ``adata.X`` with ``adata.obs.condition == 'ctrl'`` (a Series),
    which current scipy rejects; converting the mask keeps GEARS working unchanged.
    """

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key = tuple(k.to_numpy() if isinstance(k, pd.Series) else k for k in key)
        elif isinstance(key, pd.Series):
            key = key.to_numpy()
        return super().__getitem__(key)


def to_gears_adata(adata: ad.AnnData, keys, genes: pd.Index) -> ad.AnnData:
    """Our cells as the AnnData GEARS' ``PertData.new_data_process`` expects."""
    from pertbench.models.base import align_genes

    X = sp.csr_matrix(align_genes(adata, genes), dtype=np.float32)
    labels = adata.obs[keys.perturbation_key].astype(str)
    mapping = {u: gears_condition(u, keys) for u in pd.unique(labels)}
    if keys.covariate_keys:
        cell_type = adata.obs[list(keys.covariate_keys)].astype(str).agg("/".join, axis=1)
    else:
        cell_type = pd.Series("all", index=adata.obs_names)
    obs = pd.DataFrame(
        {"condition": labels.map(mapping).to_numpy(), "cell_type": cell_type.to_numpy()},
        index=pd.Index(adata.obs_names.astype(str)),
    )
    var = pd.DataFrame({"gene_name": genes.to_numpy()}, index=pd.Index(genes.astype(str)))
    return ad.AnnData(X=X, obs=obs, var=var)


class GEARS(PerturbationModel):
    """GEARS (published package) trained on our split and predicting per control cell."""

    name: ClassVar[str] = "gears"
    description: ClassVar[str] = (
        "GEARS graph neural network (optional extra pertbench[gears]; needs GO files)"
    )
    Params: ClassVar[type] = GEARSParams
    # PerturBench appendix D.6, table 14 (its co_express_threshold_graph is our
    # coexpress_threshold, GEARS' own name).
    search_space: ClassVar[dict[str, dict[str, Any]]] = {
        "num_go_gnn_layers": {"type": "int", "low": 1, "high": 3, "step": 1},
        "num_gene_gnn_layers": {"type": "int", "low": 1, "high": 3, "step": 1},
        "num_similar_genes_go_graph": {"type": "int", "low": 10, "high": 30, "step": 10},
        "num_similar_genes_co_express_graph": {"type": "int", "low": 10, "high": 30, "step": 10},
        "hidden_size": {"type": "int", "low": 32, "high": 512, "step": 32},
        "coexpress_threshold": {"type": "float", "low": 0.2, "high": 0.5, "step": 0.1},
        "lr": {"type": "float", "low": 5e-6, "high": 5e-3, "log": True},
        "wd": {"type": "float", "low": 1e-8, "high": 1e-3, "log": True},
    }

    def __init__(self, *, keys=None, **params: Any) -> None:
        super().__init__(keys=keys, **params)
        self.network = None
        self.pert_list: list[str] = []
        self.gears_config: dict[str, Any] = {}

    # -- fitting -------------------------------------------------------------------------
    def _fit(self, train: ad.AnnData, val: ad.AnnData | None, context: FitContext) -> None:
        gears = _gears()
        p = self.params
        epochs = int(p.max_epochs if context.max_epochs is None else context.max_epochs)
        if epochs < 1:
            raise ConfigError(f"max_epochs must be >= 1, got {epochs}")
        go_dir = check_go_dir(p.go_dir)
        states = _covariate_labels(train, self.keys)
        if len(states) > 1:
            raise ModelError(
                f"GEARS has no covariate input but the training cells span {len(states)} "
                f"covariate states ({', '.join(states[:4])}); train it on one (e.g. the combo task)"
            )
        cells = ad.concat([train, val]) if val is not None and val.n_obs else train.copy()
        gears_adata = to_gears_adata(cells, self.keys, self.genes)
        conditions = gears_adata.obs["condition"]
        train_conditions = sorted(set(conditions.iloc[: train.n_obs]))
        val_conditions = sorted(set(conditions.iloc[train.n_obs :]))
        if not val_conditions:
            val_conditions = train_conditions  # GEARS needs a validation set to pick its best
        out = io.StringIO()
        quiet = (
            (contextlib.redirect_stdout(out), contextlib.redirect_stderr(out))
            if not context.progress
            else (contextlib.nullcontext(), contextlib.nullcontext())
        )
        with (
            tempfile.TemporaryDirectory(prefix="pertbench-gears-") as work,
            _global_seed_scope(context.seed, context.device),
            quiet[0],
            quiet[1],
        ):
            work_dir = Path(work)
            for name in GO_FILES:
                target = work_dir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink((go_dir / name).resolve(), target)
            pert_data = gears.PertData(str(work_dir))
            pert_data.new_data_process(dataset_name="pertbench", adata=gears_adata)
            # (after GEARS has written its processed copy: the shim is not serialisable)
            pert_data.adata.X = _SeriesIndexableCSR(pert_data.adata.X)
            unknown = sorted(
                {g for c in train_conditions for g in c.split("+") if g != GEARS_CONTROL}
                - set(pert_data.pert_names)
            )
            if unknown:
                raise ModelError(
                    f"perturbed gene(s) {', '.join(unknown[:8])} are not nodes of the GO graph "
                    "in go_dir; GEARS cannot model them"
                )
            split_path = work_dir / "split.pkl"
            with open(split_path, "wb") as handle:
                pickle.dump({"train": train_conditions, "val": val_conditions, "test": []}, handle)
            pert_data.prepare_split(split="custom", split_dict_path=str(split_path))
            pert_data.get_dataloader(batch_size=p.batch_size, test_batch_size=p.batch_size)
            # Our test groups are predicted through our API, not by GEARS' own test loop.
            pert_data.dataloader.pop("test_loader", None)
            model = gears.GEARS(pert_data, device=context.device)
            model.model_initialize(
                hidden_size=p.hidden_size,
                num_go_gnn_layers=p.num_go_gnn_layers,
                num_gene_gnn_layers=p.num_gene_gnn_layers,
                decoder_hidden_size=p.decoder_hidden_size,
                num_similar_genes_go_graph=p.num_similar_genes_go_graph,
                num_similar_genes_co_express_graph=p.num_similar_genes_co_express_graph,
                coexpress_threshold=p.coexpress_threshold,
                direction_lambda=p.direction_lambda,
            )
            model.train(epochs=epochs, lr=p.lr, weight_decay=p.wd)
        self.network = model.best_model.eval()
        self.pert_list = list(model.pert_list)
        self.gears_config = dict(model.config)

    # -- prediction ----------------------------------------------------------------------
    def _predict(self, inputs: PredictionInputs, *, seed: int) -> np.ndarray:
        import torch

        _gears()
        from torch_geometric.data import Batch, Data

        if self.network is None:
            raise ModelError("the gears model has no trained network")
        node = {g: i for i, g in enumerate(self.pert_list)}
        labels = inputs.obs[self.keys.perturbation_key].astype(str).to_numpy()
        X = inputs.X
        out = np.empty((inputs.n_cells, len(self.genes)), dtype=np.float32)
        self.network.eval()
        chunk = 256
        with torch.no_grad(), torch_seed_scope(seed, self.device):
            for start in range(0, inputs.n_cells, chunk):
                rows = range(start, min(start + chunk, inputs.n_cells))
                dense = X[start : rows.stop]
                dense = dense.toarray() if sp.issparse(dense) else np.asarray(dense)
                graphs = []
                for k, i in enumerate(rows):  # one small graph per cell, as GEARS requires
                    comps = self.keys.components(labels[i])
                    missing = [c for c in comps if c not in node]
                    if missing:
                        raise ModelError(
                            f"perturbation(s) {', '.join(missing)} are not in GEARS' graph"
                        )
                    pert_idx = [node[c] for c in comps] or [-1]
                    graphs.append(
                        Data(x=torch.tensor(dense[k], dtype=torch.float32), pert_idx=pert_idx)
                    )
                batch = Batch.from_data_list(graphs).to(self.device)
                out[start : rows.stop] = self.network(batch).float().cpu().numpy()
        return out

    # -- persistence ---------------------------------------------------------------------
    _GRAPH_KEYS = ("G_go", "G_go_weight", "G_coexpress", "G_coexpress_weight")

    def _extra_config(self) -> dict[str, Any]:
        scalars = {
            k: v
            for k, v in self.gears_config.items()
            if k not in self._GRAPH_KEYS and k != "device"
        }
        return {"gears_config": scalars, "pert_list": self.pert_list}

    def _state(self) -> dict[str, Any]:
        if self.network is None:
            return {}
        graphs = {k: self.gears_config[k] for k in self._GRAPH_KEYS}
        return {"network": self.network.state_dict(), "graphs": graphs}

    def _load_state(self, state: dict[str, Any], extra: dict[str, Any]) -> None:
        _gears()
        from gears.model import GEARS_Model

        if "network" not in state:
            raise ModelError("saved gears model lacks its network; retrain it")
        config = dict(extra["gears_config"])
        config.update({k: v.to(self.device) for k, v in state["graphs"].items()})
        config["device"] = self.device
        self.pert_list = list(extra["pert_list"])
        self.gears_config = config
        with torch_seed_scope(self.seed, self.device):
            network = GEARS_Model(config)
        network.load_state_dict(state["network"])
        self.network = network.to(self.device).eval()


def _covariate_labels(adata: ad.AnnData, keys) -> list[str]:
    if not keys.covariate_keys:
        return ["all"]
    frame = adata.obs[list(keys.covariate_keys)].astype(str)
    return sorted(frame.agg("/".join, axis=1).unique().tolist())
