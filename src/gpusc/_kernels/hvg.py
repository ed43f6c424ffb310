"""``kernels/hvg.cu`` and its numba twins: per-gene, per-batch moments for highly_variable_genes.

One pass over the matrix gives, for every batch ``b`` and gene ``g``, the sum and the sum of
squares of the (transformed) values and the number of cells with a positive value, all
accumulated in double. The transform is one of:

``HVG_IDENTITY``  the value;
``HVG_EXPM1``     ``expm1(value * scale)`` computed in the value's own dtype, as scanpy's seurat
                  flavor does on a copy of the matrix (here nothing is copied);
``HVG_CLIP``      ``min(value, clip[b, g])`` in double (seurat_v3's clipped second moment).

Implicit zeros of sparse matrices add nothing to any of the three (every transform maps 0 to 0
and clip values are non-negative), so only stored values are read.

The pearson_residuals and poisson_gene_selection flavors' own loops follow in their sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical

HVG_IDENTITY, HVG_EXPM1, HVG_CLIP = 0, 1, 2  # kernels/hvg.cu's HVG_* modes
FLAG_NONFINITE, FLAG_NEGATIVE, FLAG_NONINTEGER = 1, 2, 4
BLOCK = 256
NAME_EXPRESSIONS = (
    *(cuda.template_name("moments_csc", v, i) for v in (np.float32, np.float64) for i in (np.int32, np.int64)),
    *(cuda.template_name("moments_dense", v) for v in (np.float32, np.float64)),
    "sum_chunks",
    *(cuda.template_name("pearson_dense", v) for v in (np.float32, np.float64)),
    *(cuda.template_name("pearson_csc", v, i) for v in (np.float32, np.float64) for i in (np.int32, np.int64)),
    "pearson_sum_chunks",
    "poisson_expected_zeros",
)
# Row chunks of the host kernels: a fixed count (not the thread count) so that the order of
# additions, and so the result, is the same on every machine.
N_CHUNKS = 32
# Row chunks of the device kernel for dense matrices (more, to fill the device).
N_CHUNKS_DEVICE = 128


@dataclass
class Moments:
    """Per-batch sums over cells; every array is (n_batches, n_vars), on the host."""

    sum: np.ndarray  # float64
    sum_sq: np.ndarray  # float64
    n_pos: np.ndarray  # int64, cells with a value > 0
    flags: int  # FLAG_* bits seen in the stored values

    @property
    def nonfinite(self) -> bool:
        return bool(self.flags & FLAG_NONFINITE)

    @property
    def negative(self) -> bool:
        return bool(self.flags & FLAG_NEGATIVE)

    @property
    def noninteger(self) -> bool:
        return bool(self.flags & FLAG_NONINTEGER)


@singledispatch
def gene_moments(x, batch_codes: np.ndarray | None = None, n_batches: int = 1, *,
                 mode: int = HVG_IDENTITY, scale: float = 1.0,
                 clip: np.ndarray | None = None, check_integer: bool = False,
                 count_positive: bool = True) -> Moments:
    """Per-batch, per-gene sums of a cells × genes matrix in one pass.

    ``batch_codes`` gives each cell's batch in ``0..n_batches-1`` (None: one batch).
    ``clip`` is a (n_batches, n_vars) float64 array, used with ``mode=HVG_CLIP``.
    NaN/inf and negative values are reported in ``flags``, not raised; non-integer values
    too when ``check_integer`` (the device kernels always report them). ``n_pos`` is all
    zeros when not ``count_positive`` on the host (it costs a third of a memory-bound pass).
    """
    raise TypeError(f"gene_moments: unsupported array type {type(x)}")


def _codes(batch_codes, n_obs: int) -> np.ndarray:
    if batch_codes is None:
        return np.zeros(n_obs, np.int32)
    return np.ascontiguousarray(batch_codes, dtype=np.int32)


def _clip(clip, n_batches: int, n_vars: int) -> np.ndarray:
    if clip is None:
        return np.zeros((n_batches, n_vars))
    return np.ascontiguousarray(clip, dtype=np.float64).reshape(n_batches, n_vars)


def chunk_layout(codes: np.ndarray, n_batches: int, n_chunks: int):
    """Rows grouped by batch (stable) and cut into chunks that each lie in one batch.

    Returns ``rows`` (int64 row order), ``chunk_start`` (n_chunks'+1 offsets into rows),
    ``chunk_batch`` (int32 batch of each chunk) and ``batch_chunks`` (n_batches+1 offsets
    into the chunks). The layout depends only on the batch sizes and ``n_chunks``.
    """
    n_obs = codes.size
    rows = np.argsort(codes, kind="stable").astype(np.int64)
    sizes = np.bincount(codes, minlength=n_batches).astype(np.int64)
    per_batch = np.where(sizes > 0, np.clip((n_chunks * sizes) // max(n_obs, 1), 1, sizes), 0)
    batch_chunks = np.concatenate([[0], np.cumsum(per_batch)]).astype(np.int64)
    batch_rows = np.concatenate([[0], np.cumsum(sizes)])
    chunk_start = [0]
    chunk_batch = []
    for b in range(n_batches):
        k = int(per_batch[b])
        if k:
            edges = batch_rows[b] + (np.arange(1, k + 1) * sizes[b]) // k
            chunk_start.extend(edges.tolist())
            chunk_batch.extend([b] * k)
    return (rows, np.asarray(chunk_start, np.int64), np.asarray(chunk_batch, np.int32),
            batch_chunks)


def _sum_chunks_host(part, batch_chunks) -> np.ndarray:
    """(n_chunks, ...) partial sums → (n_batches, ...): each batch's chunks, in chunk order."""
    return np.stack([part[lo:hi].sum(axis=0) for lo, hi in zip(batch_chunks[:-1], batch_chunks[1:])])


@gene_moments.register(types.csr_matrix | types.csr_array | np.ndarray)
def _(x, batch_codes=None, n_batches=1, *, mode=HVG_IDENTITY, scale=1.0, clip=None,
      check_integer=False, count_positive=True):
    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    rows, chunk_start, chunk_batch, batch_chunks = chunk_layout(codes, n_batches, N_CHUNKS)
    if isinstance(x, np.ndarray):
        data = np.ascontiguousarray(x).reshape(-1)
        indices, indptr = np.arange(n_vars, dtype=np.int64), np.empty(0, np.int64)
    else:
        data, indices, indptr = x.data, x.indices, x.indptr
    if mode == HVG_EXPM1:
        # numpy's vectorised expm1 into a new value array (as scanpy does), then plain sums:
        # 4x faster than expm1 inside the numba loop. Same rounding as _transform.
        data = np.expm1(data if scale == 1.0 else (data.astype(np.float64) * scale).astype(data.dtype))
        mode = HVG_IDENTITY
    part, v_sum, v_min, bad = _moments_rows_host(
        data, indices, indptr, n_vars, rows, chunk_start, chunk_batch, mode, float(scale),
        _clip(clip, n_batches, n_vars), data.dtype == np.float32, check_integer, count_positive)
    sums = _sum_chunks_host(part, batch_chunks)
    return Moments(sums[..., 0], sums[..., 1], sums[..., 2].astype(np.int64),
                   flags=_flags(v_sum, v_min, int(bad)))


@gene_moments.register(types.csc_matrix | types.csc_array)
def _(x, batch_codes=None, n_batches=1, *, mode=HVG_IDENTITY, scale=1.0, clip=None,
      check_integer=False, count_positive=True):
    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    s, s2, pos, v_sum, v_min, bad = _moments_csc_host(x.data, x.indices, x.indptr, n_vars, codes,
                                               n_batches, mode, float(scale),
                                               _clip(clip, n_batches, n_vars),
                                               x.data.dtype == np.float32, check_integer)
    return Moments(s, s2, pos, flags=_flags(v_sum, v_min, int(bad)))


@numba.njit(inline="always")
def _transform(v, mode, scale, clip, single):
    if mode == HVG_EXPM1:
        if single:  # scanpy: x *= log(base) and expm1 in float32
            return np.float64(np.expm1(np.float32(v * scale)))
        return np.expm1(np.float64(v) * scale)
    d = np.float64(v)
    if mode == HVG_CLIP:
        return min(d, clip)
    return d


@numba.njit(inline="always")
def _integer_flag(v, check_integer):
    # Only asked for where scanpy checks for counts: a per-value floor() halves the pass's speed.
    if check_integer and np.isfinite(v) and v != np.floor(v):
        return FLAG_NONINTEGER
    return 0


def _flags(v_sum: float, v_min: float, bad: int) -> int:
    """FLAG_* bits from the sum and the smallest of the raw values: NaN and inf reach the sum,
    so one isfinite replaces a per-value test (the clipped sums may hide them)."""
    flags = bad
    if not np.isfinite(v_sum):
        flags |= FLAG_NONFINITE
    if v_min < 0:
        flags |= FLAG_NEGATIVE
    return flags


@numba.njit(parallel=True, cache=True)
def _moments_rows_host(data, indices, indptr, n_cols, rows, chunk_start, chunk_batch, mode,
                       scale, clip, single, check_integer, count_positive):
    # CSR when indptr is given; C-ordered dense (data = x.ravel(), indices = all columns)
    # when indptr is empty. Chunks run in parallel, each with its own partial sums; a gene's
    # three sums sit side by side ([chunk, gene, 0:3]) so one cache line serves one value.
    dense = indptr.size == 0
    n_chunks = chunk_batch.size
    part = np.empty((n_chunks, n_cols, 3))  # zeroed by the chunk's own thread (first touch)
    v_min = np.full(max(n_chunks, 1), np.inf)
    v_sum = np.zeros(max(n_chunks, 1))
    flags = np.zeros(max(n_chunks, 1), np.int64)
    for k in numba.prange(n_chunks):
        part[k] = 0.0
        b = chunk_batch[k]
        bad = 0
        lowest = np.inf
        total = 0.0
        for t in range(chunk_start[k], chunk_start[k + 1]):
            r = rows[t]
            if dense:
                lo, hi = r * n_cols, (r + 1) * n_cols
            else:
                lo, hi = indptr[r], indptr[r + 1]
            for j in range(lo, hi):
                v = data[j]
                col = indices[j - lo] if dense else indices[j]
                bad |= _integer_flag(v, check_integer)
                lowest = min(lowest, np.float64(v))
                total += v
                f = _transform(v, mode, scale, clip[b, col], single)
                part[k, col, 0] += f
                part[k, col, 1] += f * f
                if count_positive:
                    part[k, col, 2] += v > 0  # a count, exact in double below 2^53
        v_min[k] = lowest
        v_sum[k] = total
        flags[k] = bad
    flag = 0
    for f in flags:
        flag |= f
    return part, v_sum.sum(), v_min.min(), flag


@numba.njit(parallel=True, cache=True)
def _moments_csc_host(data, indices, indptr, n_cols, codes, n_batches, mode, scale, clip,
                      single, check_integer):
    # Genes run in parallel; each gene's column is read by one thread, in stored order.
    s = np.zeros((n_batches, n_cols))
    s2 = np.zeros((n_batches, n_cols))
    pos = np.zeros((n_batches, n_cols), np.int64)
    v_min = np.full(max(n_cols, 1), np.inf)
    v_sum = np.zeros(max(n_cols, 1))
    flags = np.zeros(max(n_cols, 1), np.int64)
    for g in numba.prange(n_cols):
        bad = 0
        lowest = np.inf
        total = 0.0
        for j in range(indptr[g], indptr[g + 1]):
            v = data[j]
            b = codes[indices[j]]
            bad |= _integer_flag(v, check_integer)
            lowest = min(lowest, np.float64(v))
            total += v
            f = _transform(v, mode, scale, clip[b, g], single)
            s[b, g] += f
            s2[b, g] += f * f
            if v > 0:
                pos[b, g] += 1
        v_min[g] = lowest
        v_sum[g] = total
        flags[g] = bad
    flag = 0
    for f in flags:
        flag |= f
    return s, s2, pos, v_sum.sum(), v_min.min(), flag


# ---------------------------------------------------------------- device

def _device_codes(codes, n_batches):
    """Row order grouping batches and each batch's first row in that order (host arrays)."""
    rows = np.argsort(codes, kind="stable").astype(np.int64)
    sizes = np.bincount(codes, minlength=n_batches)
    return rows, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


@gene_moments.register(types.CupyCSMatrix)
def _(x, batch_codes=None, n_batches=1, *, mode=HVG_IDENTITY, scale=1.0, clip=None,
      check_integer=False, count_positive=True):
    import cupy as cp

    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    rows, batch_start = _device_codes(codes, n_batches)
    if n_batches > 1:
        # Batches become contiguous row ranges: one row gather (a CSR copy), then a CSC copy
        # whose row indices are sorted within each column. Peak: about 3x the matrix.
        csr = x if isinstance(x, types.CupyCSRMatrix) else x.tocsr()
        x = csr[cp.asarray(rows)].tocsc()
        if not x.has_sorted_indices:
            x.sort_indices()
    elif not isinstance(x, types.CupyCSCMatrix):
        x = x.tocsc()  # one CSC copy (cuSPARSE, deterministic); peak 2x the matrix
    kernel = cuda.get_kernel("hvg", NAME_EXPRESSIONS,
                             cuda.template_name("moments_csc", x.dtype, x.indices.dtype))
    out_sum = cp.empty((n_batches, n_vars), np.float64)
    out_sum_sq = cp.empty((n_batches, n_vars), np.float64)
    out_pos = cp.empty((n_batches, n_vars), np.int64)
    flags = cp.zeros(1, np.int32)
    clip_dev = cp.asarray(_clip(clip, n_batches, n_vars)) if mode == HVG_CLIP else None
    n_warps = n_vars * n_batches
    cuda.launch(kernel, -(-n_warps * 32 // BLOCK), BLOCK, (
        x.data, x.indices, x.indptr, np.int64(n_vars), np.int32(n_batches),
        cp.asarray(batch_start), np.int32(mode), np.float64(scale),
        clip_dev if clip_dev is not None else np.uintp(0),
        out_sum, out_sum_sq, out_pos, flags,
    ))
    flag = int(flags.get()[0])  # synchronize!
    return Moments(out_sum.get(), out_sum_sq.get(), out_pos.get(), flags=flag)


@gene_moments.register(types.CupyArray)
def _(x, batch_codes=None, n_batches=1, *, mode=HVG_IDENTITY, scale=1.0, clip=None,
      check_integer=False, count_positive=True):
    import cupy as cp

    n_obs, n_vars = x.shape
    x = cp.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
    codes = _codes(batch_codes, n_obs)
    rows, chunk_start, chunk_batch, batch_chunks = chunk_layout(codes, n_batches, N_CHUNKS_DEVICE)
    n_chunks = chunk_batch.size
    part = [cp.empty((n_chunks, n_vars), np.float64), cp.empty((n_chunks, n_vars), np.float64),
            cp.empty((n_chunks, n_vars), np.int64)]
    flags = cp.zeros(1, np.int32)
    clip_dev = cp.asarray(_clip(clip, n_batches, n_vars)) if mode == HVG_CLIP else None
    dense = cuda.get_kernel("hvg", NAME_EXPRESSIONS, cuda.template_name("moments_dense", x.dtype))
    n_col_tiles = -(-n_vars // BLOCK)
    cuda.launch(dense, n_chunks * n_col_tiles, BLOCK, (
        x, np.int64(n_vars), cp.asarray(rows) if n_batches > 1 else np.uintp(0),
        cp.asarray(chunk_start), cp.asarray(chunk_batch), np.int64(n_chunks), np.int32(mode),
        np.float64(scale), clip_dev if clip_dev is not None else np.uintp(0), *part, flags,
    ))
    out = [cp.empty((n_batches, n_vars), np.float64), cp.empty((n_batches, n_vars), np.float64),
           cp.empty((n_batches, n_vars), np.int64)]
    reduce = cuda.get_kernel("hvg", NAME_EXPRESSIONS, "sum_chunks")
    cuda.launch(reduce, -(-n_batches * n_vars // BLOCK), BLOCK, (
        *part, cp.asarray(batch_chunks), np.int32(n_batches), np.int64(n_vars), *out,
    ))
    flag = int(flags.get()[0])  # synchronize!
    return Moments(*(o.get() for o in out), flags=flag)


# ---------------------------------------------------------------- flavor="pearson_residuals"
#
# Per (batch, gene) sums of the clipped analytic Pearson residuals r and of r², over the
# batch's cells, without the dense residual matrix: mu = gene_sum[b, g] * cell_sum[c] /
# total[b], r = clip((x - mu) / sqrt(mu + mu² / theta), ±clip). A sparse matrix's implicit
# zeros are summed as "the residual of a zero for every cell" (dense work over cells × genes,
# compute-bound, no matrix read) plus, per stored value, f(v) - f(0). Genes without counts in
# a batch stay 0 there (scanpy leaves them out of that batch).


@singledispatch
def pearson_residual_sums(x, batch_codes: np.ndarray | None, n_batches: int,
                          gene_sums: np.ndarray, *, theta: float,
                          clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Sums of clipped Pearson residuals and of their squares per batch and gene.

    ``gene_sums`` is the (n_batches, n_vars) float64 per-batch gene totals on the host
    (``gene_moments(...).sum``). Returns two (n_batches, n_vars) float64 host arrays. A cell
    without counts makes its batch's sums NaN, as scanpy's residuals are NaN there.
    """
    raise TypeError(f"pearson_residual_sums: unsupported array type {type(x)}")


def _pearson_setup(gene_sums, n_batches, n_vars):
    gene_sums = np.ascontiguousarray(gene_sums, dtype=np.float64).reshape(n_batches, n_vars)
    return gene_sums, gene_sums.sum(axis=1)


@pearson_residual_sums.register(types.csr_matrix | types.csr_array | np.ndarray)
def _(x, batch_codes, n_batches, gene_sums, *, theta, clip):
    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    gene_sums, totals = _pearson_setup(gene_sums, n_batches, n_vars)
    rows, chunk_start, chunk_batch, batch_chunks = chunk_layout(codes, n_batches, N_CHUNKS)
    if isinstance(x, np.ndarray):
        cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        data = np.ascontiguousarray(x).reshape(-1)
        # int32 placeholders: dense shares the numba specialisation of int32-indexed CSR
        indices, indptr = np.empty(0, np.int32), np.empty(0, np.int32)
    else:
        x = canonical(x)
        cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        data, indices, indptr = x.data, x.indices, x.indptr
    part_sum, part_sum_sq = _pearson_rows_host(data, indices, indptr, n_vars, rows, chunk_start,
                                               chunk_batch, cell_sums, gene_sums, totals,
                                               float(theta), float(clip))
    return _sum_chunks_host(part_sum, batch_chunks), _sum_chunks_host(part_sum_sq, batch_chunks)


@pearson_residual_sums.register(types.csc_matrix | types.csc_array)
def _(x, batch_codes, n_batches, gene_sums, *, theta, clip):
    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    gene_sums, totals = _pearson_setup(gene_sums, n_batches, n_vars)
    x = canonical(x)
    cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    rows = np.argsort(codes, kind="stable")
    batch_start = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_batches))])
    return _pearson_csc_host(x.data, x.indices, x.indptr, n_vars, codes, n_batches,
                             cell_sums[rows], batch_start.astype(np.int64), cell_sums, gene_sums,
                             totals, float(theta), float(clip))


@numba.njit(inline="always")
def _residual(v, t, s, total, theta, clip):
    # kernels/hvg.cu's pearson_residual: NaN (a cell without counts) passes the clip
    mu = s * t / total
    r = (v - mu) / np.sqrt(mu + mu * mu / theta)
    if r < -clip:
        return -clip
    if r > clip:
        return clip
    return r


@numba.njit(parallel=True, cache=True)
def _pearson_rows_host(data, indices, indptr, n_cols, rows, chunk_start, chunk_batch, cell_sums,
                       gene_sums, totals, theta, clip):
    # Chunks of rows (each in one batch) run in parallel with their own partial sums. Dense
    # (C-ordered, indptr empty): every value's residual. CSR (canonical): the residual of a
    # zero for every gene, then f(v) - f(0) for the row's stored values.
    dense = indptr.size == 0
    n_chunks = chunk_batch.size
    part_sum = np.zeros((n_chunks, n_cols))
    part_sum_sq = np.zeros((n_chunks, n_cols))
    for k in numba.prange(n_chunks):
        b = chunk_batch[k]
        total = totals[b]
        for i in range(chunk_start[k], chunk_start[k + 1]):
            r = rows[i]
            t = cell_sums[r]
            base = r * n_cols
            for g in range(n_cols):
                s = gene_sums[b, g]
                if s != 0.0:
                    v = np.float64(data[base + g]) if dense else 0.0
                    f = _residual(v, t, s, total, theta, clip)
                    part_sum[k, g] += f
                    part_sum_sq[k, g] += f * f
            if not dense:
                for j in range(indptr[r], indptr[r + 1]):
                    g = indices[j]
                    s = gene_sums[b, g]
                    if s != 0.0:
                        f = _residual(np.float64(data[j]), t, s, total, theta, clip)
                        f0 = _residual(0.0, t, s, total, theta, clip)
                        part_sum[k, g] += f - f0
                        part_sum_sq[k, g] += f * f - f0 * f0
    return part_sum, part_sum_sq


@numba.njit(parallel=True, cache=True)
def _pearson_csc_host(data, indices, indptr, n_cols, codes, n_batches, batch_cell_sums,
                      batch_start, cell_sums, gene_sums, totals, theta, clip):
    # Genes run in parallel: per batch the residual of a zero over the batch's cells (cell
    # totals grouped by batch in batch_cell_sums), then f(v) - f(0) for the stored values.
    out_sum = np.zeros((n_batches, n_cols))
    out_sum_sq = np.zeros((n_batches, n_cols))
    for g in numba.prange(n_cols):
        for b in range(n_batches):
            s = gene_sums[b, g]
            if s != 0.0:
                acc = 0.0
                acc2 = 0.0
                for i in range(batch_start[b], batch_start[b + 1]):
                    f0 = _residual(0.0, batch_cell_sums[i], s, totals[b], theta, clip)
                    acc += f0
                    acc2 += f0 * f0
                out_sum[b, g] = acc
                out_sum_sq[b, g] = acc2
        for j in range(indptr[g], indptr[g + 1]):
            row = indices[j]
            b = codes[row]
            s = gene_sums[b, g]
            if s != 0.0:
                t = cell_sums[row]
                f = _residual(np.float64(data[j]), t, s, totals[b], theta, clip)
                f0 = _residual(0.0, t, s, totals[b], theta, clip)
                out_sum[b, g] += f - f0
                out_sum_sq[b, g] += f * f - f0 * f0
    return out_sum, out_sum_sq


@pearson_residual_sums.register(types.CupyArray | types.CupyCSMatrix)
def _(x, batch_codes, n_batches, gene_sums, *, theta, clip):
    import cupy as cp

    n_obs, n_vars = x.shape
    codes = _codes(batch_codes, n_obs)
    gene_sums, totals = _pearson_setup(gene_sums, n_batches, n_vars)
    gene_sums_dev, totals_dev = cp.asarray(gene_sums), cp.asarray(totals)
    sparse = not isinstance(x, types.CupyArray)
    if sparse:
        x = canonical(x)
    else:
        x = cp.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float64))
    cell_sums = cp.ascontiguousarray(x.sum(axis=1, dtype=np.float64).ravel())
    theta, clip = np.float64(theta), np.float64(clip)

    # Dense pass over chunks of rows: every value (dense counts) or the residual of a zero
    # (sparse counts; no matrix read). Partials: n_chunks x n_vars, twice, in float64.
    rows, chunk_start, chunk_batch, batch_chunks = chunk_layout(codes, n_batches, N_CHUNKS_DEVICE)
    n_chunks = chunk_batch.size
    part_sum = cp.empty((n_chunks, n_vars), np.float64)
    part_sum_sq = cp.empty((n_chunks, n_vars), np.float64)
    dense = cuda.get_kernel("hvg", NAME_EXPRESSIONS, cuda.template_name(
        "pearson_dense", np.float64 if sparse else x.dtype))
    cuda.launch(dense, n_chunks * -(-n_vars // BLOCK), BLOCK, (
        np.uintp(0) if sparse else x, np.int64(n_vars),
        cp.asarray(rows) if n_batches > 1 else np.uintp(0), cp.asarray(chunk_start),
        cp.asarray(chunk_batch), np.int64(n_chunks), cell_sums, gene_sums_dev, totals_dev,
        theta, clip, part_sum, part_sum_sq,
    ))

    extra = (np.uintp(0), np.uintp(0))
    if sparse:
        # Stored values per (gene, batch) from a CSC copy whose batches are contiguous row
        # ranges (as gene_moments: a row-permuted CSR copy first when n_batches > 1).
        csc_rows, batch_start = _device_codes(codes, n_batches)
        if n_batches > 1:
            csr = x if isinstance(x, types.CupyCSRMatrix) else x.tocsr()
            perm = cp.asarray(csc_rows)
            csc = csr[perm].tocsc()
            if not csc.has_sorted_indices:
                csc.sort_indices()
            csc_cell_sums = cp.ascontiguousarray(cell_sums[perm])
        else:
            csc = x if isinstance(x, types.CupyCSCMatrix) else x.tocsc()
            csc_cell_sums = cell_sums
        extra = (cp.empty((n_batches, n_vars), np.float64), cp.empty((n_batches, n_vars), np.float64))
        kernel = cuda.get_kernel("hvg", NAME_EXPRESSIONS, cuda.template_name(
            "pearson_csc", csc.dtype, csc.indices.dtype))
        cuda.launch(kernel, -(-n_vars * n_batches * 32 // BLOCK), BLOCK, (
            csc.data, csc.indices, csc.indptr, np.int64(n_vars), np.int32(n_batches),
            cp.asarray(batch_start), csc_cell_sums, gene_sums_dev, totals_dev, theta, clip,
            *extra,
        ))
    out_sum = cp.empty((n_batches, n_vars), np.float64)
    out_sum_sq = cp.empty((n_batches, n_vars), np.float64)
    reduce = cuda.get_kernel("hvg", NAME_EXPRESSIONS, "pearson_sum_chunks")
    cuda.launch(reduce, -(-n_batches * n_vars // BLOCK), BLOCK, (
        part_sum, part_sum_sq, cp.asarray(batch_chunks), np.int32(n_batches), np.int64(n_vars),
        *extra, out_sum, out_sum_sq,
    ))
    return out_sum.get(), out_sum_sq.get()  # synchronize!


# ---------------------------------------------------------------- flavor="poisson_gene_selection"
#
# Expected fraction of zeros per (batch, gene) under a Poisson model, mean over the batch's
# cells c of exp(-scaled_means[b, g] * total[c]), without the cells x genes outer product:
# cells with the same total give the same term, so each batch's distinct totals are visited
# once, weighted by how many cells have them (counts: a few thousand distinct totals).


@singledispatch
def poisson_expected_zeros(scaled_means, totals: np.ndarray, weights: np.ndarray,
                           batch_start: np.ndarray) -> np.ndarray:
    """``sum_k weights[k] * exp(-scaled_means[b, g] * totals[k]) / sum_k weights[k]`` over
    ``k`` in ``batch_start[b]:batch_start[b+1]``, for every batch ``b`` and gene ``g``.

    ``scaled_means`` is (n_batches, n_vars) float64, on the host (numba) or the device (CUDA
    kernel): that chooses where the loop runs. ``totals`` (float64) holds each batch's distinct
    cell totals, ``weights`` (float64) how many cells have each, ``batch_start`` (int64,
    n_batches + 1) where each batch's run starts. Returns (n_batches, n_vars) float64 on the host.
    """
    raise TypeError(f"poisson_expected_zeros: unsupported array type {type(scaled_means)}")


@poisson_expected_zeros.register(np.ndarray)
def _(scaled_means, totals, weights, batch_start):
    return _poisson_expected_zeros_host(
        np.ascontiguousarray(scaled_means, dtype=np.float64),
        np.ascontiguousarray(totals, dtype=np.float64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(batch_start, dtype=np.int64))


@numba.njit(parallel=True, cache=True)
def _poisson_expected_zeros_host(scaled_means, totals, weights, batch_start):
    # Genes run in parallel; each (batch, gene) walks the batch's totals in stored order,
    # as kernels/hvg.cu's poisson_expected_zeros does.
    n_batches, n_cols = scaled_means.shape
    expected = np.empty((n_batches, n_cols))
    for g in numba.prange(n_cols):
        for b in range(n_batches):
            m = scaled_means[b, g]
            acc = 0.0
            n = 0.0
            for k in range(batch_start[b], batch_start[b + 1]):
                acc += weights[k] * np.exp(-m * totals[k])
                n += weights[k]
            expected[b, g] = acc / n
    return expected


@poisson_expected_zeros.register(types.CupyArray)
def _(scaled_means, totals, weights, batch_start):
    import cupy as cp

    n_batches, n_vars = scaled_means.shape
    expected = cp.empty((n_batches, n_vars), np.float64)
    kernel = cuda.get_kernel("hvg", NAME_EXPRESSIONS, "poisson_expected_zeros")
    cuda.launch(kernel, -(-n_batches * n_vars // BLOCK), BLOCK, (
        cp.ascontiguousarray(scaled_means, dtype=np.float64),
        cp.asarray(totals, dtype=np.float64), cp.asarray(weights, dtype=np.float64),
        cp.asarray(batch_start, dtype=np.int64), np.int32(n_batches), np.int64(n_vars), expected,
    ))
    return expected.get()  # synchronize!
