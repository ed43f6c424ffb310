"""``kernels/topk.cu`` and its numba twin: exact brute-force k nearest neighbours.

Both backends work the same way: candidate distances for tiles of query × reference
rows (a BLAS/cuBLAS product ``‖a‖² + ‖b‖² − 2abᵀ`` for euclidean, sqeuclidean and
cosine, a direct tile for manhattan), a running list of the ``K = k + margin`` best
candidates per query, then an exact float64 re-ranking of those candidates. Memory is
O(n·K + tile), never n × n. The result of every row is ordered by (distance, the point
itself first, index), so each point is its own first neighbour at distance 0.

Exactness: the candidate distances carry rounding error; the margin absorbs it. On the
device the first pass uses float32 products and each row is certified (its exact k-th
distance lies below its worst candidate minus a bound on the product's rounding error);
rows that fail are redone with float64 products. On the host the products are float64.
What remains are exact ties (points at the same distance), which either order answers.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from .._core import cuda

METRICS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2, "manhattan": 3}
TOPK_MAX = 128  # kernels/topk.cu's TOPK_MAX: the most candidates a row keeps on the device
WARPS_PER_BLOCK = 4  # kernels/topk.cu's WARPS_PER_BLOCK
HOST_MARGIN = 8
DEVICE_MARGIN = 16
NAME_EXPRESSIONS = (
    *(cuda.template_name("topk_tile", t) for t in (np.float32, np.float64)),
    *(cuda.template_name("manhattan_tile", t) for t in (np.float32, np.float64)),
    *(cuda.template_name("rerank", t, g) for t in (np.float32, np.float64)
      for g in (np.float32, np.float64)),
)
_NO_INDEX = np.iinfo(np.int64).max


def n_candidates(k: int, n: int, margin: int) -> int:
    return min(k + margin, n)


# ---------------------------------------------------------------- host (numba)

def knn_host(x: np.ndarray, k: int, metric: str, *, query_block: int = 128,
             ref_block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN of the rows of ``x`` among themselves: int64 indices, float64 distances (n, k).

    Threads take blocks of ``query_block`` queries; each multiplies them with blocks of
    ``ref_block`` references (one-thread BLAS, so the tile stays in cache) and keeps a
    heap of candidates per query. Memory: n·K·16 bytes plus one tile per thread.
    """
    x64 = np.ascontiguousarray(x, dtype=np.float64)
    n = x64.shape[0]
    code = METRICS[metric]
    n_cand = n_candidates(k, n, HOST_MARGIN)
    if code == METRICS["manhattan"]:
        cand_key, cand_idx = _manhattan_select(x64, n_cand)
        rows = np.arange(n, dtype=np.int64)
        no_check = np.full(n, np.inf)  # direct float64 sums are the exact distances
        idx, dist, _ = _rerank_host(x64, rows, cand_key, cand_idx, k, code, no_check)
        return idx, dist
    rows = np.arange(n, dtype=np.int64)
    idx, dist, certified = _host_pass(x64, rows, k, n_cand, code, np.float32, query_block, ref_block)
    redo = np.flatnonzero(~certified)
    if redo.size:  # rows whose float32 candidates could have missed a neighbour
        idx[redo], dist[redo], _ = _host_pass(x64, redo, k, n_cand, code, np.float64,
                                              query_block, ref_block)
    return idx, dist


def _host_pass(x64, rows, k, n_cand, code, gemm_dtype, query_block, ref_block):
    from threadpoolctl import threadpool_limits

    vectors = _gemm_vectors(x64, code).astype(gemm_dtype)
    v64 = vectors.astype(np.float64)
    norms64 = np.einsum("ij,ij->i", v64, v64)
    err = error_bound(np.sqrt(norms64[rows]), np.sqrt(norms64.max()), x64.shape[1], gemm_dtype)
    with threadpool_limits(1, user_api="blas"):  # numba's threads each run a one-thread GEMM
        cand_key, cand_idx = _candidates(np.ascontiguousarray(vectors[rows]), vectors,
                                         norms64, n_cand, query_block, ref_block)
    cand_key += norms64[rows][:, None]  # the query's own norm, left out while ranking
    return _rerank_host(x64, rows, cand_key, cand_idx, k, code, err)


