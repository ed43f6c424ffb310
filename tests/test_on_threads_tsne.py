"""kernels/tsne.cu run on CPU threads (tests/_on_threads.py) against the numba twins and sklearn,
and the device t-SNE's own code (DeviceSteps, the grid, the optimiser) with NumPy standing in for
CuPy; the quality of the method against sklearn's TSNE on pbmc3k cells is test_tl_tsne.py's."""

from __future__ import annotations

import sys
import types

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse

from gpusc._core import cuda
from gpusc._kernels import topk
from gpusc._kernels import tsne as ktsne


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("tsne", tmp_path_factory.mktemp("tsne"))


@pytest.fixture
def device(built, monkeypatch):
    """CuPy as NumPy (tests/_on_threads.py), with what the t-SNE driver also uses: cupyx's FFT
    as scipy's, and the kernels on threads."""
    import scipy.fft

    fake = on_threads.numpy_as_cupy(monkeypatch)
    for name in ("array", "stack", "concatenate", "maximum", "zeros_like", "ones_like",
                 "empty_like"):
        make = getattr(np, name)
        setattr(fake, name, lambda *a, make=make, **k: np.asarray(make(*a, **k)).view(on_threads.DeviceArray))
    for name in ("float32", "float64", "int32", "int64"):
        setattr(fake, name, getattr(np, name))
    fft = types.ModuleType("cupyx.scipy.fft")
    fft.rfft2, fft.irfft2 = scipy.fft.rfft2, scipy.fft.irfft2
    monkeypatch.setitem(sys.modules, "cupyx.scipy.fft", fft)
    sys.modules["cupyx.scipy"].fft = fft
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[name])
    return fake


def _points(n, seed, scale=5.0):
    return np.random.default_rng(seed).normal(scale=scale, size=(n, 2))


def test_perplexity_as_sklearn(device):
    from sklearn.manifold._utils import _binary_search_perplexity

    rng = np.random.default_rng(1)
    sqdist = (rng.random((301, 20)) * 10).astype(np.float32)
    sqdist[3] = 0  # every neighbour at distance 0: the uniform row
    sqdist[4, :5] = 1e4  # far neighbours: exp underflows for them
    ours = ktsne.DeviceSteps().affinities(device.asarray(sqdist), 30.0)
    ref = np.asarray(_binary_search_perplexity(sqdist, 30.0, 0))
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(ours[3], 1 / 20)


@pytest.mark.parametrize("n", [1, 301])
def test_spread_as_twin(device, n):
    y = _points(n, 2)
    y[0] = 0.0  # a point exactly on a node
    lo, hi = y.min(axis=0), y.max(axis=0)
    x0, y0, spacing, nodes = ktsne.grid_of(lo, hi)
    ours = ktsne.DeviceSteps().spread(device.asarray(y), x0, y0, spacing, nodes)
    twin = ktsne.HostSteps().spread(y, x0, y0, spacing, nodes)
    np.testing.assert_array_equal(np.asarray(ours), twin)  # fixed point: the same integers
    # quadratic weights add up to 1 per point: the first charge counts the points
    assert abs(twin[0].sum() / ktsne.FIXED_SCALE - n) < 1e-6 * max(n, 1)


def test_gather_and_attract_as_twins(device):
    y = _points(301, 3)
    lo, hi = y.min(axis=0), y.max(axis=0)
    x0, y0, spacing, nodes = ktsne.grid_of(lo, hi)
    potentials = np.random.default_rng(4).random((4, nodes, nodes)).astype(np.float32)
    rep, phi_z = ktsne.DeviceSteps().gather(device.asarray(y), x0, y0, spacing,
                                            device.asarray(potentials))
    rep_twin, phi_z_twin = ktsne.HostSteps().gather(y, x0, y0, spacing, potentials)
    np.testing.assert_allclose(np.asarray(rep), rep_twin, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(phi_z), phi_z_twin, rtol=1e-12)
    p = sparse.random(301, 301, density=0.05, format="csr", random_state=5)
    p = (p + p.T).tocsr()
    args = (p.indptr.astype(np.int64), p.indices.astype(np.int64), p.data.astype(np.float64))
    ours = ktsne.DeviceSteps().attract(*(device.asarray(a) for a in args), device.asarray(y))
    np.testing.assert_allclose(np.asarray(ours), ktsne.HostSteps().attract(*args, y),
                               rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("scale", "bound"), [(15.0, 0.025), (3.0, 0.006), (1e-3, 1e-5)])
def test_repulsion_and_z_as_exact_sums(scale, bound):
    """The grid's repulsion over Z against the exact O(n²) sums, on 500 points spread like a
    late embedding (sparse, tens of units), a middle one and an early one (within 1e-3).
    The bounds on the relative error (norm over all points) are 1.5x what this grid gives
    (3 nodes per unit, FIt-SNE's default: 1.7%, 0.4%, 3e-6; 5 nodes per unit measured 0.4% on
    the sparse points): the quadratic interpolation's error near the kernels' peak, not
    rounding. Sklearn's Barnes-Hut (angle 0.5) approximates the same sums."""
    y = _points(500, 6, scale)
    diff = y[:, None, :] - y[None, :, :]
    w = 1.0 / (1.0 + (diff ** 2).sum(axis=2))
    np.fill_diagonal(w, 0.0)
    exact = ((w ** 2)[:, :, None] * diff).sum(axis=1) / w.sum()
    empty = (np.zeros(501, np.int64), np.zeros(0, np.int64), np.zeros(0))
    grad = ktsne.gradient(ktsne.HostSteps(), empty, y, 1.0)  # no attraction: -4 rep / Z
    assert np.linalg.norm(-grad / 4 - exact) <= bound * np.linalg.norm(exact)


def test_device_driver_as_host(device, monkeypatch):
    """embed's device path (kNN on the host here, P with cupyx's sparse sum standing in, the
    kernels on threads, the grid and the optimiser on the stand-in arrays) against its host
    path, after 5 steps: the first steps blow a 1e-4 start up to tens of units, and t-SNE's
    dynamics amplify rounding (after 30 steps the exact O(n²) gradient and the grid's, from
    the same start, differ by units), so a longer run tests chaos, not the code."""
    x = np.random.default_rng(8).normal(size=(150, 6)).astype(np.float32)
    start = np.random.default_rng(9).normal(scale=1e-4, size=(150, 2)).astype(np.float32)
    kwargs = dict(perplexity=10.0, early_exaggeration=12.0, learning_rate=200.0,
                  metric="euclidean", max_iter=5)
    host = ktsne.embed(x, start, **kwargs)
    # the device kNN is tested with the neighbours (test_pp_neighbors); not this test's
    monkeypatch.setattr(topk, "knn_device", topk.knn_host)
    ours = ktsne.embed(x, start, on_device=True, **kwargs)
    assert np.ptp(host) > 10  # the steps moved the points far from the start
    np.testing.assert_allclose(ours, host, rtol=1e-5, atol=1e-5)
