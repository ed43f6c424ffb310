"""tl.diffmap against scanpy 1.12's tl.diffmap: pbmc3k (1,500 cells, scanpy's own graph) and
seeded synthetic graphs with float32 and float64 connectivities.

The oracle is scanpy's output on the same AnnData: eigenvalues allclose (rtol 1e-5), and each
eigenvector equal up to sign where its eigenvalue is simple (|cos| > 0.9999 when the gap to its
neighbours is at least 1e-3 relative; a repeated eigenvalue has no unique eigenvector).
"""

from __future__ import annotations

import logging
import re
import sys
import types

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse
from sklearn.neighbors import kneighbors_graph

import gpusc
from gpusc.tl._diffmap import NO_NEIGHBORS, SMALL_N_COMPS


def _compare(ours, ref, min_gap=1e-3):
    evals, ref_evals = ours.uns["diffmap_evals"], ref.uns["diffmap_evals"]
    assert evals.dtype == ref_evals.dtype == np.float32
    np.testing.assert_allclose(evals, ref_evals, rtol=1e-5)
    x, y = ours.obsm["X_diffmap"], ref.obsm["X_diffmap"]
    assert x.shape == y.shape and x.dtype == y.dtype == np.float32
    compared = 0
    for i, value in enumerate(ref_evals):
        gaps = np.abs(np.delete(ref_evals, i) - value)
        if gaps.min() < min_gap * abs(value):
            continue  # a repeated (or nearly repeated) eigenvalue: any basis of it is right
        cos = abs(float(x[:, i] @ y[:, i])) / (np.linalg.norm(x[:, i]) * np.linalg.norm(y[:, i]))
        assert cos > 0.9999, (i, value, cos)
        compared += 1
    return compared


@pytest.fixture(scope="module")
def scanpy_pbmc(pbmc_graph):
    ref = pbmc_graph.copy()
    sc.tl.diffmap(ref)
    return ref


def test_pbmc3k_as_scanpy(pbmc_graph, scanpy_pbmc):
    ours = pbmc_graph.copy()
    gpusc.tl.diffmap(ours, device="cpu")
    assert _compare(ours, scanpy_pbmc) >= 10
    assert set(ours.obsm) == set(scanpy_pbmc.obsm) and set(ours.uns) == set(scanpy_pbmc.uns)


def _blob_graph(n, dtype, seed):
    """A connected symmetric kNN graph (10 neighbours) of seeded overlapping Gaussian blobs,
    weights exp(-d) as a stand-in for a kernel, in ``dtype``. Connected: with eigenvalue 1
    repeated (one per component), which of its copies ARPACK finds within k depends on
    rounding, in scanpy's float32 matrix as in ours."""
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(4, 5))
    points = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, 5))
    g = kneighbors_graph(points, 10, mode="distance")
    g.data = np.exp(-g.data)
    g = g.maximum(g.T).tocsr().astype(dtype)
    assert connected_components(g)[0] == 1
    adata = sc.AnnData(obsm={"X_pca": points})
    adata.obsp["connectivities"] = g
    adata.obsp["distances"] = g.copy()
    adata.uns["neighbors"] = {"connectivities_key": "connectivities",
                              "distances_key": "distances", "params": {"n_neighbors": 10}}
    return adata


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_comps", [3, 15])
def test_synthetic_graphs_as_scanpy(dtype, n_comps):
    adata = _blob_graph(600, dtype, seed=1)
    ref, ours = adata.copy(), adata.copy()
    sc.tl.diffmap(ref, n_comps=n_comps)
    gpusc.tl.diffmap(ours, n_comps=n_comps, device="cpu")
    assert _compare(ours, ref) >= n_comps - 4  # blobs: eigenvalue 1 and near-1 clusters aside


@pytest.mark.parametrize("failure", ["no_convergence", "collapsed_basis"])
def test_single_precision_fallback_as_scanpy(monkeypatch, failure):
    """Where single-precision ARPACK fails (no convergence) or returns vectors that do not span
    n_comps directions, float64 ARPACK runs instead: the result is scanpy's all the same."""
    from scipy.sparse import linalg as splinalg

    real_eigsh = splinalg.eigsh
    calls = []

    def eigsh(a, *args, **kwargs):
        calls.append(a.dtype)
        if a.dtype == np.float32:
            if failure == "no_convergence":
                raise splinalg.ArpackNoConvergence("stand-in", np.zeros(0), np.zeros((a.shape[0], 0)))
            values, vectors = real_eigsh(a, *args, **kwargs)
            vectors[:, 1] = vectors[:, 0]  # two equal columns: no longer 15 directions
            return values, vectors
        return real_eigsh(a, *args, **kwargs)

    monkeypatch.setattr(splinalg, "eigsh", eigsh)
    adata = _blob_graph(600, np.float32, seed=1)
    ref, ours = adata.copy(), adata.copy()
    sc.tl.diffmap(ref, n_comps=15)
    calls.clear()
    gpusc.tl.diffmap(ours, n_comps=15, device="cpu")
    assert calls == [np.float32, np.float64]
    assert _compare(ours, ref) >= 11


