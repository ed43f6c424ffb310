"""``kernels/tsne.cu`` and its numba twin: t-SNE's gradient with the repulsion interpolated on a
grid and convolved by FFT (the method of FIt-SNE, Linderman et al. 2019), for tl.tsne on the
device without cuML.

The embedding is 2-D; the affinities (sklearn's binary search, ``tsne_perplexity``) and the
optimiser (sklearn's two phases, :func:`optimize`) are sklearn's. Each step needs, for every point i (w_ij = 1 / (1 + |y_i - y_j|²)):

* the attraction ``Σ_j p_ij w_ij (y_i - y_j)`` over the stored entries of the symmetric P
  (one row of P per point, in CSR order: a fixed order);
* the repulsion ``Σ_j w_ij² (y_i - y_j) = y_i φ1_i - φy_i`` with ``φ1 = Σ_j w_ij²`` and
  ``φy = Σ_j w_ij² y_j``, and ``Z = Σ_{i≠j} w_ij = Σ_i φZ_i - n`` with ``φZ = Σ_j w_ij``.

The potentials φ are sums over all points of a smooth kernel; they are computed on a square
grid of nodes (spacing at most 1 / NODES_PER_UNIT, at least MIN_NODES a side): each point
spreads its charges (1, y_x, y_y) onto the 3 x 3 nodes around it with quadratic Lagrange
weights, the node charges are convolved with the two kernels (1 / (1 + r²)² and 1 / (1 + r²))
by FFT, and each point reads its potentials back with the same weights. Charges are added in
fixed point (FIXED_SCALE), so the node sums are the same integers in any order: on the device
the atomics of many threads give the twin's result exactly.
"""

from __future__ import annotations

import types

import numba
import numpy as np

from .._core import cuda
from . import prange_only

NODES_PER_UNIT = 3  # grid spacing at most 1/3 (FIt-SNE: 3 nodes per interval of width <= 1)
MIN_NODES = 60  # nodes a side at least (a small early embedding still gets a fine grid)
PAD = 2  # nodes beyond the points on each side (the 3 x 3 stencil reaches one node out)
# charges x weights in fixed point: resolution 6e-8 per addition; a node's sum stays below
# 2**63 while the charges it gathers add up to less than 5e11 in magnitude (a million points
# a thousand units from the centre: 1e9)
FIXED_SCALE = 2.0**24
N_CHARGES = 3  # 1, y_x, y_y
BLOCK = 256
NAME_EXPRESSIONS = ("tsne_perplexity", "tsne_spread", "tsne_gather", "tsne_attract")


