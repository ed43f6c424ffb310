"""``kernels/moments.cu`` and its numba twins: per-gene moments by group, from rows.

One pass over the matrix gives, for every group ``g`` (a batch, a cluster, or the rows a mask
keeps) and gene ``j``, the sum and the sum of squares of the (transformed) values and the number
of counted values over the group's cells, accumulated in double. highly_variable_genes (every
flavor), scale, normalize_pearson_residuals, calculate_qc_metrics' per-gene columns and the
per-group statistics of the marker-gene and aggregation tools all use it.

How it reads the matrix: CSR and dense matrices row by row, never transposed. The rows are
grouped (a stable sort of the group codes, as an index array: nothing is copied) and cut into
slices that each lie in one group; each slice is summed into its own partial buffer (one warp
per slice on the device, one thread per slice on the host), and each group's slices are added in
slice order. The slices depend only on the group sizes and the shape, so the result is the same
run to run and on every machine of a kind (host: a fixed slice count, not the thread count).
No floating-point atomics. CSC input is read by column where that needs no copy (one group, on
the host also with groups); on the device a CSC matrix with groups is read through one CSR copy.

The transform is one of ``MODE_IDENTITY`` (the value), ``MODE_EXPM1`` (``expm1(value * scale)``
in the value's own precision, as scanpy's seurat flavor computes on a copy; nothing is copied
here on the device) and ``MODE_CLIP`` (``min(value, clip[g, j])`` in double, seurat_v3's clipped
second moment). Implicit zeros add nothing: every transform maps 0 to 0.

Device memory: besides the matrix (and a canonical copy when it holds duplicate entries, a CSR
copy for CSC input with groups), the partial buffers take at most ``DEVICE_PART_BYTES`` (256 MiB)
plus one slice (n_arrays · n_vars doubles) per group, then the (n_arrays, n_groups, n_vars)
result and the groups' row order (8 bytes per cell). :func:`device_workspace_bytes` gives the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical
from . import prange_only

MODE_IDENTITY, MODE_EXPM1, MODE_CLIP = 0, 1, 2  # kernels/moments.cu's MODE_*
COUNT_NONE, COUNT_POSITIVE, COUNT_NONZERO = 0, 1, 2  # kernels/moments.cu's COUNT_*
FLAG_NONFINITE, FLAG_NEGATIVE, FLAG_NONINTEGER = 1, 2, 4
BLOCK = 256
# Slices of the host kernels: a fixed count (not the thread count), so that the order of the
# additions, and so the result, is the same on every machine.
HOST_SLICES = 32
# Device partial buffers: at most this many bytes (or one slice per non-empty group), and at
# least this many rows per slice, so a warp has work enough to hide its memory latency.
DEVICE_PART_BYTES = 256 << 20
DEVICE_MIN_ROWS = 16

NAME_EXPRESSIONS = (
    *(cuda.template_name(k, v, i) for k in ("moments_csr", "pearson_csr")
      for v in (np.float32, np.float64) for i in (np.int32, np.int64)),
    *(cuda.template_name("moments_csc", v, i) for v in (np.float32, np.float64)
      for i in (np.int32, np.int64)),
    *(cuda.template_name(k, v) for k in ("moments_dense", "pearson_dense")
      for v in (np.float32, np.float64)),
    "sum_slices",
)


@dataclass
class Moments:
    """Per-group sums over cells, on the host; each array is (n_groups, n_vars)."""

    sum: np.ndarray  # float64
    sum_sq: np.ndarray | None  # float64; None unless asked for
    count: np.ndarray | None  # int64 counted values (> 0 or != 0); None unless asked for
    flags: int  # FLAG_* bits seen in the stored values

    @property
    def nonfinite(self) -> bool:
        return bool(self.flags & FLAG_NONFINITE)

    @property
    def negative(self) -> bool:
        """A value with its sign bit set (-0.0 too), as scanpy's count check (np.signbit)."""
        return bool(self.flags & FLAG_NEGATIVE)

    @property
    def noninteger(self) -> bool:
        """A value with a fractional part; only looked for with ``check_integer=True``."""
        return bool(self.flags & FLAG_NONINTEGER)


