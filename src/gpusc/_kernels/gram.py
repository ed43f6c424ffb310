"""``kernels/gram.cu`` and its numba twin: the Gram matrix XᵀX and the column sums of X.

One function, :func:`gram`, for every supported matrix: CSR through the CUDA kernel on the
device and the numba twin on the host, CSC through one CSR copy, dense through BLAS
(cuBLAS on the device) on float64 row chunks. Everything accumulates in float64 and is
deterministic: partial results are summed in a fixed order that depends on the shape only.
"""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical

GRAM_TILE = 64  # kernels/gram.cu's GRAM_TILE
GRAM_ROWS = 32  # kernels/gram.cu's GRAM_ROWS
GRAM_THREADS = 256  # kernels/gram.cu's GRAM_THREADS
NAME_EXPRESSIONS = tuple(
    cuda.template_name("gram_csr", v, i) for v in (np.float32, np.float64) for i in (np.int32, np.int64)
)
# Device: enough blocks (output tiles × row slices) to fill a large GPU, and at most this
# many bytes of partial Grams (one n_vars² float64 Gram per row slice).
TARGET_BLOCKS = 1024
MAX_SLICES = 64
DEVICE_PARTIAL_BYTES = 1 << 30
# Host: row chunks summed in parallel, each into its own partial Gram; the chunk count is
# fixed by the shape (never the thread count), so the summation order and the result are too.
N_CHUNKS = 8
HOST_PARTIAL_BYTES = 512 << 20
# Dense input: rows converted to float64 at a time (bytes of one chunk).
DENSE_CHUNK_BYTES = 64 << 20


@singledispatch
def gram(x) -> tuple:
    """``(XᵀX, column sums)`` of a cells × genes matrix, both float64, where ``x`` lives.

    XᵀX is returned whole (symmetric, n_vars × n_vars); the kernels compute its upper
    triangle. Peak extra memory: the n_vars² float64 result (times the partial Grams'
    count: at most ``DEVICE_PARTIAL_BYTES`` / ``HOST_PARTIAL_BYTES``), plus a CSR copy for
    CSC input, plus one float64 row chunk for dense input; never a dense copy of sparse X.
    Work of the CUDA kernel: each output tile's block reads the indices of every non-zero
    of its rows (about (n_vars / 64)² / 2 passes over the indices) and multiplies dense
    64-column panels, the FLOPs of a dense n_obs × n_vars Gram in float64.
    """
    raise TypeError(f"gram: unsupported array type {type(x)}")


@gram.register(types.csc_matrix | types.csc_array | types.CupyCSCMatrix)
def _(x):
    return gram(x.tocsr())


@gram.register(types.csr_matrix | types.csr_array)
def _(x):
    n_rows, n_cols = x.shape
    n_chunks = _n_chunks(n_rows, n_cols)
    upper, sums = _gram_csr_host(x.data, x.indices, x.indptr, n_rows, n_cols, n_chunks)
    return _symmetric(upper, np), sums


@gram.register(np.ndarray)
def _(x):
    from scipy.linalg.blas import dsyrk

    n_rows, n_cols = x.shape
    upper = np.zeros((n_cols, n_cols), order="F")
    sums = np.zeros(n_cols)
    for start, stop in _row_chunks(n_rows, n_cols):
        chunk = np.asarray(x[start:stop], dtype=np.float64)
        # chunk is C-ordered rows × genes, i.e. Fortran genes × rows: C += chunkᵀ chunk
        upper = dsyrk(1.0, chunk.T, beta=1.0, c=upper, trans=0, lower=0, overwrite_c=True)
        sums += chunk.sum(axis=0)
    return _symmetric(upper, np), sums


