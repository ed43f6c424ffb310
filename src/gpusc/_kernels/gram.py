"""``kernels/gram.cu`` and its numba twins: the Gram matrix XᵀX and the column sums of X.

One function, :func:`gram`, for every supported matrix, everything accumulated in float64
and deterministic (partial results summed in an order fixed by the shape):

- host CSR: a numba kernel over the stored values only (gene blocks in parallel);
- device CSR: :class:`DenseRows` turns row blocks into dense float64 blocks on the device
  (kernels/gram.cu) and cuBLAS multiplies them (DGEMM, which runs on the FP64 tensor cores
  of sm_80+): at the ~10% density of log-normalised HVG data the dense FLOPs cost less than
  the scattered accesses of a sparse kernel (by estimate: not yet measured on a GPU);
- dense: BLAS/cuBLAS on float64 row chunks; CSC: through one CSR copy.
"""

from __future__ import annotations

from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical, placement, xp_of
from . import prange_only

BLOCK = 256  # threads per block of csr_rows_to_dense (one warp per row)
NAME_EXPRESSIONS = tuple(
    cuda.template_name("csr_rows_to_dense", v, i)
    for v in (np.float32, np.float64) for i in (np.int32, np.int64)
)
# Host: genes in blocks of GRAM_BLOCK_HOST (a 256² float64 tile is 512 KiB, about one L2;
# 128 and 384 were slower at 50k × 2000), rows in chunks of ROW_CHUNK for the block starts.
GRAM_BLOCK_HOST = 256
ROW_CHUNK = 8192
# Dense input and DenseRows: rows converted to float64 at a time (bytes of one chunk).
DENSE_CHUNK_BYTES = 64 << 20


@singledispatch
def gram(x) -> tuple:
    """``(XᵀX, column sums)`` of a cells × genes matrix, both float64, where ``x`` lives.

    XᵀX is returned whole (symmetric, n_vars × n_vars). Peak extra memory: the n_vars²
    float64 result, plus a CSR copy for CSC (or non-canonical) input, plus one float64 row
    chunk of at most ``DENSE_CHUNK_BYTES`` for dense and device sparse input; never a
    dense copy of a sparse X. Work: the host CSR kernel does one multiply-add per pair of
    stored values in a row (Σ nnz_row² / 2); the device does the FLOPs of a dense
    n_obs × n_vars Gram on cuBLAS.
    """
    raise TypeError(f"gram: unsupported array type {type(x)}")


@gram.register(types.csc_matrix | types.csc_array | types.CupyCSCMatrix)
def _(x):
    return gram(x.tocsr())


@gram.register(types.csr_matrix | types.csr_array)
def _(x):
    x = canonical(x)  # the kernel needs sorted, unique indices in each row
    n_rows, n_cols = x.shape
    upper, sums = _gram_csr_host(x.data, x.indices, x.indptr, n_rows, n_cols, GRAM_BLOCK_HOST)
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


@gram.register(types.CupyCSRMatrix)
def _(x):
    return gram(DenseRows(x))


class DenseRows:
    """A CSR matrix read as dense float64 blocks of rows, keeping only ``columns``.

    ``rows[a:b]`` (a step-1 slice is the only index supported) is a new C-ordered
    ``(b - a) × len(columns)`` float64 array where the matrix lives: a CUDA kernel fills it
    on the device (kernels/gram.cu's csr_rows_to_dense), a numba twin on the host. pca
    reads device CSR input this way so that every product is a dense cuBLAS one, and a
    gene mask costs an index map instead of a column-selected copy of the matrix (int32 and
    int64 indices alike). Duplicate entries are summed first (one copy), as everywhere in gpusc.
    """

    def __init__(self, x, columns: np.ndarray | None = None):
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float64)  # the kernel's value types; exact for counts
        self.x = canonical(x)
        self.xp = xp_of(x)
        n_vars = x.shape[1]
        columns = np.arange(n_vars) if columns is None else np.asarray(columns)
        col_map = np.full(n_vars, -1, np.int32)  # output column of each gene, -1: left out
        col_map[columns] = np.arange(columns.size, dtype=np.int32)
        self.col_map = self.xp.asarray(col_map)
        self.shape = (x.shape[0], int(columns.size))
        self.dtype = np.dtype(np.float64)

    def all_finite(self) -> bool:
        """No NaN/inf among the stored values of the kept columns (others are never read)."""
        x = self.x
        bad = ~self.xp.isfinite(x.data)
        return not bool((self.col_map[x.indices[bad]] >= 0).any())  # synchronize!

    def __getitem__(self, rows: slice):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("DenseRows takes a slice of rows with step 1")
        start, stop, _ = rows.indices(self.shape[0])
        n = max(stop - start, 0)
        out = self.xp.zeros((n, self.shape[1]), np.float64)
        x = self.x
        if self.xp is np:
            _csr_rows_to_dense_host(x.data, x.indices, x.indptr, start, n, self.col_map, out)
        elif n:
            kernel = cuda.get_kernel("gram", NAME_EXPRESSIONS,
                                     cuda.template_name("csr_rows_to_dense", x.dtype, x.indices.dtype))
            cuda.launch(kernel, -(-n * 32 // BLOCK), BLOCK, (
                x.data, x.indices, x.indptr, np.int64(start), np.int64(n), self.col_map,
                np.int64(self.shape[1]), out,
            ))
        return out


