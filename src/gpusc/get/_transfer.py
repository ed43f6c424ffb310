"""Moving count matrices between host (NumPy/SciPy) and device (CuPy/cupyx).

Everything here imports without CuPy; CuPy is imported inside the functions that
touch the device. Sparse matrices are moved as their three buffers
(``data``, ``indices``, ``indptr``) and reassembled around those very buffers, so
values arrive bit for bit and index dtypes as chosen (int32 on the device wherever it
fits; :mod:`gpusc._core.arrays` has the policy): neither SciPy's nor cupyx's
``(data, indices, indptr)`` constructor can be trusted with that (see
:func:`_assemble_device_sparse`).
"""

from __future__ import annotations

from copy import deepcopy
from functools import singledispatch
from typing import TYPE_CHECKING

import numpy as np
from fast_array_utils import types
from scipy import sparse

from .._core.arrays import index_dtype_for, is_csr

if TYPE_CHECKING:
    from anndata import AnnData

# What X_to_GPU / X_to_CPU / anndata_to_* accept (the device ones are what they return).
HOST_TYPES = (
    "numpy.ndarray",
    "scipy.sparse.csr_matrix",
    "scipy.sparse.csr_array",
    "scipy.sparse.csc_matrix",
    "scipy.sparse.csc_array",
)
DEVICE_TYPES = ("cupy.ndarray", "cupyx.scipy.sparse.csr_matrix", "cupyx.scipy.sparse.csc_matrix")
_SUPPORTED = ", ".join(HOST_TYPES + DEVICE_TYPES)

# dtype kinds a matrix may have: bool, signed/unsigned integer, float, complex.
_NUMERIC_KINDS = "biufc"
# cupyx.scipy.sparse stores only these data dtypes (bool, float32/64, complex64/128).
_CUPYX_SPARSE_DTYPE_CHARS = "?fdFD"

_INSTALL_HINT = "install the GPU extra: pip install 'gpusc[cu13]' (CUDA 13) or 'gpusc[cu12]' (CUDA 12)"


def _type_name(x) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _import_cupy():
    try:
        import cupy
        import cupyx.scipy.sparse
    except ImportError as e:
        msg = f"moving arrays to the GPU needs cupy, which could not be imported ({e}); {_INSTALL_HINT}"
        raise ImportError(msg) from e
    return cupy, cupyx.scipy.sparse


# ---------------------------------------------------------------------------
# validation: run on every array before anything is moved


@singledispatch
def _check_movable(x, where: str) -> None:
    """Raise TypeError unless `x` is a matrix type and dtype these functions move."""
    msg = f"{where} is a {_type_name(x)}, which gpusc cannot move between host and device; supported types: {_SUPPORTED}"
    raise TypeError(msg)


@_check_movable.register(types.DaskArray)
def _(x, where: str) -> None:
    # moved chunk by chunk: the chunks (whose type the meta tells) must be movable
    _check_movable(x._meta, f"the chunks of {where} (a dask array)")


@_check_movable.register(np.ndarray)
def _(x, where: str) -> None:
    if x.dtype.kind not in _NUMERIC_KINDS:
        msg = f"{where} has dtype {x.dtype}; only bool, integer, float and complex matrices can be moved"
        raise TypeError(msg)


@_check_movable.register(types.CSBase)
def _(x, where: str) -> None:
    if x.data.dtype.kind not in _NUMERIC_KINDS:
        msg = f"{where} has dtype {x.data.dtype}; only bool, integer, float and complex matrices can be moved"
        raise TypeError(msg)
    if x.indices.dtype.kind not in "iu" or x.indptr.dtype.kind not in "iu":
        msg = f"{where} has non-integer index arrays ({x.indices.dtype}, {x.indptr.dtype})"
        raise TypeError(msg)


@_check_movable.register(types.CupyArray)
@_check_movable.register(types.CupyCSMatrix)
def _(x, where: str) -> None:
    return None


# ---------------------------------------------------------------------------
# host -> device


