"""gpusc.pp.normalize_total against scanpy 1.12 run on an identical copy of the same AnnData."""

from __future__ import annotations

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse

import gpusc as rsc
from _compare import (
    BAD_INPUT_ERRORS,
    assert_frame_like_scanpy,
    assert_matrix_close,
    assert_same_kind,
    assert_same_signature,
    assert_unchanged,
    assert_warns_like,
    dense,
    make_pair,
    noncanonical,
    quiet,
    run_recording,
    snapshot,
    to_host,
)
from conftest import read_real, skip_unless_scanpy_112, synthetic_counts, to_device

DTYPES = [np.float32, np.float64]
ZERO_WARNING = "Some cells have zero counts"
# norm_counts has zero-count cells; scanpy 1.11's sparse path counts them into the median
SPARSE_MEDIAN_112 = ("scanpy 1.11's sparse normalize_total takes the median of all cells' counts, "
                     "zero-count cells included (1.12 leaves them out); with exclude_highly_expressed "
                     "that changes the median here")
OBSM_112 = pytest.mark.scanpy_112("scanpy 1.11's normalize_total has no obsm parameter")


def norm_counts(dtype=np.float32, *, zero_cells=True):
    """Counts where exclude_highly_expressed excludes some but not all genes at 0.05 and at 0.2.

    Cells 20-29 express only 8 genes, so some genes pass 20% of a cell's total; rows 3 and 17
    are empty (zero-count cells) unless ``zero_cells`` is False.
    """
    empty_rows = (3, 17) if zero_cells else ()
    x = synthetic_counts(300, 200, dtype=dtype, density=0.4, seed=11, empty_rows=empty_rows)
    x[20:30, 8:] = 0
    return x


@OBSM_112
def test_signature():
    assert_same_signature(rsc.pp.normalize_total, sc.pp.normalize_total)


def test_data_exercises_exclude_highly_expressed():
    """Guard on the test data itself: both max_fractions exclude some genes, not all."""
    x = norm_counts()
    total = x.sum(1)
    for mf in (0.05, 0.2):
        hi = (x > total[:, None] * mf).any(0)
        assert 0 < hi.sum() < x.shape[1]


NORM_OPTIONS = {
    "median": {},
    "target_1e4": dict(target_sum=1e4),
    "exclude_0.05": dict(exclude_highly_expressed=True, max_fraction=0.05),
    "exclude_0.2_target": dict(exclude_highly_expressed=True, max_fraction=0.2, target_sum=1e4),
    "key_added": dict(target_sum=1e4, key_added="norm_factor"),
    "exclude_key_added": dict(exclude_highly_expressed=True, key_added="size_factor"),
}


def run_both(ref, test, **kwargs):
    """scanpy on ref, gpusc on test; gpusc must warn about zero-count cells exactly when scanpy does."""
    ref_out, ref_msgs = run_recording(sc.pp.normalize_total, ref, **kwargs)
    test_out, test_msgs = run_recording(rsc.pp.normalize_total, test, **kwargs)
    assert_warns_like(ref_msgs, test_msgs, ZERO_WARNING)
    return ref_out, test_out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", list(NORM_OPTIONS.values()), ids=list(NORM_OPTIONS))
def test_normalize_inplace_matches_scanpy(array_type, dtype, opts):
    ref, test = make_pair(norm_counts(dtype), array_type)
    if sparse.issparse(ref.X) and opts.get("exclude_highly_expressed") and "target_sum" not in opts:
        skip_unless_scanpy_112(SPARSE_MEDIAN_112)
    ref_out, test_out = run_both(ref, test, **opts)
    assert ref_out is None
    assert test_out is None
    assert_matrix_close(test.X, ref.X, dtype, err_msg="X")
    assert dense(test.X).dtype == ref.X.dtype
    assert_same_kind(test.X, ref.X)
    assert_frame_like_scanpy(test.obs, ref.obs, dtype)
    assert set(test.uns) == set(ref.uns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "opts",
    [{}, dict(exclude_highly_expressed=True, max_fraction=0.2, target_sum=100.0, key_added="nf")],
    ids=["median", "exclude_key_added"],
)
def test_normalize_not_inplace_returns_dict(array_type, dtype, opts):
    ref, test = make_pair(norm_counts(dtype), array_type)
    snap = snapshot(test)
    ref_out, test_out = run_both(ref, test, inplace=False, **opts)
    assert isinstance(test_out, dict)
    assert set(test_out) == set(ref_out) == {"X", "norm_factor"}
    assert_matrix_close(test_out["X"], ref_out["X"], dtype, err_msg="X")
    assert_same_kind(test_out["X"], ref_out["X"])
    assert_matrix_close(np.asarray(to_host(test_out["norm_factor"])).ravel(), ref_out["norm_factor"], dtype,
                        err_msg="norm_factor")
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_copy(array_type, dtype):
    ref, test = make_pair(norm_counts(dtype), array_type)
    snap = snapshot(test)
    ref_new, test_new = run_both(ref, test, copy=True, target_sum=1e4, key_added="nf")
    assert test_new is not None and test_new is not test
    assert_matrix_close(test_new.X, ref_new.X, dtype, err_msg="X")
    assert_frame_like_scanpy(test_new.obs, ref_new.obs, dtype)
    assert_unchanged(test, snap)


