"""Kernels of kernels/hvg.cu and kernels/normalize.cu run as written on the CPU
(tests/_on_threads.py: every CUDA thread a std::thread, warp shuffles and votes as thread
barriers), with the arguments their device launchers in gpusc._kernels.hvg / .normalize
build, against the numba (or numpy) twins in the same modules.

Each test repeats its launcher's steps with numpy in place of CuPy: the same dtypes, grid,
block and argument order, the same host-side preparation (row permutation by batch, CSC copy
with sorted indices, chunk layout, cell sums) and the same follow-up kernels (sum_chunks,
pearson_sum_chunks). Shapes are small: every shuffle is a barrier of 32 threads.

Exactness: where the kernel and the twin add the same values in the same order the results
must be equal bit for bit. Where the orders differ (a warp's lanes take every 32nd value and
warp_sum reduces the 32 partial sums by __shfl_down_sync over offsets 16, 8, 4, 2, 1; the
twins add in stored order), count data keep the comparison exact (sums of integers below
2^53 do not round in double); otherwise allclose with the reason stated at the call.
"""

from __future__ import annotations

import _on_threads as on_threads
import numpy as np
import pytest
from scipy import sparse

from gpusc._core import cuda
from gpusc._kernels import hvg, normalize

EMPTY_ROW, EMPTY_COL = 7, 3


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {family: on_threads.build(family, tmp_path_factory.mktemp(family))
            for family in ("hvg", "normalize")}


def _launch(kernel, grid, block, args, shared_mem=0):
    """gpusc._core.cuda.launch, with the stand-in in place of the RawKernel."""
    kernel((max(int(grid), 1),), (int(block),), args, shared_mem=shared_mem)


def _counts(n_obs, n_vars, dtype, seed, density=0.6, lam=2.0):
    """Integer counts with one empty row and one empty column; most columns hold more than
    64 stored values, so every lane of a warp walks several of them."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(lam, (n_obs, n_vars)) * (rng.random((n_obs, n_vars)) < density)
    x[:, 0] = rng.poisson(lam, n_obs) + 1  # one full column: the longest lane strides
    x[EMPTY_ROW] = 0
    x[:, EMPTY_COL] = 0
    return x.astype(dtype)


def _codes(n_obs, n_batches, seed):
    """Batches interleaved over the rows (the launchers must regroup them); with 4 batches,
    batch 2 has no cells."""
    rng = np.random.default_rng(seed)
    if n_batches == 4:
        return rng.choice(np.array([0, 1, 3], np.int32), n_obs)
    return rng.integers(0, n_batches, n_obs).astype(np.int32)


def _csr(x, index_type):
    m = sparse.csr_matrix(x)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    return m


def _csc(m, index_type):
    m = sparse.csc_matrix(m)
    m.indices, m.indptr = m.indices.astype(index_type), m.indptr.astype(index_type)
    return m


# ================================================================ hvg: gene_moments

MODES = {
    # mode, scale, data: counts keep IDENTITY and CLIP sums exact in any order
    "identity": (hvg.HVG_IDENTITY, 1.0, "counts"),
    "expm1": (hvg.HVG_EXPM1, float(np.log(2.0)), "log"),
    "clip": (hvg.HVG_CLIP, 1.0, "counts"),
}


def _hvg_input(value_type, mode_name, n_batches, seed=0):
    mode, scale, data = MODES[mode_name]
    x = _counts(200, 40, value_type, seed)
    if data == "log":
        x = np.log1p(x)  # log-normalised values: non-integer, expm1 undoes the log
    clip = None
    if mode == hvg.HVG_CLIP:
        # integer limits (sums stay exact), below the largest values of most genes
        clip = np.random.default_rng(seed + 1).integers(1, 5, (n_batches, 40)).astype(np.float64)
    return x, _codes(200, n_batches, seed + 2), mode, scale, clip


def _moments_csc_on_threads(built, x, codes, n_batches, mode, scale, clip, index_type):
    """hvg's gene_moments for a device CSR/CSC matrix, step by step."""
    n_obs, n_vars = x.shape
    rows, batch_start = hvg._device_codes(codes, n_batches)
    if n_batches > 1:
        x = sparse.csr_matrix(x)[rows].tocsc()
        x.sort_indices()
    else:
        x = sparse.csc_matrix(x)
    x = _csc(x, index_type)
    assert x.has_sorted_indices
    kernel = built["hvg"][cuda.template_name("moments_csc", x.dtype, x.indices.dtype)]
    out_sum = np.empty((n_batches, n_vars), np.float64)
    out_sum_sq = np.empty((n_batches, n_vars), np.float64)
    out_pos = np.empty((n_batches, n_vars), np.int64)
    flags = np.zeros(1, np.int32)
    clip_dev = hvg._clip(clip, n_batches, n_vars) if mode == hvg.HVG_CLIP else None
    n_warps = n_vars * n_batches
    _launch(kernel, -(-n_warps * 32 // hvg.BLOCK), hvg.BLOCK, (
        x.data, x.indices, x.indptr, np.int64(n_vars), np.int32(n_batches),
        batch_start, np.int32(mode), np.float64(scale),
        clip_dev if clip_dev is not None else np.uintp(0),
        out_sum, out_sum_sq, out_pos, flags,
    ))
    return hvg.Moments(out_sum, out_sum_sq, out_pos, flags=int(flags[0]))


