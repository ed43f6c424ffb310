"""umap, as scanpy's tools/_umap.py: embed the neighbourhood graph."""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._core.adata import actualize_view
from .._core.arrays import placement
from .._core.compat import check_random_state
from .._kernels import umap as _umap
from .._settings import resolve_device

METHODS = ("umap", "gpusc")
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def umap(
    adata: AnnData,
    *,
    min_dist: float = 0.5,
    spread: float = 1.0,
    n_components: int = 2,
    maxiter: int | None = None,
    alpha: float = 1.0,
    gamma: float = 1.0,
    negative_sample_rate: int = 5,
    init_pos: str | np.ndarray | None = "spectral",
    random_state: Any = 0,
    a: float | None = None,
    b: float | None = None,
    method: Literal["umap", "gpusc"] = "umap",
    key_added: str | None = None,
    neighbors_key: str = "neighbors",
    copy: bool = False,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """Embed the neighbourhood graph with UMAP, as :func:`scanpy.tl.umap`.

    Where it runs (``device``, default ``gpusc.settings.device``) and ``method``:

    * on the GPU: our epoch-based layout optimiser (``kernels/umap.cu``) with a spectral
      start from cupyx's ``eigsh``; ``method`` ``"umap"`` and ``"gpusc"`` are the same;
    * on the CPU with ``method="umap"`` (default): scanpy's own umap-learn path, unchanged;
    * on the CPU with ``method="gpusc"``: the numba twin of the GPU optimiser (the same
      algorithm, a start from umap-learn's spectral_layout), to get the GPU's algorithm
      without a GPU.

    The optimiser is umap-learn's (edge sampling by ``epochs_per_sample``, negative
    sampling, clip ±4, learning rate lowered after each epoch) with synchronous
    per-epoch updates summed in fixed point, and negative samples from a counter-based
    hash: the same graph, parameters and ``random_state`` give the identical embedding
    run to run on one device (umap-learn's own threads race). See
    :mod:`gpusc._kernels.umap`. On the GPU the host only prepares the graph
    (:func:`layout_graph`) and sends it once; the connectivity test before the spectral
    start, the edges' schedules and the layout run on the device.

    Parameters
    ----------
    adata
        Annotated data matrix with a neighbourhood graph (:func:`gpusc.pp.neighbors`).
    min_dist, spread
        Fit ``a`` and ``b`` as umap-learn's ``find_ab_params`` (when they are not given).
    n_components
        Dimensions of the embedding.
    maxiter
        Epochs; ``None``: 500 for at most 10,000 cells, else 200 (scanpy's default).
    alpha
        Initial learning rate.
    gamma
        Weight of the negative samples.
    negative_sample_rate
        Negative samples per positive sample.
    init_pos
        ``"spectral"``, ``"random"``, an ``obsm`` key, or an (n_obs, n_components) array.
        ``"paga"`` is not supported here (use scanpy.tl.umap).
    random_state
        Seed (int), RandomState or ``None``, as scanpy.
    a, b
        The low-dimensional curve's parameters; ``None``: fitted from min_dist and spread.
    method
        ``"umap"`` or ``"gpusc"``; see above.
    key_added
        Store in ``obsm[key_added]`` and ``uns[key_added]`` instead of ``X_umap``/``umap``.
    neighbors_key
        The ``uns`` key of the graph (default ``"neighbors"``).
    copy
        Return a copy instead of writing to ``adata``.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsm['X_umap' | key_added]`` : numpy.ndarray, float32 (n_obs, n_components)
        UMAP coordinates.
    ``uns['umap' | key_added]`` : dict
        ``params``: ``a``, ``b`` (and ``random_state`` when it is not 0), as scanpy.
    """
    func = "umap"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if method == "rapids":
        raise ValueError(f"{func}: method='rapids' is scanpy's deprecated cuML path; gpusc runs "
                         "its own GPU optimiser with method='umap' and device='gpu'")
    if method not in METHODS:
        raise ValueError(f"{func}: method={method!r} is not one of {METHODS}")
    neighbors = _neighbors(adata, neighbors_key, func)
    ckey = neighbors.get("connectivities_key", "connectivities")
    if ckey not in adata.obsp:
        raise KeyError(f"{func}: obsp[{ckey!r}] (uns[{neighbors_key!r}]['connectivities_key']) "
                       f"not found; run pp.neighbors again")
    if isinstance(n_components, bool) or not isinstance(n_components, int | np.integer) \
            or n_components < 1:
        raise ValueError(f"{func}: n_components={n_components!r} must be a positive integer")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer)
                                or maxiter < 0):
        raise ValueError(f"{func}: maxiter={maxiter!r} must be a non-negative integer or None")
    if isinstance(init_pos, str) and init_pos == "paga":
        raise NotImplementedError(f"{func}: init_pos='paga' is not supported; run "
                                  "scanpy.tl.paga and pass init_pos=adata.obsm key or an array")
    if isinstance(init_pos, str) and init_pos not in ("spectral", "random") \
            and init_pos not in adata.obsm:
        raise KeyError(f"{func}: init_pos={init_pos!r} is neither 'spectral', 'random' nor an "
                       f"obsm key; adata.obsm has {list(adata.obsm)}")
    init_array = None
    if not isinstance(init_pos, str) and init_pos is not None:
        init_array = _init_array(init_pos, adata.n_obs, n_components, func, "init_pos")
    elif isinstance(init_pos, str) and init_pos in adata.obsm:
        init_array = _init_array(adata.obsm[init_pos], adata.n_obs, n_components, func,
                                 f"obsm[{init_pos!r}]")
    where = resolve_device(device)

    if where == "cpu" and method == "umap":  # scanpy's umap-learn path itself
        import scanpy as sc

        init = init_array if init_array is not None else init_pos
        return sc.tl.umap(adata, min_dist=min_dist, spread=spread, n_components=n_components,
                          maxiter=maxiter, alpha=alpha, gamma=gamma,
                          negative_sample_rate=negative_sample_rate, init_pos=init,
                          random_state=random_state, a=a, b=b, method="umap",
                          key_added=key_added, neighbors_key=neighbors_key, copy=copy)

    if a is None or b is None:
        a, b = find_ab_params(spread, min_dist)
    graph, n_epochs = layout_graph(adata.obsp[ckey], maxiter)
    n = graph.shape[0]
    on_device = _umap.graph_to_device(graph) if where == "gpu" else None

    params: dict[str, Any] = {"a": a, "b": b}
    if not (isinstance(random_state, int | np.integer) and random_state == 0):
        params["random_state"] = random_state
    rs = check_random_state(random_state)
    if init_array is not None:
        start = _dedupe(init_array, rs)
    elif init_pos == "random":
        start = rs.uniform(low=-10.0, high=10.0, size=(n, n_components)).astype(np.float32)
    else:
        coords = None if on_device is None else _umap.spectral_init_device(on_device, n_components)
        if coords is None:
            coords = _spectral_host(adata, graph.tocoo(), n_components, rs,
                                    neighbors.get("params", {}))
        start = _noisy_scale(coords, rs)
    span = start.max(axis=0) - start.min(axis=0)
    start = (10.0 * (start - start.min(axis=0)) / np.where(span > 0, span, 1.0)).astype(
        np.float32, order="C")
    seed = _umap.seed_from(rs)
    if on_device is not None:  # heads, tails and epochs per sample are made on the device
        embedding = _umap.optimize_layout_device_csr(start, on_device, n_epochs, a, b, gamma,
                                                     alpha, negative_sample_rate, seed)
    else:
        edges = graph.tocoo()
        eps = _umap.epochs_per_sample(edges.data, n_epochs)
        embedding = _umap.optimize_layout_host(start, edges.row, edges.col, eps, n_epochs, a, b,
                                               gamma, alpha, negative_sample_rate, seed)

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    key_obsm, key_uns = ("X_umap", "umap") if key_added is None else (key_added, key_added)
    adata.uns[key_uns] = {"params": params}
    adata.obsm[key_obsm] = embedding
    return adata if copy else None