def error_bound(query_lengths, longest, dim, gemm_dtype):
    """Bound on |‖a‖² + ‖b‖² − 2ab − exact squared distance| when the product runs in gemm_dtype.

    The inner product errs by at most γ_d Σ|a_l b_l| <= γ_d ‖a‖‖b‖ (γ_d = d·u/(1 − d·u)),
    the centred or normalised rows were rounded to gemm_dtype (2u(‖a‖+‖b‖)²), and the
    sums round once more (4u(‖a‖+‖b‖)²); 10% headroom.
    """
    unit = np.finfo(gemm_dtype).eps / 2
    gamma = dim * unit / (1 - dim * unit)
    return 1.1 * (2 * gamma + 6 * unit) * (query_lengths + longest) ** 2


def _gemm_vectors(x64: np.ndarray, code: int) -> np.ndarray:
    """Rows whose ``‖a‖² + ‖b‖² − 2ab`` ranks like the metric (centred: smaller norms, less cancellation)."""
    if code == METRICS["cosine"]:
        norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
        return x64 / np.where(norms > 0, norms, 1.0)[:, None]
    return x64 - x64.mean(axis=0)


@numba.njit(cache=True, inline="always")
def _heap_push(keys, idx, key, j):
    """Replace the root of a max-heap (keys, idx) by (key, j) and sift it down."""
    size = keys.size
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and keys[child + 1] > keys[child]:
            child += 1
        if keys[child] <= key:
            break
        keys[pos] = keys[child]
        idx[pos] = idx[child]
        pos = child
    keys[pos] = key
    idx[pos] = j


