"""pp.pca on a dask X chunked by rows: equal to gpusc's in-memory PCA and to scanpy 1.12's own
dask PCA (sparse chunks: its covariance-eigh default; dense chunks: svd_solver='covariance_eigh',
since its other dense dask solvers need dask-ml), in the number of passes the docstring says."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse
from threadpoolctl import threadpool_limits

import gpusc as rsc
from _dask import as_dask, count_computes, da
from conftest import read_real, skip_unless_scanpy_112, synthetic_counts
from gpusc.pp import _pca
from test_pp_pca import assert_pca_close, info

N_COMPS = 20
CLASSES = {"dense": np.asarray, "csr_matrix": sparse.csr_matrix, "csr_array": sparse.csr_array}
# gpusc on dask against gpusc in memory: the same float64 sums in another order (a tree of
# per-chunk partials), so float64 tolerances for every input dtype
SAME = dict(input_dtype=np.float64)
# scanpy's dask PCA accumulates the Gram matrix in the input dtype (float32 here, gpusc in
# float64): against it, 1 − |cos| measured up to 1.8e-7 on float32 input (PCA_TOL: 1e-7 against
# scikit-learn in memory); allowed 1e-6. float64 input: PCA_TOL as is.
SCANPY_DASK = {np.float32: dict(cos=1e-6), np.float64: {}}


@pytest.fixture(autouse=True)
def one_blas_thread():
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def log_counts(dtype=np.float32, n_obs=300, n_vars=200, seed=0):
    x = synthetic_counts(n_obs, n_vars, dtype=np.float64, seed=seed)
    return np.log1p(x).astype(dtype)


def make(kind, dtype, chunks="uneven", index_dtype=None, **kw):
    x = CLASSES[kind](log_counts(dtype, **kw))
    return x, as_dask(x, chunks, index_dtype=index_dtype if kind != "dense" else None)


def scanpy_dask(x_dask, n_comps=N_COMPS, **kw):
    """scanpy's dask PCA as (X_pca, components, variance_ratio, variance). Its covariance
    divides by n (scikit-learn's PCA and scanpy in memory by n − 1, as gpusc does on dask
    too): the variance is rescaled to n − 1 here; the ratio is the same."""
    adata = x_dask if isinstance(x_dask, ad.AnnData) else ad.AnnData(x_dask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.pca(adata, n_comps, **kw)
    return scanpy_dask_info(adata)


def scanpy_dask_info(adata):
    adata.obsm["X_pca"] = adata.obsm["X_pca"].compute()
    x_pca, components, ratio, variance = info(adata)
    n = adata.n_obs
    return x_pca, components, ratio, variance * n / (n - 1)


CASES = [pytest.param("dense", None, id="dense")] + [
    pytest.param(kind, index, id=f"{kind}-{np.dtype(index).name}")
    for kind, index in (("csr_matrix", np.int32), ("csr_matrix", np.int64), ("csr_array", np.int64))
]


@pytest.mark.parametrize("chunks", ["uneven", "empty"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("kind", "index_dtype"), CASES)
def test_gram_and_lanczos_equal_in_memory_and_scanpy(kind, index_dtype, dtype, chunks):
    x, x_dask = make(kind, dtype, chunks, index_dtype)
    memory = rsc.pp.pca(x, N_COMPS, return_info=True)
    with count_computes() as passes:
        gram = rsc.pp.pca(x_dask, N_COMPS, return_info=True)
    assert passes.computes == 2  # the Gram pass, then X_pca
    assert type(gram[0]) is np.ndarray and gram[0].dtype == np.float32
    for a, b in zip(gram[1:], memory[1:]):
        assert a.dtype == b.dtype
    assert_pca_close(memory, gram, **SAME)
    if chunks == "empty":  # ~120 passes of a few ms each: once per array type is enough
        lanczos = rsc.pp.pca(x_dask, N_COMPS, svd_solver="lanczos", return_info=True)
        assert_pca_close(memory, lanczos, **SAME)
    # scanpy's own dask PCA (a lazy X_pca, computed here)
    if kind == "csr_array":
        skip_unless_scanpy_112("its own dask PCA (PCAEighDask) takes spmatrix chunks only and sends "
                               "csr_array chunks to dask_ml: 'No module named 'dask_ml''")
    theirs = scanpy_dask(x_dask, **({} if kind != "dense" else dict(svd_solver="covariance_eigh")))
    assert_pca_close(theirs, gram, input_dtype=dtype, **SCANPY_DASK[dtype])


@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
def test_chunked_keeps_x_pca_lazy(kind):
    x, x_dask = make(kind, np.float32)
    memory = rsc.pp.pca(x, N_COMPS, chunked=True, return_info=True)
    with count_computes() as passes:
        lazy = rsc.pp.pca(x_dask, N_COMPS, chunked=True, return_info=True)
    assert passes.computes == 1  # the Gram pass only
    assert isinstance(lazy[0], da.Array) and lazy[0].chunks[0] == x_dask.chunks[0]
    assert lazy[0].dtype == np.float32 and lazy[1].dtype == np.float64  # as chunked in memory
    with count_computes() as passes:
        x_pca = lazy[0].compute()
    assert passes.computes == 1
    assert_pca_close(memory, (x_pca, *lazy[1:]), **SAME)


@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
@pytest.mark.parametrize("svd_solver", [None, "lanczos"])
def test_zero_center_false(kind, svd_solver):
    """scanpy refuses sparse dask here (dask-ml's TruncatedSVD) and needs dask-ml for dense
    dask: the oracle is scanpy's in-memory TruncatedSVD (ARPACK), then gpusc in memory."""
    x, x_dask = make(kind, np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sc.pp.pca(x.copy(), N_COMPS, zero_center=False, svd_solver="arpack", return_info=True)
    ours = rsc.pp.pca(x_dask, N_COMPS, zero_center=False, svd_solver=svd_solver, return_info=True)
    assert_pca_close(theirs, ours, input_dtype=np.float64)
    assert_pca_close(rsc.pp.pca(x, N_COMPS, zero_center=False, return_info=True), ours, **SAME)


def test_randomized_on_dask():
    x, x_dask = make("dense", np.float64)
    memory = rsc.pp.pca(x, N_COMPS, svd_solver="randomized", return_info=True)
    assert_pca_close(memory, rsc.pp.pca(x_dask, N_COMPS, svd_solver="randomized", return_info=True), **SAME)


def adata_with_hvg(x_dask):
    n_vars = x_dask.shape[1]
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_vars)])
    var["highly_variable"] = np.arange(n_vars) % 3 != 0
    var["even"] = np.arange(n_vars) % 2 == 0
    return ad.AnnData(x_dask, var=var)


