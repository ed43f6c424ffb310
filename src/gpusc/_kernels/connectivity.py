"""``kernels/connectivity.cu`` and its numba twin: UMAP memberships (smooth_knn_dist).

For each point a binary search finds σ with Σ_j exp(−(d_j − ρ)/σ) = log2(k), ρ being its
distance to the nearest other point (umap-learn's ``smooth_knn_dist``, in float32 as
umap-learn computes it); the membership of each neighbour is then
exp(−(d_j − ρ)/σ). The fuzzy union w + wᵀ − w∘wᵀ runs on sparse matrices (SciPy on the
host, CuPy on the device).
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import sparse

from .._core import cuda
from . import prange_only

N_ITER = 64
SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3
FLOAT32_MAX = float(np.finfo(np.float32).max)
BLOCK = 256
NAME_EXPRESSIONS = ("umap_memberships",)


# ---------------------------------------------------------------- host (numba)

def umap_memberships_host(knn_idx: np.ndarray, knn_dist: np.ndarray, *,
                          local_connectivity: float = 1.0):
    """Membership strengths (n, k) float32, sigmas and rhos (n,) float32."""
    dist32 = np.ascontiguousarray(knn_dist, dtype=np.float32)
    idx = np.ascontiguousarray(knn_idx, dtype=np.int64)
    target = float(np.log2(idx.shape[1]))
    mean_all = _mean32(dist32.reshape(-1))
    return _memberships(idx, dist32, target, np.float32(mean_all), float(local_connectivity))


@numba.njit(cache=True)
def _mean32(values):
    # umap-learn takes np.mean inside numba: a float32 running sum (kept for parity)
    return np.mean(values)


@numba.njit(parallel=prange_only(), cache=True)
def _memberships(idx, dist, target, mean_all, local_connectivity):
    n, k = dist.shape
    sigmas = np.zeros(n, np.float32)
    rhos = np.zeros(n, np.float32)
    vals = np.zeros((n, k), np.float32)
    # the row's work is a function of its own: numba's parallel passes then see a one-line
    # loop body, which compiles in a fraction of the time of the same code inlined in the loop
    for i in numba.prange(n):
        # np.int64(i): prange's own index is unsigned inside its thread function, which
        # would compile _membership_row a second time
        sigmas[i], rhos[i] = _membership_row(np.int64(i), idx[i], dist[i], target, mean_all,
                                             local_connectivity, vals[i])
    return vals, sigmas, rhos


# No float32 ``locals=``: umap-learn declares them, but numba's SSA renames the variables its
# loops reassign, so they do not apply and its sums run in float64, as here (the same sigmas,
# bit for bit; with the declarations in force 10 of 600 differ in the last bit).
@numba.njit(cache=True)
def _membership_row(i, idx, row, target, mean_all, local_connectivity, vals):
    """Point i's memberships into vals (k) from its sorted distances ``row``; returns its
    sigma and rho."""
    k = row.size
    # rho: the local_connectivity-th positive distance (interpolated), row sorted ascending
    n_pos = 0
    for j in range(k):
        n_pos += row[j] > 0.0
    positive = np.empty(n_pos, np.float32)
    p = 0
    for j in range(k):
        if row[j] > 0.0:
            positive[p] = row[j]
            p += 1
    rho = 0.0
    if n_pos >= local_connectivity:
        index = int(np.floor(local_connectivity))
        interpolation = local_connectivity - index
        if index > 0:
            rho = positive[index - 1]
            if interpolation > SMOOTH_K_TOLERANCE:
                rho += interpolation * (positive[index] - positive[index - 1])
        else:
            rho = interpolation * positive[0]
    elif n_pos > 0:
        rho = positive.max()
    lo, hi, mid = 0.0, FLOAT32_MAX, 1.0
    for _ in range(N_ITER):
        psum = 0.0
        for j in range(1, k):
            d = row[j] - rho
            if d > 0:
                psum += np.exp(-(d / mid))
            else:
                psum += 1.0
        if np.fabs(psum - target) < SMOOTH_K_TOLERANCE:
            break
        if psum > target:
            hi = mid
            mid = (lo + hi) / 2.0
        else:
            lo = mid
            mid = mid * 2 if hi >= FLOAT32_MAX else (lo + hi) / 2.0
    sigma = mid
    floor = MIN_K_DIST_SCALE * (np.mean(row) if rho > 0.0 else mean_all)
    if sigma < floor:
        sigma = floor
    for j in range(k):
        if idx[j] == i:
            vals[j] = 0.0
        elif row[j] - rho <= 0.0 or sigma == 0.0:
            vals[j] = 1.0
        else:
            vals[j] = np.exp(-((row[j] - rho) / sigma))
    return sigma, rho


def fuzzy_union_host(knn_idx: np.ndarray, vals: np.ndarray, n_obs: int) -> sparse.csr_matrix:
    """w + wᵀ − w∘wᵀ of the directed membership graph, float32 CSR with sorted indices."""
    n, k = knn_idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    w = sparse.coo_matrix((vals.reshape(-1), (rows, knn_idx.reshape(-1))), shape=(n_obs, n_obs))
    w = w.tocsr()
    w.eliminate_zeros()
    wt = w.T.tocsr()
    union = (w + wt - w.multiply(wt)).tocsr()
    union.eliminate_zeros()
    union.sort_indices()
    return union


# ---------------------------------------------------------------- device

def umap_connectivities_device(knn_idx: np.ndarray, knn_dist: np.ndarray, n_obs: int, *,
                               local_connectivity: float = 1.0) -> sparse.csr_matrix:
    """The UMAP graph computed on the GPU from host kNN arrays; returns a host CSR."""
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse

    n, k = knn_idx.shape
    idx = cp.asarray(np.ascontiguousarray(knn_idx, dtype=np.int64))
    dist = cp.asarray(np.ascontiguousarray(knn_dist, dtype=np.float32))
    mean_all = np.float32(float(dist.astype(np.float64).mean()))  # synchronize!
    vals = cp.empty((n, k), np.float32)
    sigmas = cp.empty(n, np.float32)
    rhos = cp.empty(n, np.float32)
    kernel = cuda.get_kernel("connectivity", NAME_EXPRESSIONS, "umap_memberships")
    cuda.launch(kernel, -(-n // BLOCK), BLOCK, (
        idx, dist, np.int64(n), np.int32(k), np.float64(np.log2(k)), mean_all,
        np.float32(local_connectivity), np.int32(N_ITER), sigmas, rhos, vals))
    rows = cp.repeat(cp.arange(n, dtype=np.int32), k)
    w = cpsparse.coo_matrix((vals.ravel(), (rows, idx.ravel().astype(np.int32))),
                            shape=(n_obs, n_obs)).tocsr()
    w.eliminate_zeros()
    wt = w.T.tocsr()
    union = (w + wt - w.multiply(wt)).tocsr()
    union.eliminate_zeros()
    union.sort_indices()
    return union.get()  # synchronize!
