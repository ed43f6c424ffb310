"""gpusc.pp.pca / tl.pca against scanpy 1.12's pca run on an identical copy (the oracle)."""

from __future__ import annotations

import inspect
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from threadpoolctl import threadpool_limits

import gpusc as rsc
from _compare import assert_unchanged, snapshot, to_host
from conftest import HOST_TYPES, read_real, synthetic_counts, to_device
from gpusc._core.arrays import placement
from gpusc._kernels.gram import DenseRows, gram
from gpusc.pp import _pca

N_COSINE = 20  # components compared with scanpy's (DESIGN.md: |cos| > 0.999; held far tighter)

# Deviation from scanpy, measured as the largest over this file's tests. float32 input (scanpy
# computes in float32, gpusc accumulates in float64): 1 - |cos| 2.1e-8, variance ratio 1.6e-7
# (absolute), variance 5.6e-6 (relative), X_pca 2.7e-4 of its column's largest |value|.
# float64 input (both in float64): 1.2e-15, 1.9e-16, 4.6e-15, and X_pca equal once rounded
# to scanpy's float32 output. Allowed: about 5x the measured deviation (4x for X_pca; for
# float64 X_pca four float32 ulps of the column's largest value).
PCA_TOL = {
    np.float32: dict(cos=1e-7, ratio_atol=1e-6, var_rtol=3e-5, x_rtol=1e-3),
    np.float64: dict(cos=5e-15, ratio_atol=1e-15, var_rtol=2e-14, x_rtol=2.4e-7),
}


@pytest.fixture(autouse=True)
def one_blas_thread():
    # On a shared 2-core machine OpenBLAS' spinning threads make eigh and QR ~10x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def quiet_scanpy(func, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return func(*args, **kwargs)


def assert_pca_close(ref, test, n=N_COSINE, *, input_dtype=np.float32, **tol):
    """ref/test: (X_pca, components (k × genes), variance_ratio, variance) from scanpy / gpusc;
    tolerances ``PCA_TOL[input_dtype]``, single ones overridden by ``tol``."""
    tol = PCA_TOL[np.dtype(input_dtype).type] | tol
    x_ref, c_ref, r_ref, v_ref = (np.asarray(a, dtype=np.float64) for a in ref)
    x_test, c_test, r_test, v_test = (np.asarray(to_host(a), dtype=np.float64) for a in test)
    assert x_test.shape == x_ref.shape and c_test.shape == c_ref.shape
    n = min(n, c_ref.shape[0])
    cos = np.abs(np.sum(c_ref[:n] * c_test[:n], axis=1)) / (
        np.linalg.norm(c_ref[:n], axis=1) * np.linalg.norm(c_test[:n], axis=1))
    assert (1 - cos).max() <= tol["cos"], f"1 - |cos| per component: {1 - cos}"
    np.testing.assert_allclose(r_test, r_ref, atol=tol["ratio_atol"], rtol=0)
    np.testing.assert_allclose(v_test[:n], v_ref[:n], rtol=tol["var_rtol"])
    # the same sign convention (scikit-learn's svd_flip), so X_pca matches column by column
    # where the largest loading is not a near tie; otherwise up to the column's sign
    sign = np.sign(np.sum(c_ref[:n] * c_test[:n], axis=1))
    scale = np.abs(x_ref[:, :n]).max(axis=0)
    np.testing.assert_array_less(np.abs(x_test[:, :n] * sign - x_ref[:, :n]).max(axis=0), tol["x_rtol"] * scale)
    return cos, np.abs(r_test - r_ref).max()


def info(adata, key="pca"):
    varm = adata.varm["PCs" if key == "pca" else key]
    return adata.obsm["X_pca" if key == "pca" else key], varm.T, adata.uns[key]["variance_ratio"], adata.uns[key]["variance"]


