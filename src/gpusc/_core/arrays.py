"""Where an array lives and what kind it is.

The placeholder types of :mod:`fast_array_utils.types` stand in for CuPy and Dask
classes when those are not installed, so ``singledispatch`` registrations on them
import on any machine.
"""

from __future__ import annotations

from functools import singledispatch
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
@placement.register(types.CupyCSMatrix)
def _(x) -> Placement:
    return "device"


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
