"""``kernels/qc.cu`` and its numba twin: per-cell QC statistics in one pass over the rows; the
per-gene columns come from the moments family."""

from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numba
import numpy as np
from fast_array_utils import types

from .._core import cuda
from .._core.arrays import canonical
from . import prange_only
from .moments import COUNT_NONZERO, gene_moments

QC_VARS_PER_PASS = 4  # kernels/qc.cu's QC_VARS_PER_PASS
BLOCK = 256
NAME_EXPRESSIONS = (
    *(cuda.template_name("qc_csr", v, i) for v in (np.float32, np.float64) for i in (np.int32, np.int64)),
    *(cuda.template_name("qc_dense", v) for v in (np.float32, np.float64)),
)
# Rows run in chunks of this count: a fixed number, not the thread count.
N_CHUNKS = 32


@dataclass
class QCStats:
    """Host arrays; ``row_top[:, m]`` is the sum of each cell's ``ns[m]`` largest values."""

    row_total: np.ndarray  # float64 (n_obs,)
    row_nnz: np.ndarray  # int64 (n_obs,)
    row_qc: np.ndarray  # float64 (n_obs, n_qc)
    row_top: np.ndarray  # float64 (n_obs, len(ns))
    col_total: np.ndarray  # float64 (n_vars,)
    col_nnz: np.ndarray  # int64 (n_vars,)
    nonfinite: bool
    negative: bool


@singledispatch
def qc_stats(x, qc_masks: np.ndarray, ns: np.ndarray, *, per_gene: bool = True) -> QCStats:
    """QC statistics of a cells × genes matrix.

    ``qc_masks`` is a boolean (n_vars, n_qc) array, ``ns`` the sorted ``percent_top``
    positions (each in 1..n_vars). Non-zero counts skip explicitly stored zeros. NaN, inf
    and negative values are reported in the flags, not raised, so the caller decides.
    The per-cell statistics come from one pass over the rows (``kernels/qc.cu``, one block per
    cell, or its numba twin); the per-gene sums and counts from a second pass,
    :func:`gpusc._kernels.moments.gene_moments` (rows in slices, fixed order: deterministic, no
    atomics). ``per_gene=False`` skips that second pass (the per-gene arrays are left zero).
    """
    raise TypeError(f"qc_stats: unsupported array type {type(x)}")


@qc_stats.register(types.csc_matrix | types.csc_array | types.CupyCSCMatrix)
def _(x, qc_masks, ns, *, per_gene=True):
    # Per-cell top-n needs each cell's values together: one CSR copy (2x nnz peak).
    return qc_stats(x.tocsr(), qc_masks, ns, per_gene=per_gene)


@qc_stats.register(types.csr_matrix | types.csr_array)
def _(x, qc_masks, ns, *, per_gene=True):
    x = canonical(x)
    rows = _qc_host(x.data, x.indices, x.indptr, *x.shape, _as_uint8(qc_masks), _ns(ns))
    return _stats(x, *rows, per_gene=per_gene)


@qc_stats.register(np.ndarray)
def _(x, qc_masks, ns, *, per_gene=True):
    flat = np.ascontiguousarray(x).reshape(-1)
    all_cols, no_indptr = np.arange(x.shape[1], dtype=np.int64), np.empty(0, np.int64)
    rows = _qc_host(flat, all_cols, no_indptr, *x.shape, _as_uint8(qc_masks), _ns(ns))
    return _stats(x, *rows, per_gene=per_gene)


@qc_stats.register(types.CupyArray | types.CupyCSRMatrix)
def _(x, qc_masks, ns, *, per_gene=True):
    import cupy as cp

    if isinstance(x, types.CupyArray):
        x = cp.ascontiguousarray(x if x.dtype.kind == "f" else x.astype(np.float32))
        rows = qc_rows_device(x, None, None, x.shape, qc_masks, ns)
    else:
        x = canonical(x)
        rows = qc_rows_device(x.data, x.indices, x.indptr, x.shape, qc_masks, ns)
    return _stats(x, *rows, per_gene=per_gene)