def _moments_dense_on_threads(built, x, codes, n_batches, mode, scale, clip):
    """hvg's gene_moments for a device dense matrix: moments_dense, then sum_chunks."""
    n_obs, n_vars = x.shape
    x = np.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
    rows, chunk_start, chunk_batch, batch_chunks = hvg.chunk_layout(codes, n_batches, hvg.N_CHUNKS_DEVICE)
    n_chunks = chunk_batch.size
    part = [np.empty((n_chunks, n_vars), np.float64), np.empty((n_chunks, n_vars), np.float64),
            np.empty((n_chunks, n_vars), np.int64)]
    flags = np.zeros(1, np.int32)
    clip_dev = hvg._clip(clip, n_batches, n_vars) if mode == hvg.HVG_CLIP else None
    n_col_tiles = -(-n_vars // hvg.BLOCK)
    _launch(built["hvg"][cuda.template_name("moments_dense", x.dtype)], n_chunks * n_col_tiles, hvg.BLOCK, (
        x, np.int64(n_vars), rows if n_batches > 1 else np.uintp(0),
        chunk_start, chunk_batch, np.int64(n_chunks), np.int32(mode),
        np.float64(scale), clip_dev if clip_dev is not None else np.uintp(0), *part, flags,
    ))
    out = [np.empty((n_batches, n_vars), np.float64), np.empty((n_batches, n_vars), np.float64),
           np.empty((n_batches, n_vars), np.int64)]
    _launch(built["hvg"]["sum_chunks"], -(-n_batches * n_vars // hvg.BLOCK), hvg.BLOCK, (
        *part, batch_chunks, np.int32(n_batches), np.int64(n_vars), *out,
    ))
    return hvg.Moments(*out, flags=int(flags[0]))


def _moments_dense_twin(x, codes, n_batches, mode, scale, clip):
    """The numba twin over the device's chunk layout (N_CHUNKS_DEVICE), so that every chunk
    adds its rows in the kernel's order and _sum_chunks_host adds the chunks in sum_chunks'."""
    n_obs, n_vars = x.shape
    rows, chunk_start, chunk_batch, batch_chunks = hvg.chunk_layout(codes, n_batches, hvg.N_CHUNKS_DEVICE)
    part, v_sum, v_min, bad = hvg._moments_rows_host(
        np.ascontiguousarray(x).reshape(-1), np.arange(n_vars, dtype=np.int64), np.empty(0, np.int64),
        n_vars, rows, chunk_start, chunk_batch, mode, float(scale), hvg._clip(clip, n_batches, n_vars),
        x.dtype == np.float32, True, True)
    sums = hvg._sum_chunks_host(part, batch_chunks)
    return hvg.Moments(sums[..., 0], sums[..., 1], sums[..., 2].astype(np.int64),
                       flags=hvg._flags(v_sum, v_min, int(bad)))


@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("n_batches", [1, 4])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_moments_csc_on_threads(built, value_type, index_type, n_batches, mode_name):
    x, codes, mode, scale, clip = _hvg_input(value_type, mode_name, n_batches)
    x = sparse.csr_matrix(x)
    x.data[::9] = 0  # explicit zeros: stored, yet not counted in n_pos
    got = _moments_csc_on_threads(built, x, codes, n_batches, mode, scale, clip, index_type)
    # the twin for host CSC: one gene per thread, in stored (original row) order
    want = hvg.gene_moments(sparse.csc_matrix(x), codes, n_batches, mode=mode, scale=scale, clip=clip,
                            check_integer=True)
    np.testing.assert_array_equal(got.n_pos, want.n_pos)
    assert got.flags == want.flags
    assert (got.flags == hvg.FLAG_NONINTEGER) == (mode == hvg.HVG_EXPM1)
    if MODES[mode_name][2] == "counts":
        # integer values (clipped at integer limits): exact in any order
        np.testing.assert_array_equal(got.sum, want.sum)
        np.testing.assert_array_equal(got.sum_sq, want.sum_sq)
    else:
        # non-integer: lane-strided partial sums and a shuffle tree vs the twin's stored order
        np.testing.assert_allclose(got.sum, want.sum, rtol=1e-12)
        np.testing.assert_allclose(got.sum_sq, want.sum_sq, rtol=1e-12)
    # the empty column, the empty batch; the empty row adds nothing anywhere
    assert not got.sum[:, EMPTY_COL].any() and not got.n_pos[:, EMPTY_COL].any()
    if n_batches == 4:
        assert not got.sum[2].any() and not got.sum_sq[2].any() and not got.n_pos[2].any()
    assert got.n_pos.sum() == np.count_nonzero(x.toarray()) < x.nnz


@pytest.mark.parametrize("mode_name", list(MODES))
@pytest.mark.parametrize("n_batches", [1, 4])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_moments_dense_on_threads(built, value_type, n_batches, mode_name):
    x, codes, mode, scale, clip = _hvg_input(value_type, mode_name, n_batches, seed=5)
    got = _moments_dense_on_threads(built, x, codes, n_batches, mode, scale, clip)
    want = _moments_dense_twin(x, codes, n_batches, mode, scale, clip)
    # same values (expm1 of the same rounded argument, libm's on both sides), same order
    np.testing.assert_array_equal(got.sum, want.sum)
    np.testing.assert_array_equal(got.sum_sq, want.sum_sq)
    np.testing.assert_array_equal(got.n_pos, want.n_pos)
    assert got.flags == want.flags
    # and the public host twin: 32 chunks (another order of additions) and, for EXPM1, numpy's
    # vectorised expm1, which in float32 may differ from libm's expm1f by an ulp (6e-8)
    public = hvg.gene_moments(x, codes, n_batches, mode=mode, scale=scale, clip=clip, check_integer=True)
    rtol = 1e-7 if mode == hvg.HVG_EXPM1 and value_type == np.float32 else 1e-12
    np.testing.assert_allclose(got.sum, public.sum, rtol=rtol)
    np.testing.assert_array_equal(got.n_pos, public.n_pos)
    assert not got.sum[:, EMPTY_COL].any()
    if n_batches == 4:
        assert not got.sum[2].any() and not got.n_pos[2].any()


FLAG_CASES = {
    # bad value at x[20, 5], mode, flags expected
    "nan": (np.nan, hvg.HVG_IDENTITY, hvg.FLAG_NONFINITE),
    "inf": (np.inf, hvg.HVG_IDENTITY, hvg.FLAG_NONFINITE),
    "inf-clipped": (np.inf, hvg.HVG_CLIP, hvg.FLAG_NONFINITE),  # min(inf, clip) is finite: raw values flag
    "negative": (-2.0, hvg.HVG_IDENTITY, hvg.FLAG_NEGATIVE),
    "fraction": (0.5, hvg.HVG_IDENTITY, hvg.FLAG_NONINTEGER),
    "none": (1.0, hvg.HVG_IDENTITY, 0),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
@pytest.mark.parametrize("layout", ["csc", "dense"])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_moments_flags_on_threads(built, value_type, layout, case):
    value, mode, flag = FLAG_CASES[case]
    x = _counts(100, 40, value_type, seed=11)
    x[20, 5] = value
    codes = _codes(100, 4, seed=12)
    clip = np.full((4, 40), 3.0) if mode == hvg.HVG_CLIP else None
    if layout == "csc":
        got = _moments_csc_on_threads(built, x, codes, 4, mode, 1.0, clip, np.int32)
    else:
        got = _moments_dense_on_threads(built, x, codes, 4, mode, 1.0, clip)
    want = hvg.gene_moments(x, codes, 4, mode=mode, clip=clip, check_integer=True)
    assert got.flags == flag == want.flags
    if case == "inf-clipped":
        assert np.isfinite(got.sum).all()


@pytest.mark.parametrize("layout", ["csc", "dense"])
def test_moments_all_flags_on_threads(built, layout):
    x = _counts(100, 40, np.float32, seed=11)
    x[1, 1], x[2, 2], x[3, 3] = np.nan, -1.0, 2.5
    if layout == "csc":
        got = _moments_csc_on_threads(built, x, np.zeros(100, np.int32), 1, hvg.HVG_IDENTITY, 1.0, None, np.int64)
    else:
        got = _moments_dense_on_threads(built, x, np.zeros(100, np.int32), 1, hvg.HVG_IDENTITY, 1.0, None)
    assert got.flags == hvg.FLAG_NONFINITE | hvg.FLAG_NEGATIVE | hvg.FLAG_NONINTEGER
    assert np.isnan(got.sum[0, 1]) and not np.isnan(got.sum[0, 2])


# ================================================================ hvg: pearson residuals

THETA = 100.0


def _gene_sums(x, codes, n_batches):
    return np.stack([np.asarray(x[codes == b].sum(axis=0, dtype=np.float64)).ravel()
                     for b in range(n_batches)])


def _pearson_reference(x, codes, n_batches, gene_sums, theta, clip):
    """The definition on the dense residual matrix (numpy)."""
    x = np.asarray(x, np.float64)
    cell_sums = x.sum(axis=1)
    out_sum, out_sum_sq = np.zeros((n_batches, x.shape[1])), np.zeros((n_batches, x.shape[1]))
    for b in range(n_batches):
        s, t = gene_sums[b], cell_sums[codes == b]
        with np.errstate(invalid="ignore", divide="ignore"):
            mu = t[:, None] * s[None, :] / s.sum()
            r = np.clip((x[codes == b] - mu) / np.sqrt(mu + mu * mu / theta), -clip, clip)
        keep = s != 0
        out_sum[b, keep] = r[:, keep].sum(axis=0)
        out_sum_sq[b, keep] = (r[:, keep] ** 2).sum(axis=0)
    return out_sum, out_sum_sq


def _pearson_on_threads(built, x, codes, n_batches, gene_sums, theta, clip, index_type=None):
    """hvg's pearson_residual_sums for a device dense (x an ndarray) or CSR matrix."""
    n_obs, n_vars = x.shape
    gene_sums, totals = hvg._pearson_setup(gene_sums, n_batches, n_vars)
    sparse_x = sparse.issparse(x)
    if sparse_x:
        x = sparse.csr_matrix(x, copy=True)
        x.sum_duplicates()  # canonical
        x = _csr(x, index_type)
    else:
        x = np.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float64))
    cell_sums = np.ascontiguousarray(np.asarray(x.sum(axis=1, dtype=np.float64)).ravel())
    theta, clip = np.float64(theta), np.float64(clip)
    rows, chunk_start, chunk_batch, batch_chunks = hvg.chunk_layout(codes, n_batches, hvg.N_CHUNKS_DEVICE)
    n_chunks = chunk_batch.size
    part_sum = np.empty((n_chunks, n_vars), np.float64)
    part_sum_sq = np.empty((n_chunks, n_vars), np.float64)
    dense = built["hvg"][cuda.template_name("pearson_dense", np.float64 if sparse_x else x.dtype)]
    _launch(dense, n_chunks * -(-n_vars // hvg.BLOCK), hvg.BLOCK, (
        np.uintp(0) if sparse_x else x, np.int64(n_vars),
        rows if n_batches > 1 else np.uintp(0), chunk_start,
        chunk_batch, np.int64(n_chunks), cell_sums, gene_sums, totals,
        theta, clip, part_sum, part_sum_sq,
    ))
    extra = (np.uintp(0), np.uintp(0))
    if sparse_x:
        csc_rows, batch_start = hvg._device_codes(codes, n_batches)
        if n_batches > 1:
            csc = x[csc_rows].tocsc()
            csc.sort_indices()
            csc_cell_sums = np.ascontiguousarray(cell_sums[csc_rows])
        else:
            csc = x.tocsc()
            csc_cell_sums = cell_sums
        csc = _csc(csc, index_type)
        extra = (np.empty((n_batches, n_vars), np.float64), np.empty((n_batches, n_vars), np.float64))
        kernel = built["hvg"][cuda.template_name("pearson_csc", csc.dtype, csc.indices.dtype)]
        _launch(kernel, -(-n_vars * n_batches * 32 // hvg.BLOCK), hvg.BLOCK, (
            csc.data, csc.indices, csc.indptr, np.int64(n_vars), np.int32(n_batches),
            batch_start, csc_cell_sums, gene_sums, totals, theta, clip, *extra,
        ))
    out_sum = np.empty((n_batches, n_vars), np.float64)
    out_sum_sq = np.empty((n_batches, n_vars), np.float64)
    _launch(built["hvg"]["pearson_sum_chunks"], -(-n_batches * n_vars // hvg.BLOCK), hvg.BLOCK, (
        part_sum, part_sum_sq, batch_chunks, np.int32(n_batches), np.int64(n_vars),
        *extra, out_sum, out_sum_sq,
    ))
    return out_sum, out_sum_sq


