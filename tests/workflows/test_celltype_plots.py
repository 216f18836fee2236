"""Figures of the cell-type workflow: numbers behind them and edge cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist

from pertbench import pl
from pertbench.errors import EvaluationError


@pytest.fixture(scope="module")
def three_sets():
    gen = np.random.default_rng(0)
    controls = gen.poisson(1.0, size=(40, 12)).astype(float)
    real = gen.poisson(2.0, size=(35, 12)).astype(float)
    predicted = real[:30] + gen.normal(scale=0.1, size=(30, 12))
    return controls, real, predicted


def test_edistance_matrix_matches_direct_computation(three_sets):
    controls, real, predicted = three_sets
    table = pl.edistance_matrix(controls, real, predicted, n_pcs=5)
    assert list(table.index) == ["control", "real", "predicted"]
    np.testing.assert_allclose(table.to_numpy(), table.to_numpy().T)
    np.testing.assert_allclose(np.diag(table.to_numpy()), 0.0)
    # independent: PCA of the observed cells by SVD, energy distance by hand
    observed = np.vstack([controls, real])
    mean = observed.mean(0)
    _, _, vt = np.linalg.svd(observed - mean, full_matrices=False)
    proj = [(m - mean) @ vt[:5].T for m in (controls, real, predicted)]

    def energy(x, y):
        within = lambda a: cdist(a, a).sum() / (len(a) * (len(a) - 1))  # noqa: E731
        return 2 * cdist(x, y).mean() - within(x) - within(y)

    assert table.loc["real", "predicted"] == pytest.approx(energy(proj[1], proj[2]), rel=1e-6)
    assert table.loc["control", "real"] == pytest.approx(energy(proj[0], proj[1]), rel=1e-6)
    assert table.loc["real", "predicted"] < table.loc["control", "real"]


def test_figures_draw_and_handle_edge_cases(three_sets):
    controls, real, predicted = three_sets
    genes = [f"gene{i}" for i in range(12)]
    top = pl.top_de_genes(controls, real, n=4)
    assert len(top) == 4 and set(top) <= set(genes)
    constant = predicted.copy()
    constant[:, 0] = 1.0  # a constant column has no density: must not fail
    for fig in (
        pl.condition_pca(controls, real, predicted),
        pl.edistance_heatmap(controls, real, predicted, n_pcs=5),
        pl.de_dotplot(controls, real, predicted, top),
        pl.de_violins(controls, real, constant, ["gene0", *top[:2]]),
    ):
        assert fig.axes
    table = pd.DataFrame(
        [[np.nan, 0.7, 0.3], [0.5, np.nan, 0.5]], index=["A", "B"], columns=["A", "B", "C"]
    )
    fig = pl.attention_heatmap(table)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "-" in texts and "0.70" in texts
    with pytest.raises(EvaluationError, match="not found"):
        pl.de_dotplot(controls, real, predicted, ["nope"])
    with pytest.raises(EvaluationError, match="no cells"):
        pl.condition_pca(controls, real[:0], predicted)
