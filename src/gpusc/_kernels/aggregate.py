"""``kernels/aggregate.cu`` and its numba twin: per-group medians of a cells × genes matrix.

get.aggregate's sums, means, variances and non-zero counts come from the moments family
(:mod:`gpusc._kernels.moments`); the median needs every value of a (group, gene) pair in
order, so it has its own pass. Sparse input is read by column (one CSC copy for CSR input,
never densified): each (gene, group) segment's stored values are gathered and ordered (the
device: two stable sorts; the host: negatives first and the median's ranks selected, linear
time), then ``median_sorted`` (one thread per segment) counts the group's implicit zeros in and
picks the middle value(s), as sklearn's ``csc_median_axis_0`` does on each group's rows in
scanpy.
Dense input takes ``numpy.median`` / ``cupy.median`` of each group's rows, as scanpy does.
"""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical, is_csc

BLOCK = 256
NAME_EXPRESSIONS = tuple(cuda.template_name("median_sorted", v) for v in (np.float32, np.float64))


@singledispatch
def group_medians(x, codes: np.ndarray, n_groups: int):
    """The (n_groups, n_vars) median of each group's rows (``codes[i]`` in 0..n_groups-1, -1
    leaves row i out); an empty group gives NaN. The values are scanpy's: float64 for sparse
    input, ``numpy.median``'s dtype for dense input; device input gives a device array."""
    raise TypeError(f"group_medians: unsupported array type {type(x)}")


def _group_rows(codes: np.ndarray, n_groups: int) -> list[np.ndarray]:
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    return [order[bounds[g]:bounds[g + 1]] for g in range(n_groups)]


def _n_cells(codes: np.ndarray, n_groups: int) -> np.ndarray:
    return np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.int64)


def _float_values(data):
    """Integer values as float64 (exact below 2**53): sklearn's (a + b) / 2.0 of integers."""
    return data if data.dtype.kind == "f" else data.astype(np.float64)


# ---------------------------------------------------------------- host

@group_medians.register(np.ndarray)
def _(x, codes, n_groups):
    # numpy's median of each group's rows (a copy of one group at a time), as scanpy: an empty
    # group gives NaN with numpy's "Mean of empty slice" warning
    return np.array([np.median(x[rows], axis=0) for rows in _group_rows(codes, n_groups)])


@group_medians.register(types.CSBase)
def _(x, codes, n_groups):
    x = canonical(x if is_csc(x) else x.tocsc())  # one CSC copy of CSR input
    n_vars = x.shape[1]
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    seg_start = np.cumsum(_segment_sizes_host(x.indices, x.indptr, codes, n_groups, n_vars))
    n_cells = _n_cells(codes, n_groups)
    values = ordered_segments_host(_float_values(x.data), x.indices, x.indptr, codes, n_groups,
                                  seg_start, n_cells)
    return median_sorted_host(values, seg_start, n_cells, n_groups, n_vars)


@numba.njit(parallel=True, cache=True)
def _segment_sizes_host(indices, indptr, codes, n_groups, n_cols):
    # sizes[1 + gene * n_groups + group]: the stored values of the gene in the group's cells
    sizes = np.zeros(n_cols * n_groups + 1, np.int64)
    for col in numba.prange(n_cols):
        for j in range(indptr[col], indptr[col + 1]):
            g = codes[indices[j]]
            if g >= 0:
                sizes[1 + col * n_groups + g] += 1
    return sizes


@numba.njit(parallel=True, cache=True)
def ordered_segments_host(data, indices, indptr, codes, n_groups, seg_start, n_cells):
    """Each (gene, group) segment's stored values, gene by gene, ordered as far as
    median_sorted reads them: the negative values first, and at each rank median_sorted looks
    up, the value a full sort would put there (selection, linear time; the device sorts
    fully). One thread per gene."""
    n_cols = indptr.size - 1
    out = np.empty(seg_start[-1], data.dtype)
    for col in numba.prange(n_cols):
        fill = seg_start[col * n_groups:(col + 1) * n_groups].copy()
        for j in range(indptr[col], indptr[col + 1]):
            g = codes[indices[j]]
            if g >= 0:
                out[fill[g]] = data[j]
                fill[g] += 1
        for g in range(n_groups):
            s = col * n_groups + g
            _order_for_median(out, seg_start[s], seg_start[s + 1], n_cells[g])
    return out