def _pearson_input(value_type, n_batches, empty_row, seed):
    x = _counts(150, 40, value_type, seed, density=0.3, lam=1.5)
    if not empty_row:
        x[EMPTY_ROW, 10] = 1
    codes = _codes(150, n_batches, seed + 1)
    return x, codes, _gene_sums(x, codes, n_batches), float(np.sqrt(150))


def _check_pearson_shape(got_sum, codes, gene_sums, empty_row):
    # genes without counts in a batch (the empty column, the empty batch) stay 0; a cell
    # without counts makes its batch's sums NaN (mu = 0/0), as scanpy's residuals
    assert not got_sum[gene_sums == 0].any()
    nan_batch = codes[EMPTY_ROW] if empty_row else -1
    for b in range(gene_sums.shape[0]):
        nz = gene_sums[b] != 0
        assert np.isnan(got_sum[b, nz]).all() if b == nan_batch else np.isfinite(got_sum[b]).all()


@pytest.mark.parametrize(("n_batches", "empty_row"), [(1, False), (4, True)])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_pearson_dense_on_threads(built, value_type, n_batches, empty_row):
    x, codes, gene_sums, clip = _pearson_input(value_type, n_batches, empty_row, seed=21)
    got_sum, got_sum_sq = _pearson_on_threads(built, x, codes, n_batches, gene_sums, THETA, clip)
    # the numba twin over the device's chunk layout: the same residuals added in the same
    # order (rows of a chunk, then chunks by sum_chunks' order), so equal bit for bit
    gs, totals = hvg._pearson_setup(gene_sums, n_batches, x.shape[1])
    rows, chunk_start, chunk_batch, batch_chunks = hvg.chunk_layout(codes, n_batches, hvg.N_CHUNKS_DEVICE)
    part_sum, part_sum_sq = hvg._pearson_rows_host(
        x.reshape(-1), np.empty(0, np.int32), np.empty(0, np.int32), x.shape[1], rows, chunk_start,
        chunk_batch, x.sum(axis=1, dtype=np.float64), gs, totals, THETA, clip)
    np.testing.assert_array_equal(got_sum, hvg._sum_chunks_host(part_sum, batch_chunks))
    np.testing.assert_array_equal(got_sum_sq, hvg._sum_chunks_host(part_sum_sq, batch_chunks))
    # the public host twin (32 chunks) and the definition: other orders of the additions
    for want_sum, want_sum_sq in (hvg.pearson_residual_sums(x, codes, n_batches, gene_sums, theta=THETA, clip=clip),
                                  _pearson_reference(x, codes, n_batches, gene_sums, THETA, clip)):
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(got_sum_sq, want_sum_sq, rtol=1e-10, atol=1e-9)
    _check_pearson_shape(got_sum, codes, gene_sums, empty_row)


