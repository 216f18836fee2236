"""The HTML report: self-contained, escaped, numbers that match the results, renders in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from bench_helpers import PYTHON, SLEEPY, small_config, small_run, subprocess_env
from pertbench.benchmark import paths
from pertbench.benchmark.config import parse_config
from pertbench.benchmark.runner import run_benchmark
from pertbench.errors import InputFileError
from pertbench.models.registry import BASELINE_MODELS
from pertbench.report import write_report
from pertbench.report.diagnostics import PROBE_TABLE_ID
from pertbench.report.html import SUMMARY_CSV, SUMMARY_TABLE_ID

EVIL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("bench"))


TINY_CPA = {
    "n_latent": 8,
    "hidden_dim": 16,
    "n_layers_encoder": 1,
    "n_layers_pert_emb": 1,
    "adv_classifier_hidden_dim": 8,
    "adv_classifier_n_layers": 1,
}


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A tiny benchmark with a model that has a basal latent (probe) beside the baselines."""
    root = tmp_path_factory.mktemp("latent")
    raw = small_config(
        name="latent",
        tasks={"transfer": {"task": "transfer", "options": {"fraction": 0.5}}},
        models={"cpa": {"params": TINY_CPA}},
    )
    return run_benchmark(parse_config(raw, base_dir=root), out=root / "run", log=lambda m: None)


def test_report_is_self_contained_with_all_sections(run):
    html = run.report.read_text(encoding="utf-8")
    assert f'id="{SUMMARY_TABLE_ID}"' in html
    for section in (
        "Summary",
        "Rank metrics",
        "Predicted vs observed expression",
        "Similarity heatmaps (collapse check)",
        "Stability across seeds",
        "Inputs",
        "Environment and versions",
    ):
        assert f">{section}</h2>" in html, section
    # figures are embedded; nothing is fetched from elsewhere
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html and "<script" not in html
    pngs = sorted((run.out_dir / paths.FIGURES_DIR).glob("*.png"))
    assert len(pngs) == len(images)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "torch" in html and "optuna" in html  # environment and versions


def test_summary_matches_an_independent_aggregation(run):
    summary = pd.read_csv(run.out_dir / SUMMARY_CSV)
    ok = run.results[run.results["status"] == "ok"]
    indexed = summary.set_index(["task", "model", "metric"])
    for key, rows in ok.groupby(["task", "model", "metric"]):
        got = indexed.loc[key]
        values = rows["value"].to_numpy()
        values = values[np.isfinite(values)]  # undefined values (e.g. a rank with N < 2)
        assert got["n_seeds"] == len(values)
        if len(values) == 0:
            assert np.isnan(got["mean"])
            continue
        assert got["mean"] == pytest.approx(values.mean())
        sd = np.std(values, ddof=1) if len(values) > 1 else np.nan
        assert got["sd"] == pytest.approx(sd, nan_ok=True)
    # the summary table shows those numbers
    html = run.report.read_text(encoding="utf-8")
    table = html.split(f'id="{SUMMARY_TABLE_ID}"')[1].split("</table>")[0]
    row = summary.query("task == 'combo' and model == 'linear' and metric == 'rmse_average'").iloc[
        0
    ]
    assert f"{row['mean']:.4g}" in table


