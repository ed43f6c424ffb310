"""gpusc.pp.calculate_qc_metrics against scanpy 1.12 run on an identical copy of the same AnnData."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from scipy import sparse

import gpusc as rsc
from _compare import (
    BAD_INPUT_ERRORS,
    assert_frame_like_scanpy,
    assert_same_signature,
    assert_unchanged,
    dense,
    make_pair,
    noncanonical,
    quiet,
    scanpy_input,
    snapshot,
)
from conftest import HOST_TYPES, read_real, synthetic_counts, to_device

DTYPES = [np.float32, np.float64]


def qc_var_frame(n_vars: int) -> pd.DataFrame:
    """Two boolean gene sets ("mt", "ribo"), overlapping neither the first gene nor each other."""
    j = np.arange(n_vars)
    return pd.DataFrame(
        {"mt": (j % 13 == 1), "ribo": (j % 7 == 3) & (j % 13 != 1)},
        index=[f"gene{i}" for i in j],
    )


def qc_pair(x, array_type):
    return make_pair(x, array_type, var=qc_var_frame(x.shape[1]))


def int_cols(expr_type="counts", var_type="genes"):
    return (f"n_{var_type}_by_{expr_type}", f"n_cells_by_{expr_type}")


def run_both(ref, test, **kwargs):
    """Run scanpy on ``ref`` and gpusc on ``test`` with the same arguments."""
    with quiet():
        ref_out = sc.pp.calculate_qc_metrics(ref, **kwargs)
    test_out = rsc.pp.calculate_qc_metrics(test, **kwargs)
    return ref_out, test_out


def test_signature():
    assert_same_signature(rsc.pp.calculate_qc_metrics, sc.pp.calculate_qc_metrics)


# Every option scanpy documents. The matrix has 520 genes so the default percent_top
# (50, 100, 200, 500) is valid.
QC_OPTIONS = {
    "default": {},
    "qc_vars_str": dict(qc_vars="mt"),
    "qc_vars_list": dict(qc_vars=["mt", "ribo"]),
    "percent_top_custom": dict(percent_top=(5, 20)),
    "percent_top_unsorted": dict(percent_top=(20, 5, 100)),
    "percent_top_none": dict(percent_top=None),
    "percent_top_empty": dict(percent_top=()),
    "no_log1p": dict(log1p=False, qc_vars=["mt"]),
    "renamed_keys": dict(expr_type="umis", var_type="features", qc_vars=["mt", "ribo"]),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", list(QC_OPTIONS.values()), ids=list(QC_OPTIONS))
def test_qc_inplace_matches_scanpy(array_type, dtype, opts):
    # empty rows 3 and 17: zero totals give NaN percentages in scanpy too
    x = synthetic_counts(200, 520, dtype=dtype, density=0.1, seed=1)
    ref, test = qc_pair(x, array_type)
    before = dense(test.X).copy()
    ref_out, test_out = run_both(ref, test, inplace=True, **opts)
    assert ref_out is None
    assert test_out is None
    ints = int_cols(opts.get("expr_type", "counts"), opts.get("var_type", "genes"))
    assert_frame_like_scanpy(test.obs, ref.obs, dtype, int_cols=ints)
    assert_frame_like_scanpy(test.var, ref.var, dtype, int_cols=ints)
    # QC only reads the matrix: values (and its placement) are kept
    np.testing.assert_array_equal(dense(test.X), before)
    assert type(test.X) is type(array_type(x[:2, :2]))


def test_qc_column_order_matches_scanpy():
    """Nice-to-have in the brief, but cheap: obs/var columns in scanpy's order."""
    x = synthetic_counts(200, 520, dtype=np.float32, seed=1)
    ref, test = qc_pair(x, sparse.csr_matrix)
    run_both(ref, test, inplace=True, qc_vars=["mt", "ribo"])
    assert list(test.obs.columns) == list(ref.obs.columns)
    assert list(test.var.columns) == list(ref.var.columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_not_inplace_returns_frames_and_leaves_adata(array_type, dtype):
    x = synthetic_counts(200, 520, dtype=dtype, seed=2)
    ref, test = qc_pair(x, array_type)
    snap = snapshot(test)
    (ref_obs, ref_var), out = run_both(ref, test, qc_vars=["mt", "ribo"], percent_top=(5, 50))
    assert isinstance(out, tuple) and len(out) == 2
    obs, var = out
    assert_frame_like_scanpy(obs, ref_obs, dtype, int_cols=int_cols())
    assert_frame_like_scanpy(var, ref_var, dtype, int_cols=int_cols())
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_layer(array_type, dtype):
    x = synthetic_counts(150, 260, dtype=dtype, seed=3)
    ref, test = qc_pair(x, array_type)
    for a in (ref, test):
        a.layers["counts"] = a.X.copy()
        a.X = a.X * 0.5  # X differs from the layer, so reading the wrong one shows
    ref_out, test_out = run_both(ref, test, layer="counts", qc_vars="mt", percent_top=(5, 20, 250))
    assert_frame_like_scanpy(test_out[0], ref_out[0], dtype, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], dtype, int_cols=int_cols())


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_use_raw(array_type, dtype):
    x = synthetic_counts(150, 260, dtype=dtype, seed=4)
    ref, test = qc_pair(x, array_type)
    for a in (ref, test):
        a.raw = a
        a.X = a.X * 3  # raw holds the counts, X something else
    ref_out, test_out = run_both(ref, test, use_raw=True, qc_vars=["mt", "ribo"], percent_top=(10,))
    assert_frame_like_scanpy(test_out[0], ref_out[0], dtype, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], dtype, int_cols=int_cols())


