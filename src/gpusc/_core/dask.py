"""Dask arrays: what gpusc accepts and how a step checks it before touching the AnnData.

A dask X is chunked by rows (cells): every chunk holds all genes, and every chunk is the
same kind of array (numpy, scipy CSR, cupy or cupyx CSR). dask itself is optional: this
module imports it only inside functions, and ``is_dask`` works without it (fast-array-utils'
placeholder type).
"""

from __future__ import annotations

import numpy as np
from fast_array_utils import types

# chunk kinds a dask X may hold, by the type of its meta (dask's empty stand-in chunk)
_CHUNK_KINDS = (
    (np.ndarray, "host dense"),
    (types.csr_matrix | types.csr_array, "host csr"),
    (types.CupyArray, "device dense"),
    (types.CupyCSRMatrix, "device csr"),
)
SUPPORTED_CHUNK_TYPES = ("numpy.ndarray", "scipy.sparse CSR (matrix or array)", "cupy.ndarray",
                         "cupyx.scipy.sparse.csr_matrix")


def is_dask(x) -> bool:
    return isinstance(x, types.DaskArray)


def chunk_kind(chunk) -> str | None:
    """``"host dense"``, ``"host csr"``, ``"device dense"`` or ``"device csr"``; None for others."""
    for cls, kind in _CHUNK_KINDS:
        if isinstance(chunk, cls):
            return kind
    return None


def check_row_chunks(x, func: str) -> str:
    """The chunk kind of a 2-d dask array split by rows only; a clear error otherwise.

    Called before a step changes anything. The meta tells the chunks' type without computing
    them; blocks are checked again as they are computed (``check_block``), since a dask array
    may hold chunks of another type than its meta says.
    """
    if x.ndim != 2:
        raise ValueError(f"{func}: expected a 2-d dask array, got {x.ndim} dimensions")
    if len(x.chunks[1]) != 1:
        raise ValueError(
            f"{func}: the dask array is split along genes (column chunks {x.chunks[1]}); gpusc needs "
            f"every chunk to hold all genes: rechunk with x.rechunk({{1: -1}})")
    meta = x._meta
    if isinstance(meta, types.csc_matrix | types.csc_array | types.CupyCSCMatrix):
        raise TypeError(f"{func}: the dask array's chunks are CSC; gpusc needs CSR (or dense) chunks "
                        "for row-wise processing: x.map_blocks(lambda b: b.tocsr())")
    kind = chunk_kind(meta)
    if kind is None:
        raise TypeError(f"{func}: dask chunks of type {type(meta).__module__}.{type(meta).__qualname__} "
                        f"are not supported; use one of: {', '.join(SUPPORTED_CHUNK_TYPES)}")
    return kind


def check_block(block, kind: str, func: str):
    """``block`` itself if it is of chunk kind ``kind``; a TypeError naming both otherwise."""
    found = chunk_kind(block)
    if found != kind:
        raise TypeError(f"{func}: the dask array's chunks are not all one type: its meta is {kind} "
                        f"but a chunk is {type(block).__module__}.{type(block).__qualname__}")
    return block


def block_partials(x, func: str, per_block, *per_row) -> list:
    """One lazy ``per_block(chunk, *rows)`` per row chunk of ``x`` (dask.delayed objects).

    The step hands every partial of all its reductions to one ``dask.compute`` call and
    combines them on the host: per-cell vectors by concatenation, per-gene sums by adding.
    Each chunk is checked against the array's chunk kind as it is computed. ``per_row``:
    host arrays over cells (batch codes, masks, regressors), each passed sliced to the
    chunk's rows (a task carries its own rows only).
    """
    import dask

    kind = check_row_chunks(x, func)

    def checked(block, *rows):
        return per_block(check_block(block, kind, func), *rows)

    bounds = np.cumsum((0, *x.chunks[0]))
    return [dask.delayed(checked)(block, *(a[lo:hi] for a in per_row))
            for block, lo, hi in zip(x.to_delayed().ravel(), bounds[:-1], bounds[1:])]


def map_rows(x, func: str, per_block, *per_row, dtype=None, meta=None):
    """``per_block(chunk, *rows)`` applied lazily to every row chunk, as a new dask array of
    the same chunks (an element-wise or row-wise step that needs no statistic of the whole
    matrix). ``per_row``: host arrays over cells (1-d or 2-d), each passed sliced to the
    chunk's rows."""
    import dask.array as da

    kind = check_row_chunks(x, func)

    def checked(block, *rows):
        return per_block(check_block(block, kind, func), *rows)

    dtype = x.dtype if dtype is None else dtype
    meta = x._meta if meta is None else meta
    if not per_row:
        return x.map_blocks(checked, dtype=dtype, meta=meta)
    # the per-row arrays as dask arrays of x's row chunks; their other axes (one chunk each)
    # are named apart from x's genes, so blockwise pairs chunk i with rows i and nothing more
    args = [x, ("i", "j")]
    for n, a in enumerate(per_row):
        a = np.asarray(a)
        rows = da.from_array(a, chunks=(x.chunks[0], *a.shape[1:]))
        args += [rows, ("i", *(f"k{n}_{d}" for d in range(a.ndim - 1)))]
    return da.blockwise(checked, ("i", "j"), *args, dtype=dtype, meta=meta, concatenate=True)


def compute(*lazy):
    """All lazy partials of one step in a single pass over the data."""
    import dask

    return dask.compute(*lazy)


def fresh_values(block, dtype=None):
    """A new chunk for a step to change in place: ``block``'s values copied (cast to ``dtype``
    when given). A CSR chunk shares its index arrays with ``block``, as dask's own slicing
    shares buffers between chunks: no step changes a chunk's structure in place, and copying
    only the values halves the bytes a lazy element-wise step allocates."""
    dtype = block.dtype if dtype is None else dtype
    if chunk_kind(block) in ("host dense", "device dense"):
        return block.astype(dtype, order="C", copy=True)
    out = type(block)(block.shape, dtype=dtype)  # built empty: constructors may recast indices
    out.data = block.data.astype(dtype, copy=True)
    out.indices, out.indptr = block.indices, block.indptr
    return out


# rows per chunk when a backed AnnData's on-disk matrix is read chunk by chunk (scanpy's
# log1p(chunked=True) reads 6000 rows at a time by default)
BACKED_CHUNK_ROWS = 6000


def backed_rows(x, func: str, chunk_rows: int = BACKED_CHUNK_ROWS):
    """A backed AnnData's on-disk matrix (an h5py/zarr dataset or anndata's CSR dataset) as
    a dask array of ``chunk_rows`` rows per chunk (``anndata.experimental.read_elem_lazy``):
    each chunk is read from the file when computed, so the file must stay open until then."""
    from anndata.experimental import read_elem_lazy

    element = getattr(x, "group", x)  # anndata's sparse dataset: its group holds the encoding
    if getattr(x, "format", "csr") != "csr":
        raise TypeError(f"{func}: the backed matrix is stored as {x.format.upper()}; reading it by rows "
                        "needs CSR (or dense) on disk")
    return read_elem_lazy(element, chunks=(chunk_rows, x.shape[1]))