@placement.register(DenseRows)
def _(x) -> str:
    return placement(x.x)


@gram.register(types.CupyArray)
@gram.register(DenseRows)
def _(x):
    xp = xp_of(x)
    n_rows, n_cols = x.shape
    out = xp.zeros((n_cols, n_cols), np.float64)
    sums = xp.zeros(n_cols, np.float64)
    for start, stop in _row_chunks(n_rows, n_cols):
        chunk = x[start:stop].astype(np.float64, copy=False)
        out += chunk.T @ chunk  # cuBLAS (BLAS) DGEMM: a fixed order for a fixed shape
        sums += chunk.sum(axis=0)
    return out, sums


@numba.njit(parallel=True, cache=True)
def _csr_rows_to_dense_host(data, indices, indptr, start, n_rows, col_map, out):
    for r in numba.prange(n_rows):
        for j in range(indptr[start + r], indptr[start + r + 1]):
            c = col_map[indices[j]]
            if c >= 0:
                out[r, c] = data[j]


def _symmetric(upper, xp):
    if xp is np:
        _mirror_upper_host(upper)  # in place: 2.5 ms at 2000² where triu + triu.T took 100
        return upper
    return xp.triu(upper) + xp.triu(upper, 1).T


@numba.njit(parallel=prange_only(), cache=True)
def _mirror_upper_host(a):
    # a[j, i] = a[i, j] below the diagonal, in 64 × 64 blocks so that the strided side stays in cache
    n = a.shape[0]
    nb = (n + 63) // 64
    for bi in numba.prange(nb):
        for bj in range(bi, nb):
            for i in range(bi * 64, min(bi * 64 + 64, n)):
                for j in range(max(bj * 64, i + 1), min(bj * 64 + 64, n)):
                    a[j, i] = a[i, j]


