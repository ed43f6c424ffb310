"""``kernels/topk.cu`` and its numba twin: exact brute-force k nearest neighbours.

Both backends work the same way: candidate keys ``‖a‖² + ‖b‖² − 2ab`` for euclidean,
sqeuclidean and cosine (a direct L1 sum for manhattan), a running list of the
``K = k + margin`` best candidates per query, then an exact float64 re-ranking of those
candidates. Memory is O(n·K + tile), never n × n. The result of every row is ordered by
(distance, the point itself first, index), so each point is its own first neighbour at
distance 0.

Where the products run: on the device, for up to 64 dimensions and K <= 64, one fused
kernel (``fused_candidates``) multiplies on the tensor cores in TF32 and selects on the
chip, so no distance ever reaches device memory; otherwise cuBLAS float32 tiles and the
``topk_tile`` selection kernel. On the host, BLAS float32 tiles and numba heaps.

Exactness: the candidate keys carry rounding error (:func:`error_bound`). The re-ranking
checks every candidate's exact key against its approximate one (a bound from the row's
longest candidate, which also catches a candidate pass that mislabels its keys), then
:func:`certify` proves per row that no point outside the list is nearer than the exact
k-th, with a bound that reaches only as far out as that k-th distance (one far outlier
does not loosen every row). Rows that fail are redone with float64 products; the share
certified by the first pass is returned and logged at debug level. What remains are exact
ties (points at the same distance), which either order answers.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from .._core import cuda, logg
from . import prange_only

METRICS = {"euclidean": 0, "sqeuclidean": 1, "cosine": 2, "manhattan": 3}
TOPK_MAX = 128  # kernels/topk.cu's TOPK_MAX: the most candidates a row keeps on the device
WARPS_PER_BLOCK = 4  # kernels/topk.cu's WARPS_PER_BLOCK
HOST_MARGIN = 8
DEVICE_MARGIN = 16
# kernels/topk.cu's fused pass: its block, chunk and buffer sizes (shared-memory layout)
FUSED_THREADS, FUSED_QUERIES, FUSED_REFS, FUSED_STRIDE, FUSED_BUF = 256, 256, 64, 68, 16
FUSED_MAX_DIM, FUSED_MAX_K = 64, 64
NAME_EXPRESSIONS = (
    "fused_candidates",
    *(cuda.template_name("topk_tile", t) for t in (np.float32, np.float64)),
    *(cuda.template_name("manhattan_tile", t) for t in (np.float32, np.float64)),
    *(cuda.template_name("rerank", t, g) for t in (np.float32, np.float64)
      for g in (np.float32, np.float64)),
)
_NO_INDEX = np.iinfo(np.int64).max


def n_candidates(k: int, n: int, margin: int) -> int:
    return min(k + margin, n)


# ---------------------------------------------------------------- host (numba)

def knn_host(x: np.ndarray, k: int, metric: str, *, first_pass: str = "float32",
             query_block: int = 128, ref_block: int = 2048,
             query_rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact kNN of the rows of ``x`` among themselves (of rows ``query_rows = (first, end)``
    only, when given: one worker's block of queries against all rows, the same lists as
    those rows get in a search of all).

    Threads take blocks of ``query_block`` queries; each multiplies them with blocks of
    ``ref_block`` references (one-thread BLAS, so the tile stays in cache) and keeps a
    heap of candidates per query. Memory: n·K·16 bytes plus one tile per thread.
    ``first_pass="tf32"`` rounds the vectors as the device's fused pass does (its
    certification, checked without a GPU); rows it cannot certify are redone in float64.

    Returns
    -------
    The neighbours' indices (n, k) int64 and distances (n, k) float64, and the fraction
    of rows the first pass certified (1.0 where it is exact: float64 products, manhattan).
    """
    x64 = np.ascontiguousarray(x, dtype=np.float64)
    n = x64.shape[0]
    code = METRICS[metric]
    n_cand = n_candidates(k, n, HOST_MARGIN)
    first, end = (0, n) if query_rows is None else query_rows
    rows = np.arange(first, end, dtype=np.int64)
    if code == METRICS["manhattan"]:
        cand_key, cand_idx = _manhattan_select(x64[first:end], x64, n_cand)
        no_check = np.full(n, np.inf)  # direct float64 sums are the exact distances
        idx, dist, _ = _rerank_host(x64, rows, cand_key, cand_idx, k, code, no_check)
        return idx, dist, 1.0
    idx, dist, certified = _host_pass(x64, rows, k, n_cand, code, first_pass, query_block, ref_block)
    if first_pass == "float64":
        return idx, dist, 1.0
    redo = np.flatnonzero(~certified)
    _log_certified(first_pass, rows.size, redo.size)
    if redo.size:  # rows whose first-pass candidates could have missed a neighbour
        idx[redo], dist[redo], _ = _host_pass(x64, rows[redo], k, n_cand, code, "float64",
                                              query_block, ref_block)
    return idx, dist, 1.0 - redo.size / max(rows.size, 1)