def layout_graph(connectivities, maxiter: int | None) -> tuple[sparse.csr_matrix, int]:
    """The graph the layout samples and its number of epochs, as umap-learn prepares them.

    Duplicates summed, weights float32, then the edges too weak to be sampled once in
    ``n_epochs`` (below max / n_epochs) and the zeros dropped: a canonical float32 CSR whose
    entries keep their row-major order (the twin's COO order; the device's edge numbers).
    A canonical float32 CSR with nothing to drop is used as it is, without a copy.
    """
    graph = connectivities
    if not (sparse.issparse(graph) and graph.format == "csr"):
        graph = sparse.csr_matrix(graph)
    if not graph.has_canonical_format:
        graph = graph.copy()
        graph.sum_duplicates()
    if graph.dtype != np.float32:
        graph = graph.astype(np.float32)
    n = graph.shape[0]
    default_epochs = 500 if n <= 10000 else 200
    n_epochs = default_epochs if maxiter is None else int(maxiter)
    if graph.nnz == 0:
        return graph, n_epochs
    # float32 / float: a float32 cut, compared in float32 (as umap-learn on its float32 graph)
    cut = graph.data.max() / float(n_epochs if n_epochs > 10 else default_epochs)
    return _umap.drop_weak_edges(graph, cut), n_epochs