def _index_arrays(x) -> tuple[np.ndarray, np.ndarray]:
    """indices and indptr of a compressed matrix as they go to the device: int32 wherever
    the matrix fits it (the index policy of gpusc._core.arrays), else one common dtype.

    SciPy keeps the two in one dtype; if a caller assigned them separately, both go to
    the wider one (values unchanged), because every kernel takes a single index type.
    """
    indices, indptr = x.indices, x.indptr
    if index_dtype_for(x.nnz, x.shape) == np.int32:
        return indices.astype(np.int32, copy=False), indptr.astype(np.int32, copy=False)
    if indices.dtype != indptr.dtype:
        common = np.promote_types(indices.dtype, indptr.dtype)
        indices, indptr = indices.astype(common), indptr.astype(common)
    return indices, indptr


def _forget_cached_flags(m) -> None:
    # Sorted/canonical flags are computed lazily and cached as private attributes by
    # SciPy and cupyx; the placeholder we built from a shape may have cached them for
    # its empty buffers, so drop them and let the library recompute on first use.
    for flag in ("_has_sorted_indices", "_has_canonical_format"):
        m.__dict__.pop(flag, None)


def _assemble_device_sparse(fmt: str, data, indices, indptr, shape):
    """A cupyx csr/csc matrix around exactly these device buffers (no cast, no copy).

    cupyx's ``(data, indices, indptr)`` constructor changes index dtypes: CuPy 13
    casts them to int32 unconditionally (int64 values past 2**31 wrap around), and
    CuPy 14 downcasts int64 to int32 whenever the values fit. Either way it copies.
    So we build an empty matrix of the right shape and data dtype (its placeholder
    buffers are ``major + 1`` integers) and put our buffers in.
    """
    _, cpsparse = _import_cupy()
    cls = cpsparse.csr_matrix if fmt == "csr" else cpsparse.csc_matrix
    m = cls(tuple(int(s) for s in shape), dtype=data.dtype)
    m.data = data
    m.indices = indices
    m.indptr = indptr
    _forget_cached_flags(m)
    return m


def _assemble_host_sparse(fmt: str, data, indices, indptr, shape):
    """A SciPy csr/csc *matrix* around exactly these host buffers.

    SciPy's ``(data, indices, indptr)`` constructor downcasts int64 indices to int32
    when the values fit (``check_contents=True``), so we fill an empty matrix instead.
    """
    cls = sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix
    m = cls(tuple(int(s) for s in shape), dtype=data.dtype)
    m.data = data
    m.indices = indices
    m.indptr = indptr
    _forget_cached_flags(m)
    return m


def _device_oom(nbytes: int, err: BaseException) -> MemoryError:
    try:
        import cupy

        free, total = cupy.cuda.runtime.memGetInfo()
        where = f" ({free:,} of {total:,} bytes free on the device)"
    except Exception:  # the device may be in a bad state after an OOM; the hint still helps
        where = ""
    msg = (
        f"out of device memory while moving {nbytes:,} bytes to the GPU{where}: {err}. "
        "Free other device arrays, use managed memory (gpusc.memory.configure('managed')), "
        "or process the matrix in chunks with dask."
    )
    return MemoryError(msg)


@singledispatch
def _to_device(x):
    _check_movable(x, "X")  # raises for every type not registered below
    raise AssertionError("unreachable")  # pragma: no cover


@_to_device.register(np.ndarray)
def _(x: np.ndarray):
    cupy, _ = _import_cupy()
    try:
        return cupy.asarray(x)
    except MemoryError as e:
        raise _device_oom(x.nbytes, e) from e


@_to_device.register(types.CSBase)
def _(x):
    cupy, _ = _import_cupy()
    data = x.data
    if data.dtype.char not in _CUPYX_SPARSE_DTYPE_CHARS:
        # cupyx sparse has no integer (or float16) data: cast on the host so the
        # device never holds both copies.
        data = data.astype(np.float32)
    indices, indptr = _index_arrays(x)
    nbytes = data.nbytes + indices.nbytes + indptr.nbytes
    try:
        d_data, d_indices, d_indptr = cupy.asarray(data), cupy.asarray(indices), cupy.asarray(indptr)
    except MemoryError as e:
        raise _device_oom(nbytes, e) from e
    return _assemble_device_sparse("csr" if is_csr(x) else "csc", d_data, d_indices, d_indptr, x.shape)


