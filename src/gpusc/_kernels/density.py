"""``kernels/density.cu`` and its numba twin: Gaussian kernel sums at every point of a 2-D set.

tl.embedding_density evaluates scipy's ``gaussian_kde`` of a group's cells at those same
cells. With the points whitened by the KDE's Cholesky factor (``u = L⁻¹ x``, ``L Lᵀ`` the
bandwidth-scaled covariance, as scipy's ``gaussian_kernel_estimate`` does), the estimate at
point j is a constant times ``sums[j] = Σ_i exp(-|u_i - u_j|² / 2)``; the constant cancels in
scanpy's min-max scaling. Both backends leave out the terms with ``|u_i - u_j|² > CUTOFF_SQ``
(each below ``exp(-CUTOFF_SQ / 2)`` ≈ 1e-15; the self term is 1, so a sum changes by less than
n · 1e-15 relative: 1e-9 at a million cells), and neither holds the n × n matrix:

* host: a grid of square cells of side ``sqrt(CUTOFF_SQ)`` (points sorted by cell); each
  point sums over the 3 × 3 cells around its own (three contiguous runs of the sorted
  points) with a vectorised exponential, in parallel over points (the same result whatever
  the thread count). Visiting each pair once (half the exponentials, its terms added to
  both points' sums in per-slice buffers) measured 1.5x slower: the second addition keeps
  the loop from vectorising;
* device: ``kde_sums``, one thread per point, all points streamed through shared memory in
  tiles (brute force: ``n²`` pairs; no sorting).

Coordinates and sums are float64 (scipy's output dtype for float32 and float64 embeddings).
"""

from __future__ import annotations

import numba
import numpy as np

from .._core import cuda

CUTOFF_SQ = 69.0  # exp(-34.5) ≈ 1.0e-15
BLOCK = 256  # kernels/density.cu's DENSITY_TILE
NAME_EXPRESSIONS = ("kde_sums",)


def kde_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``Σ_i exp(-((x_i - x_j)² + (y_i - y_j)²) / 2)`` for every j (host arrays, numba)."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    y = np.ascontiguousarray(y, dtype=np.float64)
    n = x.size
    if n == 0:
        return np.empty(0)
    side = np.sqrt(CUTOFF_SQ)
    cx = np.floor((x - x.min()) / side).astype(np.int64)
    cy = np.floor((y - y.min()) / side).astype(np.int64)
    width = int(cy.max()) + 3  # a column of cells, with room for the neighbours at cy ± 1
    keys = (cx + 1) * width + (cy + 1)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    sums = np.empty(n)
    _kde_sums_grid(x[order], y[order], sorted_keys, width, CUTOFF_SQ, order, sums)
    return sums


@numba.njit(cache=True, parallel=True)
def _kde_sums_grid(xs, ys, keys, width, cutoff_sq, order, sums):
    """Points sorted by cell key (column-major: cells (cx, cy - 1..cy + 1) are neighbours in
    key order, so their points form one contiguous run); point j sums over the three runs of
    columns cx - 1, cx, cx + 1 and writes sums[order[j]]. One point per iteration: the result
    does not depend on the thread count."""
    n = xs.size
    for j in numba.prange(n):
        acc = 0.0
        for dx in range(-1, 2):
            centre = keys[j] + dx * width
            lo = np.searchsorted(keys, centre - 1)
            hi = np.searchsorted(keys, centre + 1, side="right")
            acc += _run_sum(xs, ys, xs[j], ys[j], lo, hi, cutoff_sq)
        sums[order[j]] = acc


@numba.njit(cache=True, fastmath={"reassoc"})
def _run_sum(xs, ys, xj, yj, lo, hi, cutoff_sq):
    """Σ over i in [lo, hi) of exp(-r²/2) for r² <= cutoff_sq. exp as (e^(t/64))^64 with a
    degree-11 Taylor polynomial on t/64 ∈ [-0.54, 0] (pure arithmetic, so the loop vectorises;
    libm's exp does not without SVML: 5x faster), relative error below 2e-14; "reassoc" lets
    the sum run in SIMD lanes (a fixed order for a given build)."""
    acc = 0.0
    for i in range(lo, hi):
        ex = xs[i] - xj
        ey = ys[i] - yj
        r2 = ex * ex + ey * ey
        t = r2 * (-0.5 / 64.0)
        p = 1.0 + t * (1.0 + t * (1.0 / 2 + t * (1.0 / 6 + t * (1.0 / 24 + t * (
            1.0 / 120 + t * (1.0 / 720 + t * (1.0 / 5040 + t * (1.0 / 40320 + t * (
                1.0 / 362880 + t * (1.0 / 3628800 + t * (1.0 / 39916800)))))))))))
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        p = p * p
        acc += p if r2 <= cutoff_sq else 0.0
    return acc


# ---------------------------------------------------------------- device

def kde_sums_device(x, y):
    """:func:`kde_sums` on the device (``kde_sums`` kernel); ``x``, ``y`` host or device
    float arrays. Returns a host float64 array. Device memory: 24 bytes per point."""
    import cupy as cp

    x = cp.ascontiguousarray(cp.asarray(x), dtype=np.float64)
    y = cp.ascontiguousarray(cp.asarray(y), dtype=np.float64)
    n = int(x.size)
    sums = cp.empty(n, np.float64)
    if n:
        kernel = cuda.get_kernel("density", NAME_EXPRESSIONS, "kde_sums")
        cuda.launch(kernel, -(-n // BLOCK), BLOCK,
                    (x, y, np.int64(n), np.float64(CUTOFF_SQ), sums))
    return sums.get()  # synchronize!
