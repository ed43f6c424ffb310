"""bbknn, as scanpy's external ``pp.bbknn`` (the bbknn package, :cite:t:`Polanski2019`),
with exact neighbours.

For every batch, each cell's ``neighbors_within_batch`` nearest cells of that batch (its own
batch included, where the cell itself comes first); the lists of all batches are merged and
sorted by distance, turned into UMAP connectivities (umap-learn's fuzzy_simplicial_set, as
bbknn does) and trimmed to each cell's top connectivities. bbknn's exact mode (``approx=False``:
scipy's cKDTree, or scikit-learn's KDTree for other metrics) gives the same graph; its
default approximate mode (annoy) approximates it.

The search queries all cells against one batch at a time, by brute force: products of float32
rows in tiles (BLAS on the host, cuBLAS on the device) keep each cell's best
``neighbors_within_batch + margin`` candidates (numba heaps on the host, ``kernels/topk.cu``'s
``topk_tile`` on the device), which are re-ranked with exact float64 distances and certified
against the products' rounding bound (``_kernels.topk.certify``); cells that fail are searched
again with float64 products. So the neighbour sets are exact, ties aside.
"""

from __future__ import annotations

import os
from typing import Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._core import cuda, logg
from .._core.arrays import to_host
from .._core.compat import old_positionals
from .._kernels import connectivity as _conn
from .._kernels import topk as _topk
from .._settings import resolve_device

# metric names of bbknn's exact mode that the search supports, and the metric each means
METRICS = {"euclidean": "euclidean", "l2": "euclidean",
           "manhattan": "manhattan", "cityblock": "manhattan", "l1": "manhattan"}
# the rest of scikit-learn's KDTree.valid_metrics: bbknn's exact mode takes them, gpusc does not
KDTREE_ONLY = ("minkowski", "p", "chebyshev", "infinity")
HOST_MARGIN, DEVICE_MARGIN = _topk.HOST_MARGIN, _topk.DEVICE_MARGIN
RERANK_ROWS = 4096  # query rows re-ranked at a time (their candidates' coordinates gathered)


