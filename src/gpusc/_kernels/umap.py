"""``kernels/umap.cu`` and its numba twin: umap-learn's layout optimiser, made reproducible.

The algorithm is umap-learn's ``optimize_layout_euclidean`` (0.5): every directed edge
(head, tail) of the graph is sampled every ``epochs_per_sample`` epochs; a sample pulls
head and tail together (move_other) and pushes the head away from
``negative_sample_rate`` random vertices per sample; every coordinate move is clipped to
±4 and scaled by the learning rate, which umap-learn lowers after each epoch: epoch e ≥ 1
runs at ``alpha · (1 − (e − 1) / n_epochs)`` (epoch 0 samples no edge: every first sample
is due at epoch ≥ 1).

Two differences, both for reproducibility:

* Moves are synchronous per epoch: every sample of an epoch is computed from the
  embedding as it was at the start of the epoch, summed per vertex, and added at the end
  of the epoch (umap-learn applies each move at once, racing between threads). The sum is
  taken in 64-bit fixed point (units of 2^-32) with integer atomics, so it is exact and
  independent of the order of the threads: same graph, start and seed give the identical
  embedding, run to run, on the GPU and on the CPU. The two backends evaluate ``pow`` with
  different libraries, so they agree closely but not bit for bit.
* Negative samples come from a counter-based hash of (seed, epoch, edge, sample), not
  from a per-vertex Tausworthe state; the CPU twin draws the very same vertices.

And one for speed: distances and the attraction and repulsion coefficients are float32
(umap-learn takes a float32 distance to a float64 ``pow``). ``pow`` is most of a sample's
cost and float32's is twice as fast on the CPU; the layout's quality against umap-learn's
is tested (tests/test_tl_umap.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
from scipy import sparse

from .._core import cuda
from . import prange_only

NAME_EXPRESSIONS = (
    *(cuda.template_name("umap_epoch", i) for i in (np.int32, np.int64)),
    "umap_apply",
    *(cuda.template_name("umap_link", i) for i in (np.int32, np.int64)),
)
FIXED_SCALE = 4294967296.0  # kernels/umap.cu's UMAP_FIXED_SCALE
CLIP = 4.0
_CLIP32 = np.float32(CLIP)
BLOCK = 256

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_TWO_32 = 2**32


# ---------------------------------------------------------------- the layout graph (host)

def drop_weak_edges(graph: sparse.csr_matrix, cut) -> sparse.csr_matrix:
    """``graph`` without the entries below ``cut`` and the explicit zeros: umap-learn's
    pruning of edges too weak to be sampled (``data[data < cut] = 0; eliminate_zeros()``).

    ``graph`` must be canonical (sorted, no duplicates); the result keeps its entries'
    order and is canonical too. ``cut`` is compared in the data's dtype (pass a NumPy
    scalar of that dtype). Without anything to drop ``graph`` itself is returned, no copy.
    """
    indptr, indices, data = graph.indptr, graph.indices, graph.data
    cut = data.dtype.type(cut)
    kept = np.zeros(indptr.size, indptr.dtype)
    _count_strong(indptr, data, cut, kept[1:])
    np.cumsum(kept, out=kept)
    if kept[-1] == data.size:
        return graph
    out_indices = np.empty(kept[-1], indices.dtype)
    out_data = np.empty(kept[-1], data.dtype)
    _copy_strong(indptr, indices, data, cut, kept, out_indices, out_data)
    out = sparse.csr_matrix((out_data, out_indices, kept), shape=graph.shape, copy=False)
    out.has_canonical_format = True
    return out


@numba.njit(parallel=prange_only(), cache=True)
def _count_strong(indptr, data, cut, counts):
    for i in numba.prange(indptr.size - 1):
        k = 0
        for p in range(indptr[i], indptr[i + 1]):
            v = data[p]
            k += not (v < cut) and v != 0  # NaN stays, as with eliminate_zeros
        counts[i] = k


@numba.njit(parallel=prange_only(), cache=True)
def _copy_strong(indptr, indices, data, cut, out_indptr, out_indices, out_data):
    for i in numba.prange(indptr.size - 1):
        q = out_indptr[i]
        for p in range(indptr[i], indptr[i + 1]):
            v = data[p]
            if not (v < cut) and v != 0:
                out_indices[q] = indices[p]
                out_data[q] = v
                q += 1


def epochs_per_sample(weights: np.ndarray, n_epochs: int) -> np.ndarray:
    """umap-learn's make_epochs_per_sample: n_epochs / (n_epochs · w / max w); −1 for w = 0."""
    weights = np.asarray(weights, dtype=np.float64)
    out = np.full(weights.shape[0], -1.0)
    if weights.size == 0 or n_epochs <= 0:
        return out
    n_samples = n_epochs * (weights / weights.max())
    pos = n_samples > 0
    out[pos] = float(n_epochs) / n_samples[pos]
    return out