def _row_chunks(n_rows: int, n_cols: int):
    step = max(1, DENSE_CHUNK_BYTES // (8 * max(n_cols, 1)))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


@numba.njit(inline="always")
def _cross(data, indices, sa, ea, sb, eb, upper, same):
    """upper[c_j, c_k] += v_j v_k for stored j in [sa, ea) and k in [sb, eb) of one row
    (``same``: the two ranges are one, and only k > j counts). Four j at a time, so that
    each loaded (c_k, v_k) serves four scattered updates."""
    j = sa
    while j + 3 < ea:
        v0, v1 = np.float64(data[j]), np.float64(data[j + 1])
        v2, v3 = np.float64(data[j + 2]), np.float64(data[j + 3])
        r0, r1 = upper[indices[j]], upper[indices[j + 1]]
        r2, r3 = upper[indices[j + 2]], upper[indices[j + 3]]
        if same:  # the triangle among the four themselves
            c1, c2, c3 = indices[j + 1], indices[j + 2], indices[j + 3]
            r0[c1] += v0 * v1
            r0[c2] += v0 * v2
            r0[c3] += v0 * v3
            r1[c2] += v1 * v2
            r1[c3] += v1 * v3
            r2[c3] += v2 * v3
        for k in range(j + 4 if same else sb, eb):
            vk = np.float64(data[k])
            ck = indices[k]
            r0[ck] += v0 * vk
            r1[ck] += v1 * vk
            r2[ck] += v2 * vk
            r3[ck] += v3 * vk
        j += 4
    while j < ea:
        v0 = np.float64(data[j])
        r0 = upper[indices[j]]
        for k in range(j + 1 if same else sb, eb):
            r0[indices[k]] += v0 * np.float64(data[k])
        j += 1


@numba.njit(parallel=True, cache=True)
def _gram_csr_host(data, indices, indptr, n_rows, n_cols, block):
    # Canonical CSR (sorted, unique indices per row). The genes are cut into blocks; each
    # (block a <= block b) pair owns the tile upper[a, b] and runs in parallel with the
    # others, so a tile's scattered updates stay in cache and no partial Grams are needed.
    # Every entry adds its rows in row order whatever the thread count or block size:
    # the result is deterministic. Per chunk of rows, ``starts[r, g]`` is where block g
    # begins in row r.
    n_blocks = (n_cols + block - 1) // block
    n_pairs = n_blocks * (n_blocks + 1) // 2
    pair_a = np.empty(n_pairs, np.int64)
    pair_b = np.empty(n_pairs, np.int64)
    p = 0
    for a in range(n_blocks):
        for b in range(a, n_blocks):
            pair_a[p], pair_b[p] = a, b
            p += 1
    upper = np.zeros((n_cols, n_cols))
    sums = np.zeros(n_cols)
    starts = np.empty((min(ROW_CHUNK, n_rows), n_blocks + 1), np.int64)
    for r0 in range(0, n_rows, ROW_CHUNK):
        r1 = min(r0 + ROW_CHUNK, n_rows)
        for r in numba.prange(r0, r1):
            pos, end = indptr[r], indptr[r + 1]
            for g in range(n_blocks + 1):
                while pos < end and indices[pos] < g * block:
                    pos += 1
                starts[r - r0, g] = pos
        for q in numba.prange(n_pairs):
            a, b = pair_a[q], pair_b[q]
            for r in range(r0, r1):
                sa, ea = starts[r - r0, a], starts[r - r0, a + 1]
                if a == b:
                    for j in range(sa, ea):
                        v = np.float64(data[j])
                        sums[indices[j]] += v
                        upper[indices[j], indices[j]] += v * v
                _cross(data, indices, sa, ea, starts[r - r0, b], starts[r - r0, b + 1], upper,
                       a == b)
    return upper, sums


# ---------------------------------------------------------------- products with X
# X·V and Xᵀ·U in float64 for pca's matrix-free solvers (Lanczos, subspace iteration),
# where X lives. Host CSR: numba kernels over the stored values on all cores (scipy's
# sparse products run on one thread); dense, DenseRows and device input: float64 row
# chunks of at most DENSE_CHUNK_BYTES on BLAS/cuBLAS (cuSPARSE for device CSR).
RMATMAT_PART_BYTES = 64 << 20  # per-part partial sums of the host CSR Xᵀ·U, all parts together
RMATMAT_MAX_PARTS = 8  # fixed by the shape, not the thread count: the same sums run to run


@singledispatch
def matmat(x, v):
    """X·V (n_obs × b float64, where ``x`` lives) for V n_vars × b float64."""
    xp = xp_of(v)
    out = xp.empty((x.shape[0], v.shape[1]), np.float64)
    for start, stop in _row_chunks(*x.shape):
        out[start:stop] = _as_float64(x[start:stop]) @ v
    return out


@singledispatch
def rmatmat(x, u):
    """Xᵀ·U (n_vars × b float64, where ``x`` lives) for U n_obs × b float64; row chunks
    summed in order."""
    xp = xp_of(u)
    out = xp.zeros((x.shape[1], u.shape[1]), np.float64)
    for start, stop in _row_chunks(*x.shape):
        out += _as_float64(x[start:stop]).T @ u[start:stop]
    return out


def _as_float64(chunk):
    return chunk if chunk.dtype == np.float64 else chunk.astype(np.float64)


@matmat.register(types.csr_matrix | types.csr_array)
def _(x, v):
    out = np.zeros((x.shape[0], v.shape[1]))
    _csr_matmat_host(x.data, x.indices, x.indptr, np.ascontiguousarray(v, dtype=np.float64), out)
    return out


@rmatmat.register(types.csr_matrix | types.csr_array)
def _(x, u):
    n_rows, n_cols = x.shape
    width = u.shape[1]
    n_parts = int(max(1, min(RMATMAT_MAX_PARTS, n_rows // 1024,
                             RMATMAT_PART_BYTES // (8 * max(n_cols * width, 1)))))
    out = np.zeros((n_cols, width))
    _csr_rmatmat_host(x.data, x.indices, x.indptr, np.ascontiguousarray(u, dtype=np.float64),
                      n_parts, out)
    return out


@matmat.register(types.csc_matrix | types.csc_array)
def _(x, v):
    return matmat(x.tocsr(), v)


@rmatmat.register(types.csc_matrix | types.csc_array)
def _(x, u):
    return rmatmat(x.tocsr(), u)


@numba.njit(parallel=True, cache=True)
def _csr_matmat_host(data, indices, indptr, v, out):
    # one row per iteration: each row's sum is its own, in stored order
    width = v.shape[1]
    for r in numba.prange(out.shape[0]):
        start, stop = indptr[r], indptr[r + 1]
        if width == 1:  # Lanczos' matrix-vector product: a scalar sum
            acc = 0.0
            for j in range(start, stop):
                acc += np.float64(data[j]) * v[indices[j], 0]
            out[r, 0] = acc
            continue
        for j in range(start, stop):
            value = np.float64(data[j])
            col = indices[j]
            for c in range(width):
                out[r, c] += value * v[col, c]


@numba.njit(parallel=True, cache=True)
def _csr_rmatmat_host(data, indices, indptr, u, n_parts, out):
    # rows cut into n_parts contiguous parts, each summed into its own partial in parallel;
    # the partials are then added in part order, gene by gene
    n_rows = indptr.size - 1
    n_cols, width = out.shape
    partial = np.zeros((n_parts, n_cols, width))
    for p in numba.prange(n_parts):
        for r in range(p * n_rows // n_parts, (p + 1) * n_rows // n_parts):
            start, stop = indptr[r], indptr[r + 1]
            if width == 1:
                ur = u[r, 0]
                for j in range(start, stop):
                    partial[p, indices[j], 0] += np.float64(data[j]) * ur
                continue
            for j in range(start, stop):
                value = np.float64(data[j])
                col = indices[j]
                for c in range(width):
                    partial[p, col, c] += value * u[r, c]
    for g in numba.prange(n_cols):
        for p in range(n_parts):
            for c in range(width):
                out[g, c] += partial[p, g, c]
