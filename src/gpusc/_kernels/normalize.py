"""``kernels/normalize.cu`` and its numba twin: per-cell sums, the highly-expressed gene
mask, row scaling, log1p. Functions change ``x`` in place only where the name says so."""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from . import prange_only

WARPS_PER_BLOCK = 8
_V, _I = (np.float32, np.float64), (np.int32, np.int64)
NAME_EXPRESSIONS = (
    *(cuda.template_name(k, v, i) for k in ("row_sums_csr", "flag_high_genes_csr") for v in _V for i in _I),
    *(cuda.template_name("scale_rows_csr", v, i) for v in _V for i in _I),
    *(cuda.template_name(k, v) for k in ("row_sums_dense", "flag_high_genes_dense", "scale_rows_dense",
                                         "log1p_values") for v in _V),
)


def _csr_or_dense_args(x):
    """Kernel name suffix, template types and leading arguments for a device CSR or dense x."""
    if isinstance(x, types.CupyCSRMatrix):
        return "csr", (x.dtype, x.indices.dtype), (x.data, x.indices, x.indptr, np.int64(x.shape[0]))
    return "dense", (x.dtype,), (x, np.int64(x.shape[0]), np.int64(x.shape[1]))


def _launch_rows(kernel: str, x, *args) -> None:
    kind, dtypes, leading = _csr_or_dense_args(x)
    k = cuda.get_kernel("normalize", NAME_EXPRESSIONS, cuda.template_name(f"{kernel}_{kind}", *dtypes))
    rows_per_block = WARPS_PER_BLOCK  # one warp per row
    cuda.launch(k, -(-x.shape[0] // rows_per_block), 32 * WARPS_PER_BLOCK, (*leading, *args))


# --- row_sums: float64 (n_obs,) sums, genes with excluded[g] != 0 left out; and whether a
# NaN or inf was seen (checked in the same pass).


@singledispatch
def row_sums(x, excluded: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    raise TypeError(f"row_sums: unsupported array type {type(x)}")


@row_sums.register(types.csr_matrix | types.csr_array)
def _(x, excluded=None):
    return _row_sums_host(x.data, x.indices, x.indptr, *x.shape, _mask(excluded))


@row_sums.register(np.ndarray)
def _(x, excluded=None):
    return _row_sums_host(*_dense_as_rows(x), *x.shape, _mask(excluded))


@row_sums.register(types.CupyArray | types.CupyCSRMatrix)
def _(x, excluded=None):
    import cupy as cp

    sums = cp.empty(x.shape[0], np.float64)
    flags = cp.zeros(1, np.int32)
    mask = np.uintp(0) if excluded is None else cp.asarray(excluded, dtype=np.uint8)
    _launch_rows("row_sums", x, mask, sums, flags)
    return sums, bool(flags.get()[0])  # synchronize!


# --- high_genes: uint8 (n_vars,) mask of genes above max_fraction of some cell's total.


@singledispatch
def high_genes(x, sums, max_fraction: float):
    raise TypeError(f"high_genes: unsupported array type {type(x)}")


@high_genes.register(types.csr_matrix | types.csr_array)
def _(x, sums, max_fraction):
    return _high_genes_host(x.data, x.indices, x.indptr, *x.shape, sums, max_fraction)


@high_genes.register(np.ndarray)
def _(x, sums, max_fraction):
    return _high_genes_host(*_dense_as_rows(x), *x.shape, sums, max_fraction)


@high_genes.register(types.CupyArray | types.CupyCSRMatrix)
def _(x, sums, max_fraction):
    import cupy as cp

    excluded = cp.zeros(x.shape[1], np.uint8)
    _launch_rows("flag_high_genes", x, cp.asarray(sums, np.float64), np.float64(max_fraction), excluded)
    return excluded


# --- scale_rows_inplace: x[i, :] /= divisor[i].


@singledispatch
def scale_rows_inplace(x, divisor) -> None:
    raise TypeError(f"scale_rows_inplace: unsupported array type {type(x)}")


@scale_rows_inplace.register(types.csr_matrix | types.csr_array)
def _(x, divisor):
    _scale_rows_host(x.data, x.indptr, x.shape[1], np.asarray(divisor, np.float64))


@scale_rows_inplace.register(np.ndarray)
def _(x, divisor):
    divisor = np.asarray(divisor, np.float64)
    if not x.flags.c_contiguous:
        np.divide(x, divisor[:, None], out=x, casting="unsafe")
        return
    data, _, indptr = _dense_as_rows(x)
    _scale_rows_host(data, indptr, x.shape[1], divisor)


@scale_rows_inplace.register(types.CupyArray | types.CupyCSRMatrix)
def _(x, divisor):
    import cupy as cp

    kind, dtypes, leading = _csr_or_dense_args(x)
    if kind == "csr":  # the scaling kernel needs no column indices
        leading = (x.data, x.indptr, leading[-1])
    k = cuda.get_kernel("normalize", NAME_EXPRESSIONS, cuda.template_name(f"scale_rows_{kind}", *dtypes))
    cuda.launch(k, -(-x.shape[0] // WARPS_PER_BLOCK), 32 * WARPS_PER_BLOCK,
                (*leading, cp.asarray(divisor, np.float64)))


# --- log1p_inplace: values = log1p(values) / ln(base) on a flat, contiguous value array.


@singledispatch
def log1p_inplace(values, base: float | None = None) -> None:
    raise TypeError(f"log1p_inplace: unsupported array type {type(values)}")


@log1p_inplace.register(np.ndarray)
def _(values, base=None):
    # numpy's vectorised log1p beats a numba loop here (SIMD), so it is the CPU twin
    np.log1p(values, out=values)
    if base is not None:
        values /= values.dtype.type(np.log(base))


@log1p_inplace.register(types.CupyArray)
def _(values, base=None):
    k = cuda.get_kernel("normalize", NAME_EXPRESSIONS, cuda.template_name("log1p_values", values.dtype))
    n = values.size
    cuda.launch(k, min(-(-n // 256), 65536), 256,
                (values.reshape(-1), np.int64(n), np.float64(1.0 if base is None else 1.0 / np.log(base))))


# --- numba twins ---------------------------------------------------------------------


def _mask(excluded):
    return np.zeros(0, np.uint8) if excluded is None else np.asarray(excluded, np.uint8)


def _dense_as_rows(x: np.ndarray):
    """A C-ordered dense matrix seen as CSR rows: flat values, all columns, row offsets."""
    n_rows, n_cols = x.shape
    x = x if x.flags.c_contiguous else np.ascontiguousarray(x)  # a copy: read-only uses only
    indptr = np.arange(0, (n_rows + 1) * n_cols, n_cols, dtype=np.int64)
    return x.reshape(-1), np.empty(0, np.int64), indptr


@numba.njit(parallel=prange_only(), cache=True)
def _row_sums_host(data, indices, indptr, n_rows, n_cols, excluded):
    sums = np.zeros(n_rows)
    bad = np.zeros(n_rows, np.bool_)
    dense = indices.size == 0
    for i in numba.prange(n_rows):  # a one-line body: numba's parallel passes compile it fast
        sums[i], bad[i] = _row_sum(data, indices, indptr[i], indptr[i + 1], dense, excluded)
    return sums, bool(bad.any())


@numba.njit(cache=True)
def _row_sum(data, indices, lo, hi, dense, excluded):
    """:func:`_row_sums_host` for the row stored in data[lo:hi]: its sum without the excluded
    genes, and whether it holds NaN or inf."""
    s, nonfinite = 0.0, False
    if excluded.size == 0:  # the common case: a branch-free loop the compiler vectorises
        for j in range(lo, hi):
            s += data[j]
        nonfinite = not np.isfinite(s)  # NaN and inf survive a sum of finite-or-not values
    else:
        for j in range(lo, hi):
            v = data[j]
            nonfinite |= not np.isfinite(v)
            if not excluded[j - lo if dense else indices[j]]:
                s += v
    return s, nonfinite


@numba.njit(parallel=prange_only(), cache=True)
def _high_genes_host(data, indices, indptr, n_rows, n_cols, sums, max_fraction):
    n_chunks = max(1, min(32, n_rows))
    seen = np.zeros((n_chunks, n_cols), np.uint8)
    dense = indices.size == 0
    for c in numba.prange(n_chunks):
        for i in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
            limit = max_fraction * sums[i]
            for j in range(indptr[i], indptr[i + 1]):
                if data[j] > limit:
                    seen[c, j - indptr[i] if dense else indices[j]] = 1
    out = np.zeros(n_cols, np.uint8)
    for c in range(n_chunks):
        out |= seen[c]
    return out


@numba.njit(parallel=prange_only(), cache=True)
def _scale_rows_host(data, indptr, n_cols, divisor):
    for i in numba.prange(indptr.size - 1):
        inverse = 1.0 / divisor[i]  # one division per row; the product in float64 rounds as x / d
        for j in range(indptr[i], indptr[i + 1]):
            data[j] = data[j] * inverse