def _log_certified(precision: str, n: int, n_redo: int) -> None:
    logg.debug(f"    exact kNN: the {precision} pass certified {1 - n_redo / n:.2%} of {n} rows; "
               f"{n_redo} redone with float64 products")


def _host_pass(x64, rows, k, n_cand, code, precision, query_block, ref_block):
    """Candidates for the query ``rows`` with products in ``precision``, exact re-ranking and
    certification: indices, distances and the certified rows (bool)."""
    from threadpoolctl import threadpool_limits

    vectors = _gemm_vectors(x64, code)
    if precision == "float64":
        vectors = np.ascontiguousarray(vectors)
    else:
        vectors = vectors.astype(np.float32)
        if precision == "tf32":
            vectors = round_tf32(vectors)
    v64 = vectors.astype(np.float64)
    norms64 = np.einsum("ij,ij->i", v64, v64)
    with threadpool_limits(1, user_api="blas"):  # numba's threads each run a one-thread GEMM
        cand_key, cand_idx = _candidates(np.ascontiguousarray(vectors[rows]), vectors,
                                         norms64, n_cand, query_block, ref_block)
    cand_key += norms64[rows][:, None]  # the query's own norm, left out while ranking
    lengths = np.sqrt(norms64)
    dim = x64.shape[1]
    worst = cand_key.max(axis=1)
    err = candidate_bound(lengths, rows, cand_idx, dim, precision, worst)
    idx, dist, kth_key = _rerank_host(x64, rows, cand_key, cand_idx, k, code, err)
    certified = certify(kth_key, worst, lengths[rows], lengths.max(), dim, precision, code)
    return idx, dist, certified | (n_cand == x64.shape[0])  # every point a candidate: exact


# (unit roundoff of the rounded vectors, unit roundoff of the accumulation) per product precision.
# TF32 keeps 10 mantissa bits (rounded to nearest, ties away: 2^-11); tensor cores add their
# FP32 products without IEEE rounding, so the accumulation gets 2^-22, four times FP32's.
UNIT_ROUNDOFF = {"float64": (2.0**-53, 2.0**-53), "float32": (2.0**-24, 2.0**-24),
                 "tf32": (2.0**-11, 2.0**-22)}


def error_bound(query_lengths, reference_lengths, dim, precision, worst):
    """Bound on |key − exact squared distance| for a query a and any point b with
    ‖b‖ <= ``reference_lengths`` (lengths of the rounded product rows).

    ``worst`` is the query's K-th approximate key. With L = ‖a‖ + ‖b‖: the accumulated
    product and the norm sums err by at most e = (2γ_d + 6u)·L² (γ_d = d·u/(1 − d·u), u
    the accumulation's roundoff); the vectors were rounded to the product's precision,
    which moves a distance by at most δ = u_in·L, so a squared distance D' of the rounded
    rows and the exact D obey |√D − √D'| <= δ. For any point whose key is at least
    ``worst`` (every point outside the list) and for every listed candidate this gives
    |D − key| <= e + 2δ·√(worst + e) + δ². The bound grows with L, so it holds for every
    b shorter than ``reference_lengths``. 10% headroom on e and δ. Works on NumPy and CuPy
    arrays alike.
    """
    u_in, u_acc = UNIT_ROUNDOFF[precision]
    gamma = dim * u_acc / (1 - dim * u_acc)
    span = query_lengths + reference_lengths
    e = 1.1 * (2 * gamma + 6 * u_acc) * span * span
    delta = 1.1 * u_in * span
    return e + 2 * delta * np.sqrt(np.maximum(worst, 0.0) + e) + delta * delta


