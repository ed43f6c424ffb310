"""tl.umap against scanpy 1.12 (umap-learn) on pbmc3k (1,500 cells, scanpy's own graph).

The oracle is scanpy's embedding quality: trustworthiness (scikit-learn, 15 neighbours,
on X_pca). Our optimiser runs here as its numba twin (method="gpusc", device="cpu");
the CUDA kernel runs in the GPU-marked tests.
"""

from __future__ import annotations


import numpy as np
import pytest
import scanpy as sc
from sklearn.manifold import trustworthiness

import gpusc
from gpusc._kernels import umap as _kumap
from gpusc.tl import _umap



@pytest.fixture(scope="module")
def pbmc(pbmc_graph):
    return pbmc_graph.copy()


@pytest.fixture(scope="module")
def scanpy_umap(pbmc):
    ref = pbmc.copy()
    sc.tl.umap(ref, random_state=0)
    return ref


@pytest.fixture(scope="module")
def ours_cpu(pbmc):
    out = pbmc.copy()
    gpusc.tl.umap(out, method="gpusc", device="cpu")
    return out


def trust(adata, key="X_umap"):
    return trustworthiness(adata.obsm["X_pca"], adata.obsm[key], n_neighbors=15)


def test_twin_trustworthiness(pbmc, scanpy_umap, ours_cpu):
    emb = ours_cpu.obsm["X_umap"]
    assert emb.shape == (pbmc.n_obs, 2) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert trust(ours_cpu) >= trust(scanpy_umap) - 0.02
    assert trust(ours_cpu) > 0.88


def test_params_as_scanpy(scanpy_umap, ours_cpu):
    ref, ours = scanpy_umap.uns["umap"]["params"], ours_cpu.uns["umap"]["params"]
    assert set(ours) == set(ref) == {"a", "b"}
    assert ours["a"] == pytest.approx(ref["a"], rel=1e-6)
    assert ours["b"] == pytest.approx(ref["b"], rel=1e-6)


def test_twin_deterministic(pbmc, ours_cpu):
    again = pbmc.copy()
    gpusc.tl.umap(again, method="gpusc", device="cpu")
    np.testing.assert_array_equal(again.obsm["X_umap"], ours_cpu.obsm["X_umap"])
    other = pbmc.copy()
    gpusc.tl.umap(other, method="gpusc", device="cpu", random_state=1, maxiter=50)
    assert not np.array_equal(other.obsm["X_umap"], ours_cpu.obsm["X_umap"])
    assert other.uns["umap"]["params"]["random_state"] == 1


def test_init_pos_array_and_key(pbmc):
    start = np.ascontiguousarray(pbmc.obsm["X_pca"][:, :2])
    one = pbmc.copy()
    gpusc.tl.umap(one, method="gpusc", device="cpu", init_pos=start, maxiter=100)
    two = pbmc.copy()
    two.obsm["start"] = start
    gpusc.tl.umap(two, method="gpusc", device="cpu", init_pos="start", maxiter=100,
                  key_added="X_umap_start")
    np.testing.assert_array_equal(one.obsm["X_umap"], two.obsm["X_umap_start"])
    assert "X_umap_start" in two.uns
    assert trust(one) > 0.85
    rand = pbmc.copy()
    gpusc.tl.umap(rand, method="gpusc", device="cpu", init_pos="random", maxiter=100,
                  n_components=3)
    assert rand.obsm["X_umap"].shape == (pbmc.n_obs, 3)


def test_cpu_default_is_scanpy(pbmc, scanpy_umap):
    ours = pbmc.copy()
    gpusc.tl.umap(ours, device="cpu")
    np.testing.assert_array_equal(ours.obsm["X_umap"], scanpy_umap.obsm["X_umap"])


def test_find_ab_params_as_umap_learn():
    from umap.umap_ import find_ab_params

    for spread, min_dist in [(1.0, 0.5), (1.0, 0.1), (2.0, 0.3)]:
        np.testing.assert_allclose(_umap.find_ab_params(spread, min_dist),
                                   find_ab_params(spread, min_dist), rtol=1e-10)