def test_dense_and_keyed_graph_as_scanpy():
    adata = _blob_graph(300, np.float32, seed=2)
    adata.obsp["g_connectivities"] = adata.obsp.pop("connectivities").toarray()
    adata.obsp["g_distances"] = adata.obsp.pop("distances")
    adata.uns["g"] = {"connectivities_key": "g_connectivities", "distances_key": "g_distances",
                      "params": {"n_neighbors": 10}}
    del adata.uns["neighbors"]
    ref = sc.tl.diffmap(adata, n_comps=6, neighbors_key="g", random_state=3, copy=True)
    ours = gpusc.tl.diffmap(adata, n_comps=6, neighbors_key="g", random_state=3, copy=True,
                            device="cpu")
    assert "X_diffmap" not in adata.obsm  # copy=True leaves the input alone
    _compare(ours, ref)


def test_more_components_than_cells_and_seed():
    adata = _blob_graph(12, np.float64, seed=4)
    ref = sc.tl.diffmap(adata, n_comps=15, copy=True)
    ours = gpusc.tl.diffmap(adata, n_comps=15, copy=True, device="cpu")
    assert ours.obsm["X_diffmap"].shape == ref.obsm["X_diffmap"].shape == (12, 11)
    np.testing.assert_allclose(ours.uns["diffmap_evals"], ref.uns["diffmap_evals"], rtol=1e-5,
                               atol=1e-6)
    again = gpusc.tl.diffmap(adata, n_comps=15, copy=True, device="cpu")
    np.testing.assert_array_equal(again.obsm["X_diffmap"], ours.obsm["X_diffmap"])


def _snapshot(adata):
    return (set(adata.obsm), set(adata.uns), set(adata.obsp))


def test_missing_neighbors_as_scanpy():
    adata = _blob_graph(50, np.float32, seed=5)
    del adata.uns["neighbors"]
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(NO_NEIGHBORS)):
        sc.tl.diffmap(adata)
    with pytest.raises(ValueError, match=re.escape(NO_NEIGHBORS)):
        gpusc.tl.diffmap(adata)
    with pytest.raises(ValueError, match=re.escape(NO_NEIGHBORS)):
        gpusc.tl.diffmap(adata, neighbors_key="other")
    assert _snapshot(adata) == before


@pytest.mark.parametrize("n_comps", [2, 0, -1])
def test_n_comps_out_of_range_as_scanpy(n_comps):
    adata = _blob_graph(50, np.float32, seed=6)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=re.escape(SMALL_N_COMPS)):
        sc.tl.diffmap(adata, n_comps=n_comps)
    with pytest.raises(ValueError, match=re.escape(SMALL_N_COMPS)):
        gpusc.tl.diffmap(adata, n_comps=n_comps)
    assert _snapshot(adata) == before


def test_missing_connectivities_and_isolated_cell():
    adata = _blob_graph(50, np.float32, seed=7)
    del adata.obsp["connectivities"]
    with pytest.raises(KeyError, match="connectivities"):
        gpusc.tl.diffmap(adata)
    adata = _blob_graph(50, np.float32, seed=7)
    g = adata.obsp["connectivities"].tolil()
    g[3, :] = 0
    g[:, 3] = 0
    adata.obsp["connectivities"] = sparse.csr_matrix(g)
    before = _snapshot(adata)
    with pytest.raises(ValueError, match=r"no edge.*\[3\]"):
        gpusc.tl.diffmap(adata, device="cpu")
    assert _snapshot(adata) == before