def assert_same_uns(ref: ad.AnnData, test: ad.AnnData, key="pca"):
    assert set(test.uns[key]) == set(ref.uns[key])
    params_ref, params_test = ref.uns[key]["params"], test.uns[key]["params"]
    assert set(params_test) == set(params_ref)
    for k, v in params_ref.items():
        np.testing.assert_array_equal(params_test[k], v)
    for k in ("variance", "variance_ratio"):
        assert test.uns[key][k].dtype == ref.uns[key][k].dtype, k
    varm_key = "PCs" if key == "pca" else key
    assert test.varm[varm_key].dtype == ref.varm[varm_key].dtype
    assert type(test.obsm["X_pca" if key == "pca" else key]) is np.ndarray
    assert test.obsm["X_pca" if key == "pca" else key].dtype == ref.obsm["X_pca" if key == "pca" else key].dtype


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def pbmc():
    """pbmc3k after normalize_total, log1p and 2000 highly variable genes (scanpy's)."""
    adata = read_real("pbmc3k_counts_labeled.h5ad")
    with threadpool_limits(limits=1, user_api="blas"):
        quiet_scanpy(sc.pp.normalize_total, adata)
        quiet_scanpy(sc.pp.log1p, adata)
        quiet_scanpy(sc.pp.highly_variable_genes, adata, n_top_genes=2000)
    return adata


@pytest.fixture(scope="module")
def pbmc_scanpy(pbmc):
    ref = pbmc.copy()
    with threadpool_limits(limits=1, user_api="blas"):
        quiet_scanpy(sc.pp.pca, ref)
    return ref


@pytest.mark.scanpy_112("scanpy 1.11's pca has no obsm parameter")
def test_signature():
    ours, theirs = inspect.signature(rsc.pp.pca), inspect.signature(sc.pp.pca)
    assert list(ours.parameters) == list(theirs.parameters)
    for name, p in theirs.parameters.items():
        q = ours.parameters[name]
        assert q.kind == p.kind, name
        if name != "mask_var":  # scanpy's private sentinel; ours behaves the same
            assert q.default == p.default, name
    assert rsc.tl.pca is rsc.pp.pca


def test_real_sparse_default(pbmc, pbmc_scanpy):
    test = pbmc.copy()
    rsc.pp.pca(test)
    cos, ratio_diff = assert_pca_close(info(pbmc_scanpy), info(test))
    assert_same_uns(pbmc_scanpy, test)
    hvg = pbmc.var["highly_variable"].to_numpy()
    assert np.all(test.varm["PCs"][~hvg] == 0)
    assert test.obsm["X_pca"].shape == (pbmc.n_obs, 50)
    assert test.uns["pca"]["params"]["mask_var"] == "highly_variable"


def test_real_sparse_randomized_solver_and_wide_path(pbmc, pbmc_scanpy, monkeypatch):
    test = pbmc.copy()
    rsc.pp.pca(test, svd_solver="randomized")
    assert_pca_close(info(pbmc_scanpy), info(test))
    # the path for > GRAM_MAX_VARS genes, taken here with a lower threshold
    monkeypatch.setattr(_pca, "GRAM_MAX_VARS", 100)
    wide = pbmc.copy()
    rsc.pp.pca(wide)
    assert_pca_close(info(pbmc_scanpy), info(wide))


@pytest.mark.parametrize("svd_solver", [None, "randomized"])
def test_real_sparse_through_dense_rows(pbmc, pbmc_scanpy, monkeypatch, svd_solver):
    """The device CSR path (gene mask as a column map, dense float64 row blocks, dense
    products) with DenseRows' numba twin standing in for its CUDA kernel."""
    monkeypatch.setattr(_pca, "_select_columns",
                        lambda x, mask: DenseRows(x, np.flatnonzero(mask)))
    test = pbmc.copy()
    rsc.pp.pca(test, svd_solver=svd_solver)
    assert_pca_close(info(pbmc_scanpy), info(test))
    assert_same_uns(pbmc_scanpy, test)
    # NaN in a selected gene is an error; in a left-out gene it is never read, as in scanpy
    hvg = np.flatnonzero(pbmc.var["highly_variable"].to_numpy())
    other = np.flatnonzero(~pbmc.var["highly_variable"].to_numpy())
    for gene, fails in ((hvg[3], True), (other[3], False)):
        bad = pbmc.copy()
        x = bad.X.tolil()
        x[5, gene] = np.nan
        bad.X = x.tocsr()
        if fails:
            with pytest.raises(ValueError, match="NaN"):
                rsc.pp.pca(bad, 10)
        else:
            rsc.pp.pca(bad, 10)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_dense_rows(index_dtype):
    rng = np.random.default_rng(4)
    n_obs, n_vars = 120, 60
    rows = np.repeat(np.arange(n_obs), 9)
    cols = rng.integers(0, n_vars, rows.size)  # unsorted, with duplicates
    x = sparse.csr_matrix((rng.random(rows.size).astype(np.float32), cols.astype(index_dtype),
                           np.arange(0, rows.size + 1, 9).astype(index_dtype)), shape=(n_obs, n_vars))
    keep = np.flatnonzero(rng.random(n_vars) < 0.6)
    summed = x.copy()
    summed.sum_duplicates()
    expected = summed[:, keep].toarray().astype(np.float64)
    blocks = DenseRows(x, keep)
    assert blocks.shape == (n_obs, keep.size) and placement(blocks) == "host"
    np.testing.assert_array_equal(blocks[7:50], expected[7:50])
    np.testing.assert_array_equal(blocks[:], expected)
    assert blocks[50:50].shape == (0, keep.size)
    g, s = gram(blocks)
    np.testing.assert_allclose(g, expected.T @ expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, expected.sum(axis=0), rtol=1e-12)
    for index in (3, slice(0, 10, 2)):
        with pytest.raises(TypeError, match="slice"):
            blocks[index]
    assert blocks.all_finite()
    left_out = np.flatnonzero(~np.isin(summed.indices, keep))[0]
    kept = np.flatnonzero(np.isin(summed.indices, keep))[0]
    for position, expected_finite in ((left_out, True), (kept, False)):
        poisoned = summed.copy()
        poisoned.data[position] = np.nan
        assert DenseRows(poisoned, keep).all_finite() is expected_finite
    counts = DenseRows(sparse.csr_matrix(np.arange(12, dtype=np.int32).reshape(3, 4)), keep[keep < 4])
    np.testing.assert_array_equal(counts[0:3], np.arange(12.0).reshape(3, 4)[:, keep[keep < 4]])