def test_normalize_copy_with_not_inplace_is_error(array_type):
    _, test = make_pair(norm_counts(), array_type)
    snap = snapshot(test)
    with pytest.raises(ValueError, match="copy"):
        rsc.pp.normalize_total(test, copy=True, inplace=False)
    assert_unchanged(test, snap)


@pytest.mark.parametrize("max_fraction", [-0.1, 1.5])
def test_normalize_max_fraction_out_of_range(array_type, max_fraction):
    _, test = make_pair(norm_counts(), array_type)
    snap = snapshot(test)
    with pytest.raises(ValueError, match="max_fraction"):
        rsc.pp.normalize_total(test, exclude_highly_expressed=True, max_fraction=max_fraction)
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_layer(array_type, dtype):
    ref, test = make_pair(norm_counts(dtype), array_type)
    for a in (ref, test):
        a.layers["counts"] = a.X.copy()
        a.X = a.X * 2
    x_before = dense(test.X).copy()
    run_both(ref, test, layer="counts", target_sum=1e4, key_added="nf")
    assert_matrix_close(test.layers["counts"], ref.layers["counts"], dtype, err_msg="layer counts")
    assert_same_kind(test.layers["counts"], ref.layers["counts"])
    np.testing.assert_array_equal(dense(test.X), x_before)  # X untouched
    assert_frame_like_scanpy(test.obs, ref.obs, dtype)


@OBSM_112
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_obsm(dtype):
    x = norm_counts(dtype)
    ref, test = make_pair(x, np.asarray)
    for a in (ref, test):
        a.obsm["counts"] = x[:, :50].copy()
    run_both(ref, test, obsm="counts")
    assert_matrix_close(test.obsm["counts"], ref.obsm["counts"], dtype, err_msg="obsm counts")
    np.testing.assert_array_equal(dense(test.X), x)


def test_normalize_zero_count_cells_warn(array_type):
    ref, test = make_pair(norm_counts(zero_cells=True), array_type)
    with quiet():
        sc.pp.normalize_total(ref, target_sum=1e4)
    with pytest.warns(UserWarning, match=ZERO_WARNING):
        rsc.pp.normalize_total(test, target_sum=1e4)
    assert_matrix_close(test.X, ref.X, np.float32)
    # zero cells stay zero (no NaN from 0/0)
    assert not np.isnan(dense(test.X)).any()


def test_normalize_no_warning_without_zero_cells(array_type):
    ref, test = make_pair(norm_counts(zero_cells=False), array_type)
    run_both(ref, test)  # asserts neither warns "Some cells have zero counts"
    assert_matrix_close(test.X, ref.X, np.float32)


@pytest.mark.parametrize("int_type", [np.int32, np.int64])
@pytest.mark.parametrize("fmt", [np.asarray, sparse.csr_matrix], ids=["dense", "csr_matrix"])
def test_normalize_integer_input_like_scanpy(fmt, int_type):
    """scanpy turns integer counts into float32 before normalizing."""
    x = norm_counts(np.float64).astype(int_type)
    ref, test = make_pair(x, fmt)
    run_both(ref, test, target_sum=1e4)
    assert dense(test.X).dtype == ref.X.dtype
    assert_matrix_close(test.X, ref.X, np.float32)


