"""Dataset registry: curation of each source's raw layout, resumable download, checksums."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pertbench.data import public
from pertbench.data.loading import read_h5ad, validate_adata
from pertbench.errors import (
    ConfigError,
    DataValidationError,
    InputFileError,
    NetworkError,
)


def _raw(obs: dict, n_genes: int = 20, seed: int = 0, genes=None) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(obs)
    obs.index = [f"bc{i}" for i in range(len(obs))]
    counts = rng.poisson(3.0, size=(len(obs), n_genes)).astype(np.float32)
    var = pd.DataFrame(index=genes or [f"GENE{i}" for i in range(n_genes)])
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def _rep(values, n):
    return [v for v in values for _ in range(n)]


def _check_contract(adata, name):
    info = public.dataset_info(name)
    report = validate_adata(adata, keys=info.keys)
    assert report.ok and report.value_type == "log"
    assert "counts" in adata.layers
    assert (adata.obs["dataset"] == name).all()


def test_norman19_scperturb_layout():
    raw = _raw(
        {
            "perturbation": _rep(["control", "KLF1", "MAP2K6", "KLF1_MAP2K6"], 5),
            "cell_line": "K562",
            "nCount_RNA": 1000.0,
        },
        genes=["KLF1", "MAP2K6", *[f"G{i}" for i in range(18)]],
    )
    out = public.curate("norman19", raw)
    _check_contract(out, "norman19")
    assert set(out.obs.condition) == {"control", "KLF1", "MAP2K6", "KLF1+MAP2K6"}
    assert set(out.obs.cell_type) == {"k562"}
    assert "ncounts" in out.obs.columns


def test_srivatsan20_keeps_highest_dose_and_fixes_names():
    n = 4
    raw = _raw(
        {
            "perturbation": _rep(["control", "(+)-JQ1", "(+)-JQ1", "Drug+X", "control", "Dex"], n),
            "dose_value": _rep([0, 10000, 100, 10000, 0, 10000], n),
            "cell_line": _rep(["A549", "A549", "A549", "MCF7", "MCF7", "MCF7"], n),
        }
    )
    raw.obs.loc[raw.obs.index[-2:], "cell_line"] = "HEK"  # other cell lines are dropped
    out = public.curate("srivatsan20", raw)
    _check_contract(out, "srivatsan20")
    assert set(out.obs.condition) == {"control", "JQ1", "Drug_X", "Dex"}
    assert set(out.obs.cell_type) == {"a549", "mcf7"}
    assert set(out.obs.dose[out.obs.condition != "control"]) == {"10000"}
    assert out.n_obs == 6 * n - n - 2  # the 100 nM JQ1 cells and the HEK cells are gone


def test_frangieh21_treatment_covariate():
    raw = _raw(
        {
            "perturbation": _rep(["control", "JAK1", "control", "JAK1", "control", "JAK1"], 3),
            "perturbation_2": _rep(
                ["Control", "Control", "IFNγ", "IFNγ", "Co-culture", "Co-culture"], 3
            ),
        }
    )
    out = public.curate("frangieh21", raw)
    _check_contract(out, "frangieh21")
    assert set(out.obs.treatment) == {"none", "ifng", "co-culture"}


def test_jiang24_seurat_layout():
    raw = _raw(
        {
            "gene": _rep(["NT", "STAT1", "NT", "STAT1"], 3),
            "cell_type": _rep(["K562", "K562", "HAP1", "HAP1"], 3),
            "treatment": "IFNG",
        }
    )
    out = public.curate("jiang24", raw)
    _check_contract(out, "jiang24")
    assert set(out.obs.condition) == {"control", "STAT1"}
    assert set(out.obs.cell_type) == {"k562", "hap1"}


def test_mcfaline23_geo_layout():
    genes = ["NTC", "random", "NA", "MAPK1", "SGK1", "MAPK1,SGK1", "MAPK1", "SGK1"]
    treatments = [
        "vehicle",
        "trametinib",
        "dmso",
        "vehicle",
        "trametinib",
        "vehicle",
        "temozolomide",
        "vehicle",
    ]
    raw = _raw(
        {
            "gene_id": _rep(genes, 25),
            "treatment": _rep(treatments, 25),
            "cell_type": "A172",
        }
    )
    raw.obs.iloc[-5:, raw.obs.columns.get_loc("cell_type")] = "T98G"  # a 5-cell group: dropped
    out = public.curate("mcfaline23", raw)
    _check_contract(out, "mcfaline23")
    groups = out.obs.groupby(["condition", "treatment"], observed=True).size()
    assert groups.to_dict() == {
        ("MAPK1", "none"): 25,
        ("SGK1", "none"): 20,
        ("SGK1", "trametinib"): 25,
        ("control", "none"): 50,
        ("control", "trametinib"): 25,
    }


def test_kang18_pertpy_layout():
    raw = _raw(
        {
            "label": _rep(["ctrl", "stim", "ctrl", "stim"], 4),
            "cell_type": _rep(["CD4 T cells", "CD4 T cells", "B cells", "B cells"], 4),
            "replicate": "patient_101",
        }
    )
    out = public.curate("kang18", raw)
    _check_contract(out, "kang18")
    assert set(out.obs.condition) == {"control", "stimulated"}
    assert set(out.obs.donor) == {"patient_101"}


def test_wrong_source_file_message():
    raw = _raw({"condition": ["a", "b"]})
    with pytest.raises(DataValidationError, match="frangieh21: the raw file lacks obs column"):
        public.curate("frangieh21", raw)
    with pytest.raises(ConfigError, match="unknown dataset 'norman20'"):
        public.dataset_info("norman20")


def test_fetch_from_file_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(public.CACHE_ENV, str(tmp_path / "cache"))
    raw = _raw({"label": _rep(["ctrl", "stim"], 5), "cell_type": "NK"})
    raw_path = tmp_path / "kang_download.h5ad"
    raw.write_h5ad(raw_path)
    path = public.fetch("kang18", from_file=raw_path)
    assert path == tmp_path / "cache" / "kang18.h5ad"
    adata = read_h5ad(path)
    assert set(adata.obs.condition) == {"control", "stimulated"}
    assert public.list_datasets().set_index("name").loc["kang18", "cached"]
    with pytest.raises(InputFileError, match="check the --from-file path"):
        public.fetch("kang18", from_file=tmp_path / "missing.h5ad")


def _norman_raw(**changes) -> ad.AnnData:
    obs = {"perturbation": _rep(["control", "KLF1", "MAP2K6", "KLF1_MAP2K6"], 5)}
    obs.update(changes)
    return _raw({k: v for k, v in obs.items() if v is not None})


def test_curation_refuses_a_file_that_is_not_the_source(tmp_path):
    cache = tmp_path / "cache"
    # no cell_line column: refused, never relabelled as K562
    no_line = tmp_path / "no_line.h5ad"
    _norman_raw().write_h5ad(no_line)
    with pytest.raises(DataValidationError, match=r"lacks obs column.*cell_line"):
        public.fetch("norman19", from_file=no_line, cache=cache)
    # log-normalised values where the source has raw counts: refused
    logged = _norman_raw(cell_line="K562")
    logged.X = logged.X.log1p()
    log_file = tmp_path / "logged.h5ad"
    logged.write_h5ad(log_file)
    with pytest.raises(DataValidationError, match=r"no layers\[.counts.\].*raw counts"):
        public.fetch("norman19", from_file=log_file, cache=cache)
    assert not (cache / "norman19.h5ad").exists()  # nothing refused was cached
    # the same values with the counts beside them (a curator's normalised file) are fine
    logged.layers["counts"] = _norman_raw(cell_line="K562").X
    curated = public.curate("norman19", logged)
    assert set(curated.obs["cell_type"]) == {"k562"}
    # the line comes from the file, whatever it is
    other = public.curate("norman19", _norman_raw(cell_line="HEK293T"))
    assert set(other.obs["cell_type"]) == {"hek293t"}


def test_a_refused_download_records_no_checksum(server, tmp_path, monkeypatch):
    root, url, _ = server
    _raw({"condition": _rep(["a", "b"], 5)}).write_h5ad(root / "wrong.h5ad")
    info = public.REGISTRY["norman19"]
    monkeypatch.setitem(
        public.REGISTRY,
        "norman19",
        public.DatasetInfo(**{**info.__dict__, "url": f"{url}/wrong.h5ad"}),
    )
    cache = tmp_path / "cache"
    with pytest.raises(DataValidationError, match="norman19: the raw file lacks"):
        public.fetch("norman19", cache=cache)
    assert public._load_checksums(cache) == {}
    assert not (cache / "norman19.h5ad").exists()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (the standard handler ignores Range)."""

    cut_after: int | None = None  # simulate a dropped connection after this many bytes

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None and not rng:
            self.wfile.write(body[: type(self).cut_after])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Handler(_RangeHandler):
        cut_after = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", Handler
    httpd.shutdown()
    httpd.server_close()