def test_real_dense_scaled(pbmc):
    adata = pbmc[:, pbmc.var["highly_variable"].to_numpy()].copy()
    quiet_scanpy(sc.pp.scale, adata, max_value=10)
    ref, test = adata.copy(), adata.copy()
    quiet_scanpy(sc.pp.pca, ref, n_comps=20)
    rsc.pp.pca(test, n_comps=20)
    assert_pca_close(info(ref), info(test), input_dtype=adata.X.dtype)  # scale returns float64
    assert_same_uns(ref, test)


def test_real_zero_center_false(pbmc):
    # scanpy's default here is TruncatedSVD's randomized solver (approximate); its arpack
    # solver is exact. Ours is exact, so compare with arpack closely, the default loosely.
    ref_exact, ref_default, test = pbmc.copy(), pbmc.copy(), pbmc.copy()
    quiet_scanpy(sc.pp.pca, ref_exact, n_comps=20, zero_center=False, svd_solver="arpack")
    quiet_scanpy(sc.pp.pca, ref_default, n_comps=20, zero_center=False)
    rsc.pp.pca(test, n_comps=20, zero_center=False)
    assert_pca_close(info(ref_exact), info(test))
    assert_same_uns(ref_exact, test)
    c_ref, c_test = info(ref_default)[1][:5], info(test)[1][:5]
    cos = np.abs(np.sum(c_ref * c_test, axis=1)) / np.linalg.norm(c_ref, axis=1) / np.linalg.norm(c_test, axis=1)
    # measured: 1 - |cos| at most 2.3e-9 over the top 5 (the 10th on drift by 1e-1); allowed 1e-8
    assert (1 - cos).max() <= 1e-8, 1 - cos


# ---------------------------------------------------------------- synthetic data

DTYPES = [np.float32, np.float64]


def synthetic(dtype=np.float32, n_obs=300, n_vars=200, seed=0):
    counts = synthetic_counts(n_obs, n_vars, dtype=dtype, seed=seed, empty_rows=(3, min(17, n_obs - 1)),
                              empty_cols=(5, min(40, n_vars - 1)))
    return np.log1p(counts).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_synthetic_array_types(array_type, dtype):
    x = synthetic(dtype)
    ref = quiet_scanpy(sc.pp.pca, x.copy(), 30, return_info=True)
    test = rsc.pp.pca(array_type(x), 30, return_info=True)
    assert_pca_close(ref, test, input_dtype=dtype)
    for a, b in zip(ref, test, strict=True):
        assert to_host(b).dtype == a.dtype
    assert to_host(test[0]).shape == (x.shape[0], 30)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
def test_synthetic_zero_center_false(kind, dtype):
    x = synthetic(dtype)
    ref = quiet_scanpy(sc.pp.pca, x.copy(), 20, zero_center=False, svd_solver="arpack", return_info=True)
    test = rsc.pp.pca(HOST_TYPES[kind](x), 20, zero_center=False, return_info=True)
    assert_pca_close(ref, test, input_dtype=dtype)


