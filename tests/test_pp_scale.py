"""pp.scale against scanpy.pp.scale (the oracle), and pp.filter_highly_variable."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import gpusc
from _compare import dense, scanpy_input, to_host
from conftest import read_real, synthetic_counts, tolerance
from gpusc._kernels.moments import gene_moments
from gpusc._kernels.scale import scale_csr_to_dense


def _kind(x):
    x = to_host(x)
    return x.format if sparse.issparse(x) else "dense"


@pytest.fixture(scope="module")
def real():
    a = read_real("pbmc3k_counts_labeled.h5ad")[:400, :]
    a = a[:, np.asarray((a.X > 0).sum(0)).ravel() >= 20][:, :200].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    return a.X.toarray()


@pytest.fixture(params=["real", "synthetic"])
def matrix(request, real):
    return real if request.param == "real" else synthetic_counts(150, 80)


def _pair(x, array_type, dtype, seed=0):
    """The same AnnData twice: gpusc's (array_type) and scanpy's (its host twin)."""
    host = array_type(x.astype(dtype))
    ours = ad.AnnData(host)
    mask = np.random.default_rng(seed).random(x.shape[0]) < 0.6
    ours.obs["keep"] = mask
    theirs = ours.copy()
    theirs.X = scanpy_input(to_host(theirs.X))
    return ours, theirs, mask


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("zero_center", "max_value", "mask"),
                         [(True, None, None), (True, 1.5, "keep"), (False, 2.0, None), (False, None, "array")])
def test_scale_matches_scanpy(matrix, array_type, dtype, zero_center, max_value, mask):
    ours, theirs, mask_array = _pair(matrix, array_type, dtype)
    mask_obs = mask_array if mask == "array" else mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.scale(theirs, zero_center=zero_center, max_value=max_value, mask_obs=mask_obs)
        assert gpusc.pp.scale(ours, zero_center=zero_center, max_value=max_value, mask_obs=mask_obs) is None
    tol = tolerance(dtype)
    assert _kind(ours.X) == _kind(theirs.X)
    assert to_host(ours.X).dtype == theirs.X.dtype
    np.testing.assert_allclose(dense(ours.X), dense(theirs.X), **tol)
    assert list(ours.var.columns) == list(theirs.var.columns)
    for col in theirs.var.columns:
        assert ours.var[col].dtype == theirs.var[col].dtype
        np.testing.assert_allclose(ours.var[col], theirs.var[col], **tol)


def test_scale_centring_warns_only_for_sparse_input(array_type):
    x = array_type(synthetic_counts(50, 60))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpusc.pp.scale(ad.AnnData(x))
    densifies = [w for w in caught if "densifies" in str(w.message)]
    if sparse.issparse(to_host(x)):
        assert len(densifies) == 1 and densifies[0].category is UserWarning
    else:
        assert not densifies  # dense input has nothing to densify


@pytest.mark.parametrize("copy", [True, False])
def test_scale_array_input_and_copy(host_type, copy):
    x = host_type(synthetic_counts(60, 50))
    before = dense(x).copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = sc.pp.scale(scanpy_input(host_type(before)), max_value=3)
        got = gpusc.pp.scale(x, max_value=3, copy=copy)
    np.testing.assert_allclose(dense(got), dense(expected), **tolerance(np.float32))
    if copy:
        np.testing.assert_array_equal(dense(x), before)


def test_scale_integer_input_and_layer_and_copy():
    counts = synthetic_counts(80, 50).astype(np.int64)
    ours = ad.AnnData(np.zeros_like(counts, dtype=np.float32), layers={"counts": counts})
    theirs = ours.copy()
    sc.pp.scale(theirs, layer="counts")
    new = gpusc.pp.scale(ours, layer="counts", copy=True)
    assert new.layers["counts"].dtype == theirs.layers["counts"].dtype == np.float64
    np.testing.assert_allclose(new.layers["counts"], theirs.layers["counts"], **tolerance(np.float64))
    np.testing.assert_array_equal(ours.layers["counts"], counts)  # copy=True left it alone
    assert "mean" not in ours.var


def _unchanged_after(adata, exc, match, **kwargs):
    x_before, var_before = dense(adata.X).copy(), adata.var.copy()
    with pytest.raises(exc, match=match):
        gpusc.pp.scale(adata, **kwargs)
    np.testing.assert_array_equal(dense(adata.X), x_before)
    assert adata.var.equals(var_before)


def test_scale_bad_input_leaves_adata_unchanged(host_type):
    x = synthetic_counts(40, 20, empty_cols=(5,))
    adata = ad.AnnData(host_type(x))
    adata.obs["label"] = "a"
    _unchanged_after(adata, KeyError, "layer", layer="missing")
    _unchanged_after(adata, ValueError, "max_value", max_value=0)
    _unchanged_after(adata, ValueError, "max_value", max_value=-1.0)
    _unchanged_after(adata, ValueError, "boolean", mask_obs="label")
    _unchanged_after(adata, ValueError, "mask", mask_obs=np.ones(3, bool))
    x[2, 3] = np.nan
    bad = ad.AnnData(host_type(x))
    _unchanged_after(bad, ValueError, "NaN")


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_scale_kernels_index_parity_and_duplicates(index_dtype):
    x = sparse.csr_matrix(synthetic_counts(70, 30, empty_cols=(5,)))
    x.indices, x.indptr = x.indices.astype(index_dtype), x.indptr.astype(index_dtype)
    ref = gene_moments(sparse.csr_matrix(x.toarray()))
    got = gene_moments(x)
    np.testing.assert_array_equal(got.sum, ref.sum)
    np.testing.assert_array_equal(got.sum_sq, ref.sum_sq)
    # duplicate entries (non-canonical CSR) are summed before the one-pass dense writer
    coo = x.tocoo()
    dup = sparse.csr_matrix((np.r_[coo.data / 2, coo.data / 2], (np.r_[coo.row, coo.row], np.r_[coo.col, coo.col])),
                            shape=x.shape)
    dup.has_canonical_format = False
    mean, std = np.ones(30), np.full(30, 2.0)
    np.testing.assert_array_equal(scale_csr_to_dense(dup, mean, std, -np.inf, np.inf, np.float64),
                                  (x.toarray() - 1) / 2)


# ---------------------------------------------------------------- filter_highly_variable


def test_filter_highly_variable(array_type):
    x = synthetic_counts(30, 20, empty_cols=(5,))
    adata = ad.AnnData(array_type(x))
    hv = np.zeros(20, bool)
    hv[[1, 4, 9]] = True
    adata.var["highly_variable"] = hv
    sub = gpusc.pp.filter_highly_variable(adata, copy=True)
    assert sub.n_vars == 3 and adata.n_vars == 20
    np.testing.assert_array_equal(dense(sub.X), x[:, hv])
    assert gpusc.pp.filter_highly_variable(adata) is None
    assert list(adata.var_names) == list(sub.var_names)
    np.testing.assert_array_equal(dense(adata.X), x[:, hv])


def test_filter_highly_variable_keeps_raw_as_anndata_does(array_type):
    """raw (every gene) is what anndata's own in-place subset leaves, without copying its arrays."""
    x = synthetic_counts(30, 20, empty_cols=(5,))
    adata = ad.AnnData(array_type(x))
    adata.var["highly_variable"] = np.arange(20) % 3 == 0
    adata.var["gene_score"] = np.arange(20.0)
    adata.varm["loadings"] = np.arange(40.0).reshape(20, 2)
    adata.obsm["X_pca"] = np.ones((30, 2))
    adata.raw = adata
    expected = adata.copy()
    expected._inplace_subset_var(np.flatnonzero(expected.var["highly_variable"]))
    before = adata.raw.X
    gpusc.pp.filter_highly_variable(adata)
    assert adata.raw.X is before  # set aside, not copied
    assert adata.raw.shape == expected.raw.shape == (30, 20)
    np.testing.assert_array_equal(dense(adata.raw.X), dense(expected.raw.X))
    assert adata.raw.var.equals(expected.raw.var)
    np.testing.assert_array_equal(adata.raw.varm["loadings"], expected.raw.varm["loadings"])
    assert list(adata.var_names) == list(expected.var_names)
    np.testing.assert_array_equal(dense(adata.X), dense(expected.X))
    np.testing.assert_array_equal(adata.varm["loadings"], expected.varm["loadings"])
    np.testing.assert_array_equal(adata.obsm["X_pca"], expected.obsm["X_pca"])
    assert adata.raw.to_adata().var_names.equals(expected.raw.to_adata().var_names)


def test_filter_highly_variable_needs_the_column():
    adata = ad.AnnData(synthetic_counts(20, 5, empty_cols=(1,)))
    with pytest.raises(KeyError, match="highly_variable"):
        gpusc.pp.filter_highly_variable(adata)
    assert adata.n_vars == 5
