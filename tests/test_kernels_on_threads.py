"""Kernels of issue 5's families other than topk, run as written on the CPU
(tests/_on_threads.py), against their numba twins. topk's are in test_topk_device_flow.py."""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
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
def test_csr_rows_to_dense_on_threads(built, value_type, index_type):
    # rows 7 .. 7 + 50 of a CSR with an empty row, through a gene mask (a column map with -1s)
    rng = np.random.default_rng(0)
    x = sparse.random(90, 70, density=0.2, format="lil", random_state=1, dtype=value_type)
    x[10] = 0
    x = x.tocsr()
    data, indices, indptr = x.data, x.indices.astype(index_type), x.indptr.astype(index_type)
    columns = np.sort(rng.choice(70, 40, replace=False))
    col_map = np.full(70, -1, np.int32)
    col_map[columns] = np.arange(40, dtype=np.int32)
    start, n = 7, 50
    expected = np.zeros((n, 40))
    gram._csr_rows_to_dense_host(data, indices, indptr, start, n, col_map, expected)
    np.testing.assert_array_equal(expected, x[start:start + n][:, columns].toarray())
    out = np.zeros((n, 40))
    kernel = built["gram"][cuda.template_name("csr_rows_to_dense", value_type, index_type)]
    kernel((-(-n * 32 // gram.BLOCK),), (gram.BLOCK,), (
        data, indices, indptr, np.int64(start), np.int64(n), col_map, np.int64(40), out))
    np.testing.assert_array_equal(out, expected)


def test_umap_memberships_on_threads(built):
    # a kNN with exact copies (rho = 0 rows take the global mean's floor) and spread rows
    x = np.concatenate([blobs(n=300, dim=6, seed=3), np.repeat(blobs(n=5, dim=6, seed=4), 20, axis=0)])
    knn_idx, knn_dist = knn_host(x, 15, "euclidean")
    vals, sigmas, rhos = connectivity.umap_memberships_host(knn_idx, knn_dist)
    n, k = knn_idx.shape
    dist32 = knn_dist.astype(np.float32)
    out_vals, out_sigmas, out_rhos = np.empty((n, k), np.float32), np.empty(n, np.float32), np.empty(n, np.float32)
    mean_all = np.float32(dist32.astype(np.float64).mean())  # as umap_connectivities_device takes it
    built["connectivity"]["umap_memberships"]((-(-n // connectivity.BLOCK),), (connectivity.BLOCK,), (
        knn_idx, dist32, np.int64(n), np.int32(k), np.float64(np.log2(k)), mean_all, np.float32(1.0),
        np.int32(connectivity.N_ITER), out_sigmas, out_rhos, out_vals))
    assert (rhos == 0).sum() >= 100
    np.testing.assert_array_equal(out_rhos, rhos)
    # expf (libm) and numba's exp may differ in the last bit; the search for sigma stops once
    # |sum - log2 k| < 1e-5, so such a bit can stop it one step apart: agreement to 1e-4
    np.testing.assert_allclose(out_sigmas, sigmas, rtol=1e-4)
    np.testing.assert_allclose(out_vals, vals, rtol=1e-4, atol=1e-7)