def test_epochs_per_sample_as_umap_learn():
    from umap.umap_ import make_epochs_per_sample

    w = np.array([1.0, 0.5, 0.25, 0.0, 0.9])
    np.testing.assert_array_equal(_kumap.epochs_per_sample(w, 200), make_epochs_per_sample(w, 200))


def test_optimiser_on_two_blobs():
    """A graph of two cliques ends as two separated groups; zero epochs returns the start."""
    n = 40
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(np.ones((n // 2, n // 2)) - np.eye(n // 2))
    head = np.concatenate([rows, rows + n // 2])
    tail = np.concatenate([cols, cols + n // 2])
    eps = _kumap.epochs_per_sample(np.ones(head.size), 100)
    start = rng.uniform(0, 10, (n, 2)).astype(np.float32)
    same = _kumap.optimize_layout_host(start, head, tail, eps, 0, 1.6, 0.9, 1.0, 1.0, 5, 7)
    np.testing.assert_array_equal(same, start)
    out = _kumap.optimize_layout_host(start, head, tail, eps, 100, 1.6, 0.9, 1.0, 1.0, 5, 7)
    a, b = out[: n // 2], out[n // 2:]
    spread = max(np.linalg.norm(a - a.mean(0), axis=1).max(), np.linalg.norm(b - b.mean(0), axis=1).max())
    assert np.linalg.norm(a.mean(0) - b.mean(0)) > 2 * spread


# ---------------------------------------------------------------- bad input

def test_no_neighbors(pbmc):
    bare = pbmc.copy()
    del bare.uns["neighbors"]
    with pytest.raises(ValueError, match="run pp.neighbors first"):
        gpusc.tl.umap(bare, device="cpu")
    assert "X_umap" not in bare.obsm and "umap" not in bare.uns


def test_bad_arguments(pbmc):
    with pytest.raises(KeyError, match="neighbors_key='nope'"):
        gpusc.tl.umap(pbmc, neighbors_key="nope", device="cpu")
    with pytest.raises(NotImplementedError, match="paga"):
        gpusc.tl.umap(pbmc, init_pos="paga", device="cpu")
    with pytest.raises(KeyError, match="init_pos='nope'"):
        gpusc.tl.umap(pbmc, init_pos="nope", device="cpu")
    with pytest.raises(ValueError, match="init_pos has shape"):
        gpusc.tl.umap(pbmc, init_pos=np.zeros((3, 2)), device="cpu")
    with pytest.raises(ValueError, match="method="):
        gpusc.tl.umap(pbmc, method="tsne", device="cpu")
    assert "X_umap" not in pbmc.obsm


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_gpu_umap(pbmc, scanpy_umap, ours_cpu):
    one, two = pbmc.copy(), pbmc.copy()
    gpusc.tl.umap(one, device="gpu")
    gpusc.tl.umap(two, device="gpu")
    np.testing.assert_array_equal(one.obsm["X_umap"], two.obsm["X_umap"])  # reproducible
    assert trust(one) >= trust(scanpy_umap) - 0.02


@pytest.mark.gpu
def test_gpu_optimiser_matches_twin():
    """Same start, graph and seed: the kernel and the twin draw the same samples."""
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    g = sp.random(300, 300, density=0.05, random_state=1, format="coo")
    g = sp.coo_matrix(g + g.T)
    eps = _kumap.epochs_per_sample(g.data, 50)
    start = rng.uniform(0, 10, (300, 2)).astype(np.float32)
    args = (start, g.row, g.col, eps, 50, 0.58, 1.33, 1.0, 1.0, 5, 11)
    host = _kumap.optimize_layout_host(*args)
    dev = _kumap.optimize_layout_device(*args)
    np.testing.assert_allclose(dev, host, atol=1e-3)