@_to_device.register(types.CupyArray)
@_to_device.register(types.CupyCSMatrix)
def _(x):
    return x


def _move_chunks(x, move):
    """A dask array moved lazily, chunk by chunk (``move`` maps each chunk); ``x`` itself
    when its chunks are already where ``move`` takes them."""
    meta = move(x._meta)
    if meta is x._meta:
        return x
    return x.map_blocks(move, dtype=meta.dtype, meta=meta)


@_to_device.register(types.DaskArray)
def _(x):
    return _move_chunks(x, _to_device)  # moving the meta imports cupy: an ImportError now


# ---------------------------------------------------------------------------
# device -> host


@singledispatch
def _to_host(x):
    _check_movable(x, "X")
    raise AssertionError("unreachable")  # pragma: no cover


@_to_host.register(np.ndarray)
@_to_host.register(types.CSBase)
def _(x):
    return x


@_to_host.register(types.CupyArray)
def _(x):
    return x.get()  # synchronize!


@_to_host.register(types.DaskArray)
def _(x):
    return _move_chunks(x, _to_host)


@_to_host.register(types.CupyCSMatrix)
def _(x):
    # cupyx's own .get() goes through SciPy's constructor, which downcasts int64 indices.
    data, indices, indptr = x.data.get(), x.indices.get(), x.indptr.get()  # synchronize!
    return _assemble_host_sparse(x.format, data, indices, indptr, x.shape)


# ---------------------------------------------------------------------------
# public array functions


def X_to_GPU(X):  # noqa: N802 (scanpy/rapids-singlecell naming)
    """Move a count matrix to the GPU.

    Parameters
    ----------
    X
        A :class:`numpy.ndarray`, or a SciPy CSR or CSC matrix or array
        (``csr_matrix``, ``csr_array``, ``csc_matrix``, ``csc_array``). A matrix that is
        already on the device (``cupy.ndarray``, ``cupyx.scipy.sparse.csr_matrix`` or
        ``csc_matrix``) is returned as it is. A dask array of any of these is moved
        lazily, chunk by chunk: the result is a dask array with the same chunks whose
        chunks are moved as below when computed (nothing is computed at the call; a
        dask array whose chunks are on the device already is returned as it is).

    Returns
    -------
    cupy.ndarray or cupyx.scipy.sparse.csr_matrix or cupyx.scipy.sparse.csc_matrix
        ``numpy.ndarray`` becomes ``cupy.ndarray`` with the same dtype (integer stays
        integer) and values; CSR becomes ``cupyx.scipy.sparse.csr_matrix`` and CSC
        becomes ``cupyx.scipy.sparse.csc_matrix``. Sparse ``indices`` and ``indptr``
        become int32 wherever that holds them (fewer than 2**31 stored values, rows and
        columns; int64 otherwise): cupyx's int32 paths are the fast ones and the indices
        take half the memory. Their order is kept: unsorted indices or duplicates are
        moved as they are.
        cupyx sparse matrices hold only bool, float32, float64, complex64 and
        complex128 data, so sparse integer (and float16) data become **float32**;
        integer counts up to 2**24 stay exact.

    Raises
    ------
    TypeError
        For any other type (COO, lists, pandas objects, dask arrays of such chunks, ...)
        or a non-numeric dtype; the message names the type and the supported ones.
    ImportError
        When CuPy is not installed.
    MemoryError
        When the device cannot hold the matrix; the message gives the size.

    Notes
    -----
    Peak device memory: the size of the moved arrays (``X.nbytes`` for dense;
    ``data + indices + indptr`` for sparse, with data counted as float32 when it
    was integer, cast on the host first). Nothing is densified.
    """
    _check_movable(X, "X")
    return _to_device(X)


