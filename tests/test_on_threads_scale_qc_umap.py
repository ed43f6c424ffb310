"""Every kernel of kernels/scale.cu, kernels/qc.cu and kernels/umap.cu run as written on the
CPU (tests/_on_threads.py: each CUDA thread a std::thread), launched with the arguments the
device launchers of gpusc._kernels.{scale,qc,umap} build (same dtypes, grids, blocks,
shared memory, argument order; their CuPy steps redone with NumPy), against the numba twins.

What this checks is the kernels' logic (indexing, warp and block reductions, barriers,
atomics, flags), not the hardware or NVRTC (test_kernels_compile.py, GPU-marked tests).
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse

from gpusc._core import cuda
from gpusc._kernels import qc, scale, umap

V_TYPES = [np.float32, np.float64]
I_TYPES = [np.int32, np.int64]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {family: on_threads.build(family, tmp_path_factory.mktemp(family))
            for family in ("scale", "qc", "umap")}


def _csr(n_rows, n_cols, value_type, index_type, *, seed=0, integer=True, density=0.3):
    """(data, indices, indptr, dense float64 copy) of a canonical CSR matrix with an empty
    row (3), an empty column (5) and an explicitly stored zero."""
    rng = np.random.default_rng(seed)
    dense = rng.integers(1, 10, (n_rows, n_cols)).astype(np.float64)
    if not integer:
        dense *= 0.37
    dense[rng.random((n_rows, n_cols)) > density] = 0
    dense[3] = 0
    dense[:, 5] = 0
    x = sparse.csr_matrix(dense.astype(value_type))
    x.data[len(x.data) // 2] = 0  # stored, but zero
    dense = x.toarray().astype(np.float64)
    assert x.has_canonical_format
    return x.data, x.indices.astype(index_type), x.indptr.astype(index_type), dense


def _row_mask(n_rows):
    mask = np.ones(n_rows, np.uint8)
    mask[::7] = 0
    mask[3] = 1  # the empty row stays in
    return mask


def _garbage(shape, dtype):
    """What cp.empty may hold: NaNs, so that unwritten entries show."""
    return np.full(shape, np.nan, dtype)


# ============================================================ scale: per-gene moments


def _sliced_moments(dense, mask, rows_per_slice, n_slices):
    """The definition, in the device's order: each slice's rows in order, then slice by slice."""
    n_rows, n_cols = dense.shape
    sums, squares = np.zeros(n_cols), np.zeros(n_cols)
    for k in range(n_slices):
        s, q = np.zeros(n_cols), np.zeros(n_cols)
        for r in range(k * rows_per_slice, min(n_rows, (k + 1) * rows_per_slice)):
            if mask is None or mask[r]:
                s += dense[r]
                q += dense[r] * dense[r]
        sums += s
        squares += q
    return sums, squares


def _sum_slices(built, partial, n_slices, n_cols):
    """scale._sum_slices with the kernel on threads."""
    sums, squares = _garbage(n_cols, np.float64), _garbage(n_cols, np.float64)
    cuda.launch(built["scale"][cuda.template_name("sum_slices", np.float64)], -(-n_cols // scale.THREADS),
                scale.THREADS, (partial, np.int64(n_slices), np.int64(n_cols), sums, squares))
    return sums, squares


def _col_moments_csr(built, data, indices, indptr, n_rows, n_cols, mask):
    """gene_moments for a CupyCSRMatrix, line by line."""
    rows_per_slice, n_slices = scale._slices(n_rows, n_cols, 16, 1 << 16)
    partial = np.zeros(n_slices * 2 * n_cols, np.float64)
    flags = np.zeros(1, np.int32)
    cuda.launch(built["scale"][cuda.template_name("col_moments_csr", data.dtype, indices.dtype)],
                scale._warp_grid(n_slices), 32 * scale.WARPS_PER_BLOCK,
                (data, indices, indptr, np.int64(n_rows), np.int64(n_cols),
                 np.uintp(0) if mask is None else mask, np.int64(rows_per_slice), np.int64(n_slices),
                 partial, flags))
    sums, squares = _sum_slices(built, partial, n_slices, n_cols)
    return sums, squares, int(flags[0]), rows_per_slice, n_slices


def _col_moments_dense(built, x, mask):
    """gene_moments for a CupyArray, line by line."""
    n_rows, n_cols = x.shape
    rows_per_slice, n_slices = scale._slices(n_rows, n_cols, 64, 65535)
    partial = _garbage(n_slices * 2 * n_cols, np.float64)  # cp.empty
    flags = np.zeros(1, np.int32)
    k = built["scale"][cuda.template_name("col_moments_dense", x.dtype)]
    k((-(-n_cols // scale.THREADS), n_slices), (scale.THREADS,),
      (x, np.int64(n_rows), np.int64(n_cols), np.uintp(0) if mask is None else mask,
       np.int64(rows_per_slice), partial, flags))
    sums, squares = _sum_slices(built, partial, n_slices, n_cols)
    return sums, squares, int(flags[0]), rows_per_slice, n_slices


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_col_moments_csr(built, value_type, index_type, masked):
    # 160 rows: 10 slices of 16 rows on the device, the same 10 slices in the twin (k * 160 // 10),
    # so both add the same numbers in the same order: exact
    n_rows, n_cols = 160, 40
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, index_type, integer=False)
    mask = _row_mask(n_rows) if masked else None
    sums, squares, flags, rows_per_slice, n_slices = _col_moments_csr(built, data, indices, indptr,
                                                                       n_rows, n_cols, mask)
    assert (rows_per_slice, n_slices) == (16, 10)
    s, q, f = scale._col_moments_csr_host(data, indices, indptr, n_rows, n_cols, scale._host_mask(mask), 10)
    np.testing.assert_array_equal(sums, s)
    np.testing.assert_array_equal(squares, q)
    assert flags == f == scale.FLAG_NONINTEGER
    assert sums[5] == squares[5] == 0  # the empty column


@pytest.mark.parametrize("value_type", V_TYPES)
def test_col_moments_csr_uneven_slices(built, value_type):
    # 170 rows: 11 slices of 16 (the last 10) on the device, other bounds in the twin: exact
    # against the definition in the device's order, allclose against the twin (another order)
    n_rows, n_cols = 170, 37
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, np.int32, seed=4, integer=False)
    mask = _row_mask(n_rows)
    sums, squares, flags, rows_per_slice, n_slices = _col_moments_csr(built, data, indices, indptr,
                                                                       n_rows, n_cols, mask)
    assert (rows_per_slice, n_slices) == (16, 11)
    np.testing.assert_array_equal(np.stack([sums, squares]), _sliced_moments(dense, mask, 16, 11))
    s, q, f = scale._col_moments_csr_host(data, indices, indptr, n_rows, n_cols, mask, 4)
    np.testing.assert_allclose(sums, s, rtol=1e-13)
    np.testing.assert_allclose(squares, q, rtol=1e-13)
    assert flags == f


@pytest.mark.parametrize(("n_rows", "twin_exact"), [(192, True), (130, False)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("value_type", V_TYPES)
def test_col_moments_dense(built, value_type, masked, n_rows, twin_exact):
    # 192 rows: 3 slices of 64 on both sides (exact against the twin); 130 rows: slices of 44
    # on the device, of 43/44 in the twin (exact against the definition, allclose to the twin)
    n_cols = 45
    *_, dense = _csr(n_rows, n_cols, value_type, np.int32, seed=1, integer=False, density=0.6)
    x = dense.astype(value_type)
    mask = _row_mask(n_rows) if masked else None
    sums, squares, flags, rows_per_slice, n_slices = _col_moments_dense(built, x, mask)
    assert n_slices == 3
    np.testing.assert_array_equal(np.stack([sums, squares]),
                                  _sliced_moments(dense, mask, rows_per_slice, n_slices))
    s, q, f = scale._col_moments_dense_host(x, scale._host_mask(mask), 3)
    if twin_exact:
        np.testing.assert_array_equal(sums, s)
        np.testing.assert_array_equal(squares, q)
    else:
        np.testing.assert_allclose(sums, s, rtol=1e-13)
        np.testing.assert_allclose(squares, q, rtol=1e-13)
    assert flags == f == scale.FLAG_NONINTEGER


def _line_moments(built, data, indptr):
    """gene_moments for a CupyCSCMatrix."""
    n_cols = indptr.size - 1
    sums, squares = _garbage(n_cols, np.float64), _garbage(n_cols, np.float64)
    flags = np.zeros(1, np.int32)
    cuda.launch(built["scale"][cuda.template_name("line_moments_csr", data.dtype, indptr.dtype)],
                scale._warp_grid(n_cols), 32 * scale.WARPS_PER_BLOCK,
                (data, indptr, np.int64(n_cols), sums, squares, flags))
    return sums, squares, int(flags[0])


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_line_moments_csr(built, value_type, index_type, integer):
    # CSC, one warp per gene; columns up to 60 values long, so lanes take several each
    n_rows, n_cols = 200, 33
    *_, dense = _csr(n_rows, n_cols, value_type, index_type, seed=2, integer=integer)
    x = sparse.csc_matrix(dense.astype(value_type))
    data, indptr = x.data, x.indptr.astype(index_type)
    sums, squares, flags = _line_moments(built, data, indptr)
    s, q, f = scale._line_moments_host(data, indptr)
    if integer:  # integer sums below 2^53: every order gives the same double
        np.testing.assert_array_equal(sums, s)
        np.testing.assert_array_equal(squares, q)
    else:  # the warp adds lane-strided partial sums in a shuffle tree, the twin in value order
        np.testing.assert_allclose(sums, s, rtol=1e-13)
        np.testing.assert_allclose(squares, q, rtol=1e-13)
    assert flags == f == (0 if integer else scale.FLAG_NONINTEGER)
    assert sums[5] == squares[5] == 0


@pytest.mark.parametrize(("bad", "expected"), [
    (np.nan, scale.FLAG_NONFINITE), (np.inf, scale.FLAG_NONFINITE), (-np.inf, scale.FLAG_NONFINITE),
    (-0.0, scale.FLAG_NEGATIVE), (-2.0, scale.FLAG_NEGATIVE), (0.5, scale.FLAG_NONINTEGER),
    (-0.5, scale.FLAG_NEGATIVE | scale.FLAG_NONINTEGER),
])
@pytest.mark.parametrize("value_type", V_TYPES)
def test_moment_flags(built, value_type, bad, expected):
    # integer counts with one stored `bad` value, through all three moment kernels: NaN and
    # inf set FLAG_NONFINITE only (no sign or fraction bit), -0.0 is negative (signbit)
    n_rows, n_cols = 64, 20
    data, indices, indptr, _ = _csr(n_rows, n_cols, value_type, np.int32, seed=3)
    data = data.copy()
    data[-4] = bad
    x = sparse.csr_matrix((data, indices, indptr), shape=(n_rows, n_cols))
    s_ref, _, f_ref = scale._col_moments_csr_host(data, indices, indptr, n_rows, n_cols,
                                                  scale._host_mask(None), 4)
    assert f_ref == expected
    sums, _, flags, *_ = _col_moments_csr(built, data, indices, indptr, n_rows, n_cols, None)
    assert flags == expected
    np.testing.assert_array_equal(sums, s_ref)  # 4 slices of 16 rows on both sides
    dense = x.toarray()
    dense[np.searchsorted(indptr, data.size - 4, side="right") - 1, indices[-4]] = bad  # toarray adds: -0.0 + 0
    _, _, flags_dense, *_ = _col_moments_dense(built, dense, None)
    assert flags_dense == scale._col_moments_dense_host(dense, scale._host_mask(None), 1)[2] == expected
    csc = x.tocsc()  # keeps the stored entries, -0.0 too
    assert csc.nnz == x.nnz
    assert _line_moments(built, csc.data, csc.indptr)[2] == scale._line_moments_host(csc.data, csc.indptr)[2] \
        == expected


# ============================================================ scale: scaling


@pytest.mark.parametrize("layout", ["csr", "csr_masked", "csc"])
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_scale_sparse_values(built, value_type, index_type, layout):
    n_rows, n_cols = 90, 40
    *_, dense = _csr(n_rows, n_cols, value_type, index_type, seed=5, integer=False)
    x = (sparse.csc_matrix if layout == "csc" else sparse.csr_matrix)(dense.astype(value_type))
    data, indices, indptr = x.data.copy(), x.indices.astype(index_type), x.indptr.astype(index_type)
    std = np.random.default_rng(6).uniform(0.2, 2.0, n_cols)
    std[5] = 1.0  # the empty column's (scanpy sets std = 0 to 1)
    mask = _row_mask(n_rows) if layout == "csr_masked" else None
    by_line = layout == "csc"
    expected = data.copy()
    scale._scale_sparse_host(expected, indices, indptr, by_line, scale._host_mask(mask), std, 2.5)
    n_lines = indptr.size - 1
    cuda.launch(built["scale"][cuda.template_name("scale_sparse_values", data.dtype, indices.dtype)],
                scale._warp_grid(n_lines), 32 * scale.WARPS_PER_BLOCK,
                (data, indices, indptr, np.int64(n_lines), np.int32(by_line),
                 np.uintp(0) if mask is None else mask, std, np.float64(2.5)))
    np.testing.assert_array_equal(data, expected)
    assert (data == 2.5).any() and (data < 2.5).any()
    if mask is not None:  # rows outside the mask are left alone
        rows = np.repeat(np.arange(n_rows), np.diff(indptr))
        np.testing.assert_array_equal(data[mask[rows] == 0], x.data[mask[rows] == 0])


@pytest.mark.parametrize("centre", [True, False])
@pytest.mark.parametrize("value_type", V_TYPES)
def test_scale_dense(built, value_type, centre):
    n_rows, n_cols = 70, 50
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (n_rows, n_cols)).astype(value_type)
    x[3] = 0
    x[:, 5] = 0
    x[10, 11] = np.nan  # stays NaN, as np.clip
    mean, std = rng.normal(0, 1, n_cols), rng.uniform(0.3, 2.0, n_cols)
    mean[5], std[5] = 0.0, 1.0
    lo, hi = (-3.0, 3.0) if centre else (-np.inf, 3.0)  # pp/_scale.py's _bounds
    expected = x.copy()
    scale._scale_dense_host(expected, mean, std, centre, lo, hi)
    out = x.copy()
    kernel = built["scale"][cuda.template_name("scale_dense", value_type)]
    args = (out, np.int64(n_rows), np.int64(n_cols), mean if centre else np.uintp(0), std,
            np.float64(lo), np.float64(hi))
    cuda.launch(kernel, scale._flat_grid(x.size), scale.THREADS, args)
    np.testing.assert_array_equal(out, expected)
    assert np.isnan(out[10, 11]) and (out == 3.0).any()
    # the grid-stride loop (the launcher's grid stops at 65536 blocks): 2 blocks of 256
    out = x.copy()
    kernel((2,), (scale.THREADS,), (out, *args[1:]))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("out_type", V_TYPES)
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_scale_csr_to_dense(built, value_type, index_type, out_type):
    n_rows, n_cols = 60, 70  # rows longer than a warp: lanes take several columns each
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, index_type, seed=8, integer=False,
                                        density=0.6)
    mean, std = dense.mean(axis=0), dense.std(axis=0)
    std[std == 0] = 1.0
    expected = np.empty((n_rows, n_cols), out_type)
    scale._scale_csr_to_dense_host(data, indices, indptr, mean, std, -1.5, 1.5, expected)
    out = _garbage((n_rows, n_cols), out_type)
    cuda.launch(built["scale"][cuda.template_name("scale_csr_to_dense", value_type, index_type, out_type)],
                scale._warp_grid(n_rows), 32 * scale.WARPS_PER_BLOCK,
                (data, indices, indptr, np.int64(n_rows), np.int64(n_cols), mean, std, np.float64(-1.5),
                 np.float64(1.5), out))
    # zeros: clip((0.0 - m) / s) on the device, clip(-m / s) in the twin: the same double
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.clip((dense - mean) / std, -1.5, 1.5).astype(out_type))


# ============================================================ scale: Pearson residuals


def _pearson_inputs(dense):
    cell_sums, gene_sums = dense.sum(axis=1), dense.sum(axis=0)
    return cell_sums, gene_sums, float(cell_sums.sum())


@pytest.mark.parametrize("out_type", V_TYPES)
@pytest.mark.parametrize("index_type", I_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_pearson_csr(built, value_type, index_type, out_type):
    n_rows, n_cols = 60, 70
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, index_type, seed=9, density=0.5)
    cell_sums, gene_sums, total = _pearson_inputs(dense)
    theta, clip = 100.0, 2.5  # a clip that some residuals reach
    expected = np.empty((n_rows, n_cols), out_type)
    scale._pearson_csr_host(data, indices, indptr, cell_sums, gene_sums, total, theta, clip, expected)
    out = _garbage((n_rows, n_cols), out_type)
    out[3] = out[:, 5] = 0  # so that the NaNs below are written ones
    cuda.launch(built["scale"][cuda.template_name("pearson_csr", value_type, index_type, out_type)],
                scale._warp_grid(n_rows), 32 * scale.WARPS_PER_BLOCK,
                (data, indices, indptr, np.int64(n_rows), np.int64(n_cols), cell_sums, gene_sums,
                 np.float64(total), np.float64(theta), np.float64(clip), out))
    np.testing.assert_array_equal(out, expected)  # NaN where the twin has NaN
    assert np.isnan(out[3]).all() and np.isnan(out[:, 5]).all()  # mu = 0: 0 / 0, as the twin
    assert np.isfinite(np.delete(np.delete(out, 3, 0), 5, 1)).all() and (np.abs(out) == clip).any()


@pytest.mark.parametrize("out_type", V_TYPES)
@pytest.mark.parametrize("value_type", V_TYPES)
def test_pearson_dense(built, value_type, out_type):
    n_rows, n_cols = 50, 60
    *_, dense = _csr(n_rows, n_cols, value_type, np.int32, seed=10, density=0.5)
    x = dense.astype(value_type)
    cell_sums, gene_sums, total = _pearson_inputs(dense)
    theta, clip = 100.0, float(np.sqrt(n_rows))  # scanpy's default clip
    expected = np.empty((n_rows, n_cols), out_type)
    scale._pearson_dense_host(x, cell_sums, gene_sums, total, theta, clip, expected)
    out = np.zeros((n_rows, n_cols), out_type)
    cuda.launch(built["scale"][cuda.template_name("pearson_dense", value_type, out_type)],
                scale._flat_grid(x.size), scale.THREADS,
                (x, np.int64(n_rows), np.int64(n_cols), cell_sums, gene_sums, np.float64(total),
                 np.float64(theta), np.float64(clip), out))
    np.testing.assert_array_equal(out, expected)
    assert np.isnan(out[3]).all() and np.isnan(out[:, 5]).all()


# ============================================================ qc


def _qc_on_threads(built, x, qc_masks, ns, per_gene=True):
    """qc.qc_stats for a CupyArray (x: ndarray) or CupyCSRMatrix (x: (data, indices, indptr,
    shape)), line by line; returns (QCStats fields..., raw flags, col_total as the kernel left it)."""
    dense = isinstance(x, np.ndarray)
    if dense:
        n_rows, n_cols = x.shape
        x = np.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
        name = cuda.template_name("qc_dense", x.dtype)
        matrix_args, values = (x, np.int64(n_rows), np.int64(n_cols)), x
    else:
        data, indices, indptr, (n_rows, n_cols) = x
        name = cuda.template_name("qc_csr", data.dtype, indices.dtype)
        matrix_args, values = (data, indices, indptr, np.int64(n_rows)), data
    ns = qc._ns(ns)
    n_qc = qc_masks.shape[1]
    gene_atomics = per_gene and not bool(np.any(values != np.trunc(values)))  # _any_noninteger
    kernel = built["qc"][name]
    top_n = int(ns[-1]) if ns.size else 0
    cap = 1 << max(top_n - 1, 0).bit_length() if top_n else 0
    shared = -(-cap * values.dtype.itemsize // 16) * 16 + 1024 + 64
    row_total = _garbage(n_rows, np.float64)
    row_nnz = np.full(n_rows, -7, np.int64)
    n_groups = -(-n_qc // qc.QC_VARS_PER_PASS)
    row_qc = np.zeros((max(n_groups, 1), n_rows, qc.QC_VARS_PER_PASS), np.float64)
    row_top = np.zeros((n_rows, max(ns.size, 1)), np.float64)
    col_total = np.zeros(n_cols, np.float64)
    col_nnz = np.zeros(n_cols, np.uint64)
    flags = np.zeros(1, np.int32)
    ns_dev = np.asarray(ns, np.int32)
    bits = qc._qc_bits(qc_masks)
    null = np.uintp(0)
    for g in range(max(n_groups, 1)):
        first = g == 0
        group_n_qc = min(qc.QC_VARS_PER_PASS, n_qc - g * qc.QC_VARS_PER_PASS)
        cuda.launch(kernel, n_rows, qc.BLOCK, (
            *matrix_args,
            np.ascontiguousarray((bits >> np.uint32(qc.QC_VARS_PER_PASS * g)) & np.uint32(0xF)),
            np.int32(max(group_n_qc, 0)), ns_dev, np.int32(ns.size if first else 0),
            np.int32(top_n), np.int32(cap),
            row_total if first else null, row_nnz if first else null, row_qc[g], row_top,
            col_total if first and gene_atomics else null,
            col_nnz if first and per_gene else null, flags,
        ), shared_mem=shared if first else 0)
    row_qc = row_qc.transpose(1, 0, 2).reshape(n_rows, -1)[:, :n_qc]
    return (row_total, row_nnz, row_qc, row_top[:, :ns.size], col_total, col_nnz.astype(np.int64),
            int(flags[0]), gene_atomics)


def _qc_host(x, qc_masks, ns, per_gene=True):
    """The twin as qc_stats calls it for scipy CSR / numpy input."""
    if isinstance(x, np.ndarray):
        flat = np.ascontiguousarray(x).reshape(-1)
        return qc._qc_host(flat, np.arange(x.shape[1], dtype=np.int64), np.empty(0, np.int64), *x.shape,
                           qc._as_uint8(qc_masks), qc._ns(ns), per_gene)
    data, indices, indptr, shape = x
    return qc._qc_host(data, indices, indptr, *shape, qc._as_uint8(qc_masks), qc._ns(ns), per_gene)


def _qc_input(layout, value_type, index_type, n_rows, n_cols, *, integer=True, seed=11):
    # rows from nearly empty to full, so that both branches of the top-n selection run
    # (a row with at most top_n stored values, and the radix select over longer rows)
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, index_type, seed=seed,
                                        integer=integer, density=0.5)
    if layout == "dense":
        return dense.astype(value_type), dense
    return (data, indices, indptr, (n_rows, n_cols)), dense


QC_CASES = [("csr", v, i) for v in V_TYPES for i in I_TYPES] + [("dense", v, None) for v in V_TYPES]


@pytest.mark.parametrize(("layout", "value_type", "index_type"), QC_CASES)
def test_qc(built, layout, value_type, index_type):
    # integer counts (ties for the radix select), 6 qc_vars (two launches), ns up to 20 of 45
    # genes; integer sums are exact in any order, so the block trees and the double atomics
    # of the per-gene sums must give the twin's numbers exactly
    n_rows, n_cols = 18, 45
    x, dense = _qc_input(layout, value_type, index_type, n_rows, n_cols)
    if layout == "csr":  # rows with fewer stored values than top_n, with exactly top_n, with more
        lengths = np.diff(x[2])
        assert (lengths[lengths > 0] < 20).any() and (lengths == 20).any() and (lengths > 20).any()
    masks = np.random.default_rng(12).random((n_cols, 6)) < 0.3
    ns = np.array([20, 1, 5])
    got = _qc_on_threads(built, x, masks, ns)
    row_total, row_nnz, row_qc, row_top, col_total, col_nnz, flags = _qc_host(x, masks, ns)
    assert got[7]  # integer data: per-gene sums by atomics
    np.testing.assert_array_equal(got[0], row_total)
    np.testing.assert_array_equal(got[1], row_nnz)
    np.testing.assert_array_equal(got[2], row_qc)
    np.testing.assert_array_equal(got[3], row_top)
    np.testing.assert_array_equal(got[4], col_total)
    np.testing.assert_array_equal(got[5], col_nnz)
    assert got[6] == flags == 0
    # and the definition
    np.testing.assert_array_equal(got[0], dense.sum(axis=1))
    np.testing.assert_array_equal(got[1], (dense != 0).sum(axis=1))  # the stored zero does not count
    np.testing.assert_array_equal(got[2], dense @ masks)
    top = -np.sort(-dense, axis=1)
    np.testing.assert_array_equal(got[3], np.stack([top[:, :n].sum(axis=1) for n in (1, 5, 20)], axis=1))
    np.testing.assert_array_equal(got[5], (dense != 0).sum(axis=0))
    assert got[0][3] == got[3][3].sum() == 0 and got[4][5] == got[5][5] == 0  # empty row, column


@pytest.mark.parametrize("value_type", V_TYPES)
def test_qc_top_equals_row_and_no_qc_vars(built, value_type):
    # dense rows of exactly top_n values (the copy branch, cap 16 > 10 padded with zeros),
    # no qc_vars (one launch with n_qc = 0), no per-gene counts
    n_rows, n_cols = 12, 10
    x, dense = _qc_input("dense", value_type, None, n_rows, n_cols, seed=13)
    masks = np.zeros((n_cols, 0), bool)
    ns = np.array([3, 10])
    got = _qc_on_threads(built, x, masks, ns, per_gene=False)
    expected = _qc_host(x, masks, ns, per_gene=False)
    for g, e in zip(got[:4], expected[:4], strict=True):
        np.testing.assert_array_equal(g, e)
    assert not got[4].any() and not got[5].any()  # col_total and col_nnz: null, left zero
    np.testing.assert_array_equal(got[3][:, 1], dense.sum(axis=1))


@pytest.mark.parametrize(("layout", "value_type", "index_type"),
                         [("csr", np.float32, np.int32), ("dense", np.float64, None)])
def test_qc_noninteger_and_flags(built, layout, value_type, index_type):
    # non-integer values, a NaN (row 8) and a negative (row 12): the launcher leaves the
    # per-gene sums to gene_moments (col_total null, left zero) and reports both flags
    n_rows, n_cols = 16, 40
    x, dense = _qc_input(layout, value_type, index_type, n_rows, n_cols, integer=False, seed=14)
    values = x if layout == "dense" else x[0]
    if layout == "dense":
        values[8, 2], values[12, 30] = np.nan, -1.5
    else:
        indptr = x[2]
        assert indptr[9] > indptr[8] and indptr[13] > indptr[12]
        values[indptr[8]], values[indptr[12]] = np.nan, -1.5
    masks = np.random.default_rng(15).random((n_cols, 3)) < 0.4
    ns = np.array([1, 4, 25])
    got = _qc_on_threads(built, x, masks, ns)
    row_total, row_nnz, row_qc, row_top, col_total, col_nnz, flags = _qc_host(x, masks, ns)
    assert not got[7] and not got[4].any()
    assert got[6] == flags == 3  # non-finite | negative
    np.testing.assert_array_equal(got[1], row_nnz)
    np.testing.assert_array_equal(got[5], col_nnz)
    # block trees add the per-thread partial sums in another order than the twin's loop
    np.testing.assert_allclose(got[0], row_total, rtol=1e-12)
    np.testing.assert_allclose(got[2], row_qc, rtol=1e-12)
    ok = np.ones(n_rows, bool)
    ok[[8, 12]] = False  # top values of rows with NaN / negatives: flagged, rejected by the caller
    np.testing.assert_allclose(got[3][ok], row_top[ok], rtol=1e-12)
    assert np.isnan(got[0][8]) and np.isnan(row_total[8])


# ============================================================ umap


def _layout_on_threads(built, monkeypatch, embedding, head, tail, eps, n_epochs, a, b, gamma, alpha, rate, seed,
                       index_type=None):
    """umap.optimize_layout_device itself, NumPy standing in for CuPy and its kernels on
    threads; index_type forces the index instantiation (the launcher takes int64 only past
    2^31 vertices). Returns the layout and the epoch kernel's last sampling schedules."""
    on_threads.numpy_as_cupy(monkeypatch)
    if index_type is not None:
        prepare = umap._prepare

        def prepare_as(*args):
            emb, head_h, tail_h, *schedules = prepare(*args)
            return emb, head_h.astype(index_type), tail_h.astype(index_type), *schedules

        monkeypatch.setattr(umap, "_prepare", prepare_as)
    launched = {}

    def kernel(name):
        def launch(grid, block, args, shared_mem=0):
            launched[name] = args
            built["umap"][name](grid, block, args, shared_mem=shared_mem)
        return launch

    monkeypatch.setattr(umap, "_kernel", kernel)
    emb = umap.optimize_layout_device(embedding, head, tail, eps, n_epochs, a, b, gamma, alpha, rate, seed)
    (epoch_args,) = (args for name, args in launched.items() if name.startswith("umap_epoch"))
    assert epoch_args[2].dtype == (index_type or np.int32)
    assert not epoch_args[1].any()  # umap_apply clears the accumulator
    return emb, epoch_args[9], epoch_args[10]