def grid_of(lo, hi) -> tuple[float, float, float, int]:
    """(x of node 0, y of node 0, spacing, nodes a side) of the grid that holds points within
    the box ``lo``..``hi`` (2 host floats each): square, at least PAD nodes beyond the box on
    each side, and a node count whose double (the padded FFT's size) factors into 2, 3 and 5
    (an FFT of a prime size takes many times longer: 626 = 2 x 313 took 13 ms a transform
    here, 640 3 ms)."""
    from scipy.fft import next_fast_len

    extent = float(max(hi[0] - lo[0], hi[1] - lo[1]))
    inner = max(MIN_NODES, int(np.ceil(extent * NODES_PER_UNIT)))
    spacing = extent / inner if extent > 0 else 1.0
    size = next_fast_len(2 * (inner + 2 * PAD + 1), real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return float(lo[0]) - PAD * spacing, float(lo[1]) - PAD * spacing, spacing, size // 2


def _fft(xp):
    """scipy.fft on the host (its transforms on all of numba's threads), cupyx's on the device."""
    if xp is np:
        import functools

        import scipy.fft

        workers = numba.get_num_threads()
        return types.SimpleNamespace(rfft2=functools.partial(scipy.fft.rfft2, workers=workers),
                                     irfft2=functools.partial(scipy.fft.irfft2, workers=workers))
    import cupyx.scipy.fft

    return cupyx.scipy.fft


def kernel_spectra(nodes: int, spacing: float, xp=np):
    """The real FFTs of the two kernels, 1 / (1 + r²)² and 1 / (1 + r²), tabulated at the node
    offsets of a (2 nodes) x (2 nodes) periodic grid (offset a at index a mod 2 nodes), for
    the zero-padded circular convolution: (2, 2 nodes, nodes + 1) complex64 (single
    precision: its rounding, ~1e-6 relative, is far below the interpolation's)."""
    size = 2 * nodes
    offsets = xp.arange(size, dtype=xp.float64)
    offsets = xp.where(offsets < nodes, offsets, offsets - size) * spacing
    r2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    w = (1.0 / (1.0 + r2)).astype(xp.float32)
    return _fft(xp).rfft2(xp.stack([w * w, w]))


def convolve(charges, spectra, xp=np):
    """Potentials at the nodes: (N_CHARGES + 1, nodes, nodes) float32 from the node charges
    (N_CHARGES, nodes, nodes) int64 fixed point: the three charges with 1 / (1 + r²)², the
    first (the point counts) also with 1 / (1 + r²)."""
    fft = _fft(xp)
    n_charges, nodes, _ = charges.shape
    size = 2 * nodes
    padded = xp.zeros((n_charges, size, size), xp.float32)
    padded[:, :nodes, :nodes] = charges * (1.0 / FIXED_SCALE)
    spectrum = fft.rfft2(padded)
    products = xp.concatenate([spectrum * spectra[0], (spectrum[0] * spectra[1])[None]])
    return fft.irfft2(products, s=(size, size))[:, :nodes, :nodes]


@numba.njit(cache=True, inline="always")
def _weights(u):
    # the nearest node m and the quadratic Lagrange weights of nodes m - 1, m, m + 1 at u
    m = np.int64(np.floor(u + 0.5))
    t = u - m
    return m, 0.5 * t * (t - 1.0), (1.0 - t) * (1.0 + t), 0.5 * t * (t + 1.0)


@numba.njit(cache=True, inline="always")
def _stencil(y, i, x0, y0, spacing, gx, gy, w):
    # point i's 3 x 3 nodes and weights, x node first (kernels/tsne.cu's tsne_stencil)
    mx, ax0, ax1, ax2 = _weights((y[i, 0] - x0) / spacing)
    my, ay0, ay1, ay2 = _weights((y[i, 1] - y0) / spacing)
    wx = (ax0, ax1, ax2)
    wy = (ay0, ay1, ay2)
    for a in range(3):
        for b in range(3):
            w[3 * a + b] = wx[a] * wy[b]
            gx[3 * a + b] = mx - 1 + a
            gy[3 * a + b] = my - 1 + b


@numba.njit(cache=True)
def spread_host(y, x0, y0, spacing, nodes, charges):
    """charges (N_CHARGES, nodes, nodes) int64 += each point's (1, y_x, y_y) times its 3 x 3
    weights, in fixed point (kernels/tsne.cu's tsne_spread)."""
    gx, gy, w = np.empty(9, np.int64), np.empty(9, np.int64), np.empty(9)
    for i in range(y.shape[0]):
        _stencil(y, i, x0, y0, spacing, gx, gy, w)
        for s in range(9):
            charges[0, gx[s], gy[s]] += np.int64(np.rint(w[s] * FIXED_SCALE))
            charges[1, gx[s], gy[s]] += np.int64(np.rint(w[s] * y[i, 0] * FIXED_SCALE))
            charges[2, gx[s], gy[s]] += np.int64(np.rint(w[s] * y[i, 1] * FIXED_SCALE))


@numba.njit(cache=True, parallel=prange_only())
def gather_host(y, x0, y0, spacing, potentials, repulsion, phi_z):
    """Each point's repulsion y φ1 - φy (n, 2) and φZ (n,) from the node potentials, with the
    weights it spread with (kernels/tsne.cu's tsne_gather)."""
    for i in numba.prange(y.shape[0]):
        gx, gy, w = np.empty(9, np.int64), np.empty(9, np.int64), np.empty(9)
        _stencil(y, i, x0, y0, spacing, gx, gy, w)
        phi = np.zeros(4)
        for s in range(9):
            for c in range(4):
                phi[c] += w[s] * potentials[c, gx[s], gy[s]]
        repulsion[i, 0] = y[i, 0] * phi[0] - phi[1]
        repulsion[i, 1] = y[i, 1] * phi[0] - phi[2]
        phi_z[i] = phi[3]


@numba.njit(cache=True, parallel=prange_only())
def attract_host(indptr, indices, p, y, out):
    """out (n, 2) = Σ_j p_ij w_ij (y_i - y_j) over row i of P (kernels/tsne.cu's tsne_attract)."""
    for i in numba.prange(indptr.size - 1):
        fx = 0.0
        fy = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            j = indices[e]
            dx = y[i, 0] - y[j, 0]
            dy = y[i, 1] - y[j, 1]
            pw = p[e] / (1.0 + dx * dx + dy * dy)
            fx += pw * dx
            fy += pw * dy
        out[i, 0] = fx
        out[i, 1] = fy


class HostSteps:
    """The per-point pieces on host arrays (numba; sklearn's own binary search)."""

    xp = np

    @staticmethod
    def affinities(sqdist: np.ndarray, perplexity: float) -> np.ndarray:
        """Each row's conditional probabilities (n, k) float64 from its neighbours' squared
        distances (n, k) float32: sklearn's _binary_search_perplexity itself."""
        from sklearn.manifold._utils import _binary_search_perplexity

        return np.asarray(_binary_search_perplexity(sqdist, perplexity, 0))

    @staticmethod
    def spread(y, x0, y0, spacing, nodes):
        charges = np.zeros((N_CHARGES, nodes, nodes), np.int64)
        spread_host(y, x0, y0, spacing, nodes, charges)
        return charges

    @staticmethod
    def gather(y, x0, y0, spacing, potentials):
        repulsion = np.empty_like(y)
        phi_z = np.empty(y.shape[0])
        gather_host(y, x0, y0, spacing, potentials, repulsion, phi_z)
        return repulsion, phi_z

    @staticmethod
    def attract(indptr, indices, p, y):
        out = np.empty_like(y)
        attract_host(indptr, indices, p, y, out)
        return out


class DeviceSteps:
    """The same pieces on CuPy arrays (kernels/tsne.cu)."""

    @staticmethod
    def _xp():
        import cupy

        return cupy

    @property
    def xp(self):
        return self._xp()

    @staticmethod
    def affinities(sqdist, perplexity: float):
        cp = DeviceSteps._xp()
        n, k = sqdist.shape
        p = cp.empty((n, k), cp.float64)
        cuda.launch(_kernel("tsne_perplexity"), -(-n // BLOCK), BLOCK,
                    (sqdist, np.int64(n), np.int32(k), np.float32(perplexity), p))
        return p

    @staticmethod
    def spread(y, x0, y0, spacing, nodes):
        cp = DeviceSteps._xp()
        charges = cp.zeros((N_CHARGES, nodes, nodes), cp.int64)
        n = y.shape[0]
        cuda.launch(_kernel("tsne_spread"), -(-n // BLOCK), BLOCK,
                    (y, np.int64(n), np.float64(x0), np.float64(y0), np.float64(spacing),
                     np.int64(nodes), charges))
        return charges

    @staticmethod
    def gather(y, x0, y0, spacing, potentials):
        cp = DeviceSteps._xp()
        n = y.shape[0]
        repulsion = cp.empty_like(y)
        phi_z = cp.empty(n, cp.float64)
        cuda.launch(_kernel("tsne_gather"), -(-n // BLOCK), BLOCK,
                    (y, np.int64(n), np.float64(x0), np.float64(y0), np.float64(spacing),
                     np.int64(potentials.shape[1]), cp.ascontiguousarray(potentials, cp.float32),
                     repulsion, phi_z))
        return repulsion, phi_z

    @staticmethod
    def attract(indptr, indices, p, y):
        cp = DeviceSteps._xp()
        n = y.shape[0]
        out = cp.empty_like(y)
        cuda.launch(_kernel("tsne_attract"), -(-n // BLOCK), BLOCK,
                    (indptr, indices, p, y, np.int64(n), out))
        return out


def _kernel(name: str):
    return cuda.get_kernel("tsne", NAME_EXPRESSIONS, name)


def gradient(steps, p, y, exaggeration: float):
    """sklearn's Barnes-Hut KL gradient 4 (exaggeration · attraction - repulsion / Z) with the
    repulsion and Z from the grid. ``p``: (indptr, indices, values) of the symmetric,
    normalised P (int64, int64, float64); ``y`` (n, 2) float64, C order."""
    xp = steps.xp
    n = y.shape[0]
    box = xp.stack([y.min(axis=0), y.max(axis=0)])
    centre = box.sum(axis=0) / 2
    centred = y - centre[None, :]  # smaller charges: less cancellation
    half = (box[1] - box[0]) / 2
    half = half if xp is np else half.get()  # synchronize!
    x0, y0, spacing, nodes = grid_of(-half, half)
    charges = steps.spread(centred, x0, y0, spacing, nodes)
    potentials = convolve(charges, kernel_spectra(nodes, spacing, xp), xp)
    repulsion, phi_z = steps.gather(centred, x0, y0, spacing, potentials)
    z = xp.maximum(phi_z.sum() - n, 1e-12)
    attraction = steps.attract(*p, centred)
    return 4.0 * (exaggeration * attraction - repulsion / z)


EXPLORATION_ITER = 250  # sklearn's _EXPLORATION_MAX_ITER: early exaggeration, momentum 0.5
MOMENTUM = (0.5, 0.8)
MIN_GAIN = 0.01


def optimize(y, gradient, *, early_exaggeration: float, learning_rate: float, max_iter: int,
             xp=np, progress=None):
    """sklearn's two gradient-descent phases (its _gradient_descent with delta-bar-delta gains:
    + 0.2 where the update and the gradient disagree in sign, x 0.8 elsewhere, at least
    MIN_GAIN; the gains and the update start again in the second phase): EXPLORATION_ITER
    steps with P exaggerated and momentum 0.5, then the rest to ``max_iter`` with momentum
    0.8. ``gradient(y, exaggeration)``; ``y`` (n, 2) float64, updated in place. sklearn's
    checks for an early stop (every 50 steps, on the gradient's norm and the KL divergence's
    progress) are left out: every step runs."""
    phases = ((min(EXPLORATION_ITER, max_iter), early_exaggeration, MOMENTUM[0]),
              (max(max_iter - EXPLORATION_ITER, 0), 1.0, MOMENTUM[1]))
    for steps, exaggeration, momentum in phases:
        update = xp.zeros_like(y)
        gains = xp.ones_like(y)
        for _ in range(steps):
            grad = gradient(y, exaggeration)
            agree = update * grad < 0.0
            gains = xp.maximum(xp.where(agree, gains + 0.2, gains * 0.8), MIN_GAIN)
            update = momentum * update - learning_rate * (gains * grad)
            y += update
            if progress is not None:
                progress()
    return y


def joint_probabilities(steps, neighbors, sqdist, perplexity: float):
    """sklearn's _joint_probabilities_nn: each row's conditional probabilities over its
    neighbours (n, k) (their squared distances sqdist, float32), P = C + Cᵀ, normalised to
    sum 1. Returns P as (indptr, indices, values): int64, int64, float64 arrays of xp (cupyx's
    sparse sum holds int32 indices: up to 2^31 stored values)."""
    xp = steps.xp
    if xp is np:
        from scipy import sparse
    else:
        from cupyx.scipy import sparse
    n, k = neighbors.shape
    if 2 * n * k > np.iinfo(np.int32).max:
        raise ValueError(f"t-SNE's affinities: {n} cells x {k} neighbours, twice, pass the "
                         "2^31 stored values a sparse matrix holds here; use a smaller "
                         "perplexity or fewer cells")
    conditional = steps.affinities(xp.ascontiguousarray(sqdist, xp.float32), perplexity)
    c = sparse.csr_matrix((conditional.ravel(), neighbors.ravel().astype(xp.int32),
                           xp.arange(0, n * k + 1, k, dtype=xp.int32)), shape=(n, n))
    p = (c + c.T.tocsr()).tocsr()
    p.sum_duplicates()
    total = max(float(p.data.sum()), float(np.finfo(np.float64).eps))  # synchronize!
    return (p.indptr.astype(xp.int64), p.indices.astype(xp.int64),
            xp.ascontiguousarray(p.data / total, xp.float64))


def embed(x: np.ndarray, start: np.ndarray, *, perplexity: float, early_exaggeration: float,
          learning_rate: float, metric: str, max_iter: int = 1000,
          on_device: bool = False) -> np.ndarray:
    """t-SNE of the rows of ``x`` (host) into 2-D from ``start`` (n, 2), as sklearn's
    Barnes-Hut TSNE with scanpy's arguments: exact kNN (``min(n - 1, int(3 perplexity + 1))``
    neighbours, squared distances), sklearn's affinities, its two optimiser phases; the
    gradient's repulsion from the grid. Returns host float32 (n, 2)."""
    from . import topk

    n = x.shape[0]
    k = min(n - 1, int(3.0 * perplexity + 1))
    search = topk.knn_device if on_device and k + 1 + topk.DEVICE_MARGIN <= topk.TOPK_MAX \
        else topk.knn_host
    idx, dist, _ = search(x, k + 1, metric)  # the row itself first, at distance 0
    steps = DeviceSteps() if on_device else HostSteps()
    xp = steps.xp
    p = joint_probabilities(steps, xp.asarray(idx[:, 1:]),
                            xp.asarray((dist[:, 1:] ** 2).astype(np.float32)), perplexity)
    y = xp.array(start, dtype=xp.float64, order="C")
    optimize(y, lambda y, exaggeration: gradient(steps, p, y, exaggeration),
             early_exaggeration=early_exaggeration, learning_rate=learning_rate,
             max_iter=max_iter, xp=xp)
    return np.asarray(y if xp is np else y.get(), dtype=np.float32)  # synchronize!
