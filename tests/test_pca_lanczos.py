"""pp.pca's restarted Lanczos bidiagonalisation (svd_solver="lanczos", and the default above
GRAM_MAX_VARS genes) against scanpy 1.12's ARPACK on real and synthetic data, and the solver
itself against LAPACK's SVD."""

from __future__ import annotations


import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse
from threadpoolctl import threadpool_limits

import gpusc as rsc
from _compare import assert_unchanged, noncanonical, snapshot
from conftest import HOST_TYPES, read_real, synthetic_counts
from gpusc._kernels.gram import matmat, rmatmat
from gpusc.pp import _pca
from gpusc.pp._lanczos import lanczos_svd
from test_pp_pca import assert_pca_close, info, quiet_scanpy

N_COMPS = 20


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def log_counts(dtype=np.float32, n_obs=300, n_vars=200, seed=0):
    return np.log1p(synthetic_counts(n_obs, n_vars, dtype=np.float64, seed=seed)).astype(dtype)


@pytest.fixture(scope="module")
def pbmc_all_genes():
    """pbmc3k scaled to the median total and log1p'd (with scipy: the PCA is under test), all
    13,714 genes: wider than GRAM_MAX_VARS."""
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.X = sparse.csr_matrix(sparse.diags(np.median(totals) / totals) @ adata.X, dtype=np.float32)
    adata.X.data = np.log1p(adata.X.data)
    assert adata.n_vars > _pca.GRAM_MAX_VARS
    return adata


def test_real_wide_default_is_lanczos_and_matches_arpack(pbmc_all_genes, monkeypatch):
    theirs = pbmc_all_genes.copy()
    quiet_scanpy(sc.pp.pca, theirs, N_COMPS)  # ARPACK on the implicitly centred sparse matrix
    ours = pbmc_all_genes.copy()
    calls = []
    monkeypatch.setattr(_pca, "lanczos_svd", lambda *a, **k: calls.append(1) or lanczos_svd(*a, **k))
    monkeypatch.setattr(_pca, "gram", None)  # the n_vars² Gram is never formed
    rsc.pp.pca(ours, N_COMPS)
    assert calls == [1]
    assert_pca_close(info(theirs), info(ours))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["dense", "csr_matrix", "csr_array", "csc_matrix"])
def test_synthetic_matches_arpack(kind, dtype):
    x = log_counts(dtype)
    theirs = quiet_scanpy(sc.pp.pca, x.copy(), N_COMPS, svd_solver="arpack", return_info=True)
    ours = rsc.pp.pca(HOST_TYPES[kind](x), N_COMPS, svd_solver="lanczos", return_info=True)
    assert_pca_close(theirs, ours, input_dtype=dtype)
    for a, b in zip(theirs, ours):
        assert a.dtype == b.dtype


@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
def test_zero_center_false_matches_truncated_svd(kind):
    x = log_counts(np.float64)
    theirs = quiet_scanpy(sc.pp.pca, x.copy(), N_COMPS, zero_center=False, svd_solver="arpack",
                          return_info=True)
    ours = rsc.pp.pca(HOST_TYPES[kind](x), N_COMPS, zero_center=False, svd_solver="lanczos",
                      return_info=True)
    assert_pca_close(theirs, ours, input_dtype=np.float64)


def test_anndata_mask_var_like_scanpy():
    x = sparse.csr_matrix(log_counts(np.float32))
    adata = ad.AnnData(x)
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 3 != 0
    theirs, ours = adata.copy(), adata.copy()
    quiet_scanpy(sc.pp.pca, theirs, N_COMPS, svd_solver="arpack")
    rsc.pp.pca(ours, N_COMPS, svd_solver="lanczos")
    assert_pca_close(info(theirs), info(ours))
    assert ours.uns["pca"]["params"] == theirs.uns["pca"]["params"]
    assert np.all(ours.varm["PCs"][~adata.var["highly_variable"].to_numpy()] == 0)