@qc_stats.register(types.DaskArray)
def _(x, qc_masks, ns, *, per_gene=True):
    # One dask computation: every row chunk's QCStats (per-cell vectors and per-gene sums,
    # small), joined on the host; the matrix itself is never gathered.
    from .._core.dask import block_partials, compute

    def chunk_stats(block):
        return qc_stats(block, qc_masks, ns, per_gene=per_gene)

    parts = compute(*block_partials(x, "qc_stats", chunk_stats))
    n_vars = x.shape[1]
    return QCStats(
        row_total=np.concatenate([p.row_total for p in parts]),
        row_nnz=np.concatenate([p.row_nnz for p in parts]),
        row_qc=np.concatenate([p.row_qc for p in parts]),
        row_top=np.concatenate([p.row_top for p in parts]),
        col_total=sum((p.col_total for p in parts), np.zeros(n_vars)),  # chunk order: deterministic
        col_nnz=sum((p.col_nnz for p in parts), np.zeros(n_vars, np.int64)),
        nonfinite=any(p.nonfinite for p in parts),
        negative=any(p.negative for p in parts),
    )


def qc_rows_device(data, indices, indptr, shape, qc_masks, ns):
    """The per-cell pass on the device over a canonical CSR (``data``, ``indices``,
    ``indptr``) or, with ``indices`` None, the C-ordered dense float matrix ``data``: one block
    per cell. Returns host arrays (row_total, row_nnz, row_qc, row_top, flags)."""
    import cupy as cp

    n_rows, n_cols = shape
    ns = _ns(ns)
    n_qc = qc_masks.shape[1]
    if indices is None:
        name = cuda.template_name("qc_dense", data.dtype)
        matrix_args = (data, np.int64(n_rows), np.int64(n_cols))
    else:
        name = cuda.template_name("qc_csr", data.dtype, indices.dtype)
        matrix_args = (data, indices, indptr, np.int64(n_rows))
    kernel = cuda.get_kernel("qc", NAME_EXPRESSIONS, name)

    top_n = int(ns[-1]) if ns.size else 0
    cap = 1 << max(top_n - 1, 0).bit_length() if top_n else 0
    shared = -(-cap * data.dtype.itemsize // 16) * 16 + 1024 + 64  # top values, then TopState
    if shared > 48 * 1024:  # above the default: opt in (Hopper allows up to 227 KiB)
        kernel.max_dynamic_shared_size_bytes = shared

    row_total = cp.empty(n_rows, np.float64)
    row_nnz = cp.empty(n_rows, np.int64)
    n_passes = -(-n_qc // QC_VARS_PER_PASS)
    row_qc = cp.zeros((max(n_passes, 1), n_rows, QC_VARS_PER_PASS), np.float64)
    row_top = cp.zeros((n_rows, max(ns.size, 1)), np.float64)
    flags = cp.zeros(1, np.int32)
    ns_dev = cp.asarray(ns.astype(np.int32))
    bits = _qc_bits(qc_masks)
    null = np.uintp(0)
    for g in range(max(n_passes, 1)):
        first = g == 0  # the first launch does everything; later ones only more qc_vars
        pass_n_qc = min(QC_VARS_PER_PASS, n_qc - g * QC_VARS_PER_PASS)
        cuda.launch(kernel, n_rows, BLOCK, (
            *matrix_args,
            cp.asarray((bits >> np.uint32(QC_VARS_PER_PASS * g)) & np.uint32(0xF)),
            np.int32(max(pass_n_qc, 0)), ns_dev, np.int32(ns.size if first else 0),
            np.int32(top_n), np.int32(cap),
            row_total if first else null, row_nnz if first else null, row_qc[g], row_top, flags,
        ), shared_mem=shared if first else 0)
    flag = int(flags.get()[0])  # synchronize!
    # explicit width: numpy cannot infer -1 for an empty chunk (0 rows)
    row_qc = row_qc.get().transpose(1, 0, 2).reshape(n_rows, row_qc.shape[0] * QC_VARS_PER_PASS)[:, :n_qc]
    return row_total.get(), row_nnz.get(), row_qc, row_top.get()[:, : ns.size], flag


def _ns(ns) -> np.ndarray:
    return np.sort(np.asarray(ns, dtype=np.int64))


def _as_uint8(masks) -> np.ndarray:
    return np.ascontiguousarray(masks, dtype=np.uint8)


def _qc_bits(masks: np.ndarray) -> np.ndarray:
    """One uint32 per gene, bit q set when the gene is in qc_var q (at most 32)."""
    n_qc = masks.shape[1]
    if n_qc > 32:
        raise ValueError(f"qc_vars: at most 32 on the GPU, got {n_qc}")
    weights = (np.uint32(1) << np.arange(n_qc, dtype=np.uint32)).astype(np.uint32)
    return (masks.astype(np.uint32) * weights).sum(axis=1, dtype=np.uint32)


def _stats(x, row_total, row_nnz, row_qc, row_top, flags, *, per_gene: bool) -> QCStats:
    """QCStats from the per-cell pass, with the per-gene sums and non-zero counts of the
    moments family (a second pass over the rows of ``x``) when ``per_gene``."""
    n_cols = x.shape[1]
    if per_gene:
        genes = gene_moments(x, squares=False, count=COUNT_NONZERO)
        col_total, col_nnz = genes.sum[0], genes.count[0]
    else:
        col_total, col_nnz = np.zeros(n_cols), np.zeros(n_cols, np.int64)
    return QCStats(row_total, row_nnz, row_qc, row_top, col_total, col_nnz,
                   nonfinite=bool(flags & 1), negative=bool(flags & 2))


@numba.njit(cache=True)
def _select_largest(buf, n, k):
    """Reorder buf[:n] so that buf[:k] holds its k largest values (in no order):
    quickselect with Hoare partitioning, which stays linear with many ties (counts)."""
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        a, b, c = buf[lo], buf[mid], buf[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:
            while buf[i] > pivot:
                i += 1
            while buf[j] < pivot:
                j -= 1
            if i <= j:
                buf[i], buf[j] = buf[j], buf[i]
                i += 1
                j -= 1
        # now buf[lo:j+1] >= pivot >= buf[i:hi+1]
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            return


@numba.njit(cache=True)
def _top_sums(values, ns, out, buf):
    """out[m] = sum of the ns[m] largest of `values` (missing entries count as zero).

    Nested selections, largest n first, each inside the previous one's winners:
    linear in the row's length, no sort. `buf` is scratch of at least values.size.
    """
    n = values.size
    for j in range(n):
        buf[j] = values[j]
    stop = n
    for m in range(ns.size - 1, -1, -1):
        k = ns[m]
        if k < stop:
            _select_largest(buf, stop, k)
            stop = k
        acc = 0.0
        for j in range(stop):
            acc += buf[j]
        out[m] = acc


@numba.njit(cache=True)
def _qc_row(values, cols, i, qc_masks, ns, row_total, row_nnz, row_qc, row_top, buf):
    """Statistics of cell i (its values and their gene indices); returns its flag bits."""
    total, nnz, bad = 0.0, 0, 0
    for j in range(values.size):
        v, col = values[j], cols[j]
        bad |= (0 if np.isfinite(v) else 1) | (2 if v < 0 else 0)
        total += v
        nnz += v != 0
        for q in range(qc_masks.shape[1]):
            if qc_masks[col, q]:
                row_qc[i, q] += v
    row_total[i], row_nnz[i] = total, nnz
    if ns.size:
        _top_sums(values, ns, row_top[i], buf)
    return bad


@numba.njit(parallel=prange_only(), cache=True)
def _qc_host(data, indices, indptr, n_rows, n_cols, qc_masks, ns):
    # CSR when indptr is given; C-ordered dense (data = x.ravel(), indices = all columns)
    # when indptr is empty. Chunks of rows run in parallel.
    dense = indptr.size == 0
    n_chunks = max(1, min(N_CHUNKS, n_rows))
    row_total = np.zeros(n_rows)
    row_nnz = np.zeros(n_rows, np.int64)
    row_qc = np.zeros((n_rows, qc_masks.shape[1]))
    row_top = np.zeros((n_rows, ns.size))
    flags = np.zeros(n_chunks, np.int64)
    for c in numba.prange(n_chunks):
        bad = 0
        buf = np.empty(n_cols, np.float64)  # scratch for the top-n selection
        for i in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
            if dense:
                values, cols = data[i * n_cols:(i + 1) * n_cols], indices
            else:
                values, cols = data[indptr[i]:indptr[i + 1]], indices[indptr[i]:indptr[i + 1]]
            bad |= _qc_row(values, cols, i, qc_masks, ns, row_total, row_nnz, row_qc, row_top, buf)
        flags[c] = bad
    flag = 0
    for f in flags:
        flag |= f
    return row_total, row_nnz, row_qc, row_top, flag
