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


def block_partials(x, func: str, per_block) -> list:
    """One lazy ``per_block(chunk)`` per row chunk of ``x`` (dask.delayed objects).

    The step hands every partial of all its reductions to one ``dask.compute`` call and
    combines them on the host: per-cell vectors by concatenation, per-gene sums by adding.
    Each chunk is checked against the array's chunk kind as it is computed.
    """
    import dask

    kind = check_row_chunks(x, func)

    def checked(block):
        return per_block(check_block(block, kind, func))

    return [dask.delayed(checked)(block) for block in x.to_delayed().ravel()]


def map_rows(x, func: str, per_block, *, dtype=None, meta=None):
    """``per_block`` applied lazily to every row chunk, as a new dask array of the same
    chunks (an element-wise or row-wise step that needs no statistic of the whole matrix)."""
    kind = check_row_chunks(x, func)

    def checked(block):
        return per_block(check_block(block, kind, func))

    return x.map_blocks(checked, dtype=x.dtype if dtype is None else dtype,
                        meta=x._meta if meta is None else meta)


def compute(*lazy):
    """All lazy partials of one step in a single pass over the data."""
    import dask

    return dask.compute(*lazy)