def test_probe_and_collapse_tables_are_collected_and_reported(latent_run):
    out = latent_run.out_dir
    assert (latent_run.results["status"] == "ok").all(), latent_run.failures
    probe = pd.read_csv(out / "probe.csv")
    collapse = pd.read_csv(out / "collapse.csv")
    # probe: the model with a latent only, two targets per seed; collapse: every cell
    assert set(probe["model"]) == {"cpa"} and len(probe) == 2 * 2
    cells = latent_run.results.query("model != 'ceiling'").drop_duplicates(["model", "seed"])
    assert len(collapse) == len(cells)
    by_model = collapse.groupby("model")["spread_ratio"].mean()
    assert by_model["no_change"] == pytest.approx(0.0, abs=1e-6)
    assert by_model["covariate_mean"] == pytest.approx(0.0, abs=1e-6)
    assert by_model["perturbation_mean"] > 0.5
    done = json.loads(
        (paths.cell_dir(out, "sim", "transfer", "full", "cpa", 0) / "done.json").read_text()
    )
    assert done["probe"] is True
    html = latent_run.report.read_text(encoding="utf-8")
    for section in ("Disentanglement probe", "Collapse statistics"):
        assert f">{section}</h2>" in html, section
    probe_table = html.split(f'id="{PROBE_TABLE_ID}"')[1].split("</table>")[0]
    for target in ("perturbation", "cell_type"):
        accuracy = probe.loc[probe["target"] == target, "accuracy"]
        cell = f"{accuracy.mean():.3g} ± {accuracy.std(ddof=1):.2g}"
        assert cell in probe_table, (cell, probe_table)
    # badges: the collapsed baselines carry one in the summary table, the ceiling none
    summary = html.split(f'id="{SUMMARY_TABLE_ID}"')[1].split("</table>")[0]
    rows = {re.findall(r'<td class="label">([^<]*)', r)[2]: r for r in summary.split("<tr")[2:]}
    assert 'class="badge collapsed"' in rows["no_change"]
    assert 'class="badge collapsed"' in rows["covariate_mean"]
    assert "badge" not in rows["ceiling"]
    assert "badge collapsed" not in rows["perturbation_mean"]


def test_user_supplied_names_are_escaped(tmp_path, make_toy):
    adata = make_toy(n_covariates=2, n_perturbations=4, n_cells=12, n_controls=20, n_genes=20)
    adata.obs["condition"] = adata.obs["condition"].astype(str).replace({"P0": EVIL})
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str).replace({"C0": "<b>C0</b>"})
    data = tmp_path / "evil.h5ad"
    adata.write_h5ad(data)
    raw = small_config(
        name=f"run {EVIL}",
        description=EVIL,
        datasets={EVIL: {"path": str(data)}},
        tasks={"t&<x>": {"task": "transfer", "options": {"fraction": 0.5}}},
        models={EVIL: {"model": SLEEPY}},
        seeds=[0],
    )
    result = run_benchmark(
        parse_config(raw, base_dir=tmp_path), out=tmp_path / "evil", log=lambda m: None
    )
    # the toy perturbations are not genes: the gene-embedding baselines are skipped
    status = result.results.set_index("model")["status"]
    assert (status.drop(["linear_embedding", "nearest_perturbation"]) == "ok").all()
    assert (status[["linear_embedding", "nearest_perturbation"]] == "skipped").all()
    html = result.report.read_text(encoding="utf-8")
    assert (
        "Skipped: model not applicable" in html and "no training perturbation has a vector" in html
    )
    assert "<script" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "t&amp;&lt;x&gt;" in html