def find_ab_params(spread: float, min_dist: float) -> tuple[float, float]:
    """umap-learn's fit of 1 / (1 + a·x^(2b)) to the offset exponential (scipy curve_fit)."""
    from scipy.optimize import curve_fit

    def curve(x, a, b):
        return 1.0 / (1.0 + a * x ** (2 * b))

    xv = np.linspace(0, spread * 3, 300)
    yv = np.where(xv < min_dist, 1.0, np.exp(-(xv - min_dist) / spread))
    (a, b), _ = curve_fit(curve, xv, yv)
    return float(a), float(b)


def _neighbors(adata: AnnData, neighbors_key: str | None, func: str) -> dict:
    key = "neighbors" if neighbors_key is None else neighbors_key
    if key not in adata.uns:
        if key == "neighbors":
            raise ValueError(f"{func}: no neighbourhood graph (adata.uns['neighbors'] is missing); "
                             "run pp.neighbors first")
        graphs = [k for k, v in adata.uns.items()
                  if isinstance(v, dict) and "connectivities_key" in v]
        raise KeyError(f"{func}: neighbors_key={key!r} not found in adata.uns; run "
                       f"pp.neighbors(..., key_added={key!r}) first or pick one of {graphs}")
    value = adata.uns[key]
    if not isinstance(value, dict):
        raise ValueError(f"{func}: adata.uns[{key!r}] is not a neighbors entry; run pp.neighbors")
    return value


def _init_array(x, n_obs, n_components, func, arg):
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    if placement(x) == "device":
        x = x.get()  # synchronize!
    if sparse.issparse(x):
        raise TypeError(f"{func}: {arg} must be a dense array, got a sparse matrix")
    x = np.asarray(x, dtype=np.float32)
    if x.shape != (n_obs, n_components):
        raise ValueError(f"{func}: {arg} has shape {x.shape}; expected (n_obs, n_components) = "
                         f"{(n_obs, n_components)}")
    if not np.isfinite(x).all():
        raise ValueError(f"{func}: {arg} contains NaN or inf")
    return x


