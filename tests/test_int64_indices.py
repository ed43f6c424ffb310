"""int64 sparse indices on the device: every pp step gives what it gives with int32 indices.

gpusc keeps int32 indices on the device wherever they fit (gpusc._core.arrays' index
policy) and needs int64 only past 2**31 stored values, where a test matrix cannot go. So
these tests build small device matrices whose index buffers are int64 anyway (assembled
around the buffers, as X_to_GPU does, without the policy's downcast) and send them through
each pp step next to the same matrix with int32 indices. Our kernels are templated on the
index type; the cupyx routines on the way (copies, canonical form, CSC to CSR, subsetting)
take int64 from CuPy 14.1 on. GPU only: on the host SciPy and numba handle both dtypes and
the host tests already run both (test_moments.py, test_pp_*).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import gpusc
from _compare import dense, to_host
from conftest import read_real

pytestmark = pytest.mark.gpu


def _device(x, index_dtype):
    """A cupyx matrix around copies of x's buffers with exactly ``index_dtype`` indices."""
    import cupy

    from gpusc.get._transfer import _assemble_device_sparse

    return _assemble_device_sparse(x.format, cupy.asarray(x.data.astype(np.float32)),
                                   cupy.asarray(x.indices.astype(index_dtype)),
                                   cupy.asarray(x.indptr.astype(index_dtype)), x.shape)


def _pair(fmt, *, noncanonical=False):
    """pbmc3k's first 800 cells (counts) twice: int32 and int64 device indices."""
    adata = read_real("pbmc3k_counts_labeled.h5ad")[:800].copy()
    adata.var["mt"] = adata.var_names.str.startswith("MT-")
    x = adata.X.asformat(fmt)
    if noncanonical:  # every stored value split in two entries of the same cell and gene
        from scipy import sparse

        coo = x.tocoo()
        x = sparse.coo_matrix((np.r_[coo.data - coo.data // 2, coo.data // 2],
                               (np.r_[coo.row, coo.row], np.r_[coo.col, coo.col])),
                              shape=x.shape).asformat(fmt)
        x.has_canonical_format = False
    pair = []
    for index_dtype in (np.int32, np.int64):
        a = adata.copy()
        a.X = _device(x, index_dtype)
        assert a.X.indices.dtype == index_dtype
        pair.append(a)
    return pair


def _assert_same(a32, a64, step):
    """Same matrix, obs, var, obsm and uns values (the kernels add in the same order; cupyx's
    int64 routines may order a row's entries differently, so floats get float32's rtol)."""
    x32, x64 = dense(a32.X), dense(a64.X)
    np.testing.assert_allclose(x64, x32, rtol=1e-6, atol=1e-7, err_msg=f"{step}: X")
    for frame in ("obs", "var"):
        f32, f64 = getattr(a32, frame), getattr(a64, frame)
        assert list(f32.columns) == list(f64.columns), f"{step}: {frame} columns"
        for col in f32.columns:
            c32, c64 = f32[col].to_numpy(), f64[col].to_numpy()
            # counts of stored entries (n_genes_by_counts, n_cells) take the index dtype, as
            # scipy's getnnz does for scanpy: int32 beside int64 is the same answer
            same_kind_int = c32.dtype.kind == c64.dtype.kind == "i"
            assert c32.dtype == c64.dtype or same_kind_int, f"{step}: {frame}[{col}] dtype"
            if c32.dtype.kind == "f":
                np.testing.assert_allclose(c64, c32, rtol=1e-6, equal_nan=True, err_msg=f"{step}: {col}")
            else:  # categories and strings: pandas' missing values (NaN in an object array) equal too
                pd.testing.assert_series_equal(f64[col], f32[col], check_dtype=not same_kind_int,
                                               obj=f"{step}: {frame}[{col}]")
    for key in a32.obsm:
        np.testing.assert_allclose(to_host(a64.obsm[key]), to_host(a32.obsm[key]), rtol=1e-4,
                                   atol=1e-5, err_msg=f"{step}: obsm {key}")


STEPS = [
    ("calculate_qc_metrics", lambda a: gpusc.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True)),
    ("filter_cells", lambda a: gpusc.pp.filter_cells(a, min_genes=200)),
    ("filter_genes", lambda a: gpusc.pp.filter_genes(a, min_cells=3)),
    ("hvg seurat_v3", lambda a: gpusc.pp.highly_variable_genes(a, flavor="seurat_v3", n_top_genes=500)),
    ("hvg poisson", lambda a: gpusc.pp.highly_variable_genes(a, flavor="poisson_gene_selection",
                                                             n_top_genes=500, inplace=False)),
    ("hvg pearson", lambda a: gpusc.experimental.pp.highly_variable_genes(a, n_top_genes=500, inplace=False)),
    ("normalize_total copy", lambda a: gpusc.pp.normalize_total(a, inplace=False)),
    ("normalize_total", lambda a: gpusc.pp.normalize_total(a, target_sum=1e4)),
    ("log1p", lambda a: gpusc.pp.log1p(a)),
    ("hvg seurat", lambda a: gpusc.pp.highly_variable_genes(a, n_top_genes=500)),
    ("hvg cell_ranger", lambda a: gpusc.pp.highly_variable_genes(a, flavor="cell_ranger", n_top_genes=500,
                                                                 inplace=False)),
    ("pca", lambda a: gpusc.pp.pca(a, n_comps=20, mask_var="highly_variable")),
    ("scale", lambda a: gpusc.pp.scale(a, zero_center=False, max_value=10)),
]


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_every_pp_step_int64_as_int32(fmt):
    a32, a64 = _pair(fmt)
    for step, run in STEPS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r32, r64 = run(a32), run(a64)
        if isinstance(r32, dict | tuple):
            for v32, v64 in zip(r32.values() if isinstance(r32, dict) else r32,
                                r64.values() if isinstance(r64, dict) else r64, strict=True):
                if hasattr(v32, "shape") and not hasattr(v32, "columns"):
                    np.testing.assert_allclose(dense(v64), dense(v32), rtol=1e-6, atol=1e-7, err_msg=step)
        _assert_same(a32, a64, step)


def test_pearson_residuals_int64_as_int32():
    a32, a64 = _pair("csr")
    gpusc.pp.normalize_pearson_residuals(a32)
    gpusc.pp.normalize_pearson_residuals(a64)
    _assert_same(a32, a64, "normalize_pearson_residuals")


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_noncanonical_int64_as_int32(fmt):
    """Duplicate entries go through canonical() (a cupyx copy and sum_duplicates)."""
    a32, a64 = _pair(fmt, noncanonical=True)
    for step, run in STEPS[:1] + STEPS[6:10]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run(a32), run(a64)
        _assert_same(a32, a64, step)
