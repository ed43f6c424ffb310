"""embedding_density, as scanpy's tools/_embedding_density.py: a Gaussian KDE at every cell.

scanpy evaluates ``scipy.stats.gaussian_kde`` of the cells (of each ``groupby`` category) at
those cells and scales the values to [0, 1]. The bandwidth (Scott's factor) and the covariance
come from a ``gaussian_kde`` object here too (its set-up is cheap and raises scipy's errors for
too few or collinear cells); the kernel sums, scipy's O(n²) loop, are
:func:`gpusc._kernels.density.kde_sums` (numba, a grid and each pair once) on the host and the
``kde_sums`` kernel on the device, without an n × n matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core import logg
from .._core.adata import actualize_view
from .._core.arrays import placement
from .._kernels import density as _density
from .._settings import resolve_device


def embedding_density(
    adata: AnnData,
    basis: str = "umap",
    *,
    groupby: str | None = None,
    key_added: str | None = None,
    components: str | Sequence[str] | None = None,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> None:
    """Density of cells in an embedding (per category), as :func:`scanpy.tl.embedding_density`.

    Gaussian kernel density estimation (scipy's ``gaussian_kde``: Scott's bandwidth, the
    cells' covariance) over two components of ``obsm['X_' + basis]``, evaluated at every
    cell and scaled to [0, 1] (per ``groupby`` category). Equal to scanpy's to rounding: the
    only terms left out of a cell's kernel sum are each below 1e-15 of its own term (see
    :mod:`gpusc._kernels.density`).

    Where it runs (``device``, default ``gpusc.settings.device``): on the CPU a parallel numba
    pass over a grid (each pair of cells closer than ~8.3 bandwidths once); on the GPU the
    ``kde_sums`` kernel (one thread per cell, tiles in shared memory; 24 bytes per cell of
    device memory). Cells of a category with no value (NaN) get 0, as in scanpy.

    Parameters
    ----------
    adata
        Annotated data matrix with ``obsm['X_' + basis]``.
    basis
        The embedding (``"umap"``, ``"tsne"``, ``"diffmap"``, ``"pca"``, ``"draw_graph_fa"``
        or ``"fa"``, ...); case-insensitive.
    groupby
        A categorical ``obs`` column (string columns are made categorical first, as scanpy's
        ``sanitize_anndata`` does): densities per category.
    key_added
        The ``obs`` column to write; default ``{basis}_density[_{groupby}]``.
    components
        Two 1-based components, ``"1,2"`` or a sequence; default ``"1,2"`` (for
        ``diffmap``, counted after the steady-state component 0, as scanpy).
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``. Sets:

    ``obs[key_added]`` : pandas.Series, float64
        Density of each cell, scaled to [0, 1] within its category.
    ``uns[key_added + '_params']`` : dict
        ``covariate`` (``groupby``) and ``components`` (list of int), as scanpy.
    """
    func = "embedding_density"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    logg.info(f"computing density on {basis!r}")
    basis = basis.lower()
    if basis == "fa":
        basis = "draw_graph_fa"
    if f"X_{basis}" not in adata.obsm:
        raise ValueError(f"{func}: Cannot find the embedded representation "
                         f"`adata.obsm['X_{basis}']`. Compute the embedding first. "
                         f"(adata.obsm has {list(adata.obsm)})")
    if components is None:
        components = "1,2"
    if isinstance(components, str):
        components = components.split(",")
    try:
        components = np.array(components).astype(int) - 1
    except (TypeError, ValueError) as error:
        raise ValueError(f"{func}: components={components!r} must be two 1-based integers "
                         f"such as '1,2' ({error})") from None
    if components.ndim != 1 or len(components) != 2:
        raise ValueError(f"{func}: Please specify exactly 2 components, or `None`.")
    if basis == "diffmap":
        components += 1
    embedding = adata.obsm[f"X_{basis}"]
    if hasattr(embedding, "to_numpy"):
        embedding = embedding.to_numpy()
    if placement(embedding) == "device":
        embedding = embedding.get()  # synchronize!
    embedding = np.asarray(embedding)
    if embedding.ndim != 2 or components.min() < 0 or components.max() >= embedding.shape[1]:
        raise ValueError(f"{func}: components {(components + (basis != 'diffmap')).tolist()} "
                         f"are out of range for obsm['X_{basis}'] of shape {embedding.shape}")
    coords = embedding[:, components]
    if not np.isfinite(coords).all():
        raise ValueError(f"{func}: obsm['X_{basis}'] contains NaN or inf in components "
                         f"{(components + (basis != 'diffmap')).tolist()}")
    if groupby is not None:
        if groupby not in adata.obs:
            raise ValueError(f"{func}: Could not find {groupby!r} `.obs` column. "
                             f"(adata.obs has {list(adata.obs.columns)})")
        column = adata.obs[groupby]
        if column.dtype.name != "category" and pd.api.types.infer_dtype(column) != "string":
            raise ValueError(f"{func}: {groupby!r} column does not contain categorical data")
        labels = column if column.dtype.name == "category" else column.astype("category")
        masks = [(labels == cat).to_numpy() for cat in labels.cat.categories]
    else:
        masks = [np.ones(adata.n_obs, bool)]
    if key_added is not None:
        density_covariate = key_added
    elif groupby is not None:
        density_covariate = f"{basis}_density_{groupby}"
    else:
        density_covariate = f"{basis}_density"
    # every group's whitened cells first: scipy's errors (too few cells, a singular
    # covariance) come before anything is computed or written
    whitened = [_whiten(coords[mask], func) for mask in masks]
    where = resolve_device(device)

    density_values = np.zeros(adata.n_obs)
    sums = _density.kde_sums_device if where == "gpu" else _density.kde_sums
    for mask, u in zip(masks, whitened, strict=True):
        z = sums(u[0], u[1])
        with np.errstate(invalid="ignore", divide="ignore"):  # one value everywhere: NaN, as scanpy
            density_values[mask] = (z - z.min()) / (z.max() - z.min())

    actualize_view(adata)
    adata.strings_to_categoricals()  # scanpy's sanitize_anndata
    adata.obs[density_covariate] = density_values
    if basis != "diffmap":
        components += 1
    adata.uns[f"{density_covariate}_params"] = {"covariate": groupby,
                                                    "components": components.tolist()}
    logg.hint(f"added\n    '{density_covariate}', densities (adata.obs)\n"
              f"    '{density_covariate}_params', parameter (adata.uns)")


def _whiten(points: np.ndarray, func: str) -> np.ndarray:
    """(2, n) float64 points in the KDE's whitened space (scipy's ``solve_triangular`` of the
    bandwidth-scaled Cholesky factor); scipy's own errors for degenerate groups."""
    from scipy import linalg
    from scipy.stats import gaussian_kde

    xy = np.vstack([points[:, 0], points[:, 1]])
    try:
        kde = gaussian_kde(xy)
    except (ValueError, linalg.LinAlgError) as error:
        raise type(error)(f"{func}: a group of {points.shape[0]} cell(s) has no density "
                          f"estimate; scipy's gaussian_kde says: {error}") from error
    return linalg.solve_triangular(kde.cho_cov, xy.astype(np.float64), lower=True)