def _dedupe(x, rs):
    """umap-learn: jitter a start with duplicate rows by 0.1% of the mean NN distance."""
    if np.unique(x, axis=0).shape[0] < x.shape[0]:
        from sklearn.neighbors import KDTree

        dist, _ = KDTree(x).query(x, k=2)
        return x + rs.normal(scale=0.001 * np.mean(dist[:, 1]), size=x.shape).astype(np.float32)
    return x


def _noisy_scale(coords, rs, max_coord=10.0, noise=0.0001):
    """umap-learn's noisy_scale_coords: largest |coordinate| = 10, plus N(0, 1e-4) noise."""
    coords = (coords * (max_coord / np.abs(coords).max())).astype(np.float32)
    return coords + rs.normal(scale=noise, size=coords.shape).astype(np.float32)


def _spectral_host(adata, graph, n_components, rs, neigh_params):
    """umap-learn's spectral_layout (per-component layouts for a disconnected graph).

    A connected graph takes umap-learn's own eigsh call here, without importing umap-learn:
    its import compiles pynndescent's numba functions (12 s warm, 28 s with an empty numba
    cache on 2 cores), longer than the layout itself."""
    if _umap.weak_components_host(graph) == 1:  # scipy's connected_components(graph)[0]
        return _spectral_connected(graph, n_components, rs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Tensorflow not installed")
        from umap.spectral import spectral_layout

    data = _representation(adata, neigh_params)
    return spectral_layout(data, graph, n_components, rs,
                           metric=neigh_params.get("metric", "euclidean"),
                           metric_kwds=neigh_params.get("metric_kwds", {}))


def _spectral_connected(graph, n_components, rs):
    """umap-learn 0.5's _spectral_layout for one connected component, step for step: the
    normalised Laplacian's eigenvectors 1..n_components from ARPACK with its arguments, and
    the same draw from ``rs`` (its unused lobpcg start), so that the noise and the seed drawn
    after it are umap-learn's."""
    from scipy.sparse.linalg import ArpackError, eigsh
    from threadpoolctl import threadpool_limits

    n = graph.shape[0]
    sqrt_deg = np.sqrt(np.asarray(graph.sum(axis=0)).squeeze())
    inv_sqrt_deg = sparse.spdiags(1.0 / sqrt_deg, 0, n, n)
    laplacian = sparse.identity(n, dtype=np.float64) - inv_sqrt_deg @ graph @ inv_sqrt_deg
    k = n_components + 1
    rs.normal(size=(n, k))
    try:
        # one BLAS thread: ARPACK's products are too small to share out; with more, the
        # threads' hand-offs cost 5x the CPU time (0.45 s against 2.3 s at 20k cells)
        with threadpool_limits(1, user_api="blas"):
            values, vectors = eigsh(laplacian, k, which="SM", ncv=max(2 * k + 1, int(np.sqrt(n))),
                                    tol=1e-4, v0=np.ones(n), maxiter=n * 5)
    except ArpackError:
        warnings.warn("Spectral initialisation failed! The eigenvector solver\nfailed. This is likely "
                      "due to too small an eigengap. Consider\nadding some noise or jitter to your data.\n\n"
                      "Falling back to random initialisation!", UserWarning, stacklevel=4)
        return rs.uniform(low=-10.0, high=10.0, size=(n, n_components))
    return vectors[:, np.argsort(values)[1:k]]


def _representation(adata, neigh_params):
    """The matrix the graph was built from (only used to place disconnected components)."""
    use_rep, n_pcs = neigh_params.get("use_rep"), neigh_params.get("n_pcs")
    if use_rep is None:
        use_rep = "X_pca" if "X_pca" in adata.obsm and adata.n_vars > 50 else "X"
    x = adata.X if use_rep == "X" or use_rep not in adata.obsm else adata.obsm[use_rep]
    if hasattr(x, "to_numpy"):
        x = x.to_numpy()
    if placement(x) == "device":
        x = x.get()  # synchronize!
    if n_pcs is not None and use_rep != "X":
        x = x[:, :n_pcs]
    return x