def test_synthetic_randomized_matches_exact():
    x = sparse.csr_matrix(synthetic())
    ref = quiet_scanpy(sc.pp.pca, x.copy(), 20, return_info=True)
    assert_pca_close(ref, rsc.pp.pca(x, 20, svd_solver="randomized", return_info=True))
    ref = quiet_scanpy(sc.pp.pca, x.copy(), 20, zero_center=False, svd_solver="arpack", return_info=True)
    assert_pca_close(ref, rsc.pp.pca(x, 20, zero_center=False, svd_solver="randomized", return_info=True))


def synthetic_adata(dtype=np.float32, kind="csr_matrix", **kw):
    x = synthetic(dtype, **kw)
    var = pd.DataFrame(index=[f"g{i}" for i in range(x.shape[1])])
    var["highly_variable"] = np.arange(x.shape[1]) % 3 != 0
    var["even"] = np.arange(x.shape[1]) % 2 == 0
    return ad.AnnData(HOST_TYPES[kind](x), var=var, layers={"counts": HOST_TYPES[kind](x.copy())})


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default-hvg"),
        pytest.param(dict(mask_var=None), id="mask_var-None"),
        pytest.param(dict(mask_var="even"), id="mask_var-str"),
        pytest.param(dict(mask_var=np.arange(200) % 5 != 1), id="mask_var-array"),
        pytest.param(dict(use_highly_variable=True), id="use_highly_variable-True"),
        pytest.param(dict(use_highly_variable=False), id="use_highly_variable-False"),
        pytest.param(dict(layer="counts", n_comps=15), id="layer"),
        pytest.param(dict(key_added="my_pca", n_comps=10), id="key_added"),
        pytest.param(dict(zero_center=False, svd_solver="arpack", n_comps=10), id="zero_center-False"),
        pytest.param(dict(dtype="float64", n_comps=10), id="dtype"),
    ],
)
def test_anndata_options(kwargs):
    ref, test = synthetic_adata(), synthetic_adata()
    quiet_scanpy(sc.pp.pca, ref, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rsc.pp.pca(test, **{k: v for k, v in kwargs.items() if k != "svd_solver"})
    key = kwargs.get("key_added", "pca")
    assert_pca_close(info(ref, key), info(test, key))
    assert_same_uns(ref, test, key)
    mask = ref.uns[key]["params"]["mask_var"]
    if mask is not None:
        mask = ref.var[mask].to_numpy() if isinstance(mask, str) else mask
        assert np.all(test.varm["PCs" if key == "pca" else key][~mask] == 0)


def test_use_highly_variable_warns_like_scanpy():
    adata = synthetic_adata()
    with pytest.warns(FutureWarning, match="use_highly_variable"):
        rsc.pp.pca(adata, use_highly_variable=True)
    with pytest.raises(ValueError, match="mask_var"):
        rsc.pp.pca(adata, use_highly_variable=True, mask_var="even")


@pytest.mark.scanpy_112("scanpy 1.11's pca has no obsm parameter")
def test_obsm_input():
    ref, test = synthetic_adata(), synthetic_adata()
    for a in (ref, test):
        a.obsm["emb"] = synthetic(np.float64, seed=3)[:, :40]
    quiet_scanpy(sc.pp.pca, ref, n_comps=10, obsm="emb")
    rsc.pp.pca(test, n_comps=10, obsm="emb")
    assert set(test.uns["pca"]) == set(ref.uns["pca"])
    assert test.uns["pca"]["params"] == ref.uns["pca"]["params"]
    assert_pca_close(
        (ref.obsm["X_pca"], ref.uns["pca"]["components"].T, ref.uns["pca"]["variance_ratio"], ref.uns["pca"]["variance"]),
        (test.obsm["X_pca"], test.uns["pca"]["components"].T, test.uns["pca"]["variance_ratio"], test.uns["pca"]["variance"]),
        input_dtype=np.float64,
    )


@pytest.mark.parametrize(("shape", "expected"), [((300, 200), 50), ((40, 30), 29), ((25, 60), 24)])
def test_n_comps_default(shape, expected):
    x = synthetic(np.float64, *shape)
    ref = quiet_scanpy(sc.pp.pca, x.copy(), return_info=True)
    test = rsc.pp.pca(x, return_info=True)
    assert test[0].shape == ref[0].shape == (shape[0], expected)
    assert_pca_close(ref, test, input_dtype=np.float64)


@pytest.mark.parametrize("kind", ["dense", "csr_matrix", "csc_matrix"])
def test_chunked(kind):
    adata = synthetic_adata(kind=kind)
    ref_chunked, ref_exact, test = adata.copy(), adata.copy(), adata.copy()
    quiet_scanpy(sc.pp.pca, ref_chunked, n_comps=10, chunked=True, chunk_size=70)
    quiet_scanpy(sc.pp.pca, ref_exact, n_comps=10)
    rsc.pp.pca(test, n_comps=10, chunked=True, chunk_size=70)
    # keys and dtypes as scanpy's chunked (IncrementalPCA) path; numbers as the exact PCA,
    # which IncrementalPCA approximates
    assert_same_uns(ref_chunked, test)
    assert_pca_close(info(ref_exact), info(test))


def test_copy_and_array_return():
    adata = synthetic_adata()
    before = snapshot(adata)
    out = rsc.pp.pca(adata, n_comps=5, copy=True)
    assert "X_pca" in out.obsm and "X_pca" not in adata.obsm
    assert_unchanged(adata, before)
    x_pca = rsc.pp.pca(adata.X, 5)
    assert isinstance(x_pca, np.ndarray) and x_pca.shape == (adata.n_obs, 5) and x_pca.dtype == np.float32


def test_deterministic():
    x = sparse.csr_matrix(synthetic())
    for solver in (None, "randomized"):
        a = rsc.pp.pca(x, 20, svd_solver=solver, return_info=True)
        b = rsc.pp.pca(x, 20, svd_solver=solver, return_info=True)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("n_comps", [200, 300, 0, -1])
def test_n_comps_out_of_range(n_comps):
    adata = synthetic_adata(n_obs=300, n_vars=200)
    with pytest.raises(ValueError):  # scanpy fails too
        quiet_scanpy(sc.pp.pca, adata.copy(), n_comps, mask_var=None)
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"n_comps=.*min\(n_obs, n_vars\) - 1 = 199"):
        rsc.pp.pca(adata, n_comps, mask_var=None)
    assert_unchanged(adata, before)
    # with the default mask the limit is the number of highly variable genes
    with pytest.raises(ValueError, match=r"n_comps=150.*= 132"):
        rsc.pp.pca(adata, 150)