def _graph(n=14, dim=2, seed=16, uniform=False):
    """A small symmetric graph as tl.umap passes it (COO rows, cols, weights), with a
    zero-weight edge (pruned) and two coincident vertices joined by an edge."""
    rng = np.random.default_rng(seed)
    g = sparse.random(n, n, density=0.3, random_state=seed, format="coo")
    g = sparse.coo_matrix(g + g.T + sparse.coo_matrix(([1.0], ([0], [1])), shape=(n, n)))
    g.sum_duplicates()
    w = np.ones_like(g.data) if uniform else 0.2 + g.data  # eps <= 6: every edge due within 11 epochs
    w[2] = 0.0
    start = rng.uniform(0, 10, (n, dim)).astype(np.float32)
    start[1] = start[0]
    return start, g.row, g.col, w


@pytest.mark.parametrize(("n_epochs", "uniform"), [(2, True), (11, False)])
@pytest.mark.parametrize("index_type", [None, np.int64])
def test_umap_layout_epochs(built, monkeypatch, index_type, n_epochs, uniform):
    # uniform weights, 2 epochs: every edge is due at epoch 1 (epoch 0 samples none: eps >= 1,
    # as umap-learn), one full epoch with its negative samples; then 11 epochs of a weighted
    # graph. The negative samples are the same hash on both sides, the moves integer
    # fixed-point sums (order-free) and pow the same libm: exact
    start, head, tail, w = _graph(uniform=uniform)
    eps = umap.epochs_per_sample(w, n_epochs)
    seed = 0xD1B54A32D192ED03  # as umap.seed_from draws them: all 64 bits, the top one set
    params = dict(n_epochs=n_epochs, a=1.577, b=0.895, gamma=1.0, alpha=1.0)
    got, next_sample, next_negative = _layout_on_threads(built, monkeypatch, start, head, tail, eps, **params,
                                                         rate=5.0, seed=seed, index_type=index_type)
    expected = umap.optimize_layout_host(start, head, tail, eps, **params, negative_sample_rate=5.0,
                                         seed=seed)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, start)
    keep = eps > 0
    assert (next_sample > eps[keep]).all()  # every edge was sampled at least once
    assert (next_negative > eps[keep] / 5.0).all()  # and drew negative samples
    # without negative samples: the same for the attractive moves alone
    got = _layout_on_threads(built, monkeypatch, start, head, tail, eps, **params, rate=0.0, seed=seed,
                             index_type=index_type)[0]
    np.testing.assert_array_equal(got, umap.optimize_layout_host(start, head, tail, eps, **params,
                                                                 negative_sample_rate=0.0, seed=seed))


def test_umap_apply(built):
    # 300 coordinates (two blocks, the second partly idle); zero moves leave the value alone
    rng = np.random.default_rng(19)
    emb = rng.normal(0, 5, (150, 2)).astype(np.float32)
    acc = rng.integers(-(1 << 40), 1 << 40, emb.shape)
    acc[rng.random(emb.shape) < 0.3] = 0
    emb[0, 0] = -0.0
    acc[0, 0] = 0
    expected = np.where(acc != 0, (emb.astype(np.float64) + acc * (1.0 / umap.FIXED_SCALE)).astype(np.float32),
                        emb)
    got, acc_got = emb.copy(), acc.copy()
    cuda.launch(built["umap"]["umap_apply"], -(-emb.size // umap.BLOCK), umap.BLOCK,
                (got, acc_got, np.int64(emb.size)))
    np.testing.assert_array_equal(got, expected)
    assert np.signbit(got[0, 0]) and not acc_got.any()
