"""kernels/density.cu run as written on the CPU (tests/_on_threads.py: every CUDA thread a
std::thread), launched by gpusc._kernels.density.kde_sums_device itself with NumPy standing in
for CuPy: grid, tiles (a partial last tile), argument order. Compared with the definition
(NumPy over all pairs), with the numba twin, and, through tl.embedding_density, with scanpy.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
import scanpy as sc
from anndata import AnnData

import gpusc
from gpusc._core import cuda
from gpusc._kernels import density
from gpusc.tl import _embedding_density


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return on_threads.build("density", tmp_path_factory.mktemp("density"))


@pytest.fixture
def device(built, monkeypatch):
    on_threads.numpy_as_cupy(monkeypatch)
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[name])


def _definition(x, y):
    r2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    return np.where(r2 <= density.CUTOFF_SQ, np.exp(-0.5 * r2), 0.0).sum(axis=0)


@pytest.mark.parametrize("n", [1, 300, 513])
def test_kde_sums_on_threads(device, n):
    rng = np.random.default_rng(n)
    x, y = rng.normal(scale=4.0, size=n), rng.normal(scale=2.0, size=n)  # some pairs cut off
    got = density.kde_sums_device(x, y)
    assert got.dtype == np.float64 and got.shape == (n,)
    want = _definition(x, y)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    np.testing.assert_allclose(density.kde_sums(x, y), want, rtol=1e-12)  # the twin


def test_embedding_density_on_threads_as_scanpy(device, monkeypatch):
    rng = np.random.default_rng(7)
    adata = AnnData(obsm={"X_umap": rng.normal(size=(400, 2)).astype(np.float32)})
    adata.obs["group"] = rng.choice(["a", "b", "c"], 400)
    ref = adata.copy()
    sc.tl.embedding_density(ref, groupby="group")
    monkeypatch.setattr(_embedding_density, "resolve_device", lambda device: "gpu")
    gpusc.tl.embedding_density(adata, groupby="group")
    key = "umap_density_group"
    np.testing.assert_allclose(adata.obs[key], ref.obs[key], rtol=1e-5)