def X_to_CPU(X):  # noqa: N802
    """Move a count matrix from the GPU back to the host.

    Parameters
    ----------
    X
        A ``cupy.ndarray``, ``cupyx.scipy.sparse.csr_matrix`` or ``csc_matrix``. A host
        matrix (NumPy array, SciPy CSR/CSC matrix or array) is returned as it is. A dask
        array of any of these is moved lazily, chunk by chunk, as in :func:`X_to_GPU`.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix or scipy.sparse.csc_matrix
        Same dtype and values, bit for bit; sparse results are SciPy *matrix* classes
        with the same ``indices``/``indptr`` dtypes (int64 stays int64 even when the
        values would fit in int32).

    Raises
    ------
    TypeError
        For any other type; the message names the type and the supported ones.

    Notes
    -----
    Host memory: the size of the moved arrays; nothing is densified. The device copy
    is freed once nothing references it any more.
    """
    _check_movable(X, "X")
    return _to_host(X)


# ---------------------------------------------------------------------------
# AnnData


def _copy_array(x):
    # Arrays a copy=True call does not move still must not be shared with the input.
    return x.copy()


def _layer_names(adata: AnnData) -> list[str]:
    # anndata 0.13 keeps X in adata.layers under the key None; that is not a layer.
    return [k for k in adata.layers.keys() if k is not None]


def _move_anndata(adata: AnnData, layer: str | None, *, convert_all: bool, copy: bool, move, target: str):
    if adata.isbacked:
        msg = f"adata is backed by {adata.filename}; load it first with adata = adata.to_memory()"
        raise TypeError(msg)
    if layer is not None and convert_all:
        msg = "pass either layer= (move one layer) or convert_all=True (move X and every layer), not both"
        raise ValueError(msg)
    layer_names = _layer_names(adata)
    if layer is not None and layer not in layer_names:
        msg = f"layer={layer!r} is not in adata.layers; layers there: {layer_names}"
        raise KeyError(msg)

    # Keys of the arrays to move: None stands for X.
    if convert_all:
        keys = ([None] if adata.X is not None else []) + layer_names
    elif layer is not None:
        keys = [layer]
    else:
        if adata.X is None:
            msg = f"adata.X is None; nothing to move to the {target} (pass layer= to move a layer)"
            raise ValueError(msg)
        keys = [None]

    # Fetch each array once: on a view, every adata.X access builds a new view object.
    originals = {key: adata.X if key is None else adata.layers[key] for key in keys}

    # Check every array before moving any, then move them all before writing any:
    # an error or an out-of-memory leaves the AnnData exactly as it was.
    for key, value in originals.items():
        _check_movable(value, "adata.X" if key is None else f"adata.layers[{key!r}]")
    moved = {key: move(value) for key, value in originals.items()}
    # Arrays already where they had to go come back as the same object.
    changed = {key: value for key, value in moved.items() if value is not originals[key]}

    if not copy:
        for key, value in changed.items():
            if key is None:
                adata.X = value
            else:
                adata.layers[key] = value
        return None

    import anndata as ad

    def fresh(key):
        if key in changed:
            return changed[key]
        # Not moved, or already in place: copy so the result shares nothing with adata.
        if key in originals:
            return _copy_array(originals[key])
        return _copy_array(adata.X if key is None else adata.layers[key])

    return ad.AnnData(
        X=fresh(None) if adata.X is not None else None,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=deepcopy(dict(adata.uns)),
        obsm={k: _copy_array(v) for k, v in adata.obsm.items()},
        varm={k: _copy_array(v) for k, v in adata.varm.items()},
        obsp={k: _copy_array(v) for k, v in adata.obsp.items()},
        varp={k: _copy_array(v) for k, v in adata.varp.items()},
        layers={k: fresh(k) for k in layer_names},
        raw=adata.raw.copy() if adata.raw is not None else None,
    )