@pytest.mark.scanpy_112(SPARSE_MEDIAN_112)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_int64_indices(dtype):
    x = norm_counts(dtype)
    ref, test = make_pair(x, sparse.csr_matrix)
    m = test.X.copy()
    m.indices = m.indices.astype(np.int64)
    m.indptr = m.indptr.astype(np.int64)
    test.X = m
    run_both(ref, test, exclude_highly_expressed=True, key_added="nf")
    assert_matrix_close(test.X, ref.X, dtype, err_msg="X")
    assert_frame_like_scanpy(test.obs, ref.obs, dtype)


NONCANONICAL = [
    "csr", "csc", pytest.param("cupy-csr", marks=pytest.mark.gpu), pytest.param("cupy-csc", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("duplicates", [False, True], ids=["unsorted", "unsorted+duplicates"])
@pytest.mark.parametrize("fmt", NONCANONICAL)
@pytest.mark.parametrize("opts", [
    {}, pytest.param(dict(exclude_highly_expressed=True, max_fraction=0.2, key_added="nf"),
                     marks=pytest.mark.scanpy_112(SPARSE_MEDIAN_112)),
], ids=["median", "exclude"])
def test_normalize_noncanonical_sparse(fmt, duplicates, opts):
    """Unsorted indices and duplicate entries: the same dense result and factors as scanpy."""
    x = norm_counts(np.float32)
    m = noncanonical(x, fmt.removeprefix("cupy-"), duplicates=duplicates)
    ref, test = make_pair(x, np.asarray)
    ref.X = m.copy()
    test.X = to_device(m.copy()) if fmt.startswith("cupy-") else m.copy()
    ref_out, test_out = run_both(ref, test, inplace=False, **opts)
    assert_matrix_close(test_out["X"], ref_out["X"], np.float32, err_msg="X")
    assert_matrix_close(np.asarray(to_host(test_out["norm_factor"])).ravel(), ref_out["norm_factor"], np.float32,
                        err_msg="norm_factor")


@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_view(array_type, dtype):
    """A subset view is made actual and normalized, as scanpy does."""
    ref, test = make_pair(norm_counts(dtype), array_type)
    cells = np.arange(0, 300, 2)
    ref_v, test_v = ref[cells], test[cells]
    run_both(ref_v, test_v, target_sum=1e4, key_added="nf")
    assert not test_v.is_view
    assert_matrix_close(test_v.X, ref_v.X, dtype, err_msg="X")
    assert_frame_like_scanpy(test_v.obs, ref_v.obs, dtype)


@pytest.mark.parametrize("fmt", ["csr_matrix", pytest.param("cupy-csr_matrix", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("opts", [{}, dict(exclude_highly_expressed=True, key_added="nf")], ids=["median", "exclude"])
def test_normalize_real_pbmc3k(fmt, opts):
    ref = read_real("pbmc3k_counts_labeled.h5ad")
    test = ref.copy()
    if fmt.startswith("cupy-"):
        test.X = to_device(test.X)
    run_both(ref, test, **opts)
    assert_matrix_close(test.X, ref.X, np.float32, err_msg="X")
    assert_frame_like_scanpy(test.obs, ref.obs, np.float32)


# ---------------------------------------------------------------- bad input

def _bad(array_type, dtype=np.float32, poison=None):
    x = norm_counts(dtype)
    if poison is not None:
        r, c = np.argwhere(x > 0)[0]
        x[r, c] = poison
    _, test = make_pair(x, array_type)
    test.obs["label"] = "a"
    test.uns["note"] = {"k": 1}
    return test


def test_normalize_missing_layer(array_type):
    test = _bad(array_type)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match="layer"):
        rsc.pp.normalize_total(test, layer="absent", key_added="nf")
    assert_unchanged(test, snap)


@pytest.mark.parametrize("target_sum", [0, 0.0, -1, -1e4])
def test_normalize_bad_target_sum(array_type, target_sum):
    test = _bad(array_type)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match="target_sum"):
        rsc.pp.normalize_total(test, target_sum=target_sum, key_added="nf")
    assert_unchanged(test, snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("poison", "match"),
    [(np.nan, r"(?i)nan|finite"), (np.inf, r"(?i)inf|finite")],
    ids=["nan", "inf"],
)
def test_normalize_non_finite(array_type, dtype, poison, match):
    test = _bad(array_type, dtype, poison)
    snap = snapshot(test)
    with pytest.raises(BAD_INPUT_ERRORS, match=match):
        rsc.pp.normalize_total(test, target_sum=1e4, key_added="nf")
    assert_unchanged(test, snap)