@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
def test_nan_rejected(kind):
    x = synthetic()
    x[5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quiet_scanpy(sc.pp.pca, HOST_TYPES[kind](x.copy()), 10)
    adata = ad.AnnData(HOST_TYPES[kind](x))
    before = snapshot(adata)
    with pytest.raises(ValueError, match="NaN"):
        rsc.pp.pca(adata, 10)
    assert_unchanged(adata, before)


def test_missing_layer_and_chunked_layer():
    adata = synthetic_adata()
    before = snapshot(adata)
    with pytest.raises(KeyError, match="nope"):
        rsc.pp.pca(adata, 10, layer="nope")
    with pytest.raises(NotImplementedError):
        rsc.pp.pca(adata, 10, layer="counts", chunked=True)
    with pytest.raises(ValueError, match="mask_var"):
        rsc.pp.pca(adata, 10, mask_var="missing")
    assert_unchanged(adata, before)


# ---------------------------------------------------------------- the Gram kernel


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gram_unsorted_duplicates(dtype, index_dtype):
    """XᵀX and column sums of a CSR matrix with unsorted rows and duplicate entries."""
    rng = np.random.default_rng(1)
    n_obs, n_vars, per_row = 90, 70, 12
    rows = np.repeat(np.arange(n_obs), per_row)
    cols = rng.integers(0, n_vars, rows.size)  # unsorted within rows, some repeated
    vals = rng.random(rows.size).astype(dtype)
    indptr = np.arange(0, rows.size + 1, per_row)
    csr = sparse.csr_matrix((vals, cols.astype(index_dtype), indptr.astype(index_dtype)),
                            shape=(n_obs, n_vars))
    assert not csr.has_canonical_format
    # duplicates are summed in the matrix's dtype first (scipy's sum_duplicates), as every
    # gpusc kernel family does; then the products in float64
    expected = np.zeros((n_obs, n_vars), dtype)
    np.add.at(expected, (rows, cols), vals)
    expected = expected.astype(np.float64)
    g, s = gram(csr)
    np.testing.assert_allclose(g, expected.T @ expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, expected.sum(axis=0), rtol=1e-12)
    rounded = expected.astype(dtype)  # dense input of the same dtype (duplicates summed first)
    g_dense, s_dense = gram(rounded)
    exact = rounded.astype(np.float64)
    np.testing.assert_allclose(g_dense, exact.T @ exact, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s_dense, exact.sum(axis=0), rtol=1e-12)


# ---------------------------------------------------------------- device


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "csr_matrix", "csc_matrix"])
def test_device_matches_host_and_stays_on_device(kind):
    import cupy as cp

    adata = synthetic_adata(kind=kind)
    dev = adata.copy()
    dev.X = to_device(dev.X)
    rsc.pp.pca(adata, n_comps=20)
    rsc.pp.pca(dev, n_comps=20)
    assert isinstance(dev.obsm["X_pca"], cp.ndarray)
    assert isinstance(dev.varm["PCs"], np.ndarray)
    assert_pca_close(info(adata), info(dev), ratio_atol=1e-10, x_rtol=1e-5)
    again = adata.copy()
    again.X = to_device(again.X)
    rsc.pp.pca(again, n_comps=20)
    np.testing.assert_array_equal(dev.obsm["X_pca"].get(), again.obsm["X_pca"].get())