@old_positionals("batch_key", "use_rep", "approx", "use_annoy", "metric", "copy")
def bbknn(
    adata: AnnData,
    *,
    batch_key: str = "batch",
    use_rep: str = "X_pca",
    approx: bool = True,
    use_annoy: bool = True,
    metric: str = "euclidean",
    copy: bool = False,
    neighbors_within_batch: int = 3,
    n_pcs: int = 50,
    trim: int | None = None,
    annoy_n_trees: int = 10,
    pynndescent_n_neighbors: int = 30,
    pynndescent_random_state: int = 0,
    use_faiss: bool = True,
    set_op_mix_ratio: float = 1.0,
    local_connectivity: int = 1,
    key_added: str | None = None,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """Batch balanced kNN graph, as :func:`scanpy.external.pp.bbknn` (bbknn 1.6).

    The search is exact whatever ``approx``, ``use_annoy`` and ``use_faiss`` say (see the
    module docstring): the graph of bbknn's exact mode. The representation is read from the
    host (``obsm``) and the search runs where ``device`` (default ``gpusc.settings.device``)
    says; the UMAP memberships too (on the host with ``set_op_mix_ratio != 1``); results go
    to obsp/uns on the host. Memory: the n_obs × n_pcs representation twice (float64 and the
    float32 product rows), the candidate lists (n_obs · (neighbors_within_batch + margin) ·
    16 bytes per batch) and one product tile (8192 × 8192 float32 on the device, per
    thread 128 × 2048 on the host).

    Parameters
    ----------
    adata
        Annotated data matrix with the representation in ``obsm[use_rep]``.
    batch_key
        ``obs`` column with each cell's batch (labels compared as strings, as bbknn does).
    use_rep
        ``obsm`` key of the representation.
    approx, use_annoy, use_faiss, annoy_n_trees, pynndescent_n_neighbors, pynndescent_random_state
        bbknn's choice of search and its settings; accepted for the signature, unused (exact).
    metric
        ``"euclidean"`` (or ``"l2"``) or ``"manhattan"`` (``"cityblock"``, ``"l1"``). Another
        name that bbknn's exact mode does not know becomes euclidean with bbknn's warning;
        ``"minkowski"``, ``"chebyshev"`` (KDTree's other metrics) are not supported.
    copy
        Return a copy instead of writing to ``adata``.
    neighbors_within_batch
        Neighbours taken from each batch; every batch needs at least this many cells.
    n_pcs
        Use the first ``min(n_pcs, n_columns)`` columns of the representation.
    trim
        Keep each cell's ``trim`` top connectivities (an edge survives where it is among the
        top of both its cells); default 10 × the neighbours per cell; 0 keeps all.
    set_op_mix_ratio, local_connectivity
        umap-learn's fuzzy union blend (in [0, 1]) and local connectivity (> 0).
    key_added
        Store under ``uns[key_added]``, ``obsp[key_added + "_distances"]`` and
        ``obsp[key_added + "_connectivities"]`` instead of the default keys.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsp['distances']`` : scipy CSR, float64
        Each cell's neighbours (n_batches × neighbors_within_batch) and their distances;
        the cell itself and any other zero distance left out, as in bbknn.
    ``obsp['connectivities']`` : scipy CSR, float32
        The trimmed UMAP connectivities.
    ``uns['neighbors']`` : dict
        ``connectivities_key``, ``distances_key`` and ``params``: ``n_neighbors`` (int),
        ``method`` ("umap"), ``metric``, ``n_pcs`` (numpy int64), ``use_rep`` and ``bbknn``
        (``trim``, ``computation`` = ``"brute"``, ``batch_key``).

    Raises
    ------
    ValueError
        bbknn's errors (their messages inside ours): a missing ``batch_key`` or ``use_rep``,
        a batch with fewer than ``neighbors_within_batch`` cells; and missing batch labels,
        NaN/inf in the representation, arguments out of range, an unsupported metric. Nothing
        in ``adata`` changes before the graph is built.
    """
    func = "bbknn"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if batch_key not in adata.obs:
        raise ValueError(f"{func}: Batch key '{batch_key}' not present in `adata.obs`.")
    if use_rep not in adata.obsm:
        raise ValueError(f"{func}: Did not find {use_rep} in `.obsm.keys()`. You need to compute it "
                         f"first (obsm has {list(adata.obsm)}).")
    _check_positive_int(neighbors_within_batch, "neighbors_within_batch", func)
    _check_positive_int(n_pcs, "n_pcs", func)
    if trim is not None and (isinstance(trim, bool) or not isinstance(trim, int | np.integer) or trim < 0):
        raise ValueError(f"{func}: trim={trim!r} must be None or a non-negative integer")
    if not 0 <= set_op_mix_ratio <= 1:
        raise ValueError(f"{func}: set_op_mix_ratio={set_op_mix_ratio!r} must be between 0 and 1")
    if not local_connectivity > 0:
        raise ValueError(f"{func}: local_connectivity={local_connectivity!r} must be positive")
    metric, search_metric = _metric(metric, func)
    where = resolve_device(device)

    rep = to_host(adata.obsm[use_rep])
    if getattr(rep, "ndim", 0) != 2 or rep.dtype.kind not in "fiu":
        raise ValueError(f"{func}: obsm[{use_rep!r}] must be a numeric (n_obs, n_dims) array")
    n_pcs_used = np.min([n_pcs, rep.shape[1]])
    x = np.ascontiguousarray(rep[:, :n_pcs_used], dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{func}: obsm[{use_rep!r}] contains NaN or inf")
    labels = adata.obs[batch_key]
    if labels.isna().any():
        raise ValueError(f"{func}: batch_key={batch_key!r} has {int(labels.isna().sum())} missing "
                         "labels; give every cell a batch (bbknn would make them a batch 'nan')")
    batch_list = np.asarray([str(label) for label in labels.to_numpy()])
    batches, codes, counts = np.unique(batch_list, return_inverse=True, return_counts=True)
    if counts.min() < neighbors_within_batch:
        small = batches[counts.argmin()]
        raise ValueError(f"{func}: Not all batches have at least `neighbors_within_batch` cells in "
                         f"them. (batch {small!r} has {counts.min()} cells, neighbors_within_batch="
                         f"{neighbors_within_batch}: lower it or merge small batches)")

    start = logg.info("computing batch balanced neighbors")
    knn_idx, knn_dist = batch_balanced_knn(x, codes, len(batches), neighbors_within_batch,
                                           search_metric, on_device=where == "gpu")
    n_obs, k = knn_idx.shape
    distances = _distance_matrix(knn_idx, knn_dist, n_obs)
    connectivities = _connectivities(knn_idx, knn_dist, n_obs, set_op_mix_ratio, local_connectivity,
                                     on_device=where == "gpu")
    trim = 10 * k if trim is None else int(trim)
    if trim > 0:
        connectivities = _trim(connectivities, trim)

    adata = adata.copy() if copy else adata
    if key_added is None:
        key_added, conns_key, dists_key = "neighbors", "connectivities", "distances"
    else:
        conns_key, dists_key = key_added + "_connectivities", key_added + "_distances"
    adata.uns[key_added] = {
        "params": {"n_neighbors": k, "method": "umap", "metric": metric, "n_pcs": n_pcs_used,
                   "bbknn": {"trim": trim, "computation": "brute", "batch_key": batch_key},
                   "use_rep": use_rep},
        "distances_key": dists_key,
        "connectivities_key": conns_key,
    }
    adata.obsp[dists_key] = distances
    adata.obsp[conns_key] = connectivities
    logg.info("	finished", time=start)
    return adata if copy else None


def _check_positive_int(value, name: str, func: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{func}: {name}={value!r} must be a positive integer")


def _metric(metric, func: str) -> tuple[str, str]:
    """(the metric bbknn records, the one searched)."""
    if not isinstance(metric, str):
        raise ValueError(f"{func}: metric={metric!r} is not supported; use one of {tuple(METRICS)}")
    if metric in KDTREE_ONLY:
        raise ValueError(f"{func}: metric={metric!r} is not supported (bbknn's KDTree has it); use "
                         f"one of {tuple(METRICS)}")
    if metric not in METRICS:
        logg.warning("unrecognised metric for type of neighbor calculation, switching to euclidean")
        metric = "euclidean"
    return metric, METRICS[metric]


# ---------------------------------------------------------------- the graph

def batch_balanced_knn(x: np.ndarray, codes: np.ndarray, n_batches: int, k: int, metric: str, *,
                       on_device: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest rows of every batch (``codes`` in 0..n_batches-1), merged and
    sorted by (distance, the row itself first, batch, index): indices (n, n_batches · k)
    int64 and distances float64, on the host."""
    n = x.shape[0]
    knn_idx = np.empty((n, n_batches * k), np.int64)
    knn_dist = np.empty((n, n_batches * k), np.float64)
    for b in range(n_batches):
        refs = np.flatnonzero(codes == b)
        idx, dist = query_knn(x, refs, k, metric, on_device=on_device)
        knn_idx[:, b * k:(b + 1) * k] = idx
        knn_dist[:, b * k:(b + 1) * k] = dist
    rows = np.arange(n)[:, None]
    key = np.where(knn_idx == rows, -1.0, knn_dist)  # the row itself first among zero distances
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(knn_idx, order, axis=1), np.take_along_axis(knn_dist, order, axis=1)


def _distance_matrix(knn_idx, knn_dist, n_obs: int) -> sparse.csr_matrix:
    """bbknn's distance matrix: every listed neighbour, zeros (the cell itself) dropped."""
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    values = np.where(knn_idx == np.arange(n)[:, None], 0.0, knn_dist).reshape(-1)
    matrix = sparse.coo_matrix((values, (rows, knn_idx.reshape(-1))), shape=(n_obs, n_obs))
    matrix.eliminate_zeros()
    return matrix.tocsr()


def _connectivities(knn_idx, knn_dist, n_obs: int, mix_ratio: float, local_connectivity: float, *,
                    on_device: bool) -> sparse.csr_matrix:
    """umap-learn's fuzzy_simplicial_set of the lists (float32 CSR, host)."""
    if on_device and mix_ratio == 1:
        return _conn.umap_connectivities_device(knn_idx, knn_dist, n_obs,
                                                local_connectivity=local_connectivity)
    vals, _, _ = _conn.umap_memberships_host(knn_idx, knn_dist, local_connectivity=local_connectivity)
    if mix_ratio == 1:
        return _conn.fuzzy_union_host(knn_idx, vals, n_obs)
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    w = sparse.coo_matrix((vals.reshape(-1), (rows, knn_idx.reshape(-1))), shape=(n_obs, n_obs)).tocsr()
    w.eliminate_zeros()
    wt = w.T.tocsr()
    both = w.multiply(wt)
    blend = (mix_ratio * (w + wt - both) + (1.0 - mix_ratio) * both).tocsr().astype(np.float32)
    blend.eliminate_zeros()
    blend.sort_indices()
    return blend


def _trim(connectivities: sparse.csr_matrix, trim: int) -> sparse.csr_matrix:
    """bbknn's trimming: an edge stays where it reaches the ``trim``-th largest connectivity of
    both its cells (rows with at most ``trim`` entries keep everything)."""
    c = connectivities.tocsr()
    n = c.shape[0]
    lengths = np.diff(c.indptr)
    rows = np.repeat(np.arange(n), lengths)
    order = np.lexsort((-c.data, rows))  # each row's values, largest first
    cutoff = np.zeros(n, c.data.dtype)
    long_rows = np.flatnonzero(lengths > trim)
    cutoff[long_rows] = c.data[order[c.indptr[long_rows] + trim - 1]]
    coo = c.tocoo()
    keep = (coo.data >= cutoff[coo.row]) & (coo.data >= cutoff[coo.col])
    kept = sparse.coo_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=c.shape).tocsr()
    kept.eliminate_zeros()
    return kept


# ---------------------------------------------------------------- exact kNN against a reference set

def query_knn(x: np.ndarray, refs: np.ndarray, k: int, metric: str, *,
              on_device: bool = False, query_block: int | None = None,
              ref_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows of ``x[refs]`` for every row of ``x`` (exact, ties aside).

    ``x`` is float64 on the host, ``refs`` sorted row positions, ``metric`` euclidean or
    manhattan. Returns host arrays: indices into ``x`` (n, k) int64 and distances float64,
    each row in (distance, the row itself first, index) order.
    """
    code = _topk.METRICS[metric]
    margin = DEVICE_MARGIN if on_device else HOST_MARGIN
    n_cand = min(k + margin, refs.size)
    if on_device:
        import cupy as cp

        xp = cp
        blocks = (query_block or 8192, ref_block or 8192)
        first = "float64" if os.environ.get("CUPY_TF32", "0") != "0" else "float32"
    else:
        xp = np
        blocks = (query_block or 128, ref_block or 2048)
        first = "float32"
    if code == _topk.METRICS["manhattan"]:
        first = "float64"  # direct L1 sums: exact keys, nothing to certify
    x_where = xp.asarray(x)
    refs_where = xp.asarray(refs.astype(np.int64))
    all_rows = xp.arange(x.shape[0], dtype=np.int64)
    idx, dist, certified = _pass(x_where, refs_where, all_rows, k, n_cand, code, first, on_device, blocks)
    if first != "float64":
        redo = xp.flatnonzero(~certified)
        n_redo = int(redo.size)  # synchronize!
        logg.debug(f"    bbknn: the {first} pass certified {1 - n_redo / x.shape[0]:.2%} of the rows "
                   f"against {refs.size} references; {n_redo} redone with float64 products")
        if n_redo:
            idx[redo], dist[redo], _ = _pass(x_where, refs_where, redo, k, n_cand, code, "float64",
                                            on_device, blocks)
    return to_host(idx), to_host(dist)


def _pass(x, refs, rows, k: int, n_cand: int, code: int, precision: str, on_device: bool, blocks):
    """Candidates of the query ``rows`` among ``refs`` with products in ``precision``, exact
    re-ranking and certification: indices, distances and the certified rows."""
    xp = np if not on_device else __import__("cupy")
    dim = x.shape[1]
    if code == _topk.METRICS["manhattan"]:
        cand_key, cand = _manhattan_candidates(x, refs, rows, n_cand, on_device, blocks)
        err = xp.full(rows.shape[0], np.inf)  # the keys are the exact sums
        idx, dist, _ = _rerank(x, rows, cand, cand_key, k, code, err)
        return idx, dist, xp.ones(rows.shape[0], bool)
    vectors = x - x[refs].mean(axis=0)  # centred: smaller norms, less cancellation
    if precision != "float64":
        vectors = vectors.astype(np.float32)
    v64 = vectors.astype(np.float64)
    norms64 = (v64 * v64).sum(axis=1)
    if on_device:
        cand_key, cand_local = _device_candidates(vectors, norms64, refs, rows, n_cand, blocks)
    else:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # numba's threads each run a one-thread GEMM
            cand_key, cand_local = _topk._candidates(
                np.ascontiguousarray(vectors[rows]), np.ascontiguousarray(vectors[refs]),
                norms64[refs], n_cand, *blocks)
        cand_key += norms64[rows][:, None]  # the query's own norm, left out while ranking
    cand = refs[cand_local]
    lengths = xp.sqrt(norms64)
    worst = cand_key.max(axis=1).astype(np.float64)
    err = _topk.candidate_bound(lengths, rows, cand, dim, precision, worst)
    idx, dist, kth_key = _rerank(x, rows, cand, cand_key, k, code, err)
    if precision == "float64" or n_cand == refs.shape[0]:  # exact products, or every ref a candidate
        return idx, dist, xp.ones(rows.shape[0], bool)
    longest = lengths[refs].max()
    certified = _topk.certify(kth_key, worst, lengths[rows], longest, dim, precision, code)
    return idx, dist, certified


def _rerank(x, rows, cand, cand_key, k: int, code: int, err):
    """Exact float64 distances of each query's candidates, sorted by (distance, the row
    itself first, index); each row's exact k-th key (+inf where some candidate's exact key
    strays more than ``err`` from its approximate one: no certificate)."""
    xp = np if isinstance(x, np.ndarray) else __import__("cupy")
    n_q = cand.shape[0]
    idx = xp.empty((n_q, k), np.int64)
    dist = xp.empty((n_q, k), np.float64)
    kth_key = xp.empty(n_q, np.float64)
    for a in range(0, n_q, RERANK_ROWS):
        b = min(a + RERANK_ROWS, n_q)
        c = cand[a:b]
        diff = x[rows[a:b]][:, None, :] - x[c]
        exact = xp.abs(diff).sum(axis=2) if code == _topk.METRICS["manhattan"] else (diff * diff).sum(axis=2)
        consistent = (xp.abs(exact - cand_key[a:b]) <= err[a:b, None]).all(axis=1)
        by_index = xp.argsort(c, axis=1)
        c, exact = xp.take_along_axis(c, by_index, axis=1), xp.take_along_axis(exact, by_index, axis=1)
        key = xp.where(c == rows[a:b, None], -1.0, exact)  # the row itself first among ties at 0
        order = xp.argsort(key, axis=1, kind="stable")[:, :k]
        c, exact = xp.take_along_axis(c, order, axis=1), xp.take_along_axis(exact, order, axis=1)
        idx[a:b] = c
        dist[a:b] = exact if code == _topk.METRICS["manhattan"] else xp.sqrt(exact)
        kth_key[a:b] = xp.where(consistent, exact[:, k - 1], np.inf)
    return idx, dist, kth_key


def _device_candidates(vectors, norms64, refs, rows, n_cand: int, blocks):
    """K best (key, reference position) per query row from cuBLAS tiles and ``topk_tile``."""
    import cupy as cp

    dtype = vectors.dtype
    n_q, n_r = int(rows.shape[0]), int(refs.shape[0])
    query_block, ref_block = blocks
    cand_key = cp.full((n_q, n_cand), np.inf, dtype=dtype)
    cand_idx = cp.full((n_q, n_cand), np.iinfo(np.int64).max, dtype=np.int64)
    topk_tile = _topk._kernel(cuda.template_name("topk_tile", dtype))
    norms = norms64.astype(dtype)
    vq, nq = vectors[rows], norms[rows]
    vr, nr = cp.ascontiguousarray(vectors[refs]), norms[refs]
    for q0 in range(0, n_q, query_block):
        q1 = min(q0 + query_block, n_q)
        for r0 in range(0, n_r, ref_block):
            r1 = min(r0 + ref_block, n_r)
            products = vq[q0:q1] @ vr[r0:r1].T  # cuBLAS
            cuda.launch(topk_tile, -(-(q1 - q0) // _topk.WARPS_PER_BLOCK), 32 * _topk.WARPS_PER_BLOCK, (
                products, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0),
                nq[q0:q1], nr[r0:r1], np.int64(r0), cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
    return cand_key, cand_idx


def _manhattan_candidates(x, refs, rows, n_cand: int, on_device: bool, blocks):
    """K best (exact L1 sum, global index) per query row."""
    if on_device:
        import cupy as cp

        n_q, n_r, dim = int(rows.shape[0]), int(refs.shape[0]), x.shape[1]
        query_block, ref_block = blocks
        cand_key = cp.full((n_q, n_cand), np.inf, dtype=np.float64)
        cand_idx = cp.full((n_q, n_cand), np.iinfo(np.int64).max, dtype=np.int64)
        tile_kernel = _topk._kernel(cuda.template_name("manhattan_tile", np.float64))
        topk_tile = _topk._kernel(cuda.template_name("topk_tile", np.float64))
        xq, xr = cp.ascontiguousarray(x[rows]), cp.ascontiguousarray(x[refs])
        for q0 in range(0, n_q, query_block):
            q1 = min(q0 + query_block, n_q)
            for r0 in range(0, n_r, ref_block):
                r1 = min(r0 + ref_block, n_r)
                tile = cp.empty((q1 - q0, r1 - r0), np.float64)
                tile_kernel((-(-(r1 - r0) // 16), -(-(q1 - q0) // 16)), (16, 16), (
                    xq[q0:q1], np.int64(q1 - q0), xr[r0:r1], np.int64(r1 - r0), np.int64(dim),
                    tile, np.int64(r1 - r0)))
                cuda.launch(topk_tile, -(-(q1 - q0) // _topk.WARPS_PER_BLOCK), 32 * _topk.WARPS_PER_BLOCK, (
                    tile, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0), np.uintp(0),
                    np.uintp(0), np.int64(r0), cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
        return cand_key, refs[cand_idx]
    cand_key, cand_local = _topk._manhattan_select(np.ascontiguousarray(x[rows]),
                                                  np.ascontiguousarray(x[refs]), n_cand)
    return cand_key, refs[cand_local]
