"""The per-gene moments family (gpusc._kernels.moments.gene_moments) on every array type,
against the definition computed with NumPy on the dense matrix: per group, the sum and sum of
squares of the transformed values and the number of values > 0 or != 0.

The public functions built on it (highly_variable_genes, scale, normalize_pearson_residuals,
calculate_qc_metrics) are compared with scanpy in their own test files; the device kernels run
as written on CPU threads in test_on_threads_moments.py.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from scipy import sparse

from conftest import synthetic_counts
from gpusc._core.arrays import placement
from gpusc._kernels.moments import (COUNT_NONE, COUNT_NONZERO, COUNT_POSITIVE, MODE_CLIP, MODE_EXPM1,
                                    MODE_IDENTITY, gene_moments, slice_layout)

MODES = {"identity": MODE_IDENTITY, "expm1": MODE_EXPM1, "clip": MODE_CLIP}
N_GROUPS = 4  # group 2 gets no cells; some cells are left out (code -1)


def _codes(n_obs, seed=0):
    codes = np.random.default_rng(seed).choice(np.array([-1, 0, 1, 3], np.int32), n_obs,
                                               p=[0.1, 0.3, 0.3, 0.3])
    return codes


def definition(x, codes, n_groups, mode, scale, clip, count):
    """The definition, group by group, on the dense matrix (float64 sums)."""
    s, s2, n = (np.zeros((n_groups, x.shape[1])) for _ in range(3))
    for g in range(n_groups):
        xg = x[codes == g]
        if mode == MODE_EXPM1:
            f = np.expm1((xg * np.float64(scale)).astype(x.dtype)).astype(np.float64)
        elif mode == MODE_CLIP:
            f = np.minimum(xg.astype(np.float64), clip[g])
        else:
            f = xg.astype(np.float64)
        s[g], s2[g] = f.sum(axis=0), (f * f).sum(axis=0)
        n[g] = (xg > 0).sum(axis=0) if count == COUNT_POSITIVE else (xg != 0).sum(axis=0)
    return s, s2, n


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_type_against_the_definition(array_type, dtype, mode):
    x = synthetic_counts(200, 90, dtype=dtype, density=0.2, seed=3) / 4
    x[:7, 10] = -0.5  # a negative value: counted by != 0, not by > 0
    codes = _codes(x.shape[0])
    clip = np.random.default_rng(1).uniform(0.5, 3.0, (N_GROUPS, x.shape[1]))
    mode = MODES[mode]
    for count in (COUNT_POSITIVE, COUNT_NONZERO):
        m = gene_moments(array_type(x), codes, N_GROUPS, mode=mode, scale=0.7, clip=clip,
                         count=count, check_integer=True)
        s, s2, n = definition(x, codes, N_GROUPS, mode, 0.7, clip, count)
        # float32 expm1: numba's/CUDA's expm1f and NumPy's may differ by an ulp of float32
        rtol = 1e-6 if dtype == np.float32 and mode == MODE_EXPM1 else 1e-12
        np.testing.assert_allclose(m.sum, s, rtol=rtol, atol=1e-300)
        np.testing.assert_allclose(m.sum_sq, s2, rtol=rtol, atol=1e-300)
        np.testing.assert_array_equal(m.count, n)
        assert m.count.dtype == np.int64 and m.sum.shape == (N_GROUPS, x.shape[1])
        assert not m.sum[2].any()  # the group without cells
        assert m.flags == 2 | 4  # negative, non-integers (x / 4), nothing else
    if placement(array_type(x)) == "host":
        # the host looks for non-integers only when asked (the device always does)
        assert gene_moments(array_type(x), codes, N_GROUPS).flags == 2
    # deterministic: a second run is bit-identical
    again = gene_moments(array_type(x), codes, N_GROUPS, mode=mode, scale=0.7, clip=clip,
                         count=COUNT_NONZERO)
    np.testing.assert_array_equal(again.sum, m.sum)
    np.testing.assert_array_equal(again.sum_sq, m.sum_sq)


def test_no_groups_and_optional_arrays(array_type):
    x = synthetic_counts(120, 45, seed=4)
    full = gene_moments(array_type(x), count=COUNT_NONZERO)
    np.testing.assert_array_equal(full.sum[0], x.sum(axis=0))
    np.testing.assert_array_equal(full.sum_sq[0], (x.astype(np.float64) ** 2).sum(axis=0))
    np.testing.assert_array_equal(full.count[0], (x != 0).sum(axis=0))
    lean = gene_moments(array_type(x), squares=False, count=COUNT_NONE)
    assert lean.sum_sq is None and lean.count is None
    np.testing.assert_array_equal(lean.sum, full.sum)


def test_mask_as_codes_and_every_cell_left_out(array_type):
    x = synthetic_counts(100, 45, seed=5)
    keep = np.arange(100) % 3 != 0
    masked = gene_moments(array_type(x), np.where(keep, 0, -1))
    np.testing.assert_array_equal(masked.sum[0], x[keep].sum(axis=0))
    none = gene_moments(array_type(x), np.full(100, -1), 2, count=COUNT_POSITIVE)
    assert not none.sum.any() and not none.sum_sq.any() and not none.count.any()


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_int64_indices_and_duplicates(fmt):
    x = synthetic_counts(100, 50, seed=2)
    codes = _codes(100, seed=1)
    want = gene_moments(x, codes, N_GROUPS, count=COUNT_NONZERO)
    wide = sparse.csr_matrix(x).asformat(fmt)
    wide.indices, wide.indptr = wide.indices.astype(np.int64), wide.indptr.astype(np.int64)
    got = gene_moments(wide, codes, N_GROUPS, count=COUNT_NONZERO)
    for a, b in ((got.sum, want.sum), (got.sum_sq, want.sum_sq), (got.count, want.count)):
        np.testing.assert_array_equal(a, b)
    # every stored value split in two entries, unsorted: summed first (on a copy), as a dense
    # view would be; the sums of squares and the counts see the summed values
    coo = sparse.coo_matrix(x)
    order = np.random.default_rng(0).permutation(2 * coo.nnz)
    data = np.r_[coo.data - coo.data // 2, coo.data // 2][order]
    rows, cols = np.r_[coo.row, coo.row][order], np.r_[coo.col, coo.col][order]
    dup = (sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix)((data, (rows, cols)), shape=x.shape)
    dup.has_canonical_format = False
    before = dup.copy()
    got = gene_moments(dup, codes, N_GROUPS, count=COUNT_NONZERO)
    for a, b in ((got.sum, want.sum), (got.sum_sq, want.sum_sq), (got.count, want.count)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(dup.data, before.data)  # the input is untouched


@pytest.mark.parametrize(("value", "flag"), [(np.nan, 1), (np.inf, 1), (-2.0, 2), (0.5, 4),
                                             (3.0, 0)])
def test_flags(host_type, value, flag):
    x = synthetic_counts(60, 45, seed=6)
    x[4, 7] = value
    m = gene_moments(host_type(x), check_integer=True)
    assert m.flags == flag
    # inf survives a clip to a finite value: the raw values' sum finds it
    clipped = gene_moments(host_type(x), mode=MODE_CLIP, clip=np.full((1, 45), 2.0))
    assert clipped.nonfinite == (flag == 1)


def test_negative_zero_is_flagged_like_scanpys_signbit():
    x = synthetic_counts(30, 45, seed=7)
    x[2, 2] = -0.0
    assert gene_moments(x).negative
    stored = sparse.csr_matrix(synthetic_counts(30, 45, seed=7))
    stored.data[3] = -0.0  # an explicitly stored -0.0
    assert gene_moments(stored).negative and gene_moments(stored.tocsc()).negative


def test_same_result_whatever_the_thread_count():
    """The host slices are a fixed count, not the thread count: one thread or all of them
    give bit-identical sums (non-integer data, so the order of additions shows)."""
    x = sparse.csr_matrix(synthetic_counts(3000, 60, density=0.3, seed=8) * np.float32(0.37))
    codes = _codes(3000, seed=2)
    results = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            results.append(gene_moments(x, codes, N_GROUPS))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    np.testing.assert_array_equal(results[0].sum, results[1].sum)
    np.testing.assert_array_equal(results[0].sum_sq, results[1].sum_sq)


@pytest.mark.parametrize(("n_slices", "min_rows"), [(32, 1), (7, 16), (1000, 16), (3, 1)])
def test_slice_layout(n_slices, min_rows):
    codes = _codes(500, seed=3)
    layout = slice_layout(codes, 500, N_GROUPS, n_slices, min_rows)
    kept = np.flatnonzero(codes >= 0)
    # the kept rows, grouped by code, in their original order within a group
    np.testing.assert_array_equal(layout.rows, kept[np.argsort(codes[kept], kind="stable")])
    assert layout.start[0] == 0 and layout.start[-1] == kept.size
    sizes = np.diff(layout.start)
    assert (sizes > 0).all()
    for s in range(layout.n_slices):
        rows = layout.rows[layout.start[s]:layout.start[s + 1]]
        assert (codes[rows] == layout.group[s]).all()
    for g in range(N_GROUPS):
        lo, hi = layout.group_slices[g], layout.group_slices[g + 1]
        assert (layout.group[lo:hi] == g).all()
        n_cells = int((codes == g).sum())
        assert (hi > lo) == (n_cells > 0)
        if hi - lo > 1:
            assert sizes[lo:hi].min() >= min_rows
    every = slice_layout(None, 500, 1, n_slices, min_rows)
    assert every.rows is None and every.start[-1] == 500


@pytest.mark.gpu
@pytest.mark.parametrize("grouped", [False, True])
def test_device_peak_within_the_stated_bound(grouped):
    """On the device gene_moments holds no more than device_workspace_bytes beyond the matrix
    (a canonical CSR here: no copy); CuPy's pool rounds each allocation up to 512 bytes."""
    from conftest import to_device
    from gpusc._bench import DevicePeak
    from gpusc._kernels.moments import device_workspace_bytes

    n_obs, n_vars = 50_000, 2_000
    x = to_device(sparse.random(n_obs, n_vars, density=0.05, format="csr", dtype=np.float32,
                                random_state=0))
    codes = _codes(n_obs) if grouped else None
    with DevicePeak(True) as peak:
        gene_moments(x, codes, N_GROUPS if grouped else 1, count=COUNT_POSITIVE)
    bound = device_workspace_bytes(n_obs, n_vars, N_GROUPS if grouped else 1, count=COUNT_POSITIVE,
                                   grouped=grouped)
    assert peak.peak - peak.start <= bound + 16 * 512, (peak.peak - peak.start, bound)