@pytest.mark.gpu
def test_device_as_scanpy(pbmc_graph, scanpy_pbmc):
    ours = pbmc_graph.copy()
    gpusc.tl.diffmap(ours, device="gpu")
    assert _compare(ours, scanpy_pbmc) >= 10
    again = pbmc_graph.copy()
    gpusc.tl.diffmap(again, device="gpu")
    np.testing.assert_array_equal(again.obsm["X_diffmap"], ours.obsm["X_diffmap"])


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    """CuPy and cupyx's sparse eigsh as NumPy and SciPy's (ARPACK), so that the device path's
    own code (T on the device, the single-precision solve, the Rayleigh-Ritz step, the float64
    fallback) runs here; returns the list of the dtypes eigsh was called with."""
    from scipy.sparse import linalg as splinalg

    calls = []

    def eigsh(a, k, **kwargs):
        calls.append(a.dtype)
        return splinalg.eigsh(a, k=k, **kwargs)

    fake = types.ModuleType("cupy")
    for name in ("asarray", "arange", "searchsorted", "argsort", "sqrt", "float32", "float64"):
        setattr(fake, name, getattr(np, name))
    fake.asnumpy = np.asarray
    fake_linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    fake_linalg.eigsh = eigsh
    fake_sparse = types.ModuleType("cupyx.scipy.sparse")
    fake_sparse.csr_matrix, fake_sparse.linalg = sparse.csr_matrix, fake_linalg
    fake_scipy = types.ModuleType("cupyx.scipy")
    fake_scipy.sparse = fake_sparse
    fake_cupyx = types.ModuleType("cupyx")
    fake_cupyx.scipy = fake_scipy
    for name, module in (("cupy", fake), ("cupyx", fake_cupyx), ("cupyx.scipy", fake_scipy),
                         ("cupyx.scipy.sparse", fake_sparse),
                         ("cupyx.scipy.sparse.linalg", fake_linalg)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.mark.parametrize("junk", [False, True])
def test_device_solve_on_host_arrays_as_scanpy(numpy_as_cupy, junk, monkeypatch):
    """The device path's code with NumPy/SciPy standing in for CuPy/cupyx: the single-precision
    solve refined by Rayleigh-Ritz gives scanpy's result; vectors that stopped short (here the
    solve's vectors with noise of 1e-3 added: residual far above SINGLE_RESIDUAL_MAX) go to
    the float64 solve, which gives scanpy's result too."""
    from gpusc.tl import _diffmap

    if junk:
        fake_linalg = sys.modules["cupyx.scipy.sparse.linalg"]
        eigsh = fake_linalg.eigsh

        def short(a, k, **kwargs):
            values, vectors = eigsh(a, k, **kwargs)
            if a.dtype == np.float32:
                noise = np.random.default_rng(0).normal(scale=1e-3, size=vectors.shape)
                vectors = vectors + noise.astype(np.float32)
            return values, vectors

        monkeypatch.setattr(fake_linalg, "eigsh", short)
    monkeypatch.setattr(_diffmap, "resolve_device", lambda device: "gpu")
    adata = _blob_graph(600, np.float32, seed=1)
    ref, ours = adata.copy(), adata.copy()
    sc.tl.diffmap(ref, n_comps=15)
    gpusc.tl.diffmap(ours, n_comps=15)
    assert numpy_as_cupy == ([np.float32, np.float64] if junk else [np.float32])
    assert _compare(ours, ref) >= 11


def test_many_components_warning_as_scanpy():
    """scanpy warns "Transition matrix has many disconnected components!" when the graph has
    more components than half the eigenvalues: ten separate blobs, n_comps 15 (10 > 7.5) warn,
    n_comps 30 (10 < 15) do not; the count here is gpusc's union-find, scanpy's scipy's."""
    from scipy.sparse import block_diag

    parts = [_blob_graph(40, np.float64, seed=10 + i) for i in range(10)]
    adata = sc.AnnData(obsm={"X_pca": np.concatenate([p.obsm["X_pca"] for p in parts])})
    adata.obsp["connectivities"] = block_diag([p.obsp["connectivities"] for p in parts]).tocsr()
    adata.obsp["distances"] = adata.obsp["connectivities"].copy()
    adata.uns["neighbors"] = parts[0].uns["neighbors"]
    message = "Transition matrix has many disconnected components!"
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = sc.settings._root_logger  # scanpy's own logger (gpusc's logging goes through it)
    logger.addHandler(handler)
    try:
        for n_comps, warns in ((15, True), (30, False)):
            for run in (lambda a: sc.tl.diffmap(a, n_comps=n_comps),
                        lambda a: gpusc.tl.diffmap(a, n_comps=n_comps, device="cpu")):
                records.clear()
                run(adata.copy())
                assert any(message in r.getMessage() for r in records) == warns, n_comps
    finally:
        logger.removeHandler(handler)