def test_download_resumes_and_verifies(server, tmp_path):
    root, url, handler = server
    payload = np.random.default_rng(0).bytes(300_000)
    (root / "data.bin").write_bytes(payload)
    dest = tmp_path / "dl" / "data.bin"
    handler.cut_after = 100_000
    with pytest.raises(NetworkError, match="run the same command again to resume"):
        public.download(f"{url}/data.bin", dest, block=4096)
    part = dest.with_name("data.bin.part")
    assert part.is_file() and 0 < part.stat().st_size < len(payload) and not dest.exists()
    handler.cut_after = None
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    public.download(f"{url}/data.bin", dest, sha256=digest)
    assert dest.read_bytes() == payload and not part.exists()


def test_download_checksum_mismatch(server, tmp_path):
    root, url, _ = server
    (root / "f.bin").write_bytes(b"abc")
    with pytest.raises(InputFileError, match=r"checksum mismatch for f.bin"):
        public.download(f"{url}/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_download_http_error(server, tmp_path):
    _, url, _ = server
    with pytest.raises(NetworkError, match="HTTP 404"):
        public.download(f"{url}/missing.bin", tmp_path / "x")


def test_fetch_records_checksum_then_verifies(server, tmp_path, monkeypatch):
    root, url, _ = server
    raw = _raw({"label": _rep(["ctrl", "stim"], 5), "cell_type": "NK"})
    raw.write_h5ad(root / "kang_2018.h5ad")
    info = public.REGISTRY["kang18"]
    monkeypatch.setitem(
        public.REGISTRY,
        "kang18",
        public.DatasetInfo(**{**info.__dict__, "url": f"{url}/kang_2018.h5ad"}),
    )
    cache = tmp_path / "cache"
    path = public.fetch("kang18", cache=cache)
    recorded = public._load_checksums(cache)
    assert recorded["kang_2018.h5ad"] == public.sha256_of(cache / "raw" / "kang_2018.h5ad")
    assert read_h5ad(path).n_obs == 10
    # a corrupted cached source is caught when it is curated again
    (cache / "raw" / "kang_2018.h5ad").write_bytes(b"tampered")
    path.unlink()
    with pytest.raises(InputFileError, match="does not match its checksum"):
        public.fetch("kang18", cache=cache)


def test_offline_fetch_is_one_clear_line(tmp_path):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connection refused, like an offline machine
    info = public.REGISTRY["norman19"]
    entry = public.DatasetInfo(**{**info.__dict__, "url": f"http://127.0.0.1:{port}/x.h5ad"})
    public.REGISTRY["_offline"] = public.DatasetInfo(**{**entry.__dict__, "name": "_offline"})
    try:
        with pytest.raises(NetworkError) as exc:
            public.fetch("_offline", cache=tmp_path)
    finally:
        del public.REGISTRY["_offline"]
    message = str(exc.value)
    assert "\n" not in message
    assert "cannot download _offline" in message
    assert "pertbench datasets fetch _offline --from-file FILE" in message
