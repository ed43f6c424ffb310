"""neighbors, as scanpy's neighbors/__init__.py: an exact kNN graph and its connectivities."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal

import numba
import numpy as np
from anndata import AnnData
from scipy import sparse

from .._core.adata import actualize_view
from .._core.arrays import DeviceArray, is_sparse, placement
from .._core.dask import is_dask
from .._kernels import connectivity as _conn
from .._kernels import topk as _topk
from .._settings import resolve_device

METHODS = ("umap", "gauss", "jaccard")
ALGORITHMS = ("brute", "ivfflat", "ivfpq", "cagra", "nn_descent")
N_PCS = 50  # scanpy's settings.N_PCS: up to this many genes X is used as it is


def neighbors(
    adata: AnnData,
    n_neighbors: int = 15,
    n_pcs: int | None = None,
    *,
    distances: Any = None,
    use_rep: str | None = None,
    knn: bool = True,
    method: Literal["umap", "gauss", "jaccard"] = "umap",
    transformer: Any = None,
    metric: str | None = None,
    metric_kwds: Mapping[str, Any] = MappingProxyType({}),
    random_state: Any = 0,
    key_added: str | None = None,
    copy: bool = False,
    algorithm: Literal["brute", "ivfflat", "ivfpq", "cagra", "nn_descent"] = "brute",
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """Nearest-neighbour distances and connectivities, as :func:`scanpy.pp.neighbors`.

    The kNN search is exact brute force by default (``algorithm="brute"``): on the GPU
    one kernel that multiplies on the tensor cores (TF32) and keeps each cell's best
    k + 16 candidates on the chip (``kernels/topk.cu``; up to 64 dimensions, otherwise
    tiles of cuBLAS products and a top-k selection kernel), on the host BLAS tiles and
    numba heaps. Both re-rank their candidates in float64 and certify each cell against
    a bound on the products' rounding (cells that fail are searched again in float64), so
    the neighbour sets equal scikit-learn's brute force up to exact ties. Each point is
    its own first neighbour. Memory is O(n_obs · n_neighbors) plus one distance tile,
    never n_obs × n_obs; on the device the peak is the representation twice and
    n_obs · (k + 16) · 16 bytes of candidates (plus one 8192 × 8192 product tile, 512 MiB,
    on the tile path).

    The representation is read from the host (obsm or X) and the work runs where
    ``device`` (default ``gpusc.settings.device``) says; results go to obsp/uns on the host.
    A dask representation (say X_pca kept lazy on a dask-backed AnnData) is gathered (it is
    n_obs × a few dozen) and searched as one dask task per block of its row chunks, each
    block of queries against all rows: on a dask.distributed cluster the blocks run on its
    workers (one GPU each on a dask-cuda LocalCUDACluster), with the same lists as one
    search. X itself is never read here unless it is the representation.

    Parameters
    ----------
    adata
        Annotated data matrix.
    n_neighbors
        Neighbours per point, the point itself included (2 ≤ n_neighbors < n_obs).
    n_pcs
        Use this many leading columns of the representation.
    distances
        A precomputed (n_obs, n_obs) distance matrix, dense or sparse, instead of a search
        (scanpy's rules): its diagonal is set to 0 (sparse: zeros are dropped), the kNN of a
        dense matrix are each row's n_neighbors smallest, those of a sparse one the row's
        first n_neighbors − 1 stored entries when every row holds as many (the order a kNN
        transformer leaves), else its n_neighbors − 1 smallest (with scanpy's
        RuntimeWarning); each point is its own first neighbour. ``use_rep``, ``knn``,
        ``n_pcs``, ``metric_kwds``, ``random_state`` and ``algorithm`` are then ignored (a
        UserWarning names those given, and ``random_state`` is stored as 0); ``metric`` is
        only stored. Integer distances become float64. Runs on the host, except the umap
        memberships on a GPU.
    use_rep
        ``.obsm`` key, or ``"X"``. ``None``: X_pca (X when n_vars ≤ 50), as scanpy.
    knn
        Only ``True`` (the dense ``knn=False`` Gaussian kernel is scanpy's).
    method
        Connectivities: ``"umap"`` (umap-learn's fuzzy_simplicial_set), ``"gauss"``
        (scanpy's adaptive Gaussian kernel) or ``"jaccard"`` (PhenoGraph; on the host).
    transformer
        ``None`` or ``"sklearn"`` (both exact here); other kNN backends: ``algorithm``.
    metric
        ``"euclidean"`` (default), ``"sqeuclidean"``, ``"cosine"`` or ``"manhattan"``.
    metric_kwds
        Must be empty: none of the metrics takes options.
    random_state
        Stored in ``uns`` as scanpy does; exact search does not use it.
    key_added
        Store under ``uns[key_added]``, ``obsp[key_added + "_distances"]`` and
        ``obsp[key_added + "_connectivities"]`` instead of the default keys.
    copy
        Return a copy instead of writing to ``adata``.
    algorithm
        ``"brute"`` (exact, ours) or a cuVS index on the GPU: ``"ivfflat"``, ``"ivfpq"``,
        ``"cagra"``, ``"nn_descent"`` (needs the ``rapids-cu13``/``rapids-cu12`` extra).
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsp['distances']`` : scipy CSR, float64
        n_neighbors − 1 distances per row (the point itself left out), in neighbour order.
        With ``distances=``: that matrix as described there, dense (numpy) or CSR, in its
        own float dtype.
    ``obsp['connectivities']`` : scipy CSR, float32 (umap) or float64 (gauss, jaccard)
        Symmetric weighted adjacency of the neighbourhood graph. With ``distances=``:
        gauss follows scanpy (σ² = a quarter of the k-th squared distance and a dense
        result for a dense matrix; weights on every stored entry for a sparse one) in the
        matrix's dtype.
    ``uns['neighbors']`` : dict
        ``connectivities_key``, ``distances_key`` and ``params`` (n_neighbors, method,
        random_state, metric, and metric_kwds, use_rep, n_pcs when given).
    """
    func = "neighbors"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if method not in METHODS:
        raise ValueError(f"{func}: method={method!r} is not one of {METHODS}")
    if distances is not None:
        given = {"use_rep": use_rep, "knn": knn, "n_pcs": n_pcs, "metric_kwds": metric_kwds,
                 "random_state": random_state, "algorithm": algorithm}
        return _neighbors_from_distances(adata, distances, n_neighbors, method, metric, given,
                                         key_added, copy, device, func)
    if not knn:
        raise NotImplementedError(
            f"{func}: knn=False (a dense n_obs × n_obs Gaussian kernel) is not supported; "
            "use knn=True or scanpy.pp.neighbors")
    if transformer not in (None, "sklearn"):
        raise ValueError(f"{func}: transformer={transformer!r} is not supported; the search is "
                         f"chosen with algorithm= (one of {ALGORITHMS})")
    if metric is None:
        metric = "euclidean"
    if not isinstance(metric, str) or metric not in _topk.METRICS:
        raise ValueError(f"{func}: metric={metric!r} is not supported; use one of {tuple(_topk.METRICS)}")
    if metric_kwds:
        raise ValueError(f"{func}: metric_kwds={dict(metric_kwds)!r}: the metric {metric!r} takes no options")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{func}: algorithm={algorithm!r} is not one of {ALGORITHMS}")
    n_obs = adata.n_obs
    _check_n_neighbors(n_neighbors, n_obs, func)
    where = resolve_device(device)
    if algorithm != "brute" and where != "gpu":
        raise ValueError(f"{func}: algorithm={algorithm!r} runs on the GPU through cuVS; "
                         "use algorithm='brute' on the CPU")
    x, query_chunks = _representation(adata, use_rep, n_pcs, func, with_chunks=True)
    if x is None and not _has_pca():
        raise ValueError(
            f"{func}: adata has {adata.n_vars} genes and no obsm['X_pca']; run pp.pca first "
            "(or pass use_rep='X' to search X as it is)")

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    if x is None:  # no X_pca and many genes: compute the PCA first, as scanpy does
        x = _pca_first(adata, n_pcs, func)

    k = int(n_neighbors)
    if algorithm != "brute":
        knn_idx, knn_dist = _cuvs_knn(x, k, metric, algorithm)
    elif query_chunks is not None and len(query_chunks) > 1:
        knn_idx, knn_dist = _knn_by_query_blocks(x, query_chunks, k, metric, where)
    elif where == "gpu":
        knn_idx, knn_dist, _ = _topk.knn_device(x, k, metric)
    else:
        knn_idx, knn_dist, _ = _topk.knn_host(x, k, metric)

    if method == "gauss":
        conn = _gauss(knn_idx, knn_dist, n_obs, where)
    else:
        conn = _knn_connectivities(knn_idx, knn_dist, method, n_obs, where)
    _store(adata, key_added, _distance_matrix(knn_idx, knn_dist), conn, n_neighbors=k, method=method,
           random_state=random_state, metric=metric, metric_kwds=metric_kwds, use_rep=use_rep, n_pcs=n_pcs)
    return adata if copy else None


def _check_n_neighbors(n_neighbors, n_obs, func):
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, int | np.integer):
        raise TypeError(f"{func}: n_neighbors must be an integer, got {n_neighbors!r}")
    if not 2 <= n_neighbors < n_obs:
        raise ValueError(
            f"{func}: n_neighbors={n_neighbors} is out of range; it counts the point itself, so "
            f"choose 2 <= n_neighbors < n_obs = {n_obs}")


def _knn_connectivities(knn_idx, knn_dist, method, n_obs, where):
    """umap or jaccard connectivities of kNN lists (the point itself first)."""
    if method == "jaccard":
        return _jaccard(knn_idx, n_obs)
    if where == "gpu":
        return _conn.umap_connectivities_device(knn_idx, knn_dist, n_obs)
    vals, _, _ = _conn.umap_memberships_host(knn_idx, knn_dist)
    return _conn.fuzzy_union_host(knn_idx, vals, n_obs)


def _store(adata, key_added, dist_matrix, conn, *, n_neighbors, method, random_state, metric,
           metric_kwds, use_rep, n_pcs):
    """scanpy's keys: uns[key_added] with its params (metric_kwds, use_rep, n_pcs when
    given), obsp distances and connectivities."""
    params: dict[str, Any] = {"n_neighbors": n_neighbors, "method": method,
                              "random_state": random_state, "metric": metric}
    if metric_kwds:
        params["metric_kwds"] = metric_kwds
    if use_rep is not None:
        params["use_rep"] = use_rep
    if n_pcs is not None:
        params["n_pcs"] = n_pcs
    if key_added is None:
        key_added, dkey, ckey = "neighbors", "distances", "connectivities"
    else:
        dkey, ckey = f"{key_added}_distances", f"{key_added}_connectivities"
    adata.uns[key_added] = {"connectivities_key": ckey, "distances_key": dkey, "params": params}
    adata.obsp[dkey] = dist_matrix
    adata.obsp[ckey] = conn


# ---------------------------------------------------------------- precomputed distances

_DEFAULTS_IGNORED_WITH_DISTANCES = {"use_rep": None, "knn": True, "n_pcs": None, "metric_kwds": {},
                                    "random_state": 0, "algorithm": "brute"}


def _neighbors_from_distances(adata, distances, n_neighbors, method, metric, given, key_added,
                              copy, device, func):
    """scanpy's ``distances=`` branch: the graph of a precomputed distance matrix."""
    if metric is not None and not isinstance(metric, str):
        raise TypeError(f"{func}: metric={metric!r}: `metric` must be a string if `distances` is given.")
    _check_n_neighbors(n_neighbors, adata.n_obs, func)
    where = resolve_device(device)
    k = int(n_neighbors)
    d = _precomputed_distances(distances, adata.n_obs, k, func)
    random_state = given["random_state"]
    if ignored := {name for name, default in _DEFAULTS_IGNORED_WITH_DISTANCES.items()
                   if given[name] != default}:
        warnings.warn(f"{func}: Parameter(s) ignored if `distances` is given: {ignored}",
                      UserWarning, stacklevel=3)
        random_state = 0
    if sparse.issparse(d) and not _same_count_per_row(d):
        warnings.warn(f"{func}: Sparse matrix has no constant number of neighbors per row. "
                      "Cannot efficiently get indices and distances.", RuntimeWarning, stacklevel=3)

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    if method == "gauss":
        conn = _gauss_of_distances(d, k)
    else:
        conn = _knn_connectivities(*_knn_of_distances(d, k), method, adata.n_obs, where)
    _store(adata, key_added, d, conn, n_neighbors=k, method=method, random_state=random_state,
           metric=metric, metric_kwds=given["metric_kwds"], use_rep=given["use_rep"], n_pcs=given["n_pcs"])
    return adata if copy else None


def _precomputed_distances(distances, n_obs, k, func):
    """A validated host copy as scanpy stores it: CSR without its diagonal and zeros, or a
    dense array with a zero diagonal (the caller's matrix is left as it was). Each row of a
    sparse one must keep k − 1 distances to other cells."""
    if isinstance(distances, DeviceArray):
        distances = distances.get()  # synchronize!
    if sparse.issparse(distances):
        d = distances.tocsr(copy=True)
        values = d.data
    else:
        d = np.array(distances)
        values = d
    if d.ndim != 2 or d.shape != (n_obs, n_obs):
        raise ValueError(f"{func}: distances has shape {d.shape}; it must be (n_obs, n_obs) = "
                         f"({n_obs}, {n_obs}), one row and column per cell")
    if values.dtype.kind not in "fiu":
        raise TypeError(f"{func}: distances has dtype {values.dtype}; expected numbers")
    if not np.isfinite(values).all():
        raise ValueError(f"{func}: distances contains NaN or inf; a distance must be finite")
    if (values < 0).any():
        raise ValueError(f"{func}: distances has negative entries; distances are >= 0")
    if values.dtype.kind != "f":
        d = d.astype(np.float64)
    if not sparse.issparse(d):
        np.fill_diagonal(d, 0)
        return d
    d.setdiag(0)
    d.eliminate_zeros()
    counts = np.diff(d.indptr)
    if counts.min() < k - 1:
        raise ValueError(
            f"{func}: {(counts < k - 1).sum()} rows of distances hold fewer than n_neighbors − 1 = "
            f"{k - 1} distances to other cells (the fewest: {counts.min()}); pass a smaller "
            "n_neighbors or a matrix with more neighbours per row")
    return d


def _same_count_per_row(d) -> bool:
    counts = np.diff(d.indptr)
    return bool((counts == counts[0]).all())


def _knn_of_distances(d, k):
    """Each row's k neighbours, itself first (int64 indices, distances in d's dtype), by
    scanpy's rules (see neighbors' ``distances``)."""
    n = d.shape[0]
    if sparse.issparse(d):
        counts = np.diff(d.indptr)
        if _same_count_per_row(d):  # the rows' stored order, as scanpy's shortcut reads them
            idx = d.indices.reshape(n, counts[0])[:, :k - 1]
            dist = d.data.reshape(n, counts[0])[:, :k - 1]
        else:
            rows = np.repeat(np.arange(n), counts)
            by_distance = np.lexsort((d.data, rows))  # row by row, ties in stored order
            first = by_distance[(d.indptr[:-1, None] + np.arange(k - 1)).ravel()]
            idx = d.indices[first].reshape(n, k - 1)
            dist = d.data[first].reshape(n, k - 1)
        own = np.arange(n)[:, None]
        return (np.hstack([own, idx]).astype(np.int64),
                np.hstack([np.zeros((n, 1), d.dtype), dist]))
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    part_dist = np.take_along_axis(d, part, axis=1)
    # (distance, the point itself first, index): scanpy's order, with its ties settled
    order = np.lexsort((part, part != np.arange(n)[:, None], part_dist), axis=1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(part_dist, order, axis=1)


# ---------------------------------------------------------------- representation

def _representation(adata: AnnData, use_rep, n_pcs, func, *, with_chunks: bool = False):
    """The host float array to search (scanpy's _choose_representation); None: PCA needed.
    ``with_chunks``: also its row chunks when it is a dask array (None otherwise)."""
    if n_pcs is not None and (isinstance(n_pcs, bool) or not isinstance(n_pcs, int | np.integer)
                              or n_pcs < 0):
        raise ValueError(f"{func}: n_pcs={n_pcs!r} must be a non-negative integer or None")
    if use_rep is None and n_pcs == 0:  # scanpy: n_pcs=0 means X
        use_rep = "X"
    if use_rep is None:
        if adata.n_vars <= N_PCS:
            x = adata.X
        else:
            key = next((k for k in ("pca", "X_pca") if k in adata.obsm), None)
            if key is None:
                return (None, None) if with_chunks else None
            x = adata.obsm[key]
            if n_pcs is not None and n_pcs > x.shape[1]:
                raise ValueError(f"{func}: n_pcs={n_pcs} but obsm[{key!r}] has only {x.shape[1]} "
                                 "components; rerun pp.pca with a larger n_comps")
            x = x[:, :n_pcs]
    elif use_rep == "X":
        x = adata.X
    elif use_rep in adata.obsm:
        x = adata.obsm[use_rep]
        if n_pcs is not None:
            if n_pcs > x.shape[1]:
                raise ValueError(f"{func}: n_pcs={n_pcs} but obsm[{use_rep!r}] has only "
                                 f"{x.shape[1]} columns; lower n_pcs")
            x = x[:, :n_pcs]
    else:
        raise KeyError(f"{func}: use_rep={use_rep!r} not found; adata.obsm has {list(adata.obsm)} "
                       "(or use use_rep='X')")
    chunks = x.chunks[0] if is_dask(x) else None
    x = _host_float(x, func, "use_rep" if use_rep not in (None, "X") else "the representation")
    return (x, chunks) if with_chunks else x


def _host_float(x, func, arg):
    if x is None:
        raise ValueError(f"{func}: adata.X is None; pass use_rep= to choose an obsm entry")
    if hasattr(x, "to_numpy"):  # a DataFrame in obsm
        x = x.to_numpy()
    if is_dask(x):  # n_obs × a few dozen: small enough to hold (X itself is read lazily)
        x = x.compute()
    if placement(x) == "device":
        x = x.get()  # synchronize!
    if is_sparse(x):
        x = x.toarray()
    x = np.asarray(x)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{func}: {arg} must be a non-empty 2-D array, got shape {x.shape}")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{func}: {arg} has dtype {x.dtype}; expected numbers")
    if x.dtype.kind != "f":
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{func}: {arg} contains NaN or inf; remove or impute them first")
    return np.ascontiguousarray(x)


def _knn_by_query_blocks(x, query_chunks, k, metric, where):
    """Exact kNN as one dask task per block of query rows, each against all rows.

    With a dask.distributed client (a LocalCUDACluster: one GPU per worker) the blocks run
    on the workers; without one, on dask's local scheduler. Every row gets the list it gets
    in one search of all rows: its candidates, re-ranking and certification depend only on
    that row and all references. Blocks follow the representation's row chunks, with their
    starts rounded to the GPU's query blocks.
    """
    import dask

    search = _topk.knn_device if where == "gpu" else _topk.knn_host
    n = x.shape[0]
    bounds = np.cumsum((0, *query_chunks))[:-1] // _topk.FUSED_QUERIES * _topk.FUSED_QUERIES
    bounds = np.unique(np.append(bounds, n))
    references = dask.delayed(x, pure=True)  # one copy per worker, not one per task
    blocks = [dask.delayed(search, pure=True)(references, k, metric, query_rows=(int(a), int(b)))
              for a, b in zip(bounds[:-1], bounds[1:])]
    results = dask.compute(*blocks)
    return (np.concatenate([idx for idx, _, _ in results]),
            np.concatenate([dist for _, dist, _ in results]))


def _has_pca() -> bool:
    from .. import pp

    return hasattr(pp, "pca")


def _pca_first(adata, n_pcs, func):
    from .. import pp

    warnings.warn(f"{func}: no obsm['X_pca'] and {adata.n_vars} genes: computing pp.pca first",
                  UserWarning, stacklevel=3)
    pp.pca(adata, n_comps=n_pcs if n_pcs is not None else N_PCS)
    return _host_float(adata.obsm["X_pca"], func, "obsm['X_pca']")


# ---------------------------------------------------------------- graph pieces

def _distance_matrix(knn_idx, knn_dist) -> sparse.csr_matrix:
    """scanpy's CSR: each row's n_neighbors − 1 distances (the point itself left out)."""
    n, k = knn_idx.shape
    indptr = np.arange(0, n * (k - 1) + 1, k - 1)
    return sparse.csr_matrix(
        (knn_dist[:, 1:].ravel().copy(), knn_idx[:, 1:].ravel().copy(), indptr), shape=(n, n))


def _gauss(knn_idx, knn_dist, n_obs, where):
    """scanpy's gauss(knn=True): w_ij = sqrt(2σiσj/(σi²+σj²)) exp(−d²/(σi²+σj²)), σi² the
    median squared distance of i's neighbours; an edge missing in j's row copies w_ij."""
    if where == "gpu":
        import cupy as xp
        from cupyx.scipy import sparse as sp
    else:
        xp, sp = np, sparse
    n, k = knn_idx.shape
    idx = xp.asarray(knn_idx[:, 1:])
    d_sq = xp.asarray(knn_dist[:, 1:]) ** 2
    sigmas_sq = xp.median(d_sq, axis=1)
    sigmas = xp.sqrt(sigmas_sq)
    num = 2 * sigmas[:, None] * sigmas[idx]
    den = sigmas_sq[:, None] + sigmas_sq[idx]
    w_vals = xp.sqrt(num / den) * xp.exp(-d_sq / den)
    index_dtype = np.int32 if where == "gpu" else idx.dtype  # cuSPARSE indices are int32
    rows = xp.repeat(xp.arange(n, dtype=index_dtype), k - 1)
    w = sp.coo_matrix((w_vals.ravel(), (rows, idx.ravel().astype(index_dtype))),
                      shape=(n_obs, n_obs)).tocsr()
    pattern = w.copy()
    pattern.data = xp.ones_like(pattern.data)
    wt = w.T.tocsr()
    missing = (wt - wt.multiply(pattern)).tocsr()  # wᵀ where w has no edge
    missing.eliminate_zeros()
    out = (w + missing).tocsr()
    out.sort_indices()
    return out.get() if where == "gpu" else out  # synchronize!


def _gauss_of_distances(d, k):
    """scanpy's gauss(knn=True) of a precomputed matrix, in its dtype: w_ij =
    sqrt(2σiσj/(σi²+σj²)) exp(−d_ij²/(σi²+σj²)) on every stored entry of a sparse matrix
    (σi² the median squared distance of i's kNN) or on kNN pairs of a dense one (σi² a
    quarter of the largest); a kNN pair missing in j's list copies w_ij to (j, i). As in
    scanpy, the kNN are those of the squared matrix, whose rows SciPy's ``power`` sorts by
    column: for a sparse matrix with unsorted rows they are not the ones umap and jaccard use."""
    n = d.shape[0]
    d_sq = d.power(2) if sparse.issparse(d) else d**2
    knn_idx, knn_dist_sq = _knn_of_distances(d_sq, k)
    dist_sq = knn_dist_sq[:, 1:]
    sigmas_sq = np.median(dist_sq, axis=1) if sparse.issparse(d) else dist_sq[:, -1] / 4
    sigmas = np.sqrt(sigmas_sq)
    neighbours = knn_idx[:, 1:]
    rows = np.repeat(np.arange(n), neighbours.shape[1])
    is_knn = sparse.csr_matrix((np.ones(rows.size, bool), (rows, neighbours.ravel())), shape=(n, n))
    if not sparse.issparse(d):
        den = np.add.outer(sigmas_sq, sigmas_sq)
        w = np.sqrt(2 * np.multiply.outer(sigmas, sigmas) / den) * np.exp(-d_sq / den)
        mask = is_knn.toarray()
        return np.where(mask, w, np.where(mask.T, w.T, 0))
    stored_rows = np.repeat(np.arange(n), np.diff(d_sq.indptr))
    den = sigmas_sq[stored_rows] + sigmas_sq[d_sq.indices]
    w = d_sq.copy()
    w.data = np.sqrt(2 * sigmas[stored_rows] * sigmas[d_sq.indices] / den) * np.exp(-d_sq.data / den)
    # w at the kNN pairs, moved to (j, i) where i is not among j's kNN (replacing what w holds there)
    knn_w = sparse.csr_matrix(w.multiply(is_knn))
    back = (knn_w.T - knn_w.T.multiply(is_knn)).tocsr()
    back_pattern = back.astype(bool).astype(w.dtype)
    out = sparse.csr_matrix(w - w.multiply(back_pattern) + back)
    out.sort_indices()
    return out


def _jaccard(knn_idx, n_obs) -> sparse.csr_matrix:
    """scanpy's jaccard: |N(i) ∩ N(j)| / (2(k−1) − |N(i) ∩ N(j)|) over kNN edges, averaged with its transpose."""
    n, k = knn_idx.shape
    neigh = np.sort(knn_idx[:, 1:], axis=1)
    shared = _shared_counts(neigh, np.ascontiguousarray(knn_idx[:, 1:]))
    jac = shared / (2 * (k - 1) - shared)
    rows = np.repeat(np.arange(n), k - 1)
    cols = knn_idx[:, 1:].ravel()
    keep = jac.ravel() != 0
    c = sparse.csr_matrix((jac.ravel()[keep], (rows[keep], cols[keep])), shape=(n_obs, n_obs))
    out = ((c + c.T) / 2).tocsr()
    out.sort_indices()
    return out


@numba.njit(parallel=True, cache=True)
def _shared_counts(sorted_neigh, neigh):
    n, m = neigh.shape
    out = np.zeros((n, m), np.float64)
    for i in numba.prange(n):
        a = sorted_neigh[i]
        for c in range(m):
            b = sorted_neigh[neigh[i, c]]
            p = q = count = 0
            while p < m and q < m:  # merge of two sorted lists
                if a[p] == b[q]:
                    count += 1
                    p += 1
                    q += 1
                elif a[p] < b[q]:
                    p += 1
                else:
                    q += 1
            out[i, c] = count
    return out


def _cuvs_knn(x, k, metric, algorithm):
    """Approximate kNN with a cuVS index (imported here: an optional dependency)."""
    try:
        import cupy as cp
        from cuvs.neighbors import cagra, ivf_flat, ivf_pq, nn_descent
    except ImportError as exc:
        raise ImportError(
            f"neighbors: algorithm={algorithm!r} needs cuVS; install gpusc[rapids-cu13] "
            "(or rapids-cu12), or use algorithm='brute'") from exc
    cuvs_metric = {"euclidean": "sqeuclidean", "sqeuclidean": "sqeuclidean",
                   "cosine": "inner_product", "manhattan": "l1"}[metric]
    data = x.astype(np.float32)
    if metric == "cosine":  # cosine as inner products of unit rows
        lengths = np.linalg.norm(data, axis=1, keepdims=True)
        data = data / np.where(lengths > 0, lengths, 1)
    xd = cp.asarray(data)
    n = xd.shape[0]
    if algorithm == "nn_descent":
        index = nn_descent.build(nn_descent.IndexParams(graph_degree=k, metric=cuvs_metric,
                                                        return_distances=True), xd)
        idx, dist = cp.asarray(index.graph), cp.asarray(index.distances)
    else:
        module = {"ivfflat": ivf_flat, "ivfpq": ivf_pq, "cagra": cagra}[algorithm]
        build = {"metric": cuvs_metric}
        if algorithm != "cagra":
            build["n_lists"] = max(1, int(np.sqrt(n)))
        index = module.build(module.IndexParams(**build), xd)
        search = {} if algorithm == "cagra" else {"n_probes": min(50, build["n_lists"])}
        dist, idx = module.search(module.SearchParams(**search), index, xd, k)
        idx, dist = cp.asarray(idx), cp.asarray(dist)
    idx = idx.astype(np.int64).get()  # synchronize!
    dist = dist.astype(np.float64).get()
    if metric == "euclidean":
        dist = np.sqrt(np.maximum(dist, 0))
    elif metric == "cosine":
        dist = np.clip(1 - dist, 0, 2)
    # the point itself first at distance 0, as scanpy expects
    own = np.arange(n)[:, None]
    others = idx != own
    order = np.argsort(~others, axis=1, kind="stable")  # non-self entries keep their order
    idx = np.take_along_axis(idx, order, axis=1)[:, : k - 1]
    dist = np.take_along_axis(dist, order, axis=1)[:, : k - 1]
    return np.hstack([own, idx]), np.hstack([np.zeros((n, 1)), dist])
