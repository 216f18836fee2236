"""Distribution metrics: compare cells, not means.

- :func:`edistance`: energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean). Within-set
  means exclude self-pairs (the unbiased U-statistic). A set with a single cell has no
  pair: its within-set term is defined as 0 (the only "pair" is the cell with itself).
- :func:`mmd`: unbiased MMD^2 with an RBF kernel exp(-d^2 / (2 s^2)), s = median of the
  pairwise distances of the pooled sample (median heuristic; self-pairs excluded). A
  single-cell set uses k(x, x) = 1 for its within-set term, as above. If all pooled
  points coincide the two samples are identical and MMD^2 = 0.
- :func:`mean_var_kde`: per-gene (mean, variance) points of each side, a Gaussian KDE
  of each (Scott's rule, full covariance), and the L1 distance of the two densities on a
  50 x 50 Cartesian grid. The grid spans both point sets plus 3 kernel standard
  deviations on every side; each density is normalised to unit mass on the grid, so the
  value lies in [0, 2] (0: same density, 2: disjoint). A kernel's per-axis standard
  deviation is floored at one grid step of the unpadded range, so a zero-variance axis
  (e.g. all variances 0 in a single-cell group) still gives a resolvable density.

Cells are compared in a shared PCA space (:func:`pca_basis`), fitted on observed cells.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial.distance import cdist, pdist

DEFAULT_N_PCS = 30
DEFAULT_MAX_CELLS = 2000
KDE_GRID = 50


def pca_basis(
    X, *, n_pcs: int = DEFAULT_N_PCS, max_cells: int | None = 5000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact, deterministic PCA of the rows of ``X``: returns (mean, components).

    ``components`` is (n_genes, k) with orthonormal columns, k = min(n_pcs, rank); cells
    are projected with :func:`project`. Fitted on at most ``max_cells`` rows (seeded
    subsample; principal axes are stable long before that). Uses the eigendecomposition
    of the smaller of the cell-cell and the gene-gene covariance, computed from sparse
    input without densifying it.
    """
    n = X.shape[0]
    if max_cells is not None and n > max_cells:
        X = X[pca_rows(n, max_cells=max_cells, seed=seed)]
        n = max_cells
    X = sp.csr_matrix(X, dtype=np.float64) if sp.issparse(X) else np.asarray(X, np.float64)
    mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
    n_genes = X.shape[1]
    k = int(max(0, min(n_pcs, n - 1, n_genes)))
    if k == 0:
        return mean, np.zeros((n_genes, 0))
    xm = np.asarray(X @ mean).ravel()  # row i: x_i . mean
    if n <= n_genes:
        # centred Gram matrix (X - 1 m')(X - 1 m')'
        gram = X @ X.T
        gram = gram.toarray() if sp.issparse(gram) else np.asarray(gram)
        gram = gram - xm[:, None] - xm[None, :] + mean @ mean
        vals, vecs = _top_eigh(gram, k)
        top = np.argsort(vals)[::-1]
        vals, vecs = vals[top], vecs[:, top]
        keep = vals > max(vals.max(initial=0.0), 0.0) * 1e-12
        vals, vecs = vals[keep], vecs[:, keep]
        comps = np.asarray(X.T @ vecs) - np.outer(mean, vecs.sum(axis=0))
        comps = comps / np.sqrt(vals)
    else:
        cov = X.T @ X
        cov = cov.toarray() if sp.issparse(cov) else np.asarray(cov)
        cov = cov - n * np.outer(mean, mean)
        vals, vecs = _top_eigh(cov, k)
        top = np.argsort(vals)[::-1]
        vals, comps = vals[top], vecs[:, top]
        comps = comps[:, vals > max(vals.max(initial=0.0), 0.0) * 1e-12]
    # deterministic signs: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    return mean, comps * np.where(signs == 0, 1.0, signs)


def pca_rows(n: int, *, max_cells: int | None = 5000, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of the rows :func:`pca_basis` fits on among ``n``: all of them,
    or a seeded subsample of ``max_cells`` (so a caller can read only those rows)."""
    if max_cells is not None and n > max_cells:
        return np.sort(np.random.default_rng(seed).choice(n, size=max_cells, replace=False))
    return np.arange(n)


def _top_eigh(sym: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenpairs of a symmetric matrix (LAPACK, deterministic)."""
    from scipy.linalg import eigh

    n = sym.shape[0]
    return eigh(sym, subset_by_index=[n - k, n - 1])


def project(X, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Coordinates of the rows of ``X`` in a basis from :func:`pca_basis`."""
    proj = X @ components
    proj = np.asarray(proj, dtype=np.float64)
    return proj - mean @ components


def subsample(n: int, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``max_cells`` of ``n`` items (all when fewer)."""
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_cells, replace=False))


def _within_mean(x: np.ndarray) -> float:
    """Mean pairwise distance over distinct pairs (0 for fewer than two points)."""
    return float(pdist(x).mean()) if x.shape[0] >= 2 else 0.0


