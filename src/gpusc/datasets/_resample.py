"""New cells drawn from a per-group negative-binomial model fitted to real counts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ._sampler import sample_nb_csr

DISPERSION_RANGE = (1e-2, 10.0)


def _counts_csr(adata: ad.AnnData, layer: str | None) -> sparse.csr_matrix:
    if layer is None:
        X = adata.X
    elif layer not in adata.layers:
        raise KeyError(f"layer={layer!r} is not in adata.layers; layers: {list(adata.layers)}")
    else:
        X = adata.layers[layer]
    if X is None:
        raise ValueError("adata.X is None; pass layer= naming a counts layer")
    if hasattr(X, "get") and not isinstance(X, np.ndarray | sparse.spmatrix | sparse.sparray):
        X = X.get()  # a CuPy array: the fit is small host work  # synchronize!
    X = sparse.csr_matrix(X, dtype=np.float64)
    X.sum_duplicates()
    data = X.data
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if not np.all(np.isfinite(data)) or (data < 0).any() or (data != np.round(data)).any():
        raise ValueError(
            f"{where} must hold raw counts (finite, non-negative integers) to fit the model; "
            "pass layer= naming the counts layer"
        )
    return X


def _largest_remainder(n: int, sizes: np.ndarray) -> np.ndarray:
    """Split ``n`` into integers proportional to ``sizes`` (Hamilton's method)."""
    exact = n * sizes / sizes.sum()
    alloc = np.floor(exact).astype(np.int64)
    short = n - alloc.sum()
    alloc[np.argsort(-(exact - alloc), kind="stable")[:short]] += 1
    return alloc


def _fit_group(X: sparse.csr_matrix, totals: np.ndarray):
    """Gene fractions ``f`` and NB dispersions ``phi`` of one group's cells (all totals > 0)."""
    n_cells = X.shape[0]
    norm = sparse.diags(1.0 / totals) @ X
    f = np.asarray(norm.sum(axis=0)).ravel() / n_cells
    # Method of moments with mu_cj = L_c f_j: sum (x - mu)^2 = sum mu + phi sum mu^2.
    sum_x2 = np.asarray(X.multiply(X).sum(axis=0)).ravel()
    sum_lx = np.asarray(X.T @ totals).ravel()
    sum_l, sum_l2 = totals.sum(), (totals**2).sum()
    squares = sum_x2 - 2.0 * f * sum_lx + f**2 * sum_l2
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = (squares - f * sum_l) / (f**2 * sum_l2)
    phi = np.where(np.isfinite(phi), phi, DISPERSION_RANGE[1])
    return f, np.clip(phi, *DISPERSION_RANGE)


def resample(
    adata: ad.AnnData,
    n_obs: int,
    *,
    groupby: str | None = None,
    seed: int = 0,
    layer: str | None = None,
) -> ad.AnnData:
    """Draw new cells from a negative-binomial model fitted to a real counts dataset.

    For benchmarks larger than the real data. The new cells are not copies of real cells
    (copies give every cell its own copies as nearest neighbours, which breaks kNN graphs,
    UMAP and clustering); they are drawn from this model, fitted per group ``k`` (each
    category of ``adata.obs[groupby]`` with cells; cells with a missing label are dropped;
    one group for all cells when ``groupby`` is None):

    * ``f_kj``: mean over the group's cells of ``x_cj / L_c`` (normalised expression;
      ``L_c`` the cell's total count, cells with ``L_c = 0`` left out).
    * ``phi_kj``: one NB dispersion per gene by the method of moments with
      ``mu_cj = L_c f_kj``: ``phi = (sum_c (x_cj - mu_cj)^2 - sum_c mu_cj) / sum_c mu_cj^2``,
      clipped to ``[0.01, 10]``.
    * The group's observed library sizes ``L_c``.

    ``n_obs`` is split between the groups in proportion to their sizes (largest remainder)
    and the cells are put in random order. A new cell of group ``k`` gets a library size
    ``L`` drawn (with replacement) from the group's observed totals and counts
    ``x_j ~ NB(mean L f_kj, dispersion phi_kj)`` independently per gene. The sampler visits
    only the (cell, gene) pairs that can be non-zero, so time and memory scale with the
    number of non-zeros (never a dense ``n_obs x n_vars`` array).

    Parameters
    ----------
    adata
        Real data with raw counts (non-negative integers) in ``X`` or ``layers[layer]``.
    n_obs
        Number of cells to draw.
    groupby
        Column of ``adata.obs`` whose categories get separate models (cell types), or None.
    seed
        Seed of the generator; the same seed gives identical output.
    layer
        Layer with the counts instead of ``X``.

    Returns
    -------
    AnnData with

    ``X``
        :class:`scipy.sparse.csr_matrix`, float32, integer counts, sorted indices.
    ``obs[groupby]``
        categorical with the source's categories (when ``groupby`` is given).
    ``var``
        a copy of ``adata.var`` (names and columns), with ``var["mt"]`` (bool, names
        starting with ``MT-``) added when absent.
    ``uns["gpusc_resample"]``
        dict: ``source_shape``, ``groupby`` (``""`` for None), ``seed``, ``layer``
        (``""`` for X), ``model``.

    Raises
    ------
    KeyError
        ``groupby`` is not a column of ``adata.obs``, or it has no cells with a label;
        ``layer`` is not a layer.
    ValueError
        The matrix is not counts, or ``n_obs < 1``.
    """
    if n_obs < 1:
        raise ValueError(f"n_obs must be >= 1; got {n_obs}")
    if groupby is not None and groupby not in adata.obs.columns:
        raise KeyError(f"groupby={groupby!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}")
    X = _counts_csr(adata, layer)
    totals = np.asarray(X.sum(axis=1)).ravel()

    if groupby is None:
        codes = np.zeros(adata.n_obs, np.int64)
        categories = pd.Index(["all"])
    else:
        labels = adata.obs[groupby]
        labels = labels if isinstance(labels.dtype, pd.CategoricalDtype) else labels.astype("category")
        codes = labels.cat.codes.to_numpy().astype(np.int64)
        categories = labels.cat.categories
    usable = (codes >= 0) & (totals > 0)
    sizes = np.bincount(codes[usable], minlength=len(categories))
    present = np.flatnonzero(sizes)
    if present.size == 0:
        raise KeyError(
            f"groupby={groupby!r} has no cells with a label and non-zero counts; "
            "every group is empty" if groupby is not None else "adata has no cell with non-zero counts"
        )

    f = np.empty((present.size, adata.n_vars))
    phi = np.empty_like(f)
    group_totals = []
    for k, code in enumerate(present):
        rows = np.flatnonzero(usable & (codes == code))
        f[k], phi[k] = _fit_group(X[rows], totals[rows])
        group_totals.append(totals[rows])

    rng = np.random.default_rng(seed)
    alloc = _largest_remainder(n_obs, sizes[present].astype(np.float64))
    groups = rng.permutation(np.repeat(np.arange(present.size), alloc))
    libs = np.empty(n_obs)
    for k in range(present.size):
        mask = groups == k
        libs[mask] = rng.choice(group_totals[k], size=int(mask.sum()), replace=True)
    key = int(rng.integers(0, 2**63, dtype=np.int64))
    counts = sample_nb_csr(groups, libs, f, phi, adata.n_vars, key)

    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_obs)]))
    if groupby is not None:
        obs[groupby] = pd.Categorical.from_codes(present[groups], categories=categories)
    var = adata.var.copy()
    if "mt" not in var.columns:
        var["mt"] = var.index.astype(str).str.startswith("MT-")
    uns = {
        "gpusc_resample": {
            "source_shape": [int(adata.n_obs), int(adata.n_vars)],
            "groupby": groupby if groupby is not None else "",
            "seed": int(seed),
            "layer": layer if layer is not None else "",
            "model": "per group: x ~ NB(L * f_j, phi_j), f_j mean normalised expression, "
            "phi_j method of moments clipped to [0.01, 10], L drawn from the group's real totals",
        }
    }
    return ad.AnnData(X=counts, obs=obs, var=var, uns=uns)
