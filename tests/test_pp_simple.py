"""gpusc.pp.filter_cells / filter_genes / log1p against scanpy 1.12 on identical copies."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import gpusc as rsc
from _compare import (
    BAD_INPUT_ERRORS,
    assert_matrix_close,
    assert_same_kind,
    assert_same_signature,
    assert_unchanged,
    dense,
    host_copy,
    make_pair,
    noncanonical,
    quiet,
    scanpy_input,
    snapshot,
    to_host,
)
from conftest import read_real, synthetic_counts, to_device

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("name", ["filter_cells", "filter_genes", "log1p"])
def test_signature(name):
    assert_same_signature(getattr(rsc.pp, name), getattr(sc.pp, name))


def counts(dtype=np.float32):
    return synthetic_counts(300, 200, dtype=dtype, density=0.1, seed=21)


def thresholds(x, axis):
    """Thresholds in the middle of the data (read off the input, not off gpusc), so each filter drops some."""
    totals = x.sum(axis=axis)
    detected = (x > 0).sum(axis=axis)
    return {
        "min_counts": float(np.median(totals)),
        "max_counts": float(np.median(totals)),
        "min_genes" if axis == 1 else "min_cells": int(np.median(detected)),
        "max_genes" if axis == 1 else "max_cells": int(np.median(detected)),
    }


def assert_numbers_equal(got, expected, what):
    g = np.asarray(to_host(got)).ravel()
    e = np.asarray(expected).ravel()
    assert g.shape == e.shape, f"{what}: shape {g.shape} != scanpy {e.shape}"
    # counts of integer-valued data and numbers of detected entries are exact in any order
    np.testing.assert_array_equal(g, e, err_msg=what)


# ---------------------------------------------------------------- filter_cells / filter_genes

FILTERS = {
    "cells": (sc.pp.filter_cells, "filter_cells", 1, ["min_counts", "min_genes", "max_counts", "max_genes"]),
    "genes": (sc.pp.filter_genes, "filter_genes", 0, ["min_counts", "min_cells", "max_counts", "max_cells"]),
}
FILTER_CASES = [(k, opt) for k, (_, _, _, opts) in FILTERS.items() for opt in opts]
FILTER_IDS = [f"{k}-{opt}" for k, opt in FILTER_CASES]


def _written_key(opt):
    return "n_counts" if "counts" in opt else ("n_genes" if "genes" in opt else "n_cells")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_inplace_matches_scanpy(array_type, dtype, which, opt):
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts(dtype)
    ref, test = make_pair(x, array_type)
    kw = {opt: thresholds(x, axis)[opt]}
    with quiet():
        assert sc_fn(ref, **kw) is None
    assert getattr(rsc.pp, name)(test, **kw) is None
    assert 0 < ref.shape[axis == 0] < x.shape[axis == 0]  # the threshold drops some, keeps some
    assert test.shape == ref.shape
    df_ref, df_test = (ref.obs, test.obs) if axis == 1 else (ref.var, test.var)
    np.testing.assert_array_equal(test.obs_names, ref.obs_names)
    np.testing.assert_array_equal(test.var_names, ref.var_names)
    key = _written_key(opt)
    assert list(df_test.columns) == list(df_ref.columns) == [key]
    assert_numbers_equal(df_test[key], df_ref[key], key)
    if key != "n_counts":
        assert np.asarray(df_test[key]).dtype.kind in "iu", f"{key} dtype {df_test[key].dtype}"
    assert_matrix_close(test.X, ref.X, dtype, err_msg="X after subsetting")
    assert_same_kind(test.X, ref.X)


@pytest.mark.parametrize("which", ["cells", "genes"])
def test_filter_min_zero_annotates_only(array_type, which):
    """min_genes=0 / min_cells=0: nothing dropped, numbers written (scanpy's doc example)."""
    sc_fn, name, _, _ = FILTERS[which]
    opt = "min_genes" if which == "cells" else "min_cells"
    ref, test = make_pair(counts(), array_type)
    with quiet():
        sc_fn(ref, **{opt: 0})
    getattr(rsc.pp, name)(test, **{opt: 0})
    assert test.shape == ref.shape == counts().shape
    df_ref, df_test = (ref.obs, test.obs) if which == "cells" else (ref.var, test.var)
    assert_numbers_equal(df_test[_written_key(opt)], df_ref[_written_key(opt)], opt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_not_inplace_returns_mask_and_numbers(array_type, dtype, which, opt):
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts(dtype)
    ref, test = make_pair(x, array_type)
    snap = snapshot(test)
    kw = {opt: thresholds(x, axis)[opt]}
    with quiet():
        ref_mask, ref_num = sc_fn(ref, inplace=False, **kw)
    out = getattr(rsc.pp, name)(test, inplace=False, **kw)
    assert isinstance(out, tuple) and len(out) == 2
    mask, num = out
    mask = np.asarray(to_host(mask))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, ref_mask)
    assert_numbers_equal(num, ref_num, "numbers")
    assert_unchanged(test, snap)


@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_copy(array_type, which, opt):
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts()
    ref, test = make_pair(x, array_type)
    snap = snapshot(test)
    kw = {opt: thresholds(x, axis)[opt]}
    with quiet():
        ref_new = sc_fn(ref, copy=True, **kw)
    test_new = getattr(rsc.pp, name)(test, copy=True, **kw)
    assert test_new is not None and test_new is not test
    assert test_new.shape == ref_new.shape
    np.testing.assert_array_equal(test_new.obs_names, ref_new.obs_names)
    np.testing.assert_array_equal(test_new.var_names, ref_new.var_names)
    df_ref, df_test = (ref_new.obs, test_new.obs) if axis == 1 else (ref_new.var, test_new.var)
    key = _written_key(opt)
    assert_numbers_equal(df_test[key], df_ref[key], key)
    assert_matrix_close(test_new.X, ref_new.X, np.float32)
    assert_unchanged(test, snap)


@pytest.mark.parametrize(
    "kw",
    [dict(min_counts=1, min_genes=1), dict(min_counts=1, max_counts=100), dict(max_genes=5, min_genes=1), {}],
    ids=["min_counts+min_genes", "min+max_counts", "max+min_genes", "none"],
)
def test_filter_cells_needs_exactly_one_option(kw):
    _, test = make_pair(counts(), sparse.csr_matrix)
    snap = snapshot(test)
    with pytest.raises(ValueError):
        rsc.pp.filter_cells(test, **kw)
    assert_unchanged(test, snap)


@pytest.mark.parametrize(
    "kw",
    [dict(min_counts=1, min_cells=1), dict(min_cells=1, max_cells=100), dict(max_counts=5, min_counts=1), {}],
    ids=["min_counts+min_cells", "min+max_cells", "max+min_counts", "none"],
)
def test_filter_genes_needs_exactly_one_option(kw):
    _, test = make_pair(counts(), sparse.csr_matrix)
    snap = snapshot(test)
    with pytest.raises(ValueError):
        rsc.pp.filter_genes(test, **kw)
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_array_input(array_type, dtype, which, opt):
    """A bare matrix (not AnnData) returns (mask, numbers) like scanpy's."""
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts(dtype)
    x_test = array_type(x.copy())
    x_ref = host_copy(x_test)
    kw = {opt: thresholds(x, axis)[opt]}
    with quiet():
        ref_mask, ref_num = sc_fn(x_ref, **kw)
    out = getattr(rsc.pp, name)(x_test, **kw)
    assert isinstance(out, tuple) and len(out) == 2
    np.testing.assert_array_equal(np.asarray(to_host(out[0])), ref_mask)
    assert_numbers_equal(out[1], ref_num, "numbers")
    np.testing.assert_array_equal(dense(x_test), x)  # input untouched


NONCANONICAL = [
    "csr", "csc", pytest.param("cupy-csr", marks=pytest.mark.gpu), pytest.param("cupy-csc", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("duplicates", [False, True], ids=["unsorted", "unsorted+duplicates"])
@pytest.mark.parametrize("fmt", NONCANONICAL)
@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_noncanonical_sparse(fmt, duplicates, which, opt):
    """Unsorted indices and duplicate entries: a gene expressed once is counted once."""
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts()
    m = noncanonical(x, fmt.removeprefix("cupy-"), duplicates=duplicates)
    m_test = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    kw = {opt: thresholds(x, axis)[opt]}
    with quiet():
        ref_mask, ref_num = sc_fn(m.copy(), **kw)
    mask, num = getattr(rsc.pp, name)(m_test, **kw)
    np.testing.assert_array_equal(np.asarray(to_host(mask)), ref_mask)
    assert_numbers_equal(num, ref_num, "numbers")


@pytest.mark.parametrize("fmt", NONCANONICAL)
@pytest.mark.parametrize(("which", "opt"), FILTER_CASES, ids=FILTER_IDS)
def test_filter_explicit_stored_zeros(fmt, which, opt):
    """A stored 0.0 is not an expressed gene (scanpy counts data > 0)."""
    sc_fn, name, axis, _ = FILTERS[which]
    x = counts()
    m = (sparse.csr_matrix if fmt.endswith("csr") else sparse.csc_matrix)(x)
    m.data[::4] = 0
    x0 = m.toarray()
    m_test = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    kw = {opt: thresholds(x0, axis)[opt]}
    with quiet():
        ref_mask, ref_num = sc_fn(m.copy(), **kw)
    mask, num = getattr(rsc.pp, name)(m_test, **kw)
    np.testing.assert_array_equal(np.asarray(to_host(mask)), ref_mask)
    assert_numbers_equal(num, ref_num, "numbers")


@pytest.mark.parametrize("fmt", ["csr_matrix", pytest.param("cupy-csr_matrix", marks=pytest.mark.gpu)])
def test_filter_real_pbmc3k(fmt):
    ref = read_real("pbmc3k_counts_labeled.h5ad")
    test = ref.copy()
    if fmt.startswith("cupy-"):
        test.X = to_device(test.X)
    with quiet():
        sc.pp.filter_cells(ref, min_genes=500)
        sc.pp.filter_genes(ref, min_cells=10)
    rsc.pp.filter_cells(test, min_genes=500)
    rsc.pp.filter_genes(test, min_cells=10)
    assert test.shape == ref.shape
    np.testing.assert_array_equal(test.obs_names, ref.obs_names)
    np.testing.assert_array_equal(test.var_names, ref.var_names)
    assert_numbers_equal(test.obs["n_genes"], ref.obs["n_genes"], "n_genes")
    assert_numbers_equal(test.var["n_cells"], ref.var["n_cells"], "n_cells")


# ---------------------------------------------------------------- log1p

def log_data(dtype=np.float32):
    # not just integers: normalized-looking values
    return synthetic_counts(300, 200, dtype=dtype, density=0.1, seed=31) * dtype(0.37)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2, 10.0], ids=["e", "2", "10"])
def test_log1p_anndata_matches_scanpy(array_type, dtype, base):
    ref, test = make_pair(log_data(dtype), array_type)
    with quiet():
        assert sc.pp.log1p(ref, base=base) is None
    assert rsc.pp.log1p(test, base=base) is None
    assert_matrix_close(test.X, ref.X, dtype, err_msg="X")
    assert dense(test.X).dtype == ref.X.dtype
    assert_same_kind(test.X, ref.X)
    assert dict(test.uns["log1p"]) == dict(ref.uns["log1p"]) == {"base": base}


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_layer(array_type, dtype):
    ref, test = make_pair(log_data(dtype), array_type)
    for a in (ref, test):
        a.layers["norm"] = a.X.copy()
        a.X = a.X * 2
    x_before = dense(test.X).copy()
    with quiet():
        sc.pp.log1p(ref, layer="norm", base=2)
    rsc.pp.log1p(test, layer="norm", base=2)
    assert_matrix_close(test.layers["norm"], ref.layers["norm"], dtype, err_msg="layer")
    np.testing.assert_array_equal(dense(test.X), x_before)
    assert dict(test.uns["log1p"]) == dict(ref.uns["log1p"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_obsm(dtype):
    x = log_data(dtype)
    ref, test = make_pair(x, np.asarray)
    for a in (ref, test):
        a.obsm["emb"] = x[:, :20].copy()
    with quiet():
        sc.pp.log1p(ref, obsm="emb")
    rsc.pp.log1p(test, obsm="emb")
    assert_matrix_close(test.obsm["emb"], ref.obsm["emb"], dtype, err_msg="obsm")
    np.testing.assert_array_equal(dense(test.X), x)
    assert dict(test.uns["log1p"]) == dict(ref.uns["log1p"])


@pytest.mark.parametrize("base", [None, 2])
def test_log1p_copy(array_type, base):
    ref, test = make_pair(log_data(), array_type)
    snap = snapshot(test)
    with quiet():
        ref_new = sc.pp.log1p(ref, copy=True, base=base)
    test_new = rsc.pp.log1p(test, copy=True, base=base)
    assert test_new is not None and test_new is not test
    assert_matrix_close(test_new.X, ref_new.X, np.float32)
    assert dict(test_new.uns["log1p"]) == {"base": base}
    assert_unchanged(test, snap)
    assert "log1p" not in test.uns


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_chunked(array_type, dtype):
    ref, test = make_pair(log_data(dtype), array_type)
    with quiet():
        sc.pp.log1p(ref, chunked=True, chunk_size=64)
    rsc.pp.log1p(test, chunked=True, chunk_size=64)
    assert_matrix_close(test.X, ref.X, dtype)
    assert dict(test.uns["log1p"]) == dict(ref.uns["log1p"])


ARRAY_INPUTS = {
    "ndarray": np.asarray,
    "csr_matrix": sparse.csr_matrix,
    "csc_matrix": sparse.csc_matrix,
    "csr_array": sparse.csr_array,
}


# every host format with float and integer values; on the device a cupy ndarray of each, and a
# cupyx CSR of floats only (cupyx sparse matrices hold no integers: bool, float, complex)
ARRAY_CASES = [
    *((fmt, dtype) for fmt in ARRAY_INPUTS for dtype in (*DTYPES, np.int64)),
    *(pytest.param("cupy-ndarray", dtype, marks=pytest.mark.gpu) for dtype in (*DTYPES, np.int64)),
    *(pytest.param("cupy-csr_matrix", dtype, marks=pytest.mark.gpu) for dtype in DTYPES),
]


@pytest.mark.parametrize("base", [None, 2])
@pytest.mark.parametrize(("fmt", "dtype"), ARRAY_CASES)
def test_log1p_array_input(fmt, dtype, base):
    """A bare matrix returns the log-transformed matrix, as scanpy's (same dtype: ints become float64)."""
    x = synthetic_counts(120, 90, dtype=np.float64, seed=32).astype(dtype)
    host = ARRAY_INPUTS[fmt.removeprefix("cupy-")](x.copy())
    x_test = to_device(host) if fmt.startswith("cupy-") else host.copy()
    with quiet():
        ref = sc.pp.log1p(scanpy_input(host), base=base)
    got = rsc.pp.log1p(x_test, base=base)
    tol_dtype = np.float32 if np.dtype(dtype) == np.float32 else np.float64
    assert_matrix_close(got, ref, tol_dtype)
    assert dense(got).dtype == ref.dtype
    assert_same_kind(got, ref)


@pytest.mark.parametrize("duplicates", [False, True], ids=["unsorted", "unsorted+duplicates"])
@pytest.mark.parametrize("fmt", NONCANONICAL)
def test_log1p_noncanonical_sparse(fmt, duplicates):
    """Whatever scanpy makes of stored entries (it maps data elementwise), gpusc makes the same."""
    m = noncanonical(log_data(), fmt.removeprefix("cupy-"), duplicates=duplicates)
    m_test = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    with quiet():
        ref = sc.pp.log1p(m.copy())
    got = rsc.pp.log1p(m_test)
    assert_matrix_close(got, ref, np.float32)


@pytest.mark.parametrize("fmt", list(ARRAY_INPUTS))
def test_log1p_array_copy_keeps_input(fmt):
    x = log_data()
    arr = ARRAY_INPUTS[fmt](x.copy())
    with quiet():
        ref = sc.pp.log1p(scanpy_input(ARRAY_INPUTS[fmt](x)), copy=True)
    got = rsc.pp.log1p(arr, copy=True)
    assert_matrix_close(got, ref, np.float32)
    np.testing.assert_array_equal(dense(arr), x)


def test_log1p_real_pbmc3k():
    ref = read_real("pbmc3k_counts_labeled.h5ad")
    test = ref.copy()
    with quiet():
        sc.pp.log1p(ref)
    rsc.pp.log1p(test)
    assert_matrix_close(test.X, ref.X, np.float32)


def test_log1p_missing_layer(array_type):
    _, test = make_pair(log_data(), array_type)
    test.obs["label"] = "a"
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match="layer"):
        rsc.pp.log1p(test, layer="absent")
    assert_unchanged(test, snap)