def edistance(X: np.ndarray, Y: np.ndarray) -> float:
    """Energy distance between two point sets (rows), self-pairs excluded within sets."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    if X.shape[0] == 0 or Y.shape[0] == 0:
        raise ValueError("edistance needs at least one point in each set")
    between = float(cdist(X, Y).mean())
    return 2.0 * between - _within_mean(X) - _within_mean(Y)


def mmd(X: np.ndarray, Y: np.ndarray, *, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with an RBF kernel (median-heuristic bandwidth unless given)."""
    X = np.atleast_2d(np.asarray(X, dtype=np.float64))
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    if X.shape[0] == 0 or Y.shape[0] == 0:
        raise ValueError("mmd needs at least one point in each set")
    dxx, dyy, dxy = pdist(X, "sqeuclidean"), pdist(Y, "sqeuclidean"), cdist(X, Y, "sqeuclidean")
    if bandwidth is None:
        pooled = np.concatenate([dxx, dyy, dxy.ravel()])
        bandwidth = float(np.sqrt(np.median(pooled))) if pooled.size else 0.0
        if bandwidth == 0.0:
            positive = pooled[pooled > 0]
            if positive.size == 0:
                return 0.0  # every point coincides: identical samples
            bandwidth = float(np.sqrt(positive.min()))
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = float(np.exp(-gamma * dxx).mean()) if dxx.size else 1.0
    kyy = float(np.exp(-gamma * dyy).mean()) if dyy.size else 1.0
    kxy = float(np.exp(-gamma * dxy).mean())
    return kxx + kyy - 2.0 * kxy


def _scott_cov(points: np.ndarray) -> np.ndarray:
    n, d = points.shape
    factor = n ** (-1.0 / (d + 4))
    cov = np.cov(points, rowvar=False, bias=False) if n > 1 else np.zeros((d, d))
    return np.atleast_2d(cov) * factor**2


def _kde_on_grid(
    points: np.ndarray, cov: np.ndarray, grid: np.ndarray, *, chunk: int = 512
) -> np.ndarray:
    """Gaussian KDE (kernel covariance ``cov``) evaluated at ``grid`` (m, 2), unnormalised.

    Works in whitened coordinates, a block of points at a time with in-place operations,
    so the (grid x points) kernel matrix is never held whole.
    """
    inv = np.linalg.inv(np.linalg.cholesky(cov))
    gw = grid @ inv.T
    pw = points @ inv.T
    out = np.zeros(grid.shape[0])
    width = min(chunk, pw.shape[0])
    buf = np.empty((grid.shape[0], width))
    tmp = np.empty_like(buf)
    for lo in range(0, pw.shape[0], width):
        p = pw[lo : lo + width]
        b, t = buf[:, : p.shape[0]], tmp[:, : p.shape[0]]
        np.subtract(gw[:, :1], p[None, :, 0], out=b)
        np.multiply(b, b, out=b)
        np.subtract(gw[:, 1:], p[None, :, 1], out=t)
        np.multiply(t, t, out=t)
        b += t
        b *= -0.5
        np.exp(b, out=b)
        out += b.sum(axis=1)
    return out


def mean_var_kde(
    pred_points: np.ndarray, truth_points: np.ndarray, *, grid_size: int = KDE_GRID
) -> float:
    """L1 distance between KDEs of per-gene (mean, variance) points; in [0, 2].

    Parameters
    ----------
    pred_points, truth_points
        (n_genes, 2) arrays of (mean, variance) per gene, e.g. ``np.c_[mean, var]``.
    grid_size
        Grid points per axis.
    """
    P = np.asarray(pred_points, dtype=np.float64)
    T = np.asarray(truth_points, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 2 or T.ndim != 2 or T.shape[1] != 2:
        raise ValueError("mean_var_kde expects (n_genes, 2) arrays of (mean, variance)")
    if P.shape[0] == 0 or T.shape[0] == 0:
        raise ValueError("mean_var_kde needs at least one gene")
    both = np.vstack([P, T])
    lo, hi = both.min(axis=0), both.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    floor = span / (grid_size - 1)
    covs = []
    for pts in (P, T):
        cov = _scott_cov(pts)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        sd_new = np.maximum(sd, floor)
        # keep the correlation, raise the per-axis scale to the floor
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = cov / np.outer(np.where(sd > 0, sd, 1.0), np.where(sd > 0, sd, 1.0))
        corr = np.where(np.outer(sd > 0, sd > 0), corr, np.eye(2))
        np.fill_diagonal(corr, 1.0)
        corr = np.clip(corr, -0.999, 0.999)
        np.fill_diagonal(corr, 1.0)
        covs.append(corr * np.outer(sd_new, sd_new))
    pad = 3.0 * np.max([np.sqrt(np.diag(c)) for c in covs], axis=0)
    axes = [np.linspace(lo[d] - pad[d], hi[d] + pad[d], grid_size) for d in range(2)]
    gx, gy = np.meshgrid(axes[0], axes[1], indexing="ij")
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    f = _kde_on_grid(P, covs[0], grid)
    g = _kde_on_grid(T, covs[1], grid)
    f /= f.sum()
    g /= g.sum()
    return float(np.abs(f - g).sum())


def pair_mean_var_kde(
    pred_mean: np.ndarray, pred_var: np.ndarray, truth_mean: np.ndarray, truth_var: np.ndarray
) -> float:
    """:func:`mean_var_kde` of one group from its per-gene means and variances."""
    return mean_var_kde(
        np.column_stack([pred_mean, pred_var]), np.column_stack([truth_mean, truth_var])
    )
