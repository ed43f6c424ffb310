"""Every kernel of kernels/scale.cu, kernels/qc.cu and kernels/umap.cu run as written on the
CPU (tests/_on_threads.py: each CUDA thread a std::thread), launched with the arguments the
device launchers of gpusc._kernels.{scale,qc,umap} build (same dtypes, grids, blocks,
shared memory, argument order; the qc launcher runs itself with NumPy standing in for CuPy,
the others' CuPy steps are redone with NumPy), against the numba twins.

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


# (scale's per-gene moments are the moments family's: test_on_threads_moments.py)


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


@pytest.fixture
def qc_device(built, monkeypatch):
    """qc.qc_rows_device, the launcher itself, with NumPy standing in for CuPy and the qc
    kernels on threads."""
    on_threads.numpy_as_cupy(monkeypatch)
    monkeypatch.setattr(cuda, "get_kernel", lambda family, names, name: built[family][name])

    def run(x, qc_masks, ns):
        if isinstance(x, np.ndarray):
            x = np.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
            return qc.qc_rows_device(x, None, None, x.shape, qc_masks, ns)
        data, indices, indptr, shape = x
        return qc.qc_rows_device(data, indices, indptr, shape, qc_masks, ns)
    return run


def _qc_host(x, qc_masks, ns):
    """The twin as qc_stats calls it for scipy CSR / numpy input."""
    if isinstance(x, np.ndarray):
        flat = np.ascontiguousarray(x).reshape(-1)
        return qc._qc_host(flat, np.arange(x.shape[1], dtype=np.int64), np.empty(0, np.int64), *x.shape,
                           qc._as_uint8(qc_masks), qc._ns(ns))
    data, indices, indptr, shape = x
    return qc._qc_host(data, indices, indptr, *shape, qc._as_uint8(qc_masks), qc._ns(ns))


def _qc_input(layout, value_type, index_type, n_rows, n_cols, *, integer=True, seed=11):
    # rows from nearly empty to full, so that both branches of the top-n selection run
    # (a row with at most top_n stored values, and the radix select over longer rows)
    data, indices, indptr, dense = _csr(n_rows, n_cols, value_type, index_type, seed=seed,
                                        integer=integer, density=0.5)
    if layout == "dense":
        return dense.astype(value_type), dense
    return (data, indices, indptr, (n_rows, n_cols)), dense


def _qc_equals_twin(qc_device, x, n_cols):
    """The launcher on ``x`` with 6 qc_vars (two launches) and ns (20, 1, 5), checked equal
    to the twin; returns (the masks, the launcher's arrays)."""
    masks = np.random.default_rng(12).random((n_cols, 6)) < 0.3
    ns = np.array([20, 1, 5])
    got = qc_device(x, masks, ns)
    expected = _qc_host(x, masks, ns)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    return masks, got


QC_CASES = [("csr", v, i) for v in V_TYPES for i in I_TYPES] + [("dense", v, None) for v in V_TYPES]


@pytest.mark.parametrize(("layout", "value_type", "index_type"), QC_CASES)
def test_qc(qc_device, layout, value_type, index_type):
    # integer counts (ties for the radix select), 6 qc_vars (two launches), ns up to 20 of 45
    # genes; integer sums are exact in any order, so the block trees must give the twin's
    # numbers exactly
    n_rows, n_cols = 18, 45
    x, dense = _qc_input(layout, value_type, index_type, n_rows, n_cols)
    if layout == "csr":  # rows with fewer stored values than top_n, with exactly top_n, with more
        lengths = np.diff(x[2])
        assert (lengths[lengths > 0] < 20).any() and (lengths == 20).any() and (lengths > 20).any()
    masks, got = _qc_equals_twin(qc_device, x, n_cols)
    assert got[4] == 0
    # and the definition
    np.testing.assert_array_equal(got[0], dense.sum(axis=1))
    np.testing.assert_array_equal(got[1], (dense != 0).sum(axis=1))  # the stored zero does not count
    np.testing.assert_array_equal(got[2], dense @ masks)
    top = -np.sort(-dense, axis=1)
    np.testing.assert_array_equal(got[3], np.stack([top[:, :n].sum(axis=1) for n in (1, 5, 20)], axis=1))
    assert got[0][3] == got[3][3].sum() == 0  # the empty row


@pytest.mark.parametrize(("layout", "index_type"), [("csr", np.int32), ("csr", np.int64), ("dense", None)])
def test_qc_empty_chunk(qc_device, layout, index_type):
    """A chunk of no rows (a dask array's empty chunk): no block is launched, and the
    launcher returns the twin's empty arrays (on an H200 a block launched anyway read past
    the one-entry indptr: an illegal address; then the reshape of 0 rows failed)."""
    n_cols = 45
    if layout == "dense":
        x = np.zeros((0, n_cols), np.float64)
    else:
        x = (np.zeros(0, np.float64), np.zeros(0, index_type), np.zeros(1, index_type), (0, n_cols))
    _, got = _qc_equals_twin(qc_device, x, n_cols)
    assert got[2].shape == (0, 6) and got[3].shape == (0, 3)


@pytest.mark.parametrize("value_type", V_TYPES)
def test_qc_top_equals_row_and_no_qc_vars(qc_device, value_type):
    # dense rows of exactly top_n values (the copy branch, cap 16 > 10 padded with zeros),
    # no qc_vars (one launch with n_qc = 0)
    n_rows, n_cols = 12, 10
    x, dense = _qc_input("dense", value_type, None, n_rows, n_cols, seed=13)
    masks = np.zeros((n_cols, 0), bool)
    ns = np.array([3, 10])
    got = qc_device(x, masks, ns)
    expected = _qc_host(x, masks, ns)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(got[3][:, 1], dense.sum(axis=1))


@pytest.mark.parametrize(("layout", "value_type", "index_type"),
                         [("csr", np.float32, np.int32), ("dense", np.float64, None)])
def test_qc_noninteger_and_flags(qc_device, layout, value_type, index_type):
    # non-integer values, a NaN (row 8) and a negative (row 12): both flags reported
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
    got = qc_device(x, masks, ns)
    row_total, row_nnz, row_qc, row_top, flags = _qc_host(x, masks, ns)
    assert got[4] == flags == 3  # non-finite | negative
    np.testing.assert_array_equal(got[1], row_nnz)
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
    launched = on_threads.launchers_on_threads(monkeypatch, built)
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