def test_report_command_and_missing_results(tmp_path, run):
    copy = tmp_path / "copy"
    shutil.copytree(run.out_dir, copy)  # a moved benchmark folder still reports
    (copy / paths.REPORT_FILE).unlink()
    proc = subprocess.run(
        [PYTHON, "-m", "pertbench", "report", str(copy)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {copy.resolve() / paths.REPORT_FILE}"
    assert (copy / paths.REPORT_FILE).is_file()
    with pytest.raises(InputFileError, match="run 'pertbench benchmark"):
        write_report(tmp_path / "empty")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _render(tmp_path, url: str, name: str):
    """The DOM and a 1280 x 1600 screenshot (grey levels and RGB) of ``url`` in headless Chromium."""
    browser = _chromium()
    if browser is None:
        pytest.skip(
            "headless Chromium not found; run scripts/ensure_test_services.sh (apt-get install chromium)"
        )
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    shot = tmp_path / f"{name}.png"
    proc = subprocess.run(
        [browser, *flags, "--window-size=1280,1600", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    from PIL import Image

    assert shot.stat().st_size > 20_000
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    return dom.stdout, rgb


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path, run, latent_run):
    dom, rgb = _render(tmp_path, run.report.resolve().as_uri(), "report")
    # the rendered document holds the summary table with one row per (task, model)
    table = dom.split(f'id="{SUMMARY_TABLE_ID}"')[1].split("</table>")[0]
    n_models = 2 + len(BASELINE_MODELS)  # linear, the baselines, the ceiling
    assert table.count("<tr") == 1 + 2 * n_models  # header + 2 tasks x models
    # one badge per (task, model) whose mean spread ratio is below the threshold (in the
    # combo task no covariate has two test groups: undefined, no badge); no_change and
    # covariate_mean of the transfer task are collapsed by construction
    spread = pd.read_csv(run.out_dir / "collapse.csv").groupby(["task", "model"])["spread_ratio"]
    n_collapsed = int((spread.mean() < 0.15).sum())
    assert n_collapsed >= 2
    assert table.count('class="badge collapsed"') == n_collapsed
    # the probe section and the badges of a run with a latent model, as rendered
    latent_dom, _ = _render(tmp_path, latent_run.report.resolve().as_uri(), "latent")
    assert ">Disentanglement probe</h2>" in latent_dom
    probe = latent_dom.split(f'id="{PROBE_TABLE_ID}"')[1].split("</table>")[0]
    assert probe.count("<tr") == 1 + 2  # header + cpa x (perturbation, cell_type)
    summary = latent_dom.split(f'id="{SUMMARY_TABLE_ID}"')[1].split("</table>")[0]
    assert 'class="badge collapsed"' in summary
    # a real, non-blank screenshot
    image = rgb.mean(axis=2)
    assert image.shape == (1600, 1280)
    assert image.std() > 10  # text and figures, not a blank page


@pytest.fixture(scope="module")
def gi_run(tmp_path_factory):
    """A combination benchmark (the fast test model) with the metric validation study."""
    root = tmp_path_factory.mktemp("gi")
    raw = small_config(
        tasks={"combo": {"task": "combo", "options": {"fraction": 0.7}}},
        models={"shift": {"model": SLEEPY}},
        seeds=[0],
        evaluation={"metrics": ["rmse_average", "rmse_rank_average"], "validate_metrics": True},
    )
    return run_benchmark(parse_config(raw, base_dir=root), out=root / "run", log=lambda m: None)


def test_interaction_and_validation_sections(gi_run):
    out = gi_run.out_dir
    html = gi_run.report.read_text(encoding="utf-8")
    assert ">Genetic interactions (combinations)</h2>" in html
    assert ">Metric validation study</h2>" in html
    assert '<p class="verdict">Interacting combinations:' in html
    # the GI table shows the results' numbers, the additive reference first
    section = html.split('id="gi-label-sim-combo"')[1].split("</table>")[0]
    results = gi_run.results
    for model in ("shift", "perturbation_mean"):
        hit = (results["model"] == model) & (results["metric"] == "gi_rmse[interacting]")
        assert f"{results.loc[hit, 'value'].iloc[0]:.3g}" in section
    reference = results["metric"] == "gi_rmse_additive[interacting]"
    additive = results.loc[reference, "value"].unique()
    assert len(additive) == 1 and f"{additive[0]:.3g}" in section  # model-independent
    assert section.index("additive (observed singles)") < section.index("shift")
    # the validation study ran once, as its own job, and its heatmap is embedded
    assert (out / "validation" / "sim" / "heatmap.png").is_file()
    assert 'alt="Metric validation study, sim"' in html
    assert len(list((out / "figures").glob("*_validation_sim.png"))) == 1
    detection = pd.read_csv(out / "validation" / "sim" / "detection.csv")
    assert "gi_rmse[interacting]" in set(detection["metric"])
    assert detection["metric"].nunique() > 70  # the whole catalogue


@pytest.mark.browser
def test_validation_heatmap_renders_in_headless_chromium(tmp_path, gi_run):
    dom, _ = _render(tmp_path, gi_run.report.resolve().as_uri(), "report")
    assert 'alt="Metric validation study, sim"' in dom and 'id="gi-label-sim-combo"' in dom
    # the heatmap exactly as embedded in the report, drawn alone: strong reds where the
    # failures score worse than perfect
    html = gi_run.report.read_text(encoding="utf-8")
    figure = re.search(r'<img alt="Metric validation study, sim"[^>]*>', html)
    assert figure is not None
    page = tmp_path / "figure.html"
    page.write_text(f"<!DOCTYPE html><html><body>{figure.group(0)}</body></html>")
    _, rgb = _render(tmp_path, page.resolve().as_uri(), "figure")
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    assert red.mean() > 0.02