def candidate_bound(lengths, rows, cand_idx, dim, precision, worst):
    """Per query row, :func:`error_bound` for its own candidates (the re-ranking's check that
    each candidate's key is its own): the reference length is the row's longest candidate.
    ``lengths`` of all product rows; NumPy or CuPy alike."""
    valid = (cand_idx >= 0) & (cand_idx < lengths.shape[0])  # unfilled slots: -1 or int64 max
    cand_lengths = np.where(valid, lengths[np.where(valid, cand_idx, 0)], 0.0)
    return error_bound(lengths[rows], cand_lengths.max(axis=1), dim, precision, worst)


def certify(kth_key, worst, query_lengths, longest, dim, precision, code):
    """Rows whose candidate lists provably hold their k nearest neighbours (ties aside).

    ``kth_key`` is each row's exact k-th key after the re-ranking (+inf where a
    candidate's exact key strayed from its approximate one: no certificate), ``worst`` its
    list's K-th approximate key, ``query_lengths`` the length ‖v_a‖ of its product row and
    ``longest`` that of the longest product row. NumPy or CuPy arrays alike.

    The argument. A point b outside the list has key >= worst, so by :func:`error_bound`
    its exact key D(a, b) >= worst − err(‖v_a‖ + ‖v_b‖), err growing with the span. b can
    displace a listed neighbour only if D(a, b) < D_k, the exact k-th key. The exact rows c
    whose differences give D (the rows centred, or for cosine normalised, in exact
    arithmetic; a zero row's cosine key 2 exceeds its squared distance 1, which keeps what
    follows true) obey the reverse triangle inequality √D(a, b) >= ‖c_b‖ − ‖c_a‖, so such
    a b has ‖c_b‖ < ‖c_a‖ + √D_k. The product rows v are the c rounded elementwise to the
    product's precision (u_in, 10% headroom: TF32 rounds rows already rounded to float32)
    after float64 centring or normalising, and their lengths are float64 sums (each within
    γ = γ_{d+8} of float64), so ‖v‖ <= ρ‖c‖ and ‖c‖ <= ρ‖v‖ with
    ρ = (1 + 1.1·u_in)(1 + 2γ). D_k is itself a float64 sum: the true value is below
    D_k(1 + 2γ) (+ 4γ for cosine's 2(1 − cos), an absolute error). Hence ‖v_b‖ < reach =
    min(longest, ρ(ρ‖v_a‖ + √D_k)), and with err = error_bound(‖v_a‖, reach) the row is
    certified when D_k <= worst − err: a nearer b would need D_k > D(a, b) >= worst − err.

    This bound is per row, tighter than one per tile of references: a far outlier widens
    only its own row's bound and those of rows whose k-th distance reaches out to it. For
    cosine every product row has length 1 (or 0), so the reach is ``longest`` anyway.
    """
    u_in, _ = UNIT_ROUNDOFF[precision]
    gamma = (dim + 8) * 2.0**-53 / (1 - (dim + 8) * 2.0**-53)
    rho = (1 + 1.1 * u_in) * (1 + 2 * gamma)
    kth_upper = kth_key * (1 + 2 * gamma) + (4 * gamma if code == METRICS["cosine"] else 0.0)
    reach = np.minimum(longest, rho * (rho * query_lengths + np.sqrt(kth_upper)))
    return kth_key <= worst - error_bound(query_lengths, reach, dim, precision, worst)


def round_tf32(v):
    """float32 values rounded to TF32 (10 mantissa bits, nearest, ties away from zero), as
    cvt.rna.tf32.f32 does; NumPy or CuPy in, the same out."""
    bits = v.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def _gemm_vectors(x64, code: int):
    """Rows whose ``‖a‖² + ‖b‖² − 2ab`` ranks like the metric (centred: smaller norms, less
    cancellation); NumPy or CuPy float64 in, the same out."""
    if code == METRICS["cosine"]:
        norms = np.sqrt((x64 * x64).sum(axis=1))
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