@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_device_gram_kernel(index_dtype):
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse

    x = sparse.random(3000, 700, density=0.05, format="csr", random_state=2, dtype=np.float32)
    dev = cpsparse.csr_matrix((cp.asarray(x.data), cp.asarray(x.indices.astype(index_dtype)),
                               cp.asarray(x.indptr.astype(index_dtype))), shape=x.shape)
    g, s = gram(dev)
    g_host, s_host = gram(x)
    np.testing.assert_allclose(g.get(), g_host, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.get(), s_host, rtol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_device_dense_rows_kernel(index_dtype):
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse

    x = sparse.random(3000, 700, density=0.05, format="csr", random_state=5, dtype=np.float32)
    keep = np.flatnonzero(np.random.default_rng(0).random(700) < 0.3)
    dev = cpsparse.csr_matrix((cp.asarray(x.data), cp.asarray(x.indices.astype(index_dtype)),
                               cp.asarray(x.indptr.astype(index_dtype))), shape=x.shape)
    blocks = DenseRows(dev, keep)
    assert placement(blocks) == "device"
    np.testing.assert_array_equal(blocks[100:2900].get(), DenseRows(x, keep)[100:2900])


def test_cuml_solver_needs_dense_device_input():
    adata = synthetic_adata()  # host CSR
    before = snapshot(adata)
    with pytest.raises(ValueError, match="svd_solver='cuml' takes dense device input"):
        rsc.pp.pca(adata, 10, svd_solver="cuml")
    assert_unchanged(adata, before)


@pytest.mark.gpu
def test_device_cuml_solver(pbmc):
    adata = pbmc[:, pbmc.var["highly_variable"].to_numpy()].copy()
    quiet_scanpy(sc.pp.scale, adata, max_value=10)
    ref = adata.copy()
    quiet_scanpy(sc.pp.pca, ref)
    dev = adata.copy()
    dev.X = to_device(dev.X)
    try:
        import cuml  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs cuML"):
            rsc.pp.pca(dev, svd_solver="cuml")
        return
    rsc.pp.pca(dev, svd_solver="cuml")
    assert_pca_close(info(ref), info(dev))


@pytest.mark.gpu
def test_device_peak_memory_sparse():
    """Sparse input is never densified: the peak stays near n_vars² doubles, not n_obs × n_vars."""
    import cupy as cp
    from cupy.cuda import MemoryHook  # the base class (cupy.cuda.memory_hooks holds CuPy's own hooks)

    class Peak(MemoryHook):
        name = "peak"

        def __init__(self):
            self.now = self.peak = 0

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.now += mem_size
            self.peak = max(self.peak, self.now)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.now -= mem_size

    n_obs, n_vars = 200_000, 500
    x = sparse.random(n_obs, n_vars, density=0.02, format="csr", random_state=3, dtype=np.float32)
    dev = to_device(x)
    hook = Peak()
    with hook:
        rsc.pp.pca(dev, 20)
    dense_bytes = n_obs * n_vars * 4
    assert hook.peak < dense_bytes / 2, (hook.peak, dense_bytes)