@pytest.mark.parametrize(("n_batches", "empty_row"), [(1, False), (4, True)])
@pytest.mark.parametrize("index_type", [np.int32, np.int64])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_pearson_csr_on_threads(built, value_type, index_type, n_batches, empty_row):
    x, codes, gene_sums, clip = _pearson_input(value_type, n_batches, empty_row, seed=31)
    got_sum, got_sum_sq = _pearson_on_threads(built, sparse.csr_matrix(x), codes, n_batches, gene_sums,
                                              THETA, clip, index_type)
    # Not the twin's order: the device adds the residuals of zeros over all cells per chunk,
    # then the stored values' corrections r(v) - r(0) (lane-strided, shuffle tree) last; the
    # twin adds each row's corrections right after its zeros. The sums cancel to a few units
    # (residuals of zeros are negative, of counts positive), hence an absolute tolerance.
    for want_sum, want_sum_sq in (
            hvg.pearson_residual_sums(_csr(x, index_type), codes, n_batches, gene_sums, theta=THETA, clip=clip),
            _pearson_reference(x, codes, n_batches, gene_sums, THETA, clip)):
        np.testing.assert_allclose(got_sum, want_sum, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(got_sum_sq, want_sum_sq, rtol=1e-10, atol=1e-9)
    _check_pearson_shape(got_sum, codes, gene_sums, empty_row)


# ================================================================ hvg: poisson_gene_selection


def test_poisson_expected_zeros_on_threads(built):
    rng = np.random.default_rng(41)
    n_batches, n_vars = 3, 300  # 900 (batch, gene) threads: four blocks, the last one partial
    scaled_means = rng.gamma(0.5, 1e-4, (n_batches, n_vars))
    scaled_means[:, EMPTY_COL] = 0.0  # a gene without counts: every cell a zero
    per_batch = [40, 1, 25]  # distinct totals per batch; one batch with a single total
    totals = np.concatenate([np.sort(rng.choice(np.arange(100, 20000), k, replace=False)) for k in per_batch])
    totals = totals.astype(np.float64)
    weights = rng.integers(1, 30, totals.size).astype(np.float64)
    batch_start = np.concatenate([[0], np.cumsum(per_batch)]).astype(np.int64)
    expected = np.empty((n_batches, n_vars), np.float64)
    _launch(built["hvg"]["poisson_expected_zeros"], -(-n_batches * n_vars // hvg.BLOCK), hvg.BLOCK, (
        np.ascontiguousarray(scaled_means, dtype=np.float64), totals, weights, batch_start,
        np.int32(n_batches), np.int64(n_vars), expected,
    ))
    want = hvg.poisson_expected_zeros(scaled_means, totals, weights, batch_start)
    # the same terms (libm's exp on both sides) added in the same order
    np.testing.assert_array_equal(expected, want)
    np.testing.assert_array_equal(expected[:, EMPTY_COL], 1.0)
    reference = np.stack([(weights[lo:hi, None] * np.exp(-scaled_means[b][None, :] * totals[lo:hi, None])).sum(0)
                          / weights[lo:hi].sum() for b, (lo, hi) in enumerate(zip(batch_start[:-1], batch_start[1:]))])
    np.testing.assert_allclose(expected, reference, rtol=1e-13)  # numpy's pairwise sum


# ================================================================ normalize


def _normalize_input(kind, value_type, values, seed):
    """(device-like x, host twin x): kind is csr32, csr64 or dense."""
    x = _counts(120, 100, value_type, seed, density=0.5)
    if values == "real":
        x = (x * np.random.default_rng(seed + 1).uniform(0.1, 3.0, x.shape)).astype(value_type)
    if kind == "dense":
        return x, x.copy()
    return _csr(x, np.int32 if kind == "csr32" else np.int64), _csr(x, np.int32 if kind == "csr32" else np.int64)


def _leading(x):
    """normalize._csr_or_dense_args with numpy/scipy arrays."""
    if sparse.issparse(x):
        return "csr", (x.dtype, x.indices.dtype), (x.data, x.indices, x.indptr, np.int64(x.shape[0]))
    return "dense", (x.dtype,), (x, np.int64(x.shape[0]), np.int64(x.shape[1]))


def _launch_rows(built, kernel, x, *args):
    """normalize._launch_rows: one warp per row, WARPS_PER_BLOCK rows per block."""
    kind, dtypes, leading = _leading(x)
    k = built["normalize"][cuda.template_name(f"{kernel}_{kind}", *dtypes)]
    _launch(k, -(-x.shape[0] // normalize.WARPS_PER_BLOCK), 32 * normalize.WARPS_PER_BLOCK, (*leading, *args))


def _row_sums_on_threads(built, x, excluded=None):
    sums = np.empty(x.shape[0], np.float64)
    flags = np.zeros(1, np.int32)
    mask = np.uintp(0) if excluded is None else np.asarray(excluded, dtype=np.uint8)
    _launch_rows(built, "row_sums", x, mask, sums, flags)
    return sums, bool(flags[0])


KINDS = ["csr32", "csr64", "dense"]


@pytest.mark.parametrize("values", ["counts", "real"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_row_sums_on_threads(built, value_type, kind, masked, values):
    x, host = _normalize_input(kind, value_type, values, seed=51)
    excluded = None
    if masked:
        excluded = np.zeros(100, np.uint8)
        excluded[[0, 2, 50, 99]] = 1
    got, bad = _row_sums_on_threads(built, x, excluded)
    want, want_bad = normalize.row_sums(host, excluded)
    assert bad is want_bad is False
    assert got[EMPTY_ROW] == 0.0
    if values == "counts":
        np.testing.assert_array_equal(got, want)  # integers: exact in any order
    else:
        # lane-strided partial sums and a shuffle tree vs the twin's row order
        np.testing.assert_allclose(got, want, rtol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_row_sums_nonfinite_on_threads(built, value_type, kind):
    for value in (np.nan, np.inf, -np.inf):
        dense = _counts(120, 100, value_type, seed=52, density=0.5)
        dense[30, 40] = value
        x = dense if kind == "dense" else _csr(dense, np.int32 if kind == "csr32" else np.int64)
        got, bad = _row_sums_on_threads(built, x)
        want, want_bad = normalize.row_sums(x)
        assert bad and want_bad
        np.testing.assert_array_equal(got, want)  # counts elsewhere; NaN/inf in row 30
        # a non-finite value in an excluded gene is still reported
        excluded = np.zeros(100, np.uint8)
        excluded[40] = 1
        got, bad = _row_sums_on_threads(built, x, excluded)
        assert bad and np.isfinite(got).all()
        np.testing.assert_array_equal(got, normalize.row_sums(x, excluded)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_high_genes_on_threads(built, value_type, kind):
    dense = _counts(120, 100, value_type, seed=61, density=0.5)
    dense[[5, 60, 119], [11, 42, 97]] = 500  # a few genes far above 20 % of their cell's total
    max_fraction = 0.2
    # gene 12: in row 9 the largest count v with v <= 20 % of the row's total (v included),
    # v <= rest / 4; not flagged (the test is strictly above)
    dense[:, 12] = 0
    dense[9, 12] = np.floor(dense[9].sum(dtype=np.float64) / 4)
    x = dense if kind == "dense" else _csr(dense, np.int32 if kind == "csr32" else np.int64)
    sums, _ = normalize.row_sums(x)
    excluded = np.zeros(x.shape[1], np.uint8)
    _launch_rows(built, "flag_high_genes", x, np.asarray(sums, np.float64), np.float64(max_fraction), excluded)
    want = normalize.high_genes(x, sums, max_fraction)
    np.testing.assert_array_equal(excluded, want)  # the same comparisons, value by value
    assert excluded[[11, 42, 97]].all() and not excluded[12] and not excluded[EMPTY_COL]
    assert excluded.sum() < 10
    # normalize_total's second pass: the sums without the flagged genes
    got, _ = _row_sums_on_threads(built, x, excluded)
    np.testing.assert_array_equal(got, normalize.row_sums(x, excluded)[0])  # counts: exact


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_scale_rows_on_threads(built, value_type, kind):
    x, host = _normalize_input(kind, value_type, "real", seed=71)
    sums, _ = normalize.row_sums(host)
    norm_factor = sums / 1e4
    divisor = norm_factor + (norm_factor == 0)  # as pp.normalize_total: empty cells stay zero
    kind_, dtypes, leading = _leading(x)
    if kind_ == "csr":  # the scaling kernel needs no column indices
        leading = (x.data, x.indptr, leading[-1])
    k = built["normalize"][cuda.template_name(f"scale_rows_{kind_}", *dtypes)]
    _launch(k, -(-x.shape[0] // normalize.WARPS_PER_BLOCK), 32 * normalize.WARPS_PER_BLOCK,
            (*leading, np.asarray(divisor, np.float64)))
    normalize.scale_rows_inplace(host, divisor)
    # value * (1 / divisor) in double, rounded to the value type, on both sides
    got = x.toarray() if sparse.issparse(x) else x
    want = host.toarray() if sparse.issparse(host) else host
    np.testing.assert_array_equal(got, want)
    assert not got[EMPTY_ROW].any()
    np.testing.assert_allclose(got.sum(axis=1, dtype=np.float64)[sums > 0], 1e4, rtol=1e-5)


@pytest.mark.parametrize("base", [None, 2.0])
@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("value_type", [np.float32, np.float64])
def test_log1p_on_threads(built, value_type, kind, base):
    dense = _counts(120, 100, value_type, seed=81, density=0.5)
    dense = (dense * np.random.default_rng(82).uniform(0.1, 3.0, dense.shape)).astype(value_type)
    values = dense.copy() if kind == "dense" else sparse.csr_matrix(dense).data  # pp.log1p: x or x.data
    host = values.copy()
    k = built["normalize"][cuda.template_name("log1p_values", values.dtype)]

    def launch(v, grid):
        n = v.size
        _launch(k, grid, 256, (v.reshape(-1), np.int64(n), np.float64(1.0 if base is None else 1.0 / np.log(base))))

    n = values.size
    launch(values, min(-(-n // 256), 65536))  # normalize.log1p_inplace's grid
    normalize.log1p_inplace(host, base)
    # The kernel takes log1p in double and multiplies by 1 / ln(base); the twin (numpy) takes
    # log1p in the value type and divides by ln(base) in it: up to 2 ulp apart in float32 and,
    # with a base, in float64 (the reciprocal's rounding and the product's).
    eps = np.finfo(value_type).eps
    np.testing.assert_allclose(values, host, rtol=2 * eps, atol=0)
    reference = np.log1p(dense.astype(np.float64)) / (1.0 if base is None else np.log(base))
    if kind == "dense":
        # float32: one rounding of a double result; float64 with a base: the reciprocal's and
        # the product's roundings vs the reference's division
        np.testing.assert_allclose(values, reference, rtol=2 * eps)
        assert not values[EMPTY_ROW].any()
    # the grid-stride loop (the launcher's grid reaches it past 2^24 values): 3 blocks
    strided = (dense if kind == "dense" else sparse.csr_matrix(dense).data).copy()
    launch(strided, 3)
    np.testing.assert_array_equal(strided, values)