@gram.register(types.CupyArray)
def _(x):
    import cupy as cp

    n_rows, n_cols = x.shape
    out = cp.zeros((n_cols, n_cols), np.float64)
    sums = cp.zeros(n_cols, np.float64)
    for start, stop in _row_chunks(n_rows, n_cols):
        chunk = x[start:stop].astype(np.float64)
        out += chunk.T @ chunk  # cuBLAS DGEMM: a fixed order for a fixed shape
        sums += chunk.sum(axis=0)
    return out, sums


@gram.register(types.CupyCSRMatrix)
def _(x):
    import cupy as cp

    # duplicate entries would add up in shared memory in racing order: summed first
    x = canonical(x)
    n_rows, n_cols = x.shape
    n_tiles = -(-n_cols // GRAM_TILE)
    tile_a, tile_b = np.triu_indices(n_tiles)
    n_pairs = tile_a.size
    n_slices = max(1, min(MAX_SLICES, -(-TARGET_BLOCKS // n_pairs), -(-n_rows // GRAM_ROWS),
                          DEVICE_PARTIAL_BYTES // (8 * n_cols * n_cols)))
    partial_gram = cp.zeros((n_slices, n_cols, n_cols), np.float64)
    partial_sums = cp.zeros((n_slices, n_cols), np.float64)
    kernel = cuda.get_kernel("gram", NAME_EXPRESSIONS,
                             cuda.template_name("gram_csr", x.dtype, x.indices.dtype))
    kernel((n_pairs, n_slices), (GRAM_THREADS,), (
        x.data, x.indices, x.indptr, np.int64(n_rows), np.int64(n_cols),
        cp.asarray(tile_a, np.int32), cp.asarray(tile_b, np.int32), np.int32(n_slices),
        partial_gram, partial_sums,
    ))
    # a fixed-order reduction over the slices (no atomics), then the lower triangle
    upper = partial_gram[0] if n_slices == 1 else partial_gram.sum(axis=0)
    return _symmetric(upper, cp), partial_sums.sum(axis=0)


def _symmetric(upper, xp):
    return xp.triu(upper) + xp.triu(upper, 1).T


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, DENSE_CHUNK_BYTES // (8 * max(n_cols, 1)))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _n_chunks(n_rows: int, n_cols: int) -> int:
    return max(1, min(N_CHUNKS, n_rows, HOST_PARTIAL_BYTES // (8 * n_cols * n_cols)))


@numba.njit(cache=True)
def _gram_rows(data, indices, indptr, start, stop, upper, sums):
    """Add rows start..stop of a CSR matrix into ``upper`` (XᵀX at [min, max]) and ``sums``."""
    for i in range(start, stop):
        b, e = indptr[i], indptr[i + 1]
        for j in range(b, e):
            vj = np.float64(data[j])
            cj = indices[j]
            sums[cj] += vj
            upper[cj, cj] += vj * vj
            for k in range(j + 1, e):
                ck = indices[k]
                v = vj * np.float64(data[k])
                if ck == cj:  # a duplicate entry: its cross term counts twice on the diagonal
                    upper[cj, cj] += 2.0 * v
                elif ck > cj:
                    upper[cj, ck] += v
                else:
                    upper[ck, cj] += v


@numba.njit(parallel=True, cache=True)
def _gram_csr_host(data, indices, indptr, n_rows, n_cols, n_chunks):
    # Row chunks run in parallel, each into its own partial Gram; the partials are then
    # summed in chunk order (parallel over output rows), so the result never depends on
    # the thread count.
    partial = np.zeros((n_chunks, n_cols, n_cols))
    partial_sums = np.zeros((n_chunks, n_cols))
    for c in numba.prange(n_chunks):
        _gram_rows(data, indices, indptr, c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks,
                   partial[c], partial_sums[c])
    upper = np.zeros((n_cols, n_cols))
    for a in numba.prange(n_cols):
        for c in range(n_chunks):
            for b in range(a, n_cols):
                upper[a, b] += partial[c, a, b]
    sums = np.zeros(n_cols)
    for c in range(n_chunks):
        sums += partial_sums[c]
    return upper, sums