@pytest.mark.parametrize("n", [(20, 521), (600,), (5, 0)], ids=["above_n_vars", "only_above", "zero"])
def test_qc_percent_top_out_of_range_is_index_error(n):
    x = synthetic_counts(50, 520, seed=5)
    ref, test = qc_pair(x, sparse.csr_matrix)
    with pytest.raises(IndexError), quiet():
        sc.pp.calculate_qc_metrics(ref, percent_top=n, inplace=True)
    snap = snapshot(test)
    with pytest.raises(IndexError):
        rsc.pp.calculate_qc_metrics(test, percent_top=n, inplace=True)
    assert_unchanged(test, snap)


SHAPES = {
    "odd_57x1001": dict(shape=(57, 1001), percent_top=(50, 100, 200, 500), empty_rows=(3,), empty_cols=(5, 1000)),
    "one_row": dict(shape=(1, 30), percent_top=(5, 20), empty_rows=(), empty_cols=(4,)),
    "one_col": dict(shape=(40, 1), percent_top=(1,), empty_rows=(0, 7), empty_cols=()),
    "all_zero": dict(shape=(20, 30), percent_top=(5,), empty_rows=tuple(range(20)), empty_cols=()),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SHAPES.values()), ids=list(SHAPES))
def test_qc_shapes(array_type, dtype, case):
    n_obs, n_vars = case["shape"]
    x = synthetic_counts(n_obs, n_vars, dtype=dtype, density=0.3, seed=6,
                         empty_rows=case["empty_rows"], empty_cols=case["empty_cols"])
    ref, test = qc_pair(x, array_type)
    qc_vars = ["mt"] if ref.var["mt"].any() else []
    ref_out, test_out = run_both(ref, test, percent_top=case["percent_top"], qc_vars=qc_vars)
    assert_frame_like_scanpy(test_out[0], ref_out[0], dtype, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], dtype, int_cols=int_cols())


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_non_integer_values_deterministic(array_type, dtype):
    """Normalised (non-integer) data: same numbers as scanpy, and bit-identical run to run
    (on the device the per-gene sums then leave the atomics for a fixed-order pass)."""
    x = synthetic_counts(300, 120, dtype=dtype, density=0.3, seed=9)
    x = (x / np.maximum(x.sum(axis=1, keepdims=True), 1) * 1e4 / 7).astype(dtype)
    ref, test = qc_pair(x, array_type)
    ref_out, test_out = run_both(ref, test, qc_vars=["mt"], percent_top=(5, 20), inplace=False)
    for got, expected in zip(test_out, ref_out, strict=True):
        assert_frame_like_scanpy(got, expected, dtype, int_cols=int_cols())
    again = rsc.pp.calculate_qc_metrics(test, qc_vars=["mt"], percent_top=(5, 20), inplace=False)
    for first, second in zip(test_out, again, strict=True):
        pd.testing.assert_frame_equal(first, second, check_exact=True)


SPARSE_TYPES = {
    "csr_matrix": sparse.csr_matrix,
    "csr_array": sparse.csr_array,
    "csc_matrix": sparse.csc_matrix,
    "csc_array": sparse.csc_array,
}