@singledispatch
def gene_moments(x, codes: np.ndarray | None = None, n_groups: int = 1, *,
                 mode: int = MODE_IDENTITY, scale: float = 1.0, clip: np.ndarray | None = None,
                 squares: bool = True, count: int = COUNT_NONE,
                 check_integer: bool = False) -> Moments:
    """Per-group, per-gene sums of a cells × genes matrix in one pass over its rows.

    ``codes`` gives each cell's group in ``0..n_groups-1``, or -1 to leave the cell out (None:
    every cell in group 0). ``clip`` is a (n_groups, n_vars) float64 array, used with
    ``mode=MODE_CLIP``. ``squares`` adds the sums of squares, ``count`` the number of values
    > 0 (``COUNT_POSITIVE``) or != 0 (``COUNT_NONZERO``). NaN/inf and negative values are
    reported in ``flags``, not raised; non-integer values only with ``check_integer`` (the
    device always looks). Duplicate entries of a sparse matrix are summed first (a copy), as a
    dense view of it would be. Results are host arrays. A dask array chunked by rows: every
    chunk through this same function, the chunks' sums added on the host (one pass, one
    dask.compute; ``moments_partials`` gives the lazy partials).
    """
    raise TypeError(f"gene_moments: unsupported array type {type(x)}")


def _codes(codes, n_obs: int) -> np.ndarray | None:
    if codes is None:
        return None
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    if codes.shape != (n_obs,):
        raise ValueError(f"gene_moments: {codes.size} group codes for {n_obs} cells")
    return codes


def _n_arrays(squares: bool, count: int) -> int:
    return 1 + bool(squares) + (count != COUNT_NONE)


def _clip(clip, n_groups: int, n_vars: int) -> np.ndarray:
    if clip is None:
        return np.zeros((n_groups, n_vars))
    return np.ascontiguousarray(clip, dtype=np.float64).reshape(n_groups, n_vars)


def _moments(out, squares: bool, count: int, flags: int) -> Moments:
    """Moments from the (n_arrays, n_groups, n_vars) float64 sums."""
    sum_sq = out[1] if squares else None
    counted = out[-1].astype(np.int64) if count != COUNT_NONE else None  # exact below 2^53
    return Moments(out[0], sum_sq, counted, int(flags))


@dataclass
class SliceLayout:
    """Rows grouped by code and cut into slices that each lie in one group.

    ``rows``: the kept rows in group order (int64; None: every row, in order, one group);
    ``start``: n_slices + 1 offsets into rows; ``group``: int32 group of each slice;
    ``group_slices``: n_groups + 1 offsets into the slices.
    """

    rows: np.ndarray | None
    start: np.ndarray
    group: np.ndarray
    group_slices: np.ndarray

    @property
    def n_slices(self) -> int:
        return self.group.size