@numba.njit(parallel=prange_only(), cache=True)
def _candidates(queries, refs, ref_norms, n_cand, query_block, ref_block):
    """Per query the n_cand smallest ‖b‖² − 2ab (a max-heap per row), in float64."""
    n_q = queries.shape[0]
    cand_key = np.full((n_q, n_cand), np.inf)
    cand_idx = np.full((n_q, n_cand), -1, np.int64)
    # a block's work is a function of its own: numba's parallel passes compile a short loop
    # body much faster than the same code inlined in it
    for b in numba.prange((n_q + query_block - 1) // query_block):
        q0 = b * query_block
        q1 = min(q0 + query_block, n_q)
        _candidates_block(queries[q0:q1], refs, ref_norms, ref_block, cand_key[q0:q1], cand_idx[q0:q1])
    return cand_key, cand_idx


@numba.njit(cache=True)
def _candidates_block(block, refs, ref_norms, ref_block, cand_key, cand_idx):
    """:func:`_candidates` for one block of queries, into their heaps cand_key/cand_idx."""
    n = refs.shape[0]
    for r0 in range(0, n, ref_block):
        r1 = min(r0 + ref_block, n)
        products = np.dot(block, refs[r0:r1].T)
        for i in range(block.shape[0]):
            keys, idx, row = cand_key[i], cand_idx[i], products[i]
            worst = keys[0]
            for c in range(r1 - r0):
                key = ref_norms[r0 + c] - 2.0 * row[c]
                if key < worst:
                    _heap_push(keys, idx, key, r0 + c)
                    worst = keys[0]


@numba.njit(parallel=prange_only(), cache=True)
def _manhattan_select(queries, refs, n_cand):
    """Per query row the n_cand smallest L1 sums to the reference rows (a max-heap per row);
    pp.bbknn passes one batch's cells as the references."""
    n_q, dim = queries.shape
    n_r = refs.shape[0]
    cand_key = np.full((n_q, n_cand), np.inf)
    cand_idx = np.full((n_q, n_cand), -1, np.int64)
    for i in numba.prange(n_q):
        keys, idx = cand_key[i], cand_idx[i]
        worst = keys[0]
        for j in range(n_r):
            acc = 0.0
            for f in range(dim):
                acc += abs(queries[i, f] - refs[j, f])
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


@numba.njit(parallel=prange_only(), cache=True)
def _rerank_host(x, rows, cand_key, cand_idx, k, code, err):
    """Exact distances of each query's candidates, sorted, and each row's exact k-th key
    (the input of :func:`certify`), +inf where some candidate's exact key lies farther than
    err from its approximate one (the keys are not the candidates': no certificate)."""
    n_q = cand_idx.shape[0]
    out_idx = np.empty((n_q, k), np.int64)
    out_dist = np.empty((n_q, k), np.float64)
    kth_key = np.empty(n_q, np.float64)
    # the row's work is a function of its own: numba's parallel passes then see a two-line
    # loop body, which compiles in a third of the time of the same code inlined in the loop
    for q in numba.prange(n_q):
        kth_key[q] = _rerank_row(x, rows[q], cand_idx[q].copy(), cand_key[q], err[q], k, code,
                                 out_idx[q], out_dist[q])
    return out_idx, out_dist, kth_key


@numba.njit(cache=True)
def _rerank_row(x, i, idx, approx_key, err, k, code, out_idx, out_dist):
    """:func:`_rerank_host` for query row i: sorts its candidates ``idx`` (a copy) by exact
    distance into out_idx/out_dist (k each); returns the exact k-th key, +inf where a
    candidate's exact key lies farther than err from its approximate one."""
    n_cand = idx.size
    dist = np.empty(n_cand)
    has_self = False
    consistent = True
    for c in range(n_cand):
        dist[c] = _exact_key(x, i, idx[c], code) if idx[c] >= 0 else np.inf
        has_self |= idx[c] == i
        if idx[c] >= 0 and not abs(dist[c] - approx_key[c]) <= err:
            consistent = False
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
    for c in range(k):
        out_idx[c] = idx[c]
        d = dist[c]
        out_dist[c] = np.sqrt(d) if code == 0 else (0.5 * d if code == 2 else d)
    return dist[k - 1] if consistent else np.inf


# ---------------------------------------------------------------- device (CuPy + kernels/topk.cu)

def _kernel(name: str):
    return cuda.get_kernel("topk", NAME_EXPRESSIONS, name)


def knn_device(x_host: np.ndarray, k: int, metric: str, *, fused: bool | None = None,
               query_block: int = 8192, ref_block: int = 8192,
               query_rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact kNN on the GPU; takes and returns host arrays (and the fraction of rows the
    first pass certified) like :func:`knn_host`, ``query_rows`` included (its first row a
    multiple of FUSED_QUERIES, so the fused pass starts at one of its blocks).

    ``fused`` (default: where it applies) picks the fused TF32 candidate pass over the
    cuBLAS tiles. Device memory: x and its product rows (2·n·d), the candidate lists
    (n·K·16 bytes, K = k + 16) and, on the tile path, one product tile (query_block ·
    ref_block · 8 bytes, 512 MiB at the defaults) with its cuBLAS workspace.
    """
    import cupy as cp

    x = cp.asarray(np.ascontiguousarray(x_host))
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    n, dim = x.shape
    code = METRICS[metric]
    n_cand = n_candidates(k, n, DEVICE_MARGIN)
    if n_cand > TOPK_MAX:
        raise ValueError(f"n_neighbors={k}: brute force on the GPU keeps at most "
                         f"{TOPK_MAX - DEVICE_MARGIN} neighbours; use a smaller n_neighbors")
    first, end = (0, n) if query_rows is None else query_rows
    if first % FUSED_QUERIES:
        raise ValueError(f"query_rows starts at {first}, not a multiple of {FUSED_QUERIES}")
    all_rows = cp.arange(first, end, dtype=np.int64)
    # shared memory per block: 202 KB at K = 64 fits an H100 (227 KB), an A100 (163 KB) K <= 46
    shared_limit = cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    fits = (code != METRICS["manhattan"] and dim <= FUSED_MAX_DIM and n_cand <= FUSED_MAX_K
            and fused_shared_bytes(n_cand) <= shared_limit and n < 2**31 - FUSED_MAX_K)
    if fused and not fits:
        raise ValueError(f"the fused pass takes euclidean, sqeuclidean or cosine, up to "
                         f"{FUSED_MAX_DIM} dimensions and lists of up to {FUSED_MAX_K} candidates "
                         f"({shared_limit} bytes of shared memory per block here)")
    if code == METRICS["manhattan"]:
        first_pass = "float64"  # direct sums: nothing to redo
    elif fits and fused is not False:
        first_pass = "tf32"
    elif os.environ.get("CUPY_TF32", "0") != "0":
        first_pass = "float64"  # cuBLAS would multiply float32 tiles in TF32 unasked
    else:
        first_pass = "float32"
    out_idx, out_dist, certified = _device_pass(x, all_rows, k, n_cand, code, first_pass,
                                                query_block, ref_block)
    if first_pass == "float64":
        return out_idx.get(), out_dist.get(), 1.0  # synchronize!
    redo = cp.flatnonzero(~certified)
    n_redo = int(redo.size)  # synchronize!
    _log_certified(first_pass, end - first, n_redo)
    if n_redo:
        idx64, dist64, _ = _device_pass(x, all_rows[redo], k, n_cand, code, "float64",
                                        query_block, ref_block)
        out_idx[redo] = idx64
        out_dist[redo] = dist64
    return out_idx.get(), out_dist.get(), 1.0 - n_redo / max(end - first, 1)  # synchronize!


def fused_shared_bytes(n_cand: int) -> int:
    """Dynamic shared memory of ``fused_candidates``: two reference stages with their norms,
    then per query row its list, its buffer, its count and its K-th (key, index)."""
    return 4 * (2 * FUSED_REFS * FUSED_STRIDE + 2 * FUSED_REFS
                + FUSED_QUERIES * (2 * n_cand + 2 * FUSED_BUF + 3))


def _fused_candidates(x, n_cand, code, first=0, end=None):
    """K best (key, index) per query row ``first <= i < end`` (default all) among all rows,
    from ``fused_candidates``; TF32 products.

    Returns the keys (float32, ascending, the query's norm included), the indices and the
    float64 norms of the rounded rows.
    """
    import cupy as cp

    n, dim = x.shape
    assert dim <= FUSED_MAX_DIM and n_cand <= min(FUSED_MAX_K, n), "knn_device checks these"
    dim_pad = -(-dim // 8) * 8
    n_pad = -(-n // FUSED_QUERIES) * FUSED_QUERIES
    vecs = cp.zeros((n_pad, dim_pad), np.float32)
    vecs[:n, :dim] = round_tf32(_gemm_vectors(x.astype(np.float64, copy=False), code).astype(np.float32))
    norms64 = (vecs[:n].astype(np.float64) ** 2).sum(axis=1)
    norms = cp.full(n_pad, np.inf, np.float32)  # padding rows never pass a threshold
    norms[:n] = norms64
    end = n if end is None else end
    cand_key = cp.empty((end - first, n_cand), np.float32)
    cand_idx = cp.empty((end - first, n_cand), np.int64)
    kernel = _kernel("fused_candidates")
    shared = fused_shared_bytes(n_cand)
    kernel.max_dynamic_shared_size_bytes = shared
    cuda.launch(kernel, -(-(end - first) // FUSED_QUERIES), FUSED_THREADS, (
        vecs, norms, np.int64(n), np.int32(dim_pad), np.int32(n_cand), np.int64(first),
        np.int64(end), cand_key, cand_idx), shared_mem=shared)
    return cand_key, cand_idx, norms64


def _tile_candidates(x, rows, n_cand, code, gemm_dtype, query_block, ref_block):
    """K best (key, index) per query row from cuBLAS (or L1) tiles and ``topk_tile``.

    Returns the keys (ascending), the indices and the float64 norms of the product rows
    (None for manhattan, whose keys are exact).
    """
    import cupy as cp

    n, dim = x.shape
    n_q = int(rows.size)
    cand_key = cp.full((n_q, n_cand), np.inf, dtype=gemm_dtype)
    cand_idx = cp.full((n_q, n_cand), _NO_INDEX, dtype=np.int64)
    topk_tile = _kernel(cuda.template_name("topk_tile", gemm_dtype))
    block = 32 * WARPS_PER_BLOCK
    if code == METRICS["manhattan"]:
        manhattan = _kernel(cuda.template_name("manhattan_tile", x.dtype))
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
                cuda.launch(topk_tile, -(-(q1 - q0) // WARPS_PER_BLOCK), block, (
                    tile, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0),
                    np.uintp(0), np.uintp(0), np.int64(r0),
                    cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
        return cand_key, cand_idx, None
    vectors = cp.ascontiguousarray(_gemm_vectors(x.astype(np.float64, copy=False), code).astype(gemm_dtype))
    # Norms of the vectors the product sees, so only the product's rounding is left.
    v64 = vectors.astype(np.float64)
    norms64 = (v64 * v64).sum(axis=1)
    del v64
    norms = norms64.astype(gemm_dtype)
    vq_all, nq_all = vectors[rows], norms[rows]
    for q0 in range(0, n_q, query_block):
        q1 = min(q0 + query_block, n_q)
        for r0 in range(0, n, ref_block):
            r1 = min(r0 + ref_block, n)
            products = vq_all[q0:q1] @ vectors[r0:r1].T  # cuBLAS
            cuda.launch(topk_tile, -(-(q1 - q0) // WARPS_PER_BLOCK), block, (
                products, np.int64(q1 - q0), np.int64(r1 - r0), np.int64(r1 - r0),
                nq_all[q0:q1], norms[r0:r1], np.int64(r0),
                cand_key[q0:q1], cand_idx[q0:q1], np.int32(n_cand)))
    return cand_key, cand_idx, norms64


def _device_pass(x, rows, k, n_cand, code, precision, query_block, ref_block):
    """Candidates for the query ``rows`` with products in ``precision``, exact re-ranking and
    certification (as :func:`_host_pass`): indices, distances and the certified rows (bool)."""
    import cupy as cp

    n, dim = x.shape
    n_q = int(rows.size)
    if precision == "tf32":  # the fused pass takes a contiguous block of rows
        first = int(rows[0]) if n_q else 0  # synchronize!
        cand_key, cand_idx, norms64 = _fused_candidates(x, n_cand, code, first, first + n_q)
    else:
        cand_key, cand_idx, norms64 = _tile_candidates(x, rows, n_cand, code, np.dtype(precision),
                                                       query_block, ref_block)
    worst = cand_key[:, -1].astype(np.float64)
    if norms64 is None:
        err = cp.zeros(n_q, np.float64)  # direct float64 sums: no product error to bound
    else:
        lengths = cp.sqrt(norms64)
        err = candidate_bound(lengths, rows, cand_idx, dim, precision, worst)
    out_idx = cp.empty((n_q, k), np.int64)
    out_dist = cp.empty((n_q, k), np.float64)
    kth_key = cp.empty(n_q, np.float64)
    rerank = _kernel(cuda.template_name("rerank", x.dtype, cand_key.dtype))
    cuda.launch(rerank, -(-n_q // WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK, (
        x, np.int64(n), np.int64(dim), np.int32(code), rows, np.int64(n_q),
        cand_key, cand_idx, np.int32(n_cand), np.int32(k), err,
        out_idx, out_dist, kth_key))
    if norms64 is None or n_cand == n:  # exact sums, or every point a candidate
        return out_idx, out_dist, cp.full(n_q, True)
    certified = certify(kth_key, worst, lengths[rows], lengths.max(), dim, precision, code)
    return out_idx, out_dist, certified