@numba.njit(cache=True)
def _order_for_median(values, lo, hi, n):
    """Reorder values[lo:hi] (the stored values of n cells, the rest zeros) so that the
    negative ones come first and the stored values of the median's ranks sit where sorting
    puts them."""
    n_negative = 0
    for i in range(lo, hi):  # negatives to the front (a partition; their order is free)
        if values[i] < 0:
            values[lo + n_negative], values[i] = values[i], values[lo + n_negative]
            n_negative += 1
    n_zeros = n - (hi - lo)
    # the median's ranks in increasing order; a second rank in the same part (negatives or
    # the rest) is selected among the values after the first, which selection left larger
    negatives_from, rest_from = lo, lo + n_negative
    for r in range(max((n - 1) // 2, 0), n // 2 + 1):
        if r < n_negative:
            _select(values, negatives_from, lo + n_negative, lo + r)
            negatives_from = lo + r + 1
        elif r - n_negative >= n_zeros:  # else an implicit zero: nothing to place
            _select(values, rest_from, hi, lo + r - n_zeros)
            rest_from = lo + r - n_zeros + 1


@numba.njit(cache=True)
def _select(values, lo, hi, k):
    """Put into values[k] the value that sorting values[lo:hi] would, smaller or equal values
    before it and larger or equal after (Hoare partitions, median-of-three pivots: linear on
    average, also with many ties)."""
    hi -= 1
    while lo < hi:
        mid = (lo + hi) // 2
        a, b, c = values[lo], values[mid], values[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while values[i] < pivot:
                i += 1
            while values[j] > pivot:
                j -= 1
            if i <= j:
                values[i], values[j] = values[j], values[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            return


@numba.njit(parallel=True, cache=True)
def median_sorted_host(sorted_values, seg_start, n_cells, n_groups, n_cols):
    """The twin of kernels/aggregate.cu's median_sorted: (n_groups, n_cols) float64."""
    out = np.empty((n_groups, n_cols))
    zero = np.zeros(1, sorted_values.dtype)[0]
    two = zero + 2
    for s in numba.prange(n_cols * n_groups):
        gene, group = s // n_groups, s % n_groups
        lo, n_stored = seg_start[s], seg_start[s + 1] - seg_start[s]
        n = n_cells[group]
        if n == 0:
            out[group, gene] = np.nan
            continue
        a, b = 0, n_stored
        while a < b:  # n_negative: the first stored value >= 0
            mid = a + (b - a) // 2
            if sorted_values[lo + mid] < zero:
                a = mid + 1
            else:
                b = mid
        n_negative, n_zeros, middle = a, n - n_stored, n // 2
        if n % 2 == 1:
            out[group, gene] = _at_rank(sorted_values, lo, middle, n_negative, n_zeros, zero)
        else:
            pair = (_at_rank(sorted_values, lo, middle - 1, n_negative, n_zeros, zero)
                    + _at_rank(sorted_values, lo, middle, n_negative, n_zeros, zero))
            out[group, gene] = pair / two  # in the values' own precision, as sklearn
    return out


@numba.njit(inline="always")
def _at_rank(sorted_values, lo, r, n_negative, n_zeros, zero):
    if r < n_negative:
        return sorted_values[lo + r]
    if r - n_negative < n_zeros:
        return zero
    return sorted_values[lo + r - n_zeros]


# ---------------------------------------------------------------- device

@group_medians.register(types.CupyArray)
def _(x, codes, n_groups):
    import cupy as cp

    medians = []
    for rows in _group_rows(codes, n_groups):
        if rows.size:
            medians.append(cp.median(x[cp.asarray(rows)], axis=0))
        else:  # cupy's median of no rows is not numpy's NaN
            medians.append(cp.full(x.shape[1], np.nan, np.median(np.zeros((1, 1), x.dtype)).dtype))
    return cp.stack(medians)


@group_medians.register(types.CupyCSMatrix)
def _(x, codes, n_groups):
    x = canonical(x if isinstance(x, types.CupyCSCMatrix) else x.tocsc())  # cuSPARSE copy
    return sparse_medians_device(_float_values(x.data), x.indices, x.indptr, x.shape, codes,
                                 n_groups)


def sparse_medians_device(data, indices, indptr, shape, codes, n_groups):
    """The device pass over a canonical CSC matrix: each stored value's segment
    (gene * n_groups + group), two stable argsorts (by value, then by segment), then
    median_sorted. Device memory besides the matrix: about 40 bytes per stored value (segment
    keys, sort orders, the sorted values) and the (n_groups, n_vars) float64 result."""
    import cupy as cp

    n_vars = shape[1]
    nnz = data.size  # canonical: every stored value is a distinct (cell, gene)
    group = cp.asarray(np.ascontiguousarray(codes, dtype=np.int64))[indices]
    gene = cp.searchsorted(indptr, cp.arange(nnz, dtype=indptr.dtype), side="right") - 1
    kept = cp.flatnonzero(group >= 0)
    values = data[kept]
    key = gene[kept] * n_groups + group[kept]
    del group, gene, kept
    order = cp.argsort(values)  # cupy's sorts are stable: by segment, then by value
    order = order[cp.argsort(key[order])]
    values, key = values[order], key[order]
    del order
    seg_start = cp.searchsorted(key, cp.arange(n_vars * n_groups + 1, dtype=key.dtype))
    return medians_device(values, seg_start.astype(np.int64), _n_cells(np.asarray(codes),
                                                                       n_groups), n_groups, n_vars)


def medians_device(sorted_values, seg_start, n_cells, n_groups: int, n_vars: int):
    """median_sorted over sorted segments on the device: (n_groups, n_vars) float64."""
    import cupy as cp

    out = cp.empty((n_groups, n_vars), np.float64)
    kernel = cuda.get_kernel("aggregate", NAME_EXPRESSIONS,
                             cuda.template_name("median_sorted", sorted_values.dtype))
    cuda.launch(kernel, -(-n_vars * n_groups // BLOCK), BLOCK,
                (sorted_values, seg_start, cp.asarray(np.asarray(n_cells, np.int64)),
                 np.int32(n_groups), np.int64(n_vars), out))
    return out