_ANNDATA_PARAMS = """\
    Parameters
    ----------
    adata
        The annotated data matrix. A view is made actual by anndata when written to
        in place (``copy=False``), as in scanpy.
    layer
        Move ``adata.layers[layer]`` instead of ``adata.X``.
    convert_all
        Move ``adata.X`` (when not None) and every layer. Cannot be combined with
        ``layer``.
    copy
        Return a new AnnData and leave ``adata`` untouched. Its obs, var, obsm, varm,
        obsp, varp, uns and raw are copies on the host; X and layers that are not
        moved are copies where they already were."""


def anndata_to_GPU(  # noqa: N802
    adata: AnnData, layer: str | None = None, *, convert_all: bool = False, copy: bool = False
) -> AnnData | None:
    return _move_anndata(adata, layer, convert_all=convert_all, copy=copy, move=_to_device, target="GPU")


def anndata_to_CPU(  # noqa: N802
    adata: AnnData, layer: str | None = None, *, convert_all: bool = False, copy: bool = False
) -> AnnData | None:
    return _move_anndata(adata, layer, convert_all=convert_all, copy=copy, move=_to_host, target="CPU")


anndata_to_GPU.__doc__ = f"""Move ``adata.X`` (or a layer, or all of them) to the GPU.

Each matrix is moved as :func:`X_to_GPU` moves it: dense stays dense with its dtype,
CSR/CSC become cupyx ``csr_matrix``/``csc_matrix`` with int32 indices wherever they fit
(int64 past 2**31 stored values), and integer sparse data become float32. A dask matrix
stays lazy: its chunks move when computed. obs, var, obsm, varm, obsp,
varp, uns and raw stay on the host, where scanpy's plotting reads them.

{_ANNDATA_PARAMS}

    Returns
    -------
    AnnData or None
        With ``copy=True`` a new AnnData whose moved matrices are on the device;
        otherwise ``None``, and ``adata.X`` / ``adata.layers[...]`` are replaced in place.

    Raises
    ------
    KeyError
        ``layer`` is not in ``adata.layers`` (the message lists the layers there).
    TypeError
        A matrix to move has an unsupported type or dtype, or ``adata`` is backed.
    ValueError
        ``layer`` together with ``convert_all``, or ``adata.X`` is None and no layer given.
    MemoryError
        The device cannot hold the matrices.

    All checks run before anything is moved, and every matrix is moved before any is
    written back, so on an error ``adata`` is left as it was.

    Notes
    -----
    Peak device memory: the size of the moved matrices (for sparse, data + indices +
    indptr; integer data counted as float32). Nothing is densified. With ``copy=True``
    a matrix already on the device is copied there too.
"""

anndata_to_CPU.__doc__ = f"""Move ``adata.X`` (or a layer, or all of them) back to the host.

Each matrix is moved as :func:`X_to_CPU` moves it: cupy arrays become NumPy arrays,
cupyx CSR/CSC become SciPy ``csr_matrix``/``csc_matrix`` with the same values and
index dtypes, bit for bit. Host matrices are left as they are. A dask matrix stays lazy:
its chunks move when computed.

{_ANNDATA_PARAMS}

    Returns
    -------
    AnnData or None
        With ``copy=True`` a new AnnData whose moved matrices are on the host;
        otherwise ``None``, and ``adata.X`` / ``adata.layers[...]`` are replaced in place.

    Raises
    ------
    KeyError
        ``layer`` is not in ``adata.layers`` (the message lists the layers there).
    TypeError
        A matrix to move has an unsupported type, or ``adata`` is backed.
    ValueError
        ``layer`` together with ``convert_all``, or ``adata.X`` is None and no layer given.

    All checks run before anything is moved, and every matrix is moved before any is
    written back, so on an error ``adata`` is left as it was.

    Notes
    -----
    Host memory: the size of the moved matrices; nothing is densified. Device memory
    is released when the replaced device arrays are no longer referenced. With
    ``copy=True`` matrices not moved are copied where they are (on the device for
    device matrices that are not moved).
"""