def seed_from(random_state: np.random.RandomState) -> int:
    """A 64-bit hash seed drawn from a RandomState (umap-learn draws its rng_state there too)."""
    hi, lo = random_state.randint(np.iinfo(np.int32).min, np.iinfo(np.int32).max, 2)
    return ((int(hi) & 0xFFFFFFFF) << 32) | (int(lo) & 0xFFFFFFFF)


def _prepare(embedding, head, tail, eps, negative_sample_rate):
    emb = np.ascontiguousarray(embedding, dtype=np.float32).copy()
    n_edges = int(np.asarray(head).size)
    index = np.int64 if emb.shape[0] > np.iinfo(np.int32).max else np.int32
    head = np.ascontiguousarray(head, dtype=index)
    tail = np.ascontiguousarray(tail, dtype=index)
    eps = np.ascontiguousarray(eps, dtype=np.float64)
    if head.shape != (n_edges,) or tail.shape != (n_edges,) or eps.shape != (n_edges,):
        raise ValueError("head, tail and epochs_per_sample must be 1-D arrays of one length")
    keep = eps > 0  # edges of weight 0 are never sampled (umap-learn prunes them first)
    if not keep.all():
        head, tail, eps = head[keep], tail[keep], eps[keep]
    # umap-learn: negative samples every epochs_per_sample / negative_sample_rate epochs;
    # with a rate of 0 a huge finite period keeps the sample count at 0 (no inf/inf)
    eps_neg = eps / float(negative_sample_rate) if negative_sample_rate > 0 else np.full_like(eps, 1e300)
    return emb, head, tail, eps, eps_neg


# ---------------------------------------------------------------- host (numba)

