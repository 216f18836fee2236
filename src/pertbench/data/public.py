"""Registry of public perturbation datasets: download, cache and curation to the contract.

``fetch(name)`` downloads the source file into the cache directory (``$PERTBENCH_CACHE`` or
``~/.cache/pertbench``) with a streaming, resumable download that is renamed into place
only when complete and verified, then *curates* it: maps the source's own columns to the
data contract (``condition`` with ``control``, ``+`` between combination parts, covariate
columns, optional ``dose``), moves raw counts to ``layers['counts']`` and log-normalises
X. The curated file is written atomically to ``<cache>/<name>.h5ad``.

Checksums: where the sha256 of a source file is known it is verified; otherwise the digest
of the first complete download is recorded in ``<cache>/checksums.json`` and every later
download (or cached copy) is checked against it.

Without internet, ``fetch`` fails with one clear line; a file downloaded by hand can be
curated with ``fetch(name, from_file=PATH)`` (CLI: ``pertbench datasets fetch NAME
--from-file RAW.h5ad``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pertbench.data.keys import PerturbationKeys
from pertbench.data.loading import (
    normalize_log1p,
    read_h5ad,
    scan_values,
    validate_adata,
)
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    InputFileError,
    NetworkError,
    OutputError,
)
from pertbench.utils.io import write_h5ad_atomic, write_json_atomic

CACHE_ENV = "PERTBENCH_CACHE"
CHECKSUM_FILE = "checksums.json"
_USER_AGENT = "pertbench-dataset-fetch"


def cache_dir() -> Path:
    """The dataset cache: ``$PERTBENCH_CACHE`` or ``~/.cache/pertbench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pertbench"