def slice_layout(codes: np.ndarray | None, n_obs: int, n_groups: int, n_slices: int,
                 min_rows: int = 1) -> SliceLayout:
    """The slices of :func:`gene_moments`: about ``n_slices`` of them, each group getting a share
    proportional to its size (at least one when it has cells, at most one per ``min_rows``
    rows). Depends only on the codes and the numbers given, never on the machine."""
    if codes is None:
        sizes = np.array([n_obs], np.int64)
        rows = None
    else:
        order = np.argsort(codes, kind="stable")
        n_left_out = int(np.count_nonzero(codes < 0))
        rows = order[n_left_out:].astype(np.int64)
        sizes = np.bincount(codes[rows], minlength=n_groups).astype(np.int64)
    n_used = max(int(sizes.sum()), 1)
    most = np.maximum(sizes // max(min_rows, 1), 1)
    per_group = np.where(sizes > 0, np.clip((n_slices * sizes) // n_used, 1, most), 0)
    group_rows = np.concatenate([[0], np.cumsum(sizes)])
    start, group = [0], []
    for g in np.flatnonzero(per_group):
        k = int(per_group[g])
        start.extend((group_rows[g] + (np.arange(1, k + 1) * sizes[g]) // k).tolist())
        group.extend([g] * k)
    return SliceLayout(rows, np.asarray(start, np.int64), np.asarray(group, np.int32),
                       np.concatenate([[0], np.cumsum(per_group)]).astype(np.int64))


def device_slices(n_obs: int, n_vars: int, n_arrays: int) -> int:
    """How many slices the device kernels cut the rows into (before the per-group minimum)."""
    by_budget = DEVICE_PART_BYTES // (8 * n_arrays * max(n_vars, 1))
    return int(max(1, min(by_budget, n_obs // DEVICE_MIN_ROWS)))


def device_workspace_bytes(n_obs: int, n_vars: int, n_groups: int, *, squares: bool = True,
                           count: int = COUNT_NONE, grouped: bool = False) -> int:
    """At most this many device bytes :func:`gene_moments` allocates besides the matrix (and
    its copies): the partial buffers (at most DEVICE_PART_BYTES, plus one slice per group),
    the result, the slice layout, and the row order when ``grouped``."""
    n_arrays = _n_arrays(squares, count)
    n_slices = device_slices(n_obs, n_vars, n_arrays) + min(n_groups, n_obs)
    per_array = 8 * n_vars
    return (n_slices * n_arrays * per_array + n_arrays * n_groups * per_array
            + (8 * n_obs if grouped else 0) + 8 * (2 * n_slices + n_groups + 3))


# ---------------------------------------------------------------- host (numba)

@gene_moments.register(types.csr_matrix | types.csr_array | np.ndarray)
def _(x, codes=None, n_groups=1, *, mode=MODE_IDENTITY, scale=1.0, clip=None, squares=True,
      count=COUNT_NONE, check_integer=False):
    n_obs, n_vars = x.shape
    codes = _codes(codes, n_obs)
    layout = slice_layout(codes, n_obs, n_groups, HOST_SLICES)
    rows = np.arange(n_obs, dtype=np.int64) if layout.rows is None else layout.rows
    if isinstance(x, np.ndarray):
        data = np.ascontiguousarray(x).reshape(-1)
        indices, indptr = np.arange(n_vars, dtype=np.int64), np.empty(0, np.int64)
    else:
        x = canonical(x)
        data, indices, indptr = x.data, x.indices, x.indptr
    if mode == MODE_EXPM1:
        # numpy's vectorised expm1 into a new value array (as scanpy does), then plain sums:
        # 4x faster than expm1 inside the numba loop. Same rounding as _transform.
        data = np.expm1(data if scale == 1.0 else (data.astype(np.float64) * scale).astype(data.dtype))
        mode = MODE_IDENTITY
    part, v_sum, sign, bad = _moments_rows_host(
        data, indices, indptr, n_vars, rows, layout.start, layout.group, mode, float(scale),
        _clip(clip, n_groups, n_vars), data.dtype == np.float32, check_integer, bool(squares),
        int(count))
    return _moments(_add_slices_host(part, layout.group_slices, n_groups), squares, count,
                    _flags(v_sum, sign, int(bad)))


@gene_moments.register(types.csc_matrix | types.csc_array)
def _(x, codes=None, n_groups=1, *, mode=MODE_IDENTITY, scale=1.0, clip=None, squares=True,
      count=COUNT_NONE, check_integer=False):
    n_obs, n_vars = x.shape
    codes = _codes(codes, n_obs)
    x = canonical(x)
    out, v_sum, sign, bad = _moments_csc_host(
        x.data, x.indices, x.indptr, n_vars, np.zeros(n_obs, np.int32) if codes is None else codes,
        n_groups, mode, float(scale), _clip(clip, n_groups, n_vars), x.data.dtype == np.float32,
        check_integer, bool(squares), int(count))
    return _moments(out, squares, count, _flags(v_sum, sign, int(bad)))


def _add_slices_host(part, group_slices, n_groups: int) -> np.ndarray:
    """(n_slices, n_vars, n_arrays) partial sums → (n_arrays, n_groups, n_vars): each group's
    slices added in slice order."""
    n_vars, n_arrays = part.shape[1], part.shape[2]
    out = np.zeros((n_arrays, n_groups, n_vars))
    for g in range(n_groups):
        lo, hi = group_slices[g], group_slices[g + 1]
        if hi > lo:
            out[:, g] = part[lo:hi].sum(axis=0).T
    return out


def _flags(v_sum: float, sign: bool, bad: int) -> int:
    """FLAG_* bits: NaN and inf reach the sum of the raw values, so one isfinite replaces a
    per-value test (transformed sums may hide them); signs and fractions come from the loop."""
    flags = bad
    if not np.isfinite(v_sum):
        flags |= FLAG_NONFINITE
    if sign:
        flags |= FLAG_NEGATIVE
    return flags


@numba.njit(inline="always")
def _transform(v, mode, scale, clip, single):
    if mode == MODE_EXPM1:
        if single:  # scanpy: x *= log(base) and expm1 in float32
            return np.float64(np.expm1(np.float32(v * scale)))
        return np.expm1(np.float64(v) * scale)
    d = np.float64(v)
    if mode == MODE_CLIP:
        return min(d, clip)
    return d


@numba.njit(inline="always")
def _integer_flag(v, check_integer):
    # Only asked for where a caller checks for counts: a per-value floor() halves the pass's speed.
    if check_integer and np.isfinite(v) and v != np.floor(v):
        return FLAG_NONINTEGER
    return 0


@numba.njit(inline="always")
def _counted(v, count):
    if count == COUNT_POSITIVE:
        return v > 0
    return count == COUNT_NONZERO and v != 0


@numba.njit(inline="always")
def _accumulate(acc, i, j, v, f, squares, count, at_count):
    """Adds value v (transformed: f) to the sums acc[i, j, :] (sum, squares, count)."""
    acc[i, j, 0] += f
    if squares:
        acc[i, j, 1] += f * f
    if count != COUNT_NONE and _counted(v, count):
        acc[i, j, at_count] += 1.0  # a count, exact in double below 2^53


@numba.njit(parallel=prange_only(), cache=True)
def _moments_rows_host(data, indices, indptr, n_cols, rows, slice_start, slice_group, mode,
                       scale, clip, single, check_integer, squares, count):
    # CSR when indptr is given; C-ordered dense (data = x.ravel(), indices = all columns) when
    # indptr is empty. Slices run in parallel, each with its own partial sums; a gene's arrays
    # sit side by side ([slice, gene, array]) so one cache line serves one value.
    dense = indptr.size == 0
    n_slices = slice_group.size
    n_arrays = 1 + (1 if squares else 0) + (1 if count != COUNT_NONE else 0)
    at_count = n_arrays - 1
    part = np.empty((n_slices, n_cols, n_arrays))  # zeroed by the slice's own thread (first touch)
    sign = np.zeros(max(n_slices, 1), np.bool_)
    v_sum = np.zeros(max(n_slices, 1))
    flags = np.zeros(max(n_slices, 1), np.int64)
    # a slice's work is a function of its own: numba's parallel passes compile a one-line loop
    # body much faster than the same code inlined in it
    for k in numba.prange(n_slices):
        part[k] = 0.0
        flags[k], sign[k], v_sum[k] = _moments_slice(
            part, np.int64(k), data, indices, indptr, n_cols, rows[slice_start[k]:slice_start[k + 1]], dense,
            mode, scale, clip[slice_group[k]], single, check_integer, squares, count, at_count)
    flag = 0
    for f in flags:
        flag |= f
    return part, v_sum.sum(), sign.any(), flag


@numba.njit(cache=True)
def _moments_slice(part, k, data, indices, indptr, n_cols, rows, dense, mode, scale, clip_row,
                   single, check_integer, squares, count, at_count):
    """:func:`_moments_rows_host` for slice k (its rows): adds to part[k]; returns the flag
    bits, whether a value was negative, and the sum of the raw values."""
    bad = 0
    negative = False
    total = 0.0
    for r in rows:
        if dense:
            lo, hi = r * n_cols, (r + 1) * n_cols
        else:
            lo, hi = indptr[r], indptr[r + 1]
        # the row's values and columns as views, and clip read only in MODE_CLIP: the
        # inner loop then runs 1.5-2x faster (same additions, in the same order)
        values = data[lo:hi]
        cols = indices if dense else indices[lo:hi]
        for i in range(values.size):
            v = values[i]
            col = cols[i]
            bad |= _integer_flag(v, check_integer)
            negative |= np.signbit(v)
            total += v
            c = clip_row[col] if mode == MODE_CLIP else 0.0
            _accumulate(part, k, col, v, _transform(v, mode, scale, c, single), squares,
                        count, at_count)
    return bad, negative, total


@numba.njit(parallel=True, cache=True)
def _moments_csc_host(data, indices, indptr, n_cols, codes, n_groups, mode, scale, clip, single,
                      check_integer, squares, count):
    # Genes run in parallel; each gene's column is read by one thread, in stored order; cells
    # with code -1 are left out.
    n_arrays = 1 + (1 if squares else 0) + (1 if count != COUNT_NONE else 0)
    at_count = n_arrays - 1
    out = np.zeros((n_groups, n_cols, n_arrays))
    sign = np.zeros(max(n_cols, 1), np.bool_)
    v_sum = np.zeros(max(n_cols, 1))
    flags = np.zeros(max(n_cols, 1), np.int64)
    for g in numba.prange(n_cols):
        bad = 0
        negative = False
        total = 0.0
        for j in range(indptr[g], indptr[g + 1]):
            b = codes[indices[j]]
            if b < 0:
                continue
            v = data[j]
            bad |= _integer_flag(v, check_integer)
            negative |= np.signbit(v)
            total += v
            _accumulate(out, b, g, v, _transform(v, mode, scale, clip[b, g], single), squares,
                        count, at_count)
        sign[g] = negative
        v_sum[g] = total
        flags[g] = bad
    flag = 0
    for f in flags:
        flag |= f
    return out.transpose(2, 0, 1).copy(), v_sum.sum(), sign.any(), flag


# ---------------------------------------------------------------- device

def _kernel(name: str, *dtypes):
    return cuda.get_kernel("moments", NAME_EXPRESSIONS, cuda.template_name(name, *dtypes)
                           if dtypes else name)


@gene_moments.register(types.CupyCSMatrix | types.CupyArray)
def _(x, codes=None, n_groups=1, *, mode=MODE_IDENTITY, scale=1.0, clip=None, squares=True,
      count=COUNT_NONE, check_integer=False):
    import cupy as cp

    n_obs = x.shape[0]
    codes = _codes(codes, n_obs)
    one_group = codes is None or (n_groups == 1 and not (codes < 0).any())
    if isinstance(x, types.CupyArray):
        x = cp.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
        return moments_device(x, None, None, x.shape, codes, n_groups, mode, scale, clip,
                              squares, count)
    if isinstance(x, types.CupyCSCMatrix):
        if one_group:
            return moments_device_csc(canonical(x), mode, scale, clip, squares, count)
        x = x.tocsr()  # cuSPARSE; one CSR copy (peak: 2x the matrix)
    x = canonical(x)
    return moments_device(x.data, x.indices, x.indptr, x.shape, codes, n_groups, mode, scale,
                          clip, squares, count)


def moments_device(data, indices, indptr, shape, codes, n_groups, mode, scale, clip, squares,
                   count) -> Moments:
    """The device pass over a canonical CSR (``data``, ``indices``, ``indptr``) or, with
    ``indices`` None, the C-ordered dense float matrix ``data``: moments_csr or moments_dense
    into the slices' partial buffers, then sum_slices."""
    import cupy as cp

    n_obs, n_vars = shape
    n_arrays = _n_arrays(squares, count)
    layout = slice_layout(codes, n_obs, n_groups, device_slices(n_obs, n_vars, n_arrays),
                          DEVICE_MIN_ROWS)
    n_slices = layout.n_slices
    rows = np.uintp(0) if layout.rows is None else cp.asarray(layout.rows)
    clip_dev = cp.asarray(_clip(clip, n_groups, n_vars)) if mode == MODE_CLIP else np.uintp(0)
    flags = cp.zeros(1, np.int32)
    common = (rows, cp.asarray(layout.start), cp.asarray(layout.group), np.int64(n_slices),
              np.int32(mode), np.float64(scale), clip_dev, np.int32(bool(squares)),
              np.int32(count))
    if indices is None:
        part = cp.empty(n_slices * n_arrays * n_vars, np.float64)  # every entry written once
        cuda.launch(_kernel("moments_dense", data.dtype), n_slices * -(-n_vars // BLOCK), BLOCK,
                    (data, np.int64(n_vars), *common, part, flags))
    else:
        part = cp.zeros(n_slices * n_arrays * n_vars, np.float64)  # the warps add into it
        cuda.launch(_kernel("moments_csr", data.dtype, indices.dtype), -(-n_slices * 32 // BLOCK),
                    BLOCK, (data, indices, indptr, np.int64(n_vars), *common, part, flags))
    out = _sum_slices(part, n_arrays, layout.group_slices, n_groups, n_vars)
    flag = int(flags.get()[0])  # synchronize!
    return _moments(out.get().reshape(n_arrays, n_groups, n_vars), squares, count, flag)


def moments_device_csc(x, mode, scale, clip, squares, count) -> Moments:
    """One group, CSC input on the device: one warp per gene (moments_csc), no copy."""
    import cupy as cp

    n_vars = x.shape[1]
    n_arrays = _n_arrays(squares, count)
    out = cp.empty(n_arrays * n_vars, np.float64)
    flags = cp.zeros(1, np.int32)
    clip_dev = cp.asarray(_clip(clip, 1, n_vars)) if mode == MODE_CLIP else np.uintp(0)
    cuda.launch(_kernel("moments_csc", x.data.dtype, x.indptr.dtype), -(-n_vars * 32 // BLOCK),
                BLOCK, (x.data, x.indptr, np.int64(n_vars), np.int32(mode), np.float64(scale),
                        clip_dev, np.int32(bool(squares)), np.int32(count), out, flags))
    flag = int(flags.get()[0])  # synchronize!
    return _moments(out.get().reshape(n_arrays, 1, n_vars), squares, count, flag)


def _sum_slices(part, n_arrays: int, group_slices, n_groups: int, n_vars: int):
    import cupy as cp

    out = cp.empty(n_arrays * n_groups * n_vars, np.float64)
    cuda.launch(_kernel("sum_slices"), -(-out.size // BLOCK), BLOCK,
                (part, np.int32(n_arrays), cp.asarray(group_slices), np.int32(n_groups),
                 np.int64(n_vars), out))
    return out


# ---------------------------------------------------------------- Pearson residual sums
#
# Per (group, gene) sums of the clipped analytic Pearson residuals r and of r², over the group's
# cells, without the dense residual matrix: mu = gene_sum[g, j] * cell_sum[c] / total[g],
# r = clip((x - mu) / sqrt(mu + mu² / theta), ±clip). A sparse matrix's implicit zeros are summed
# as "the residual of a zero for every cell" (dense work over cells × genes, compute-bound, no
# matrix read) plus, per stored value, f(v) - f(0). Genes without counts in a group stay 0 there
# (scanpy leaves them out of that group). Same slices as gene_moments.


@singledispatch
def pearson_residual_sums(x, codes: np.ndarray | None, n_groups: int, gene_sums: np.ndarray, *,
                          theta: float, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Sums of clipped Pearson residuals and of their squares per group and gene.

    ``gene_sums`` is the (n_groups, n_vars) float64 per-group gene totals on the host
    (``gene_moments(...).sum``). Returns two (n_groups, n_vars) float64 host arrays. A cell
    without counts makes its group's sums NaN, as scanpy's residuals are NaN there.
    """
    raise TypeError(f"pearson_residual_sums: unsupported array type {type(x)}")


def _pearson_setup(gene_sums, n_groups, n_vars):
    gene_sums = np.ascontiguousarray(gene_sums, dtype=np.float64).reshape(n_groups, n_vars)
    return gene_sums, gene_sums.sum(axis=1)


@pearson_residual_sums.register(types.csr_matrix | types.csr_array | np.ndarray)
def _(x, codes, n_groups, gene_sums, *, theta, clip):
    n_obs, n_vars = x.shape
    codes = _codes(codes, n_obs)
    gene_sums, totals = _pearson_setup(gene_sums, n_groups, n_vars)
    layout = slice_layout(codes, n_obs, n_groups, HOST_SLICES)
    rows = np.arange(n_obs, dtype=np.int64) if layout.rows is None else layout.rows
    if isinstance(x, np.ndarray):
        cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        data = np.ascontiguousarray(x).reshape(-1)
        # int32 placeholders: dense shares the numba specialisation of int32-indexed CSR
        indices, indptr = np.empty(0, np.int32), np.empty(0, np.int32)
    else:
        x = canonical(x)
        cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        data, indices, indptr = x.data, x.indices, x.indptr
    part = _pearson_rows_host(data, indices, indptr, n_vars, rows, layout.start, layout.group,
                              cell_sums, gene_sums, totals, float(theta), float(clip))
    out = _add_slices_host(part, layout.group_slices, n_groups)
    return out[0], out[1]


@pearson_residual_sums.register(types.csc_matrix | types.csc_array)
def _(x, codes, n_groups, gene_sums, *, theta, clip):
    n_obs, n_vars = x.shape
    codes = np.zeros(n_obs, np.int32) if codes is None else _codes(codes, n_obs)
    gene_sums, totals = _pearson_setup(gene_sums, n_groups, n_vars)
    x = canonical(x)
    cell_sums = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
    rows = np.argsort(codes, kind="stable")
    group_start = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=n_groups))])
    return _pearson_csc_host(x.data, x.indices, x.indptr, n_vars, codes, n_groups,
                             cell_sums[rows], group_start.astype(np.int64), cell_sums, gene_sums,
                             totals, float(theta), float(clip))


@numba.njit(inline="always")
def _residual(v, t, s, total, theta, clip):
    # kernels/moments.cu's pearson_residual: NaN (a cell without counts) passes the clip
    mu = s * t / total
    r = (v - mu) / np.sqrt(mu + mu * mu / theta)
    if r < -clip:
        return -clip
    if r > clip:
        return clip
    return r


@numba.njit(parallel=True, cache=True)
def _pearson_rows_host(data, indices, indptr, n_cols, rows, slice_start, slice_group, cell_sums,
                       gene_sums, totals, theta, clip):
    # Slices of rows (each in one group) run in parallel with their own partial sums
    # ([slice, gene, sum / sum of squares]). Dense (C-ordered, indptr empty): every value's
    # residual. CSR (canonical): the residual of a zero for every gene, then f(v) - f(0) for
    # the row's stored values.
    dense = indptr.size == 0
    n_slices = slice_group.size
    part = np.zeros((n_slices, n_cols, 2))
    for k in numba.prange(n_slices):
        b = slice_group[k]
        total = totals[b]
        for i in range(slice_start[k], slice_start[k + 1]):
            r = rows[i]
            t = cell_sums[r]
            base = r * n_cols
            for g in range(n_cols):
                s = gene_sums[b, g]
                if s != 0.0:
                    v = np.float64(data[base + g]) if dense else 0.0
                    f = _residual(v, t, s, total, theta, clip)
                    part[k, g, 0] += f
                    part[k, g, 1] += f * f
            if not dense:
                for j in range(indptr[r], indptr[r + 1]):
                    g = indices[j]
                    s = gene_sums[b, g]
                    if s != 0.0:
                        f = _residual(np.float64(data[j]), t, s, total, theta, clip)
                        f0 = _residual(0.0, t, s, total, theta, clip)
                        part[k, g, 0] += f - f0
                        part[k, g, 1] += f * f - f0 * f0
    return part


@numba.njit(parallel=True, cache=True)
def _pearson_csc_host(data, indices, indptr, n_cols, codes, n_groups, group_cell_sums,
                      group_start, cell_sums, gene_sums, totals, theta, clip):
    # Genes run in parallel: per group the residual of a zero over the group's cells (cell
    # totals grouped by group in group_cell_sums), then f(v) - f(0) for the stored values.
    out_sum = np.zeros((n_groups, n_cols))
    out_sum_sq = np.zeros((n_groups, n_cols))
    for g in numba.prange(n_cols):
        for b in range(n_groups):
            s = gene_sums[b, g]
            if s != 0.0:
                acc = 0.0
                acc2 = 0.0
                for i in range(group_start[b], group_start[b + 1]):
                    f0 = _residual(0.0, group_cell_sums[i], s, totals[b], theta, clip)
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
def _(x, codes, n_groups, gene_sums, *, theta, clip):
    import cupy as cp

    n_obs = x.shape[0]
    codes = _codes(codes, n_obs)
    if isinstance(x, types.CupyArray):
        x = cp.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float64))
        cell_sums = cp.ascontiguousarray(x.sum(axis=1, dtype=np.float64).ravel())
        return pearson_sums_device(x, None, None, x.shape, codes, n_groups, cell_sums, gene_sums,
                                   theta, clip)
    x = canonical(x if isinstance(x, types.CupyCSRMatrix) else x.tocsr())
    cell_sums = cp.ascontiguousarray(x.sum(axis=1, dtype=np.float64).ravel())
    return pearson_sums_device(x.data, x.indices, x.indptr, x.shape, codes, n_groups, cell_sums,
                               gene_sums, theta, clip)


def pearson_sums_device(data, indices, indptr, shape, codes, n_groups, cell_sums, gene_sums,
                        theta, clip):
    """The device pass of :func:`pearson_residual_sums` over a canonical CSR or (``indices``
    None) a C-ordered dense float matrix ``data``; ``cell_sums`` float64 on the device."""
    import cupy as cp

    n_obs, n_vars = shape
    gene_sums, totals = _pearson_setup(gene_sums, n_groups, n_vars)
    layout = slice_layout(codes, n_obs, n_groups, device_slices(n_obs, n_vars, 2),
                          DEVICE_MIN_ROWS)
    n_slices = layout.n_slices
    slices = (np.uintp(0) if layout.rows is None else cp.asarray(layout.rows),
              cp.asarray(layout.start), cp.asarray(layout.group), np.int64(n_slices))
    model = (cell_sums, cp.asarray(gene_sums), cp.asarray(totals), np.float64(theta),
             np.float64(clip))
    part = cp.empty(n_slices * 2 * n_vars, np.float64)
    sparse = indices is not None
    # every value of dense counts, or the residual of a zero for every (cell, gene)
    cuda.launch(_kernel("pearson_dense", np.float64 if sparse else data.dtype),
                n_slices * -(-n_vars // BLOCK), BLOCK,
                (np.uintp(0) if sparse else data, np.int64(n_vars), *slices, *model, part))
    if sparse:  # then f(v) - f(0) for each stored value, into the same slices
        cuda.launch(_kernel("pearson_csr", data.dtype, indices.dtype), -(-n_slices * 32 // BLOCK),
                    BLOCK, (data, indices, indptr, np.int64(n_vars), *slices, *model, part))
    out = _sum_slices(part, 2, layout.group_slices, n_groups, n_vars).get()  # synchronize!
    out = out.reshape(2, n_groups, n_vars)
    return out[0], out[1]


# ---------------------------------------------------------------- dask
#
# A dask array chunked by rows goes chunk by chunk through the registrations above (host or
# device chunks alike): each chunk's sums are one partial, and the partials are added on the
# host. ``*_partials`` give the lazy partials, so that a step can compute them together with
# its other reductions in one dask.compute; the registrations compute them alone (one pass).


def add_moments(parts) -> Moments:
    """The moments of the rows of several chunks: the chunks' sums and counts added (in
    chunk order), their flags or-ed."""
    parts = list(parts)
    first = parts[0]
    total = Moments(first.sum.copy(), None if first.sum_sq is None else first.sum_sq.copy(),
                    None if first.count is None else first.count.copy(), first.flags)
    for part in parts[1:]:
        total.sum += part.sum
        if total.sum_sq is not None:
            total.sum_sq += part.sum_sq
        if total.count is not None:
            total.count += part.count
        total.flags |= part.flags
    return total


def moments_partials(x, codes: np.ndarray | None = None, n_groups: int = 1, **kwargs) -> list:
    """One lazy :func:`gene_moments` per row chunk of the dask array ``x`` (dask.delayed
    objects; :func:`add_moments` of their results is ``gene_moments`` of ``x``)."""
    from .._core.dask import block_partials

    if codes is None:
        return block_partials(x, "gene_moments", lambda block: gene_moments(
            block, None, n_groups, **kwargs))
    codes = _codes(codes, x.shape[0])
    return block_partials(x, "gene_moments", lambda block, block_codes: gene_moments(
        block, block_codes, n_groups, **kwargs), codes)


@gene_moments.register(types.DaskArray)
def _(x, codes=None, n_groups=1, **kwargs):
    # one pass over the chunks (one dask.compute)
    from .._core.dask import compute

    return add_moments(compute(*moments_partials(x, codes, n_groups, **kwargs)))


def pearson_partials(x, codes: np.ndarray | None, n_groups: int, gene_sums: np.ndarray, *,
                     theta: float, clip: float) -> list:
    """One lazy :func:`pearson_residual_sums` per row chunk of the dask array ``x``; their
    results added are the sums of ``x``. Each chunk's cell totals come from the chunk itself."""
    from .._core.dask import block_partials

    codes = np.zeros(x.shape[0], np.int32) if codes is None else _codes(codes, x.shape[0])
    gene_sums = np.ascontiguousarray(gene_sums, dtype=np.float64)
    return block_partials(x, "pearson_residual_sums", lambda block, block_codes: (
        pearson_residual_sums(block, block_codes, n_groups, gene_sums, theta=theta, clip=clip)),
        codes)


@pearson_residual_sums.register(types.DaskArray)
def _(x, codes, n_groups, gene_sums, *, theta, clip):
    # one pass over the chunks (one dask.compute)
    from .._core.dask import compute

    parts = compute(*pearson_partials(x, codes, n_groups, gene_sums, theta=theta, clip=clip))
    return (np.sum([p[0] for p in parts], axis=0), np.sum([p[1] for p in parts], axis=0))
