"""tl.umap's spectral start on a connected graph (gpusc.tl._umap._spectral_connected) against
umap-learn's own spectral_layout: gpusc no longer imports umap-learn there, because that import
compiles pynndescent's numba functions (longer than the layout)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from gpusc.tl._umap import _spectral_connected


def _knn_graph(n=600, k=10, seed=0):
    """A symmetric, connected, weighted kNN graph of seeded Gaussian blobs."""
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, 5)) + np.repeat(rng.normal(scale=1, size=(3, 5)), n // 3, axis=0)
    dist = ((points[:, None] - points[None]) ** 2).sum(-1)
    nearest = np.argsort(dist, axis=1)[:, 1:k + 1]
    rows = np.repeat(np.arange(n), k)
    graph = sparse.csr_matrix((np.exp(-dist[rows, nearest.ravel()] / 10), (rows, nearest.ravel())), shape=(n, n))
    graph = graph.maximum(graph.T).tocsr()
    assert connected_components(graph)[0] == 1
    return graph


def test_spectral_connected_is_umap_learns():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Tensorflow not installed")
        from umap.spectral import spectral_layout

    graph = _knn_graph()
    ours_rs, theirs_rs = np.random.RandomState(3), np.random.RandomState(3)
    ours = _spectral_connected(graph, 2, ours_rs)
    theirs = spectral_layout(None, graph, 2, theirs_rs)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    # the same draws from the random state: the noise and seed umap draws next are umap-learn's
    assert ours_rs.randint(2**31) == theirs_rs.randint(2**31)
