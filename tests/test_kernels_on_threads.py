"""Kernels of issue 5's families other than topk, run as written on the CPU
(tests/_on_threads.py) through their own device launchers (NumPy standing in for CuPy),
against their numba twins and the oracles. topk's are in test_topk_device_flow.py."""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scanpy.neighbors._connectivity import umap as sc_umap
from scipy import sparse
from test_pp_neighbors import blobs

from gpusc._core import cuda
from gpusc._kernels import connectivity, gram
from gpusc._kernels.topk import knn_host


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {family: on_threads.build(family, tmp_path_factory.mktemp(family))
            for family in ("gram", "connectivity")}


@pytest.mark.parametrize("value_type", [np.float32, np.float64])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_dense_rows_on_threads(built, monkeypatch, value_type, index_type):
    # gram.DenseRows and gram() as pca runs them on a device CSR: rows 7 .. 7 + 50 of a CSR
    # with an empty row, through a gene mask (a column map with -1s), then the Gram matrix
    # of every row in blocks; NumPy stands in for CuPy, csr_rows_to_dense runs on threads
    rng = np.random.default_rng(0)
    x = sparse.random(90, 70, density=0.2, format="lil", random_state=1, dtype=value_type)
    x[10] = 0
    x = x.tocsr()
    x.indices, x.indptr = x.indices.astype(index_type), x.indptr.astype(index_type)
    columns = np.sort(rng.choice(70, 40, replace=False))
    fake_cupy = on_threads.numpy_as_cupy(monkeypatch)
    launched = on_threads.launchers_on_threads(monkeypatch, built)
    monkeypatch.setattr(gram, "xp_of", lambda _: fake_cupy)  # placement says "host" for SciPy
    monkeypatch.setattr(gram, "DENSE_CHUNK_BYTES", 8 * 40 * 32)  # gram() in blocks of 32 rows
    blocks = gram.DenseRows(x, columns)
    expected = x[:, columns].toarray().astype(np.float64)
    np.testing.assert_array_equal(blocks[7:57], expected[7:57])
    assert list(launched) == [cuda.template_name("csr_rows_to_dense", value_type, index_type)]
    g, s = gram.gram(blocks)
    np.testing.assert_allclose(g, expected.T @ expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, expected.sum(axis=0), rtol=1e-12)
    assert launched[cuda.template_name("csr_rows_to_dense", value_type, index_type)][4] == 26  # the last block


def test_umap_connectivities_device_on_threads(built, monkeypatch):
    # connectivity.umap_connectivities_device itself (NumPy for CuPy, SciPy for cupyx, the
    # kernel on threads) on a kNN with exact copies (rho = 0 rows take the global mean's
    # floor) and spread rows, against scanpy's graph (umap-learn's fuzzy_simplicial_set)
    x = np.concatenate([blobs(n=300, dim=6, seed=3), np.repeat(blobs(n=5, dim=6, seed=4), 20, axis=0)])
    knn_idx, knn_dist, _ = knn_host(x, 15, "euclidean")
    n, k = knn_idx.shape
    on_threads.numpy_as_cupy(monkeypatch)
    launched = on_threads.launchers_on_threads(monkeypatch, built)
    graph = connectivity.umap_connectivities_device(knn_idx, knn_dist, n)
    *_, out_sigmas, out_rhos, out_vals = launched["umap_memberships"]
    vals, sigmas, rhos = connectivity.umap_memberships_host(knn_idx, knn_dist)
    assert (rhos == 0).sum() >= 100
    np.testing.assert_array_equal(out_rhos, rhos)
    # expf (libm) and numba's exp may differ in the last bit; the search for sigma stops once
    # |sum - log2 k| < 1e-5, so such a bit can stop it one step apart: agreement to 1e-4
    np.testing.assert_allclose(out_sigmas, sigmas, rtol=1e-4)
    np.testing.assert_allclose(out_vals, vals, rtol=1e-4, atol=1e-7)
    expected = sc_umap(knn_idx, knn_dist, n_obs=n, n_neighbors=k)
    assert graph.format == "csr" and graph.has_sorted_indices and graph.dtype == np.float32
    np.testing.assert_array_equal(graph.indptr, expected.indptr)
    np.testing.assert_array_equal(graph.indices, expected.indices)
    np.testing.assert_allclose(graph.data, expected.data, rtol=1e-4)