@pytest.mark.parametrize("mask_kw", [{}, {"mask_var": "even"}, {"use_highly_variable": True}],
                         ids=["default-hvg", "mask_var", "use_highly_variable"])
def test_anndata_masks_like_scanpy(mask_kw):
    _, x_dask = make("csr_matrix", np.float32, "empty")
    ours, theirs = adata_with_hvg(x_dask), adata_with_hvg(x_dask)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        rsc.pp.pca(ours, N_COMPS, **mask_kw)
    with warnings.catch_warnings(record=True) as ref:
        warnings.simplefilter("always")
        sc.pp.pca(theirs, N_COMPS, **mask_kw)
    assert [str(w.message) for w in got if w.category is FutureWarning] == \
        [str(w.message) for w in ref if w.category is FutureWarning]
    theirs_info = scanpy_dask_info(theirs)
    assert_pca_close(theirs_info, info(ours), **SCANPY_DASK[np.float32])
    assert ours.uns["pca"]["params"] == theirs.uns["pca"]["params"]
    assert type(ours.obsm["X_pca"]) is np.ndarray
    assert ours.varm["PCs"].dtype == theirs.varm["PCs"].dtype
    for key in ("variance", "variance_ratio"):
        assert ours.uns["pca"][key].dtype == theirs.uns["pca"][key].dtype
    mask = ours.var["even" if mask_kw.get("mask_var") else "highly_variable"].to_numpy()
    assert np.all(ours.varm["PCs"][~mask] == 0)
    assert isinstance(ours.X, da.Array)  # X itself is left lazy


def test_wide_input_takes_lanczos(monkeypatch):
    """Above GRAM_MAX_VARS genes (lowered here) the default is the matrix-free Lanczos solver:
    no n_vars² partial is formed on any chunk."""
    x, x_dask = make("csr_matrix", np.float64)
    memory = rsc.pp.pca(x, N_COMPS, return_info=True)
    monkeypatch.setattr(_pca, "GRAM_MAX_VARS", 50)
    monkeypatch.setattr(_pca, "gram", None)  # would fail if called
    with count_computes() as passes:
        wide = rsc.pp.pca(x_dask, N_COMPS, return_info=True)
    assert_pca_close(memory, wide, **SAME)
    # one pass for the column statistics, one for the start vector (Xᵀ·u), two per Lanczos
    # step (X·v, Xᵀ·u), one for X_pca
    assert (passes.computes - 3) % 2 == 0 and passes.computes > 2 * N_COMPS