@numba.njit(parallel=True, cache=True)
def _candidates(queries, refs, ref_norms, n_cand, query_block, ref_block):
    """Per query the n_cand smallest ‖b‖² − 2ab (a max-heap per row), in float64."""
    n_q, n = queries.shape[0], refs.shape[0]
    cand_key = np.full((n_q, n_cand), np.inf)
    cand_idx = np.full((n_q, n_cand), -1, np.int64)
    for b in numba.prange((n_q + query_block - 1) // query_block):
        q0 = b * query_block
        q1 = min(q0 + query_block, n_q)
        block = queries[q0:q1]
        for r0 in range(0, n, ref_block):
            r1 = min(r0 + ref_block, n)
            products = np.dot(block, refs[r0:r1].T)
            for i in range(q1 - q0):
                keys, idx, row = cand_key[q0 + i], cand_idx[q0 + i], products[i]
                worst = keys[0]
                for c in range(r1 - r0):
                    key = ref_norms[r0 + c] - 2.0 * row[c]
                    if key < worst:
                        _heap_push(keys, idx, key, r0 + c)
                        worst = keys[0]
    return cand_key, cand_idx


@numba.njit(parallel=True, cache=True)
def _manhattan_select(x, n_cand):
    n, dim = x.shape
    cand_key = np.full((n, n_cand), np.inf)
    cand_idx = np.full((n, n_cand), -1, np.int64)
    for i in numba.prange(n):
        keys, idx = cand_key[i], cand_idx[i]
        worst = keys[0]
        for j in range(n):
            acc = 0.0
            for f in range(dim):
                acc += abs(x[i, f] - x[j, f])
                if acc >= worst:  # cannot enter the list any more
                    break
            if acc < worst:
                _heap_push(keys, idx, acc, j)
                worst = keys[0]
    return cand_key, cand_idx


@numba.njit(cache=True, inline="always")
def _exact_key(x, i, j, code):
    """Rows i and j compared directly in float64, on the candidates' scale: squared
    euclidean for (sq)euclidean, 2(1 − cos) for cosine, the L1 sum for manhattan."""
    if i == j:
        return 0.0
    dim = x.shape[1]
    if code == 2:
        dot, na, nb = 0.0, 0.0, 0.0
        for f in range(dim):
            dot += x[i, f] * x[j, f]
            na += x[i, f] * x[i, f]
            nb += x[j, f] * x[j, f]
        if na == 0.0 or nb == 0.0:  # scikit-learn: a zero row has cosine distance 1
            return 2.0
        return 2.0 * min(max(1.0 - dot / (np.sqrt(na) * np.sqrt(nb)), 0.0), 2.0)
    acc = 0.0
    if code == 3:
        for f in range(dim):
            acc += abs(x[i, f] - x[j, f])
        return acc
    for f in range(dim):
        diff = x[i, f] - x[j, f]
        acc += diff * diff
    return acc


@numba.njit(cache=True, inline="always")
def _before(d1, i1, d2, i2, self_index):
    """(distance, the point itself first, index) order."""
    if d1 != d2:
        return d1 < d2
    s1, s2 = i1 == self_index, i2 == self_index
    if s1 != s2:
        return s1
    return i1 < i2


@numba.njit(parallel=True, cache=True)
def _rerank_host(x, rows, cand_key, cand_idx, k, code, err):
    """Exact distances of each query's candidates, sorted; certified[q] when no point
    outside the candidates can be nearer than the k-th (approximate worst − err)."""
    n_q, n_cand = cand_idx.shape
    out_idx = np.empty((n_q, k), np.int64)
    out_dist = np.empty((n_q, k), np.float64)
    certified = np.empty(n_q, np.bool_)
    for q in numba.prange(n_q):
        i = rows[q]
        idx = cand_idx[q].copy()
        worst_approx = -np.inf
        for c in range(n_cand):
            worst_approx = max(worst_approx, cand_key[q, c])
        dist = np.empty(n_cand)
        has_self = False
        for c in range(n_cand):
            dist[c] = _exact_key(x, i, idx[c], code) if idx[c] >= 0 else np.inf
            has_self |= idx[c] == i
        if not has_self:  # only with many exact duplicates of point i
            c_worst = 0
            for c in range(n_cand):
                if dist[c] >= dist[c_worst]:
                    c_worst = c
            idx[c_worst], dist[c_worst] = i, 0.0
        for a in range(1, n_cand):  # insertion sort of a few dozen candidates
            d, j = dist[a], idx[a]
            b = a - 1
            while b >= 0 and _before(d, j, dist[b], idx[b], i):
                dist[b + 1], idx[b + 1] = dist[b], idx[b]
                b -= 1
            dist[b + 1], idx[b + 1] = d, j
        certified[q] = n_cand == x.shape[0] or dist[k - 1] <= worst_approx - err[q]
        out_idx[q] = idx[:k]
        for c in range(k):
            d = dist[c]
            out_dist[q, c] = np.sqrt(d) if code == 0 else (0.5 * d if code == 2 else d)
    return out_idx, out_dist, certified


# ---------------------------------------------------------------- device (CuPy + kernels/topk.cu)

def _kernel(name: str):
    return cuda.get_kernel("topk", NAME_EXPRESSIONS, name)


def knn_device(x_host: np.ndarray, k: int, metric: str, *, query_block: int = 8192,
               ref_block: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN on the GPU; takes and returns host arrays like :func:`knn_host`.

    Device memory: x and its product rows (2·n·d), the candidate lists (n·K·16 bytes,
    K = k + 16) and one product tile (query_block · ref_block · 8 bytes, 512 MiB at the
    defaults) with its cuBLAS workspace.
    """
    import cupy as cp

    x = cp.asarray(np.ascontiguousarray(x_host))
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    n = x.shape[0]
    code = METRICS[metric]
    n_cand = n_candidates(k, n, DEVICE_MARGIN)
    if n_cand > TOPK_MAX:
        raise ValueError(f"n_neighbors={k}: brute force on the GPU keeps at most "
                         f"{TOPK_MAX - DEVICE_MARGIN} neighbours; use a smaller n_neighbors")
    all_rows = cp.arange(n, dtype=np.int64)
    tf32 = os.environ.get("CUPY_TF32", "0") != "0"  # TF32 products would void the error bound
    first = np.float64 if code == METRICS["manhattan"] or tf32 else np.float32
    out_idx, out_dist, certified = _device_pass(x, all_rows, k, n_cand, code, first,
                                                query_block, ref_block)
    if first == np.float32:
        redo = cp.flatnonzero(certified == 0)
        if int(redo.size):  # synchronize!
            idx64, dist64, _ = _device_pass(x, redo, k, n_cand, code, np.float64,
                                            query_block, ref_block)
            out_idx[redo] = idx64
            out_dist[redo] = dist64
    return out_idx.get(), out_dist.get()  # synchronize!


def _device_pass(x, rows, k, n_cand, code, gemm_dtype, query_block, ref_block):
    """Candidates for the query ``rows`` with products in ``gemm_dtype``, then exact re-ranking."""
    import cupy as cp

    n, dim = x.shape
    n_q = int(rows.size)
    gemm_dtype = np.dtype(gemm_dtype)
    cand_key = cp.full((n_q, n_cand), np.inf, dtype=gemm_dtype)
    cand_idx = cp.full((n_q, n_cand), _NO_INDEX, dtype=np.int64)
    topk_tile = _kernel(cuda.template_name("topk_tile", gemm_dtype))
    grid = lambda rows_: -(-rows_ // WARPS_PER_BLOCK)  # noqa: E731
    block = 32 * WARPS_PER_BLOCK
    if code == METRICS["manhattan"]:
        manhattan = _kernel(cuda.template_name("manhattan_tile", x.dtype))
        err = cp.zeros(n_q, np.float64)  # direct float64 sums: no product error to bound
        xq_all = x[rows]
        for q0 in range(0, n_q, query_block):
            q1 = min(q0 + query_block, n_q)
            for r0 in range(0, n, ref_block):
                r1 = min(r0 + ref_block, n)
                tile = cp.empty((q1 - q0, r1 - r0), np.float64)
                blocks = (-(-(r1 - r0) // 16), -(-(q1 - q0) // 16))
                manhattan(blocks, (16, 16), (
                    xq_all[q0:q1], np.int64(q1 - q0), x[r0:r1], np.int64(r1 - r0), np.int64(dim),
                    tile, np.int64(r1 - r0)))
                cuda.launch(topk_tile, grid(q1 - q0), block, (
                    tile, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0),
                    np.uintp(0), np.uintp(0), np.int64(r0),
                    cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
    else:
        x64 = x.astype(np.float64, copy=False)
        if code == METRICS["cosine"]:
            lengths = cp.sqrt((x64 * x64).sum(axis=1))
            vec64 = x64 / cp.where(lengths > 0, lengths, 1.0)[:, None]
        else:
            vec64 = x64 - x64.mean(axis=0)
        vectors = cp.ascontiguousarray(vec64.astype(gemm_dtype))
        # Norms of the vectors the product sees, so only the product's rounding is left.
        v64 = vectors.astype(np.float64)
        norms64 = (v64 * v64).sum(axis=1)
        del v64
        norms = norms64.astype(gemm_dtype)
        longest = float(cp.sqrt(norms64.max()))  # synchronize!
        err = error_bound(cp.sqrt(norms64[rows]), longest, dim, gemm_dtype)
        vq_all, nq_all = vectors[rows], norms[rows]
        for q0 in range(0, n_q, query_block):
            q1 = min(q0 + query_block, n_q)
            for r0 in range(0, n, ref_block):
                r1 = min(r0 + ref_block, n)
                products = vq_all[q0:q1] @ vectors[r0:r1].T  # cuBLAS
                cuda.launch(topk_tile, grid(q1 - q0), block, (
                    products, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0),
                    nq_all[q0:q1], norms[r0:r1], np.int64(r0),
                    cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
    out_idx = cp.empty((n_q, k), np.int64)
    out_dist = cp.empty((n_q, k), np.float64)
    certified = cp.empty(n_q, np.int32)
    rerank = _kernel(cuda.template_name("rerank", x.dtype, gemm_dtype))
    cuda.launch(rerank, grid(n_q), block, (
        x, np.int64(n), np.int64(dim), np.int32(code), rows, np.int64(n_q),
        cand_key, cand_idx, np.int32(n_cand), np.int32(k), err.astype(np.float64),
        out_idx, out_dist, certified))
    return out_idx, out_dist, certified