# ---------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike, *, block: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    block: int = 1 << 20,
    timeout: float = 60.0,
    progress: bool = False,
) -> Path:
    """Stream ``url`` to ``dest``, resuming a previous partial download.

    Bytes go to ``dest + '.part'``; an interrupted download resumes from there with an
    HTTP Range request (restarting when the server ignores it). The finished file is
    checked against ``sha256`` (when given) and only then renamed onto ``dest``.

    Raises
    ------
    NetworkError
        The server cannot be reached or answers with an error.
    InputFileError
        The downloaded file does not match ``sha256`` (the partial file is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # range not satisfiable: the part is already complete
            response = None
        else:
            raise NetworkError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(
            f"no connection to {url}: {reason}; check the internet connection"
        ) from exc
    if response is not None:
        with response:
            status = getattr(response, "status", 200)
            mode = "ab" if have and status == 206 else "wb"
            total = response.headers.get("Content-Length")
            total = int(total) + (have if mode == "ab" else 0) if total else None
            bar = _progress(total, have if mode == "ab" else 0, dest.name, progress)
            try:
                with open(part, mode) as handle:
                    while True:
                        try:
                            chunk = response.read(block)
                        except OSError as exc:
                            raise NetworkError(
                                f"download of {url} was interrupted ({exc}); run the same "
                                "command again to resume"
                            ) from exc
                        if not chunk:
                            break
                        handle.write(chunk)
                        bar.update(len(chunk))
            finally:
                bar.close()
            if total is not None and part.stat().st_size < total:
                raise NetworkError(
                    f"download of {url} stopped at {part.stat().st_size:,} of {total:,} bytes; "
                    "run the same command again to resume"
                )
    if sha256:
        got = sha256_of(part)
        if got != sha256.lower():
            part.unlink()
            raise InputFileError(
                f"checksum mismatch for {dest.name} (expected {sha256[:12]}..., got {got[:12]}...); "
                "the download was removed, try again"
            )
    os.replace(part, dest)
    return dest


def _progress(total: int | None, initial: int, name: str, enabled: bool):
    if not enabled:

        class _Null:
            def update(self, n: int) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc=name)


def _load_checksums(cache: Path) -> dict[str, str]:
    path = cache / CHECKSUM_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (ValueError, OSError):
        return {}


def _verify(cache: Path, filename: str, path: Path, known: str | None) -> str:
    """Check ``path`` against the known or recorded sha256; return its digest."""
    digest = sha256_of(path)
    expected = known or _load_checksums(cache).get(filename)
    if expected and digest != expected:
        raise InputFileError(
            f"cached {filename} does not match its checksum ({digest[:12]}... vs "
            f"{expected[:12]}...); delete {path} and fetch again"
        )
    return digest


def _record(cache: Path, filename: str, digest: str) -> None:
    """Remember the digest of a source file that curated cleanly (first download only)."""
    recorded = _load_checksums(cache)
    if filename not in recorded:
        recorded[filename] = digest
        write_json_atomic(cache / CHECKSUM_FILE, recorded)


# ---------------------------------------------------------------------------------------
# Curation helpers
# ---------------------------------------------------------------------------------------


def _require_columns(adata: ad.AnnData, name: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        raise DataValidationError(
            f"{name}: the raw file lacks obs column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, adata.obs.columns[:15]))}); is it the right source file?"
        )


def _require_counts(adata: ad.AnnData, name: str) -> None:
    """Refuse a file whose expression is not the raw counts its source publishes.

    Counts may sit in X or, for files already normalised by their curators, in
    ``layers['counts']`` (then X is kept as it is).
    """
    if "counts" in adata.layers:
        layer = scan_values(adata.layers["counts"]).value_type
        if layer in ("counts", "integer", "empty"):
            return
    value_type = scan_values(adata.X).value_type if adata.X is not None else "empty"
    if value_type in ("counts", "integer"):
        return
    raise DataValidationError(
        f"{name}: X holds {value_type} values and there is no layers['counts'], but the "
        f"source publishes raw counts ({dataset_info(name).source}); is it the right file?"
    )


def _finish(adata: ad.AnnData, name: str, keys: PerturbationKeys) -> ad.AnnData:
    """Common last steps: unique names, CSR float32 X, counts -> layer + log1p, validate."""
    adata.obs_names_make_unique()
    adata.var_names = adata.var_names.astype(str)
    adata.var_names_make_unique()
    if adata.raw is not None:
        adata.raw = None
    if not sp.issparse(adata.X):
        adata.X = sp.csr_matrix(np.asarray(adata.X, dtype=np.float32))
    else:
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    for col in [keys.perturbation_key, *keys.covariate_keys]:
        adata.obs[col] = pd.Categorical(adata.obs[col].astype(str))
    if REGISTRY[name].values == "counts":
        _require_counts(adata, name)
    stats = scan_values(adata.X)
    if stats.value_type in ("counts", "integer"):
        normalize_log1p(adata)
    adata.obs["dataset"] = name
    adata.uns["pertbench_dataset"] = {"name": name, "keys": keys.to_dict()}
    validate_adata(adata, keys=keys, expect="log")
    return adata


def _join_combos(values: pd.Series, sep: str, keys: PerturbationKeys) -> pd.Series:
    return values.astype(str).str.replace(sep, keys.delimiter, regex=False)


def curate_norman19(adata: ad.AnnData) -> ad.AnnData:
    """scPerturb NormanWeissman2019: ``perturbation`` ('KLF1_MAP2K6', 'control'), ``cell_line``.

    The cell line comes from the file's own ``cell_line`` column (K562 in the source): a
    file without it is refused rather than labelled with a line it may not hold.
    """
    keys = REGISTRY["norman19"].keys
    _require_columns(adata, "norman19", ["perturbation", "cell_line"])
    obs = adata.obs
    obs[keys.perturbation_key] = _join_combos(obs["perturbation"], "_", keys)
    obs["cell_type"] = obs["cell_line"].astype(str).str.lower()
    obs["perturbation_type"] = "CRISPRa"
    obs = obs.rename(columns={"nCount_RNA": "ncounts", "nFeature_RNA": "ngenes"})
    adata.obs = obs
    return _finish(adata, "norman19", keys)


#: sciplex3 drug names that contain the combination delimiter.
SCIPLEX_RENAMES = {"(+)-JQ1": "JQ1", "ENMD-2076 L-(+)-Tartaric acid": "ENMD-2076"}
SCIPLEX_HIGHEST_DOSE = 10000.0  # nM (10 uM)


def curate_srivatsan20(adata: ad.AnnData) -> ad.AnnData:
    """scPerturb sciplex3: ``perturbation`` (drug / 'control'), ``cell_line``, ``dose_value`` (nM).

    Keeps A549, K562 and MCF7 and the highest dose (10 uM) as PerturBench did.
    """
    keys = REGISTRY["srivatsan20"].keys
    _require_columns(adata, "srivatsan20", ["perturbation", "cell_line", "dose_value"])
    obs = adata.obs
    pert = obs["perturbation"].astype(str).replace(SCIPLEX_RENAMES)
    # any other name with the delimiter would read as a combination: make it one token
    pert = pert.str.replace(keys.delimiter, "_", regex=False)
    pert = pert.replace({"DMSO": "control", "Vehicle": "control", "vehicle": "control"})
    obs[keys.perturbation_key] = pert
    obs["cell_type"] = obs["cell_line"].astype(str).str.lower()
    dose = pd.to_numeric(obs["dose_value"], errors="coerce")
    is_ctrl = pert.to_numpy() == keys.control
    keep = obs["cell_type"].isin(["a549", "k562", "mcf7"]).to_numpy() & (
        is_ctrl | np.isclose(dose.to_numpy(dtype=float), SCIPLEX_HIGHEST_DOSE)
    )
    obs["dose"] = np.where(is_ctrl, "0", dose.map(lambda v: f"{v:g}"))
    obs["perturbation_type"] = "chemical"
    adata.obs = obs
    adata = adata[keep].copy()
    return _finish(adata, "srivatsan20", keys)


FRANGIEH_TREATMENTS = {"Co-culture": "co-culture", "Control": "none", "IFNγ": "ifng"}


def curate_frangieh21(adata: ad.AnnData) -> ad.AnnData:
    """scPerturb FrangiehIzar2021_RNA: ``perturbation`` (gene / 'control'), ``perturbation_2``
    (Co-culture / Control / IFNγ) as the treatment covariate."""
    keys = REGISTRY["frangieh21"].keys
    _require_columns(adata, "frangieh21", ["perturbation", "perturbation_2"])
    obs = adata.obs
    obs[keys.perturbation_key] = _join_combos(obs["perturbation"], "_", keys)
    obs["treatment"] = (
        obs["perturbation_2"].astype(str).map(lambda v: FRANGIEH_TREATMENTS.get(v, v.lower()))
    )
    # Not a covariate of this screen (one melanoma line); the file's own label when it has one.
    obs["cell_type"] = obs["cell_line"].astype(str) if "cell_line" in obs else "melanoma"
    obs["perturbation_type"] = "CRISPRko"
    adata.obs = obs
    return _finish(adata, "frangieh21", keys)


def _processed_layout(adata: ad.AnnData, keys: PerturbationKeys) -> bool:
    return all(c in adata.obs.columns for c in (keys.perturbation_key, *keys.covariate_keys))


def curate_jiang24(adata: ad.AnnData) -> ad.AnnData:
    """Jiang24: the PerturBench processed file (``condition``, ``cell_type``, ``treatment``)
    or an h5ad converted from the Zenodo Seurat objects (``gene`` with 'NT' controls,
    ``cell_type``, ``treatment``)."""
    keys = REGISTRY["jiang24"].keys
    obs = adata.obs
    if not _processed_layout(adata, keys):
        _require_columns(adata, "jiang24", ["gene", "cell_type", "treatment"])
        obs[keys.perturbation_key] = obs["gene"].astype(str).replace({"NT": keys.control})
    obs["cell_type"] = obs["cell_type"].astype(str).str.lower()
    obs["treatment"] = obs["treatment"].astype(str)
    obs["perturbation_type"] = "CRISPRko"
    adata.obs = obs
    if adata.raw is not None and adata.raw.X is not None and adata.raw.shape == adata.shape:
        adata.X = adata.raw.X  # the Seurat conversion keeps counts in raw
    return _finish(adata, "jiang24", keys)


MCFALINE_GENE_CONTROLS = ("NA", "NTC", "random")
MCFALINE_DRUG_CONTROLS = ("vehicle", "dmso", "DMSO")
MCFALINE_DROPPED_TREATMENTS = ("temozolomide", "thioguanine")
MCFALINE_MIN_CELLS = 20


def curate_mcfaline23(adata: ad.AnnData) -> ad.AnnData:
    """McFalineFigueroa23: the PerturBench processed file, or an h5ad converted from the GEO
    sciPlex-GxE objects (``gene_id`` with ',' between guides' genes and NA/NTC/random
    controls, ``treatment`` with vehicle/DMSO controls, ``cell_type``).

    As PerturBench: single-gene perturbations only, temozolomide and thioguanine dropped,
    (cell type, treatment, perturbation) groups with fewer than 20 cells dropped.
    """
    keys = REGISTRY["mcfaline23"].keys
    obs = adata.obs
    if not _processed_layout(adata, keys):
        _require_columns(adata, "mcfaline23", ["gene_id", "cell_type", "treatment"])
        parts = obs["gene_id"].astype(str).str.split(",")
        genes = parts.map(
            lambda ps: [keys.control if p in MCFALINE_GENE_CONTROLS else p for p in ps]
        )
        genes = genes.map(lambda ps: sorted(set(ps) - {keys.control}) or [keys.control])
        obs[keys.perturbation_key] = genes.map(keys.delimiter.join)
        treat = obs["treatment"].astype(str)
        obs["treatment"] = treat.where(~treat.isin(MCFALINE_DRUG_CONTROLS), "none")
    obs["cell_type"] = obs["cell_type"].astype(str).str.lower()
    obs["perturbation_type"] = "CRISPRi"
    adata.obs = obs
    pert = obs[keys.perturbation_key].astype(str)
    single = ~pert.str.contains(keys.delimiter, regex=False)
    keep = single & ~obs["treatment"].isin(MCFALINE_DROPPED_TREATMENTS)
    group = pert + "|" + obs["cell_type"] + "|" + obs["treatment"]
    sizes = group[keep].value_counts()
    keep &= group.map(sizes).fillna(0).to_numpy() >= MCFALINE_MIN_CELLS
    adata = adata[keep.to_numpy()].copy()
    return _finish(adata, "mcfaline23", keys)


def curate_kang18(adata: ad.AnnData) -> ad.AnnData:
    """Kang18: pertpy's kang_2018 (``label`` ctrl/stim, ``cell_type``, ``replicate``) or the
    scGen layout (``condition`` control/stimulated, ``cell_type``)."""
    keys = REGISTRY["kang18"].keys
    obs = adata.obs
    if keys.perturbation_key not in obs.columns:
        _require_columns(adata, "kang18", ["label", "cell_type"])
        obs[keys.perturbation_key] = (
            obs["label"].astype(str).replace({"ctrl": keys.control, "stim": "stimulated"})
        )
    if "replicate" in obs.columns and "donor" not in obs.columns:
        obs["donor"] = obs["replicate"].astype(str)
    obs["perturbation_type"] = "cytokine"
    adata.obs = obs
    return _finish(adata, "kang18", keys)


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """One public dataset: where it comes from and how it maps to the contract."""

    name: str
    title: str
    citation: str
    url: str
    source: str
    filename: str
    curate: Callable[[ad.AnnData], ad.AnnData] = field(repr=False)
    keys: PerturbationKeys = field(default_factory=PerturbationKeys)
    sha256: str | None = None
    compressed: bool = False
    task: str = "transfer"
    notes: str = ""
    #: What the source file's expression holds: ``"counts"`` (checked: a file with only
    #: log-normalised values is refused) or ``"any"``.
    values: str = "counts"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "citation": self.citation,
            "url": self.url,
            "source": self.source,
            "filename": self.filename,
            "sha256": self.sha256 or "recorded on first download",
            "keys": self.keys.to_dict(),
            "task": self.task,
            "values": self.values,
            "notes": self.notes,
        }


_SCPERTURB = "https://zenodo.org/records/7041849/files/{}?download=1"
_PERTURBENCH_HF = "https://huggingface.co/datasets/altoslabs/perturbench/resolve/main/{}"

REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="norman19",
            title="Norman et al. 2019: K562 CRISPRa, single and dual gene overexpression",
            citation="Norman et al., Science 365:786-793 (2019), GEO GSE133344",
            url=_SCPERTURB.format("NormanWeissman2019_filtered.h5ad"),
            source="scPerturb harmonised h5ad (Zenodo record 7041849), raw counts",
            filename="NormanWeissman2019_filtered.h5ad",
            curate=curate_norman19,
            keys=PerturbationKeys(covariate_keys=("cell_type",)),
            task="combo",
        ),
        DatasetInfo(
            name="srivatsan20",
            title="Srivatsan et al. 2020 sci-Plex3: 188 drugs x A549/K562/MCF7 (highest dose)",
            citation="Srivatsan et al., Science 367:45-51 (2020), GEO GSE139944",
            url=_SCPERTURB.format("SrivatsanTrapnell2020_sciplex3.h5ad"),
            source="scPerturb harmonised h5ad (Zenodo record 7041849), raw counts",
            filename="SrivatsanTrapnell2020_sciplex3.h5ad",
            curate=curate_srivatsan20,
            keys=PerturbationKeys(covariate_keys=("cell_type",), dose_key="dose"),
        ),
        DatasetInfo(
            name="frangieh21",
            title="Frangieh et al. 2021 Perturb-CITE-seq: melanoma alone / IFNγ / co-culture",
            citation="Frangieh et al., Nat. Genet. 53:332-341 (2021), SCP1064",
            url=_SCPERTURB.format("FrangiehIzar2021_RNA.h5ad"),
            source="scPerturb harmonised h5ad (Zenodo record 7041849), raw counts",
            filename="FrangiehIzar2021_RNA.h5ad",
            curate=curate_frangieh21,
            keys=PerturbationKeys(covariate_keys=("treatment",)),
        ),
        DatasetInfo(
            name="jiang24",
            title="Jiang et al. 2024: 219 CRISPR KOs x 6 cell lines x 5 cytokines",
            citation="Jiang et al., bioRxiv 2024.01.29.576933; Seurat objects on Zenodo 10520190",
            url=_PERTURBENCH_HF.format("jiang24_processed.h5ad.gz"),
            source=(
                "PerturBench's curated h5ad (gzip). The original Seurat .rds files "
                "(zenodo.org/records/10520190) need R to convert; the converted h5ad is "
                "accepted by --from-file"
            ),
            filename="jiang24_processed.h5ad.gz",
            curate=curate_jiang24,
            keys=PerturbationKeys(covariate_keys=("cell_type", "treatment")),
            compressed=True,
        ),
        DatasetInfo(
            name="mcfaline23",
            title="McFaline-Figueroa et al. 2024 sciPlex-GxE: CRISPRi x kinase inhibitors in glioma lines",
            citation="McFaline-Figueroa et al., Cell Genomics 4(2) (2024), GEO GSE225775",
            url=_PERTURBENCH_HF.format("mcfaline23_gxe_processed.h5ad.gz"),
            source=(
                "PerturBench's curated h5ad (gzip). The GEO .rds objects (GSM7056148, "
                "GSM7056149) need R to convert; the converted h5ad is accepted by --from-file"
            ),
            filename="mcfaline23_gxe_processed.h5ad.gz",
            curate=curate_mcfaline23,
            keys=PerturbationKeys(covariate_keys=("cell_type", "treatment")),
            compressed=True,
        ),
        DatasetInfo(
            name="kang18",
            title="Kang et al. 2018: PBMCs, control vs IFN-β stimulated",
            citation="Kang et al., Nat. Biotechnol. 36:89-94 (2018), GEO GSE96583",
            url="https://figshare.com/ndownloader/files/34464122",
            source="pertpy's kang_2018 h5ad (figshare), raw counts, ~25k cells",
            filename="kang_2018.h5ad",
            curate=curate_kang18,
            keys=PerturbationKeys(covariate_keys=("cell_type",)),
            task="celltype",
            values="any",  # the scGen layout, also accepted, is log-normalised
        ),
    )
}


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry of ``name`` (case-insensitive)."""
    key = name.lower().strip()
    if key not in REGISTRY:
        raise ConfigError(f"unknown dataset '{name}'; available: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def list_datasets() -> pd.DataFrame:
    """One row per registered dataset (name, title, task, covariates, source, cached)."""
    cache = cache_dir()
    rows = [
        {
            "name": info.name,
            "title": info.title,
            "task": info.task,
            "covariates": ",".join(info.keys.covariate_keys),
            "cached": (cache / f"{info.name}.h5ad").is_file(),
            "url": info.url,
        }
        for info in REGISTRY.values()
    ]
    return pd.DataFrame(rows)


def curate(name: str, adata: ad.AnnData) -> ad.AnnData:
    """Map a raw AnnData of dataset ``name`` to the data contract (modifies ``adata``)."""
    return dataset_info(name).curate(adata)


def _read_raw(path: Path, *, unpack_dir: Path) -> ad.AnnData:
    """Read a source file; a ``.gz`` is decompressed into ``unpack_dir`` first (never next
    to a file the user gave)."""
    if path.suffix == ".gz":
        unpacked = unpack_dir / path.with_suffix("").name
        if not unpacked.exists():
            unpack_dir.mkdir(parents=True, exist_ok=True)
            tmp = unpacked.with_name(unpacked.name + ".part")
            try:
                with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (OSError, EOFError) as exc:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise InputFileError(f"cannot decompress '{path}': {exc}") from exc
            os.replace(tmp, unpacked)
        path = unpacked
    return read_h5ad(path, validate=False, on_counts="allow")


def _cached_source_digest(path: Path) -> str | None:
    """The sha256 of the source file a cached curated dataset was made from (if recorded)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            value = handle["uns/pertbench_dataset/source_sha256"][()]
    except (OSError, KeyError):
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def fetch(
    name: str,
    *,
    from_file: str | os.PathLike | None = None,
    cache: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download (or take ``from_file``), curate and cache dataset ``name``.

    Returns the path of the curated ``<cache>/<name>.h5ad``. An existing curated file is
    reused unless ``force`` (with ``from_file``: when it was curated from a file with the
    same checksum; another file is refused without ``force``, so a cached dataset is never
    replaced silently). A file that does not look like the source (columns, raw counts) is
    refused with one line and nothing is cached: neither the curated file nor, for a first
    download, its checksum.
    """
    info = dataset_info(name)
    cache = Path(cache) if cache is not None else cache_dir()
    out = cache / f"{info.name}.h5ad"
    if out.is_file() and not force and from_file is None:
        return out
    digest = None
    if from_file is not None:
        raw = Path(from_file)
        if not raw.is_file():
            raise InputFileError(f"file '{raw}' does not exist; check the --from-file path")
        source_digest = sha256_of(raw)
        if out.is_file() and not force:
            if _cached_source_digest(out) == source_digest:
                return out
            raise OutputError(
                f"{info.name} is already cached ({out}), curated from another file; pass "
                f"--overwrite to replace it with the curation of '{raw}'"
            )
        unpack_dir = cache / "raw" / "from_file"
    else:
        raw = cache / "raw" / info.filename
        if not raw.is_file() or force:
            try:
                download(info.url, raw, sha256=info.sha256, progress=progress, timeout=timeout)
            except NetworkError as exc:
                raise NetworkError(
                    f"cannot download {info.name} ({exc}); download {info.url} by hand and run "
                    f"'pertbench datasets fetch {info.name} --from-file FILE'"
                ) from exc
        digest = source_digest = _verify(cache, info.filename, raw, info.sha256)
        unpack_dir = raw.parent
    try:
        adata = _read_raw(raw, unpack_dir=unpack_dir)
    finally:
        if from_file is not None:  # a user's file is unpacked for this call only
            shutil.rmtree(unpack_dir, ignore_errors=True)
    curated = info.curate(adata)
    curated.uns["pertbench_dataset"]["source"] = str(raw.name)
    curated.uns["pertbench_dataset"]["source_sha256"] = source_digest
    write_h5ad_atomic(out, curated, compression="gzip")
    if digest is not None and not info.sha256:
        _record(cache, info.filename, digest)
    return out