def test_real_pbmc3k_hvg_against_scanpy_dask():
    """pbmc3k, 900 cells subsampled, scaled to the median total and log1p'd (with scipy: the
    PCA is under test), as CSR chunks; var['highly_variable'] marks the 2000 genes of highest
    variance (mask_var's default)."""
    adata = read_real("pbmc3k_counts_labeled.h5ad")[::3].copy()
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    x = sparse.csr_matrix(sparse.diags(np.median(totals) / totals) @ adata.X)
    x.data = np.log1p(x.data)
    variance = np.asarray(x.multiply(x).mean(axis=0)).ravel() - np.asarray(x.mean(axis=0)).ravel() ** 2
    adata.var["highly_variable"] = np.isin(np.arange(adata.n_vars), np.argsort(-variance)[:2000])
    adata.X = as_dask(x.astype(np.float32), "uneven")
    ours = adata.copy()
    rsc.pp.pca(ours)
    theirs = scanpy_dask(adata.copy(), n_comps=50)
    assert_pca_close(theirs, info(ours), **SCANPY_DASK[np.float32])


# ---------------------------------------------------------------- bad input


def dask_snapshot(adata):
    return dict(x=adata.X, obsm=set(adata.obsm), varm=set(adata.varm), uns=set(adata.uns))


@pytest.mark.parametrize("bad", ["csc", "gene_split", "mixed", "nan", "random_state"])
def test_bad_input_clear_error_and_adata_unchanged(bad):
    x, x_dask = make("csr_matrix", np.float32)
    kw = {}
    if bad == "csc":
        x_dask = x_dask.map_blocks(lambda b: b.tocsc(), meta=sparse.csc_matrix((0, x.shape[1])))
        error, match = TypeError, "CSC"
    elif bad == "gene_split":
        x_dask = da.from_array(x.toarray(), chunks=(100, 50))
        error, match = ValueError, "split along genes"
    elif bad == "mixed":
        x_dask = x_dask.map_blocks(lambda b: b.toarray() if b.shape[0] < 100 else b, meta=x_dask._meta)
        error, match = TypeError, "not all one type"
    elif bad == "nan":
        dense = x.toarray()
        dense[7, 11] = np.nan
        x_dask = as_dask(sparse.csr_matrix(dense))
        error, match = ValueError, "NaN or inf"
    else:
        kw = dict(random_state=np.random.RandomState(0))
        error, match = TypeError, "random_state needs to be an int"  # scanpy's message
    adata = ad.AnnData(x_dask)
    before = dask_snapshot(adata)
    for solver in (None, "lanczos"):
        with pytest.raises(error, match=match):
            rsc.pp.pca(adata, N_COMPS, svd_solver=solver, **kw)
        assert dask_snapshot(adata) == before


def test_cuml_refuses_dask():
    _, x_dask = make("dense", np.float32)
    with pytest.raises(ValueError, match="cuml"):
        rsc.pp.pca(x_dask, N_COMPS, svd_solver="cuml")


# ---------------------------------------------------------------- device chunks


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["dense", "csr_matrix"])
@pytest.mark.parametrize("svd_solver", [None, "lanczos"])
def test_device_chunks_match_host(kind, svd_solver):
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse

    x, x_dask = make(kind, np.float32, "empty")
    to_device = cp.asarray if kind == "dense" else cpsparse.csr_matrix
    meta = cp.empty((0, x.shape[1]), np.float32) if kind == "dense" else \
        cpsparse.csr_matrix((0, x.shape[1]), dtype=np.float32)
    x_device = x_dask.map_blocks(to_device, meta=meta)
    host = rsc.pp.pca(x_dask, N_COMPS, svd_solver=svd_solver, return_info=True)
    with count_computes() as passes:
        device = rsc.pp.pca(x_device, N_COMPS, svd_solver=svd_solver, return_info=True)
    assert type(device[0]) is np.ndarray  # X_pca comes back to the host
    assert svd_solver or passes.computes == 2
    assert_pca_close(host, device, **SAME)
    lazy = rsc.pp.pca(x_device, N_COMPS, chunked=True)
    assert isinstance(lazy, da.Array) and isinstance(lazy._meta, cp.ndarray)