def optimize_layout_host(embedding, head, tail, eps, n_epochs: int, a: float, b: float,
                         gamma: float, alpha: float, negative_sample_rate: float,
                         seed: int) -> np.ndarray:
    """The layout after ``n_epochs`` epochs, as a new float32 (n, dim) array.

    ``eps`` are the epochs per sample of each edge (:func:`epochs_per_sample`); edges
    with eps ≤ 0 are never sampled. Each epoch splits the edges into one block per numba
    thread, each adding its moves to its own int64 accumulator, then sums the accumulators
    into the embedding: integer sums do not depend on their order, so the layout is the
    same for any number of threads (and the same as the CUDA kernel's).
    """
    emb, head, tail, eps, eps_neg = _prepare(embedding, head, tail, eps, negative_sample_rate)
    n_blocks = max(1, min(numba.get_num_threads(), head.size // 1024))
    _optimize_host(emb, head, tail, eps, eps_neg, int(n_epochs), float(a), float(b),
                   float(gamma), float(alpha), np.uint64(seed), n_blocks)
    return emb


@numba.njit(cache=True, inline="always")
def _mix64(z):
    z = z + _M1
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _edge_hash(seed, epoch, edge):
    """The hash of (seed, epoch, edge) that an edge's negative samples of the epoch share."""
    return _mix64(_mix64(_mix64(seed) ^ np.uint64(epoch)) ^ np.uint64(edge))


@numba.njit(cache=True, inline="always")
def _negative_vertex(edge_hash, sample, n_vertices):
    """A vertex in [0, n): the top 32 bits of the hash scaled to n (a multiply, not a
    division) while n < 2^32, else the hash modulo n."""
    h = _mix64(edge_hash ^ np.uint64(sample))
    if n_vertices < _TWO_32:
        return np.int64(((h >> np.uint64(32)) * np.uint64(n_vertices)) >> np.uint64(32))
    return np.int64(h % np.uint64(n_vertices))


@numba.njit(cache=True, inline="always")
def _clip(v):
    return _CLIP32 if v > _CLIP32 else (-_CLIP32 if v < -_CLIP32 else v)


@numba.njit(cache=True, inline="always")
def _rdist(emb, j, k):
    d2 = np.float32(0.0)
    for d in range(emb.shape[1]):
        diff = emb[j, d] - emb[k, d]
        d2 += diff * diff
    return d2


@numba.njit(cache=True, inline="always")
def _fixed(move):
    return np.int64(np.floor(move * FIXED_SCALE + 0.5))


@numba.njit(parallel=prange_only(), cache=True)
def _optimize_host(emb, head, tail, eps, eps_neg, n_epochs, a, b, gamma, alpha0, seed, n_blocks):
    n_vertices, dim = emb.shape
    n_edges = head.shape[0]
    acc = np.zeros((n_blocks, n_vertices, dim), np.int64)  # one accumulator per block of edges
    next_sample = eps.copy()
    next_negative = eps_neg.copy()
    for epoch in range(n_epochs):
        alpha = alpha0 * (1.0 - float(max(epoch - 1, 0)) / float(n_epochs))  # as umap-learn
        n = float(epoch)
        for block in numba.prange(n_blocks):
            _epoch_edges(emb, head, tail, eps, eps_neg, next_sample, next_negative, acc[block],
                         n_edges * block // n_blocks, n_edges * (block + 1) // n_blocks,
                         epoch, n, alpha, a, b, gamma, seed)
        for i in numba.prange(n_vertices):
            _apply_moves(emb, acc, np.int64(i))  # int64: one compilation (prange's index is unsigned)


@numba.njit(cache=True)
def _apply_moves(emb, acc, i):
    """Vertex i's moves of the epoch, summed over the blocks' accumulators (which it zeroes),
    added to its coordinates. A function of its own: numba's parallel passes compile a
    one-line loop body much faster than the same code inlined in it."""
    for d in range(emb.shape[1]):
        q = np.int64(0)
        for block in range(acc.shape[0]):
            q += acc[block, i, d]
            acc[block, i, d] = 0
        if q != 0:
            emb[i, d] = np.float32(np.float64(emb[i, d]) + np.float64(q) * (1.0 / FIXED_SCALE))


@numba.njit(cache=True)
def _epoch_edges(emb, head, tail, eps, eps_neg, next_sample, next_negative, acc, first, stop,
                 epoch, n, alpha, a, b, gamma, seed):
    """One epoch's moves of the edges first..stop-1, added to ``acc`` (emb is only read)."""
    n_vertices, dim = emb.shape
    a32, b32 = np.float32(a), np.float32(b)
    attract = np.float32(-2.0 * a * b)
    repulse = np.float32(2.0 * gamma * b)
    one = np.float32(1.0)
    for e in range(first, stop):
        if next_sample[e] > n:
            continue
        j = np.int64(head[e])
        k = np.int64(tail[e])
        d2 = _rdist(emb, j, k)
        coeff = np.float32(0.0)
        if d2 > 0.0:
            power = d2 ** (b32 - one)  # d2^(b-1); d2^b is one product more, not a second pow
            coeff = attract * power / (a32 * (power * d2) + one)
        for d in range(dim):
            g = np.float64(_clip(coeff * (emb[j, d] - emb[k, d]))) * alpha
            acc[j, d] += _fixed(g)
            acc[k, d] += _fixed(-g)
        next_sample[e] += eps[e]
        n_neg = np.int64((n - next_negative[e]) / eps_neg[e])
        edge_hash = _edge_hash(seed, epoch, e)
        for p in range(n_neg):
            kk = _negative_vertex(edge_hash, p, n_vertices)
            if kk == j:
                continue
            d2 = _rdist(emb, j, kk)
            if d2 <= 0.0:
                continue
            coeff = repulse / ((np.float32(0.001) + d2) * (a32 * d2 ** b32 + one))
            for d in range(dim):
                g = np.float64(_clip(coeff * (emb[j, d] - emb[kk, d]))) * alpha
                acc[j, d] += _fixed(g)
        next_negative[e] += np.float64(n_neg) * eps_neg[e]


# ---------------------------------------------------------------- device (CuPy + kernels/umap.cu)

def _kernel(name: str):
    return cuda.get_kernel("umap", NAME_EXPRESSIONS, name)


def optimize_layout_device(embedding, head, tail, eps, n_epochs: int, a: float, b: float,
                           gamma: float, alpha: float, negative_sample_rate: float,
                           seed: int) -> np.ndarray:
    """:func:`optimize_layout_host` on the GPU; takes and returns host arrays.

    Device memory: the embedding (n·dim·4 bytes), its int64 accumulator (n·dim·8) and per
    edge head, tail and four float64 schedules (E·(2·4 + 32) bytes for int32 indices).
    Two launches per epoch, no host synchronisation inside the loop.
    """
    import cupy as cp

    emb_h, head_h, tail_h, eps_h, eps_neg_h = _prepare(embedding, head, tail, eps,
                                                       negative_sample_rate)
    return _epochs_device(cp.asarray(emb_h), cp.asarray(head_h), cp.asarray(tail_h),
                          cp.asarray(eps_h), cp.asarray(eps_neg_h), n_epochs, a, b, gamma, alpha,
                          seed)


class DeviceGraph(NamedTuple):
    """A CSR graph's arrays on the device (indptr and indices of one integer dtype)."""

    indptr: Any
    indices: Any
    weights: Any
    n_vertices: int


def graph_to_device(graph: sparse.csr_matrix) -> DeviceGraph:
    """Copy a host CSR graph to the device once, for the spectral start and the layout."""
    import cupy as cp

    index = np.result_type(graph.indptr, graph.indices)
    return DeviceGraph(cp.asarray(graph.indptr.astype(index, copy=False)),
                       cp.asarray(graph.indices.astype(index, copy=False)),
                       cp.asarray(graph.data), int(graph.shape[0]))


def optimize_layout_device_csr(embedding, graph: DeviceGraph, n_epochs: int, a: float, b: float,
                               gamma: float, alpha: float, negative_sample_rate: float,
                               seed: int) -> np.ndarray:
    """:func:`optimize_layout_device` for the edges of a device CSR graph in their stored
    order (what tl.umap passes the twin as COO rows and columns): heads, tails and
    epochs per sample are made on the device, the host only sends the start.

    Device memory: besides :func:`optimize_layout_device`'s, an int64 edge counter (E·8
    bytes) while the heads are found.
    """
    import cupy as cp

    emb = cp.asarray(np.ascontiguousarray(embedding, dtype=np.float32))
    n_vertices = emb.shape[0]
    n_edges = int(graph.indices.size)
    index = np.int64 if n_vertices > np.iinfo(np.int32).max else np.int32  # as _prepare
    head = cp.searchsorted(graph.indptr[1:], cp.arange(n_edges), side="right").astype(index)
    tail = graph.indices.astype(index, copy=False)
    eps = _epochs_per_sample_device(cp, graph.weights, n_epochs)
    keep = eps > 0  # as _prepare: edges of weight 0 are never sampled
    if not bool(keep.all()):  # synchronize!
        head, tail, eps = head[keep], tail[keep], eps[keep]
    if negative_sample_rate > 0:
        eps_neg = eps / float(negative_sample_rate)
    else:
        eps_neg = cp.full(eps.shape, 1e300)
    return _epochs_device(emb, head, tail, eps, eps_neg, n_epochs, a, b, gamma, alpha, seed)


def _epochs_per_sample_device(xp, weights, n_epochs: int):
    """:func:`epochs_per_sample` with device arrays, the same float64 operations in the same
    order (IEEE division and products), so the same numbers."""
    w = weights.astype(np.float64)
    if w.size == 0 or n_epochs <= 0:
        return xp.full(w.shape, -1.0)
    n_samples = n_epochs * (w / w.max())
    positive = n_samples > 0
    return xp.where(positive, float(n_epochs) / xp.where(positive, n_samples, 1.0), -1.0)


def _epochs_device(emb, head_d, tail_d, eps_d, eps_neg_d, n_epochs, a, b, gamma, alpha, seed):
    """The epoch loop of both device entries; returns the host embedding."""
    import cupy as cp

    n_vertices, dim = emb.shape
    n_edges = int(head_d.size)
    acc = cp.zeros(emb.shape, np.int64)
    next_sample, next_negative = eps_d.copy(), eps_neg_d.copy()
    epoch_kernel = _kernel(cuda.template_name("umap_epoch", head_d.dtype))
    apply_kernel = _kernel("umap_apply")
    size = n_vertices * dim
    for epoch in range(int(n_epochs)):
        rate = float(alpha) * (1.0 - float(max(epoch - 1, 0)) / float(n_epochs))  # as umap-learn
        cuda.launch(epoch_kernel, -(-n_edges // BLOCK), BLOCK, (
            emb, acc, head_d, tail_d, np.int64(n_edges), np.int32(dim), np.int64(n_vertices),
            eps_d, eps_neg_d, next_sample, next_negative, np.float64(a), np.float64(b),
            np.float64(gamma), np.float64(rate), np.int64(epoch), np.uint64(seed)))
        cuda.launch(apply_kernel, -(-size // BLOCK), BLOCK, (emb, acc, np.int64(size)))
    return emb.get()  # synchronize!


def weak_components_host(graph: sparse.spmatrix | sparse.sparray) -> int:
    """The number of weakly connected components of a host graph (CSR or COO, as stored):
    scipy's ``connected_components(graph)``'s count, without the labels; umap_link's
    union-find on one thread (scipy's search takes 0.77 s on a 1M-vertex graph of 30M edges on
    this 2-core machine, this 0.12 s)."""
    n = graph.shape[0]
    if graph.shape[1] != n:
        raise ValueError(f"the graph is not square: {graph.shape}")
    if graph.format == "coo":
        return int(_weak_components_edges(graph.row, graph.col, n))
    if graph.format != "csr":
        graph = sparse.csr_matrix(graph)
    return int(_weak_components_csr(graph.indptr, graph.indices, n))


@numba.njit(cache=True, inline="always")
def _link(parent, a, b):
    # joins the trees of a and b (the larger root under the smaller, as umap_link, halving
    # the paths on the way up); True when they were two trees
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    while parent[b] != b:
        parent[b] = parent[parent[b]]
        b = parent[b]
    if a == b:
        return False
    parent[max(a, b)] = min(a, b)
    return True


@numba.njit(cache=True)
def _weak_components_csr(indptr, indices, n):
    parent = np.arange(n, dtype=np.int64)
    roots = n
    for row in range(n):
        for e in range(indptr[row], indptr[row + 1]):
            roots -= _link(parent, row, indices[e])
    return roots


@numba.njit(cache=True)
def _weak_components_edges(rows, cols, n):
    parent = np.arange(n, dtype=np.int64)
    roots = n
    for e in range(rows.size):
        roots -= _link(parent, rows[e], cols[e])
    return roots


def weak_components_device(graph: DeviceGraph) -> int:
    """The number of weakly connected components of a device graph (``umap_link``'s
    union-find): scipy's ``connected_components(graph)``'s count, without the labels.

    Device memory: one parent per vertex (n·4 bytes, n·8 past 2^31 vertices or edges).
    """
    import cupy as cp

    n = graph.n_vertices
    index = graph.indptr.dtype
    parent = cp.arange(n, dtype=index)
    kernel = _kernel(cuda.template_name("umap_link", index))
    cuda.launch(kernel, -(-n // BLOCK), BLOCK, (graph.indptr, graph.indices, np.int64(n), parent))
    return int((parent == cp.arange(n, dtype=index)).sum())  # synchronize!


def spectral_init_device(graph: DeviceGraph, dim: int):
    """The ``dim`` leading non-trivial eigenvectors of D^-1/2 A D^-1/2 (cupyx eigsh), as
    umap-learn's spectral_layout for a connected graph; ``None`` when the graph is not
    connected (the caller then uses umap-learn's per-component layout on the host).
    The connectivity test runs on the device (:func:`weak_components_device`).
    """
    n = graph.n_vertices
    if dim + 1 >= n or weak_components_device(graph) > 1:
        return None
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse
    from cupyx.scipy.sparse import linalg as cplinalg

    a = cpsparse.csr_matrix((graph.weights.astype(cp.float64), graph.indices, graph.indptr),
                            shape=(n, n))
    deg = cp.asarray(a.sum(axis=1)).ravel()
    inv_sqrt = 1.0 / cp.sqrt(deg)
    d = cpsparse.diags(inv_sqrt)
    m = d @ a @ d
    # umap-learn's start vector (ones): cupyx's default is cupy.random's unseeded draw, which
    # made two runs on the same graph differ (seen on an H200)
    vals, vecs = cplinalg.eigsh(m, k=dim + 1, which="LA", v0=cp.ones(n, cp.float64), tol=1e-4, maxiter=n * 5)
    order = cp.argsort(vals)[::-1][1:dim + 1]  # largest of M = smallest of the Laplacian
    return vecs[:, order].get()  # synchronize!