def _with_stored_zeros(m):
    m = m.copy()
    assert m.nnz > 10
    m.data[::5] = 0  # explicit zeros: stored entries whose value is 0.0
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "fmt",
    [*SPARSE_TYPES, *(pytest.param(f"cupy-{n}", marks=pytest.mark.gpu) for n in ("csr_matrix", "csc_matrix"))],
)
def test_qc_explicit_stored_zeros_are_not_genes(fmt, dtype):
    """scanpy calls eliminate_zeros() first: a stored 0.0 is neither a detected gene nor a detecting cell."""
    x = synthetic_counts(120, 260, dtype=dtype, density=0.2, seed=7)
    m = _with_stored_zeros(SPARSE_TYPES[fmt.removeprefix("cupy-")](x))
    assert (m.data == 0).sum() > 0
    ref, _ = qc_pair(x, np.asarray)
    ref.X = scanpy_input(m)
    test = ref.copy()
    test.X = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    before = dense(test.X).copy()
    ref_out, test_out = run_both(ref, test, qc_vars=["mt"], percent_top=(5, 20, 250))
    assert_frame_like_scanpy(test_out[0], ref_out[0], dtype, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], dtype, int_cols=int_cols())
    np.testing.assert_array_equal(dense(test.X), before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_int64_indices(dtype):
    """int32 vs int64 index parity: both equal scanpy's result."""
    x = synthetic_counts(200, 520, dtype=dtype, seed=8)
    m32 = sparse.csr_matrix(x)
    m64 = m32.copy()
    m64.indices = m64.indices.astype(np.int64)
    m64.indptr = m64.indptr.astype(np.int64)
    ref, t32 = qc_pair(x, sparse.csr_matrix)
    t64 = t32.copy()
    t64.X = m64
    assert t64.X.indptr.dtype == np.int64 and t64.X.indices.dtype == np.int64
    with quiet():
        ref_obs, ref_var = sc.pp.calculate_qc_metrics(ref, qc_vars=["mt"])
    for t in (t32, t64):
        obs, var = rsc.pp.calculate_qc_metrics(t, qc_vars=["mt"])
        assert_frame_like_scanpy(obs, ref_obs, dtype, int_cols=int_cols())
        assert_frame_like_scanpy(var, ref_var, dtype, int_cols=int_cols())


NONCANONICAL = [
    "csr", "csc", pytest.param("cupy-csr", marks=pytest.mark.gpu), pytest.param("cupy-csc", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("duplicates", [False, pytest.param(True, marks=pytest.mark.scanpy_112(
    "scanpy 1.11's calculate_qc_metrics counts a duplicate (row, col) entry as another gene "
    "(getnnz; 1.12 counts non-zeros, duplicates summed)"))], ids=["unsorted", "unsorted+duplicates"])
@pytest.mark.parametrize("fmt", NONCANONICAL)
def test_qc_noncanonical_sparse(fmt, duplicates):
    """Unsorted indices and duplicate (row, col) entries: a gene is one gene however it is stored."""
    x = synthetic_counts(120, 260, dtype=np.float32, density=0.2, seed=10)
    m = noncanonical(x, fmt.removeprefix("cupy-"), duplicates=duplicates)
    ref, test = qc_pair(x, np.asarray)
    ref.X = m.copy()
    test.X = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    ref_out, test_out = run_both(ref, test, qc_vars=["mt"], percent_top=(1, 5, 20, 250))
    assert_frame_like_scanpy(test_out[0], ref_out[0], np.float32, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], np.float32, int_cols=int_cols())
    np.testing.assert_array_equal(dense(test.X), x)


def test_qc_overwrites_existing_columns():
    """Re-running QC replaces earlier columns (scanpy assigns adata.obs[cols] = ...)."""
    x = synthetic_counts(200, 520, seed=12)
    ref, test = qc_pair(x, sparse.csr_matrix)
    for a in (ref, test):
        a.obs["total_counts"] = -1.0
        a.obs["keep_me"] = "x"
        a.var["mean_counts"] = -1.0
    run_both(ref, test, inplace=True, qc_vars="mt")
    assert_frame_like_scanpy(test.obs, ref.obs, np.float32, int_cols=int_cols())
    assert_frame_like_scanpy(test.var, ref.var, np.float32, int_cols=int_cols())


@pytest.mark.parametrize("dtype", DTYPES)
def test_qc_on_view_not_inplace(array_type, dtype):
    """A subset view (adata[cells, genes]) as input, results for the view's cells and genes."""
    x = synthetic_counts(200, 520, dtype=dtype, seed=13)
    ref, test = qc_pair(x, array_type)
    cells = np.arange(0, 200, 3)
    genes = np.r_[0:300, 310:520]
    with quiet():
        ref_obs, ref_var = sc.pp.calculate_qc_metrics(ref[cells, genes], qc_vars=["mt"])
    view = test[cells, genes]
    obs, var = rsc.pp.calculate_qc_metrics(view, qc_vars=["mt"])
    assert_frame_like_scanpy(obs, ref_obs, dtype, int_cols=int_cols())
    assert_frame_like_scanpy(var, ref_var, dtype, int_cols=int_cols())


# ---------------------------------------------------------------- real data

REAL_FORMATS = ["csr_matrix", "csc_matrix", pytest.param("cupy-csr_matrix", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def pbmc3k():
    a = read_real("pbmc3k_counts_labeled.h5ad")
    # numpy bool columns: with pandas 2 (Python 3.11) str.startswith gives a nullable BooleanArray,
    # with which scanpy 1.11 cannot index a sparse matrix
    a.var["mt"] = np.asarray(a.var_names.str.startswith("MT-"), dtype=bool)
    a.var["ribo"] = np.asarray(a.var_names.str.startswith(("RPS", "RPL")), dtype=bool)
    assert a.var["mt"].sum() > 0 and a.var["ribo"].sum() > 0
    return a


@pytest.fixture(scope="module")
def tenx_subset():
    a = read_real("scanpy_10x_10k_subset_1000genes.h5ad")
    a.var["mt"] = np.asarray(a.var_names.str.startswith("mt-"), dtype=bool)  # as pbmc3k's
    return a


def _real_pair(a, fmt):
    ref = a.copy()
    host = SPARSE_TYPES[fmt.removeprefix("cupy-")]
    ref.X = host(ref.X)
    test = ref.copy()
    if fmt.startswith("cupy-"):
        test.X = to_device(test.X)
    return ref, test


@pytest.mark.parametrize("fmt", REAL_FORMATS)
def test_qc_real_pbmc3k(pbmc3k, fmt):
    ref, test = _real_pair(pbmc3k, fmt)
    run_both(ref, test, qc_vars=["mt", "ribo"], inplace=True)
    assert ref.obs["pct_counts_mt"].max() > 0  # the qc var is not trivially empty
    assert_frame_like_scanpy(test.obs, ref.obs, np.float32, int_cols=int_cols())
    assert_frame_like_scanpy(test.var, ref.var, np.float32, int_cols=int_cols())


@pytest.mark.parametrize("fmt", REAL_FORMATS)
def test_qc_real_10x_subset(tenx_subset, fmt):
    ref, test = _real_pair(tenx_subset, fmt)
    qc_vars = ["mt"] if ref.var["mt"].any() else []
    ref_out, test_out = run_both(ref, test, qc_vars=qc_vars)
    assert_frame_like_scanpy(test_out[0], ref_out[0], np.float32, int_cols=int_cols())
    assert_frame_like_scanpy(test_out[1], ref_out[1], np.float32, int_cols=int_cols())


# ---------------------------------------------------------------- bad input

def _bad_adata(array_type, dtype, poison=None):
    x = synthetic_counts(60, 40, dtype=dtype, density=0.3, seed=9, empty_cols=(5,))
    if poison is not None:
        r, c = np.argwhere(x > 0)[0]  # a stored entry, so sparse formats hold it too
        x[r, c] = poison
    _, test = qc_pair(x, array_type)
    test.obs["label"] = "a"
    test.uns["note"] = {"k": 1}
    return test


def test_qc_missing_layer(array_type):
    test = _bad_adata(array_type, np.float32)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match="layer"):
        rsc.pp.calculate_qc_metrics(test, layer="absent", percent_top=(5,), inplace=True)
    assert_unchanged(test, snap)


@pytest.mark.parametrize("qc_vars", ["no_such_var", ["mt", "no_such_var"]], ids=["str", "list"])
def test_qc_unknown_qc_var(array_type, qc_vars):
    test = _bad_adata(array_type, np.float32)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match="qc_vars"):
        rsc.pp.calculate_qc_metrics(test, qc_vars=qc_vars, percent_top=(5,), inplace=True)
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("poison", "match"),
    [(np.nan, r"(?i)nan|finite"), (np.inf, r"(?i)inf|finite"), (-np.inf, r"(?i)inf|finite|negative"),
     (-1.0, r"(?i)negative")],
    ids=["nan", "inf", "-inf", "negative"],
)
def test_qc_bad_values(array_type, dtype, poison, match):
    test = _bad_adata(array_type, dtype, poison)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match=match):
        rsc.pp.calculate_qc_metrics(test, percent_top=(5,), qc_vars=["mt"], inplace=True)
    assert_unchanged(test, snap)