def test_seeded():
    x = sparse.csr_matrix(log_counts(np.float64))
    a = rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", random_state=3, return_info=True)
    b = rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", random_state=3, return_info=True)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)
    c = rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", random_state=4, return_info=True)
    assert not np.array_equal(a[1], c[1])  # another start vector, the same converged answer
    assert_pca_close(a, c, input_dtype=np.float64)


def test_sparse_input_never_densified(monkeypatch):
    x = sparse.csr_matrix(log_counts(np.float32))
    ref = rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", return_info=True)
    for cls in (sparse.csr_matrix, sparse.csc_matrix):
        monkeypatch.setattr(cls, "toarray", lambda *a, **k: pytest.fail("densified"))
        monkeypatch.setattr(cls, "todense", lambda *a, **k: pytest.fail("densified"))
    assert_pca_close(ref, rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", return_info=True),
                     input_dtype=np.float64)


@pytest.mark.parametrize(("shape", "rank", "k"), [((60, 40), 3, 6), ((40, 60), 40, 39), ((25, 12), 12, 12)],
                         ids=["rank-below-k", "wide-almost-full", "basis-is-everything"])
def test_solver_against_lapack(shape, rank, k):
    """Low rank (invariant subspaces: restarts from fresh directions), and a basis as large as
    the matrix; the oracle is numpy's (LAPACK) SVD of the same matrix."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    singular, vectors = lanczos_svd(lambda v: a @ v, lambda u: a.T @ u, a.shape, k)
    _, s_ref, vt_ref = np.linalg.svd(a)
    np.testing.assert_allclose(singular, s_ref[:k], atol=1e-10 * s_ref[0])
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-10)
    top = min(k, rank)
    cos = np.abs(np.sum(vectors[:, :top] * vt_ref[:top].T, axis=0))
    assert np.all(1 - cos < 1e-10)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 5])
def test_host_csr_products(index_dtype, dtype, width):
    """The numba products against scipy's, on CSR with unsorted and duplicate entries."""
    dense = synthetic_counts(2500, 70, dtype=dtype)  # over 1024 rows: Xᵀ·U sums partial parts
    x = noncanonical(dense)
    x.indices, x.indptr = x.indices.astype(index_dtype), x.indptr.astype(index_dtype)
    rng = np.random.default_rng(0)
    v, u = rng.standard_normal((70, width)), rng.standard_normal((2500, width))
    np.testing.assert_allclose(matmat(x, v), dense.astype(np.float64) @ v, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(rmatmat(x, u), dense.astype(np.float64).T @ u, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(rmatmat(x, u), rmatmat(x, u))  # a fixed order of the sums


# ---------------------------------------------------------------- bad input


def test_bad_input_clear_errors_and_adata_unchanged():
    x = log_counts(np.float32, 40, 50)
    adata = ad.AnnData(sparse.csr_matrix(x))
    before = snapshot(adata)
    with pytest.raises(ValueError, match="n_comps=40 must be between 1 and min"):
        rsc.pp.pca(adata, 40, svd_solver="lanczos")
    with pytest.raises(ValueError, match="cannot be used to seed"):  # check_random_state, as scanpy
        rsc.pp.pca(adata, 5, svd_solver="lanczos", random_state="seed")
    assert_unchanged(adata, before)
    x[3, 4] = np.inf
    bad = ad.AnnData(sparse.csr_matrix(x))
    before = snapshot(bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        rsc.pp.pca(bad, 5, svd_solver="lanczos")
    assert_unchanged(bad, before)


# ---------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
def test_device_matches_host(kind):
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse

    x = HOST_TYPES[kind](log_counts(np.float32))
    x_device = cp.asarray(x) if kind == "dense" else cpsparse.csr_matrix(x)
    host = rsc.pp.pca(x, N_COMPS, svd_solver="lanczos", return_info=True)
    device = rsc.pp.pca(x_device, N_COMPS, svd_solver="lanczos", return_info=True)
    assert isinstance(device[0], cp.ndarray)
    assert_pca_close(host, device, input_dtype=np.float64)
