"""Where an array lives and what kind it is.

The placeholder types of :mod:`fast_array_utils.types` stand in for CuPy and Dask
classes when those are not installed, so ``singledispatch`` registrations on them
import on any machine.
"""

from __future__ import annotations

from functools import cache, singledispatch
from typing import Literal

import numpy as np
from fast_array_utils import types

HostSparse = types.CSBase
HostArray = np.ndarray | types.CSBase
DeviceDense = types.CupyArray
DeviceSparse = types.CupyCSMatrix
DeviceArray = types.CupyArray | types.CupyCSMatrix

# The one table that docs and tests read: array types each pp function accepts.
SUPPORTED_ARRAY_TYPES = (
    "numpy.ndarray",
    "scipy.sparse.csr_matrix",
    "scipy.sparse.csr_array",
    "scipy.sparse.csc_matrix",
    "scipy.sparse.csc_array",
    "cupy.ndarray",
    "cupyx.scipy.sparse.csr_matrix",
    "cupyx.scipy.sparse.csc_matrix",
)

Placement = Literal["host", "device"]

# Index policy on the device: int32 wherever it fits (cupyx's fast paths, half the index
# bytes), int64 only past 2**31 - 1 stored values or rows/columns. cupyx handles int64
# index buffers from CuPy 14.1 on; CuPy 13 reads them as int32 (wrong results), so it is
# refused for them.
INT32_MAX = int(np.iinfo(np.int32).max)
CUPY_INT64_SPARSE = (14, 1)


@singledispatch
def placement(x) -> Placement:
    """``"host"`` or ``"device"``; a TypeError naming the supported types otherwise."""
    raise TypeError(
        f"gpusc does not support arrays of type {type(x).__module__}.{type(x).__qualname__}; "
        f"use one of: {', '.join(SUPPORTED_ARRAY_TYPES)}"
    )


@placement.register(np.ndarray)
@placement.register(types.CSBase)
def _(x) -> Placement:
    return "host"


@placement.register(types.CupyArray)
def _(x) -> Placement:
    return "device"


@placement.register(types.CupyCSMatrix)
def _(x) -> Placement:
    if x.indices.dtype.itemsize > 4 or x.indptr.dtype.itemsize > 4:
        _check_cupy_int64_sparse()
    return "device"


def index_dtype_for(nnz: int, shape: tuple[int, ...]) -> np.dtype:
    """The index dtype a compressed matrix needs: int32 unless its stored values or a
    dimension pass 2**31 - 1."""
    return np.dtype(np.int32 if max(int(nnz), *(int(s) for s in shape)) <= INT32_MAX else np.int64)


@cache
def _cupy_version() -> tuple[int, int]:
    import cupy

    major, minor = (int("".join(c for c in part if c.isdigit()) or 0)
                    for part in cupy.__version__.split(".")[:2])
    return major, minor


def _check_cupy_int64_sparse() -> None:
    if _cupy_version() < CUPY_INT64_SPARSE:
        raise RuntimeError(
            f"this device sparse matrix has int64 indices, which CuPy "
            f"{'.'.join(map(str, _cupy_version()))} reads as int32 (wrong results); install "
            "CuPy >= 14.1 (pip install 'gpusc[cu13]' or 'gpusc[cu12]'), or keep int32 indices "
            "(gpusc.get.X_to_GPU does when the matrix has fewer than 2**31 stored values)")


def is_sparse(x) -> bool:
    return isinstance(x, types.CSBase | types.CupyCSMatrix)


def is_csr(x) -> bool:
    return isinstance(x, types.csr_matrix | types.csr_array | types.CupyCSRMatrix)


def is_csc(x) -> bool:
    return isinstance(x, types.csc_matrix | types.csc_array | types.CupyCSCMatrix)


def xp_of(x):
    """numpy for host arrays, cupy for device arrays."""
    if placement(x) == "device":
        import cupy

        return cupy
    return np


def to_host(a):
    """A small device result (a per-cell or per-gene vector) as a numpy array."""
    if isinstance(a, types.CupyArray):
        return a.get()  # synchronize!
    return np.asarray(a)


def canonical(x):
    """A CSR/CSC matrix (host or device) holding each index once per row/column: x itself,
    or a copy with duplicate entries summed. Kernels that count or stage stored entries
    need this; the flag is computed once by scipy/cupyx and cached."""
    if x.has_canonical_format:
        return x
    x = x.copy()
    x.sum_duplicates()
    return x


def float_dtype(dtype) -> np.dtype:
    """The floating dtype scanpy computes in for `dtype` (float32 for integers)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.kind == "f" else np.dtype(np.float32)
