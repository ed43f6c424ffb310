"""``kernels/scale.cu`` and its numba twin: scaling with clipping, and dense outputs
(zero-centred scaling, Pearson residuals) written in one pass from sparse input. The per-gene
moments these need come from :mod:`gpusc._kernels.moments`.
"""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical
from . import prange_only

WARPS_PER_BLOCK = 8
THREADS = 256
_V, _I, _O = (np.float32, np.float64), (np.int32, np.int64), (np.float32, np.float64)
NAME_EXPRESSIONS = (
    *(cuda.template_name("scale_sparse_values", v, i) for v in _V for i in _I),
    *(cuda.template_name("scale_dense", v) for v in _V),
    *(cuda.template_name(k, v, i, o) for k in ("scale_csr_to_dense", "pearson_csr")
      for v in _V for i in _I for o in _O),
    *(cuda.template_name("pearson_dense", v, o) for v in _V for o in _O),
)


def _kernel(name: str, *dtypes):
    return cuda.get_kernel("scale", NAME_EXPRESSIONS, cuda.template_name(name, *dtypes))


def _warp_grid(n_lines: int) -> int:
    return -(-n_lines // WARPS_PER_BLOCK)


def _flat_grid(n: int) -> int:
    return min(-(-n // THREADS), 65536)


def _device_mask(row_mask):
    import cupy as cp

    return np.uintp(0) if row_mask is None else cp.asarray(row_mask, dtype=np.uint8)


def _host_mask(row_mask) -> np.ndarray:
    return np.zeros(0, np.uint8) if row_mask is None else np.asarray(row_mask, np.uint8)


# --- scale_dense_inplace: x = clip((x - mean) / std, lo, hi) per column; mean None: no centering.


@singledispatch
def scale_dense_inplace(x, mean, std, lo: float, hi: float) -> None:
    raise TypeError(f"scale_dense_inplace: unsupported array type {type(x)}")


@scale_dense_inplace.register(np.ndarray)
def _(x, mean, std, lo, hi):
    centre = mean is not None
    mean = np.zeros(x.shape[1]) if mean is None else np.asarray(mean, np.float64)
    _scale_dense_host(x, mean, np.asarray(std, np.float64), centre, float(lo), float(hi))


@scale_dense_inplace.register(types.CupyArray)
def _(x, mean, std, lo, hi):
    import cupy as cp

    if not x.flags.c_contiguous:
        raise ValueError("scale_dense_inplace: a C-ordered device array is needed")
    n = x.size
    cuda.launch(_kernel("scale_dense", x.dtype), _flat_grid(n), THREADS,
                (x, np.int64(x.shape[0]), np.int64(x.shape[1]),
                 np.uintp(0) if mean is None else cp.asarray(mean, np.float64),
                 cp.asarray(std, np.float64), np.float64(lo), np.float64(hi)))


# --- scale_sparse_inplace: stored values v = min(v / std[gene], hi); CSR rows outside row_mask kept.


@singledispatch
def scale_sparse_inplace(x, std, hi: float, row_mask=None) -> None:
    raise TypeError(f"scale_sparse_inplace: unsupported array type {type(x)}")


@scale_sparse_inplace.register(types.CSBase)
def _(x, std, hi, row_mask=None):
    by_line = x.format == "csc"
    if by_line and row_mask is not None:
        raise ValueError("scale_sparse_inplace: row_mask needs CSR input")
    _scale_sparse_host(x.data, x.indices, x.indptr, by_line, _host_mask(row_mask),
                       np.asarray(std, np.float64), float(hi))


@scale_sparse_inplace.register(types.CupyCSMatrix)
def _(x, std, hi, row_mask=None):
    import cupy as cp

    by_line = x.format == "csc"
    if by_line and row_mask is not None:
        raise ValueError("scale_sparse_inplace: row_mask needs CSR input")
    n_lines = x.indptr.size - 1
    cuda.launch(_kernel("scale_sparse_values", x.dtype, x.indices.dtype), _warp_grid(n_lines),
                32 * WARPS_PER_BLOCK,
                (x.data, x.indices, x.indptr, np.int64(n_lines), np.int32(by_line),
                 _device_mask(row_mask), cp.asarray(std, np.float64), np.float64(hi)))


# --- scale_csr_to_dense: a new dense C-ordered clip((x - mean) / std, lo, hi) from CSR input.


@singledispatch
def scale_csr_to_dense(x, mean, std, lo: float, hi: float, out_dtype):
    raise TypeError(f"scale_csr_to_dense: unsupported array type {type(x)}")


@scale_csr_to_dense.register(types.csr_matrix | types.csr_array)
def _(x, mean, std, lo, hi, out_dtype):
    x = canonical(x)
    out = np.empty(x.shape, out_dtype)
    _scale_csr_to_dense_host(x.data, x.indices, x.indptr, np.asarray(mean, np.float64),
                             np.asarray(std, np.float64), float(lo), float(hi), out)
    return out


@scale_csr_to_dense.register(types.CupyCSRMatrix)
def _(x, mean, std, lo, hi, out_dtype):
    import cupy as cp

    x = canonical(x)
    out = cp.empty(x.shape, out_dtype)
    cuda.launch(_kernel("scale_csr_to_dense", x.dtype, x.indices.dtype, out_dtype),
                _warp_grid(x.shape[0]), 32 * WARPS_PER_BLOCK,
                (x.data, x.indices, x.indptr, np.int64(x.shape[0]), np.int64(x.shape[1]),
                 cp.asarray(mean, np.float64), cp.asarray(std, np.float64), np.float64(lo),
                 np.float64(hi), out))
    return out


# --- pearson_residuals: dense clip((x - mu) / sqrt(mu + mu^2 / theta), ±clip),
# mu = cell_sums[i] * gene_sums[j] / total, from CSR or C-ordered dense counts.


@singledispatch
def pearson_residuals(x, cell_sums, gene_sums, total: float, theta: float, clip: float, out_dtype):
    raise TypeError(f"pearson_residuals: unsupported array type {type(x)}")


@pearson_residuals.register(types.csr_matrix | types.csr_array)
def _(x, cell_sums, gene_sums, total, theta, clip, out_dtype):
    x = canonical(x)
    out = np.empty(x.shape, out_dtype)
    _pearson_csr_host(x.data, x.indices, x.indptr, np.asarray(cell_sums, np.float64),
                      np.asarray(gene_sums, np.float64), float(total), float(theta), float(clip), out)
    return out


@pearson_residuals.register(np.ndarray)
def _(x, cell_sums, gene_sums, total, theta, clip, out_dtype):
    out = np.empty(x.shape, out_dtype)
    _pearson_dense_host(x, np.asarray(cell_sums, np.float64), np.asarray(gene_sums, np.float64),
                        float(total), float(theta), float(clip), out)
    return out


@pearson_residuals.register(types.CupyCSRMatrix)
def _(x, cell_sums, gene_sums, total, theta, clip, out_dtype):
    import cupy as cp

    x = canonical(x)
    out = cp.empty(x.shape, out_dtype)
    cuda.launch(_kernel("pearson_csr", x.dtype, x.indices.dtype, out_dtype), _warp_grid(x.shape[0]),
                32 * WARPS_PER_BLOCK,
                (x.data, x.indices, x.indptr, np.int64(x.shape[0]), np.int64(x.shape[1]),
                 cp.asarray(cell_sums, np.float64), cp.asarray(gene_sums, np.float64),
                 np.float64(total), np.float64(theta), np.float64(clip), out))
    return out


@pearson_residuals.register(types.CupyArray)
def _(x, cell_sums, gene_sums, total, theta, clip, out_dtype):
    import cupy as cp

    x = cp.ascontiguousarray(x)
    out = cp.empty(x.shape, out_dtype)
    cuda.launch(_kernel("pearson_dense", x.dtype, out_dtype), _flat_grid(x.size), THREADS,
                (x, np.int64(x.shape[0]), np.int64(x.shape[1]), cp.asarray(cell_sums, np.float64),
                 cp.asarray(gene_sums, np.float64), np.float64(total), np.float64(theta),
                 np.float64(clip), out))
    return out


# --- numba twins ---------------------------------------------------------------------


@numba.njit(cache=True, inline="always")
def _clamp(v, lo, hi):
    if v > hi:
        return hi
    if v < lo:
        return lo
    return v


@numba.njit(parallel=prange_only(), cache=True)
def _scale_dense_host(x, mean, std, centre, lo, hi):
    n_rows, n_cols = x.shape
    for r in numba.prange(n_rows):
        for c in range(n_cols):
            v = np.float64(x[r, c])
            if centre:
                v -= mean[c]
            x[r, c] = _clamp(v / std[c], lo, hi)


@numba.njit(parallel=prange_only(), cache=True)
def _scale_sparse_host(data, indices, indptr, by_line, row_mask, std, hi):
    masked = row_mask.size > 0
    for i in numba.prange(indptr.size - 1):
        if masked and not row_mask[i]:
            continue
        for j in range(indptr[i], indptr[i + 1]):
            g = np.int64(i) if by_line else np.int64(indices[j])
            v = np.float64(data[j]) / std[g]
            data[j] = hi if v > hi else v


@numba.njit(parallel=prange_only(), cache=True)
def _scale_csr_to_dense_host(data, indices, indptr, mean, std, lo, hi, out):
    n_rows, n_cols = out.shape
    for r in numba.prange(n_rows):
        for c in range(n_cols):
            out[r, c] = _clamp(-mean[c] / std[c], lo, hi)
        for j in range(indptr[r], indptr[r + 1]):
            c = indices[j]
            out[r, c] = _clamp((np.float64(data[j]) - mean[c]) / std[c], lo, hi)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _pearson(v, mu, theta, clip):
    return _clamp((v - mu) / np.sqrt(mu + mu * mu / theta), -clip, clip)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _pearson_csr_host(data, indices, indptr, cell_sums, gene_sums, total, theta, clip, out):
    n_rows, n_cols = out.shape
    for r in numba.prange(n_rows):
        for c in range(n_cols):
            out[r, c] = _pearson(0.0, cell_sums[r] * gene_sums[c] / total, theta, clip)
        for j in range(indptr[r], indptr[r + 1]):
            c = indices[j]
            out[r, c] = _pearson(np.float64(data[j]), cell_sums[r] * gene_sums[c] / total, theta, clip)


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _pearson_dense_host(x, cell_sums, gene_sums, total, theta, clip, out):
    n_rows, n_cols = out.shape
    for r in numba.prange(n_rows):
        for c in range(n_cols):
            out[r, c] = _pearson(np.float64(x[r, c]), cell_sums[r] * gene_sums[c] / total, theta, clip)
