"""pp.normalize_pearson_residuals against scanpy.experimental.pp.normalize_pearson_residuals."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import gpusc
from _compare import dense, to_host
from conftest import read_real, synthetic_counts, tolerance


@pytest.fixture(scope="module")
def real():
    a = read_real("scanpy_10x_10k_subset_1000genes.h5ad")[:600, :250]
    return a.X.toarray()


@pytest.fixture(params=["real", "synthetic"])
def counts(request, real):
    return real if request.param == "real" else synthetic_counts(200, 120)


def _scanpy(x, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 for empty cells and genes
        return sc.experimental.pp.normalize_pearson_residuals(ad.AnnData(x), inplace=False, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("theta", "clip"), [(100, None), (10.0, 3.0)])
def test_pearson_matches_scanpy(counts, array_type, dtype, theta, clip):
    x = counts.astype(dtype)
    expected = _scanpy(x, theta=theta, clip=clip)
    adata = ad.AnnData(array_type(x))
    assert gpusc.pp.normalize_pearson_residuals(adata, theta=theta, clip=clip) is None
    got = to_host(adata.X)
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected["X"].dtype
    np.testing.assert_allclose(got, expected["X"], equal_nan=True, **tolerance(dtype))
    assert adata.uns["pearson_residuals_normalization"] == {k: v for k, v in expected.items() if k != "X"}


def test_pearson_inplace_false_copy_layer(host_type):
    x = synthetic_counts(100, 60)
    adata = ad.AnnData(host_type(np.zeros_like(x)), layers={"counts": host_type(x)})
    expected = _scanpy(x)["X"]
    result = gpusc.pp.normalize_pearson_residuals(adata, layer="counts", inplace=False)
    np.testing.assert_allclose(result["X"], expected, equal_nan=True, **tolerance(np.float32))
    assert result["computed_on"] == "counts" and result["theta"] == 100 and result["clip"] is None
    np.testing.assert_array_equal(dense(adata.layers["counts"]), x)  # untouched
    assert "pearson_residuals_normalization" not in adata.uns
    new = gpusc.pp.normalize_pearson_residuals(adata, layer="counts", copy=True)
    np.testing.assert_allclose(new.layers["counts"], expected, equal_nan=True, **tolerance(np.float32))
    np.testing.assert_array_equal(dense(adata.layers["counts"]), x)
    with pytest.raises(ValueError, match="copy=True"):
        gpusc.pp.normalize_pearson_residuals(adata, copy=True, inplace=False)


def test_pearson_integer_counts():
    x = synthetic_counts(80, 50).astype(np.int64)
    expected = _scanpy(x)["X"]
    got = gpusc.pp.normalize_pearson_residuals(ad.AnnData(sparse.csr_matrix(x)), inplace=False)["X"]
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got, expected, equal_nan=True, **tolerance(np.float64))


@pytest.mark.parametrize("bad", [0.5, -1.0])
def test_pearson_check_values_warns_like_scanpy(host_type, bad):
    x = synthetic_counts(60, 50)
    x[0, 0] = bad
    with pytest.warns(UserWarning, match="non-integers"):
        sc.experimental.pp.normalize_pearson_residuals(ad.AnnData(x.copy()), inplace=False)
    with pytest.warns(UserWarning, match="non-integers"):
        gpusc.pp.normalize_pearson_residuals(ad.AnnData(host_type(x)), inplace=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        gpusc.pp.normalize_pearson_residuals(ad.AnnData(host_type(x)), inplace=False, check_values=False)


def test_pearson_bad_input_leaves_adata_unchanged(host_type):
    x = synthetic_counts(60, 50)
    adata = ad.AnnData(host_type(x.copy()))
    for kwargs, exc, match in [(dict(theta=0), ValueError, "theta"), (dict(clip=-1), ValueError, "clip"),
                               (dict(layer="missing"), KeyError, "missing")]:
        with pytest.raises(exc, match=match):
            gpusc.pp.normalize_pearson_residuals(adata, **kwargs)
    x[4, 2] = np.nan
    bad = ad.AnnData(host_type(x.copy()))
    with pytest.raises(ValueError, match="NaN"):
        gpusc.pp.normalize_pearson_residuals(bad)
    np.testing.assert_array_equal(dense(bad.X), x)
    np.testing.assert_array_equal(dense(adata.X), synthetic_counts(60, 50))
    assert not adata.uns and not bad.uns
