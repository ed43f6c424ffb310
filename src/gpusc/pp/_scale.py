"""scale, as in scanpy's preprocessing/_scale.py."""

from __future__ import annotations

from functools import singledispatch

import numpy as np
from anndata import AnnData

from .._core import logg
from .._core.adata import check_not_empty, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import is_csc, is_sparse, placement, xp_of
from .._core.compat import (array_only_arguments, backed_error, check_mask, is_backed_type, old_positionals,
                            renamed_data_arg, view_to_actual, warn)
from .._core.dask import check_row_chunks, fresh_values, is_dask, map_rows
from .._kernels.moments import gene_moments
from .._kernels.scale import scale_csr_to_dense, scale_dense_inplace, scale_sparse_inplace

_FUNC = "scale"


def _check_max_value(max_value) -> None:
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise ValueError(f"{_FUNC}: max_value={max_value!r} must be a positive number (or None: no clipping)")


def _check_cells(x) -> None:
    # no genes is fine (scanpy scales nothing: a recipe's HVG selection may keep none);
    # no cells leaves no mean to subtract
    if x.shape[0] == 0:
        check_not_empty(x, _FUNC)


def _mean_std(moments, n: int):
    """scanpy's mean and std (ddof=1, fast_array_utils' formula), genes with zero std -> 1."""
    sums, squares = moments.sum[0], moments.sum_sq[0]
    mean = sums / n
    var = squares / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    std = np.sqrt(np.maximum(var, 0))  # rounding may leave a constant gene at -1e-18
    std[std == 0] = 1
    return mean, std


def _moments(x, row_mask=None):
    codes = None if row_mask is None else np.where(row_mask, 0, -1).astype(np.int32)
    moments = gene_moments(x, codes)  # rows outside the mask: code -1, left out
    if moments.nonfinite:
        raise nonfinite_error(_FUNC, "the data")
    n = x.shape[0] if row_mask is None else int(np.count_nonzero(row_mask))
    return _mean_std(moments, n)


def _bounds(max_value, zero_center: bool) -> tuple[float, float]:
    """Clip range: both sides when centred, only above otherwise (as scanpy's clip)."""
    if max_value is None:
        return -np.inf, np.inf
    return (-max_value if zero_center else -np.inf), float(max_value)


def _densify_warning() -> None:
    warn("zero-centering a sparse array/matrix densifies it.", UserWarning)


def _scale_unmasked(x, zero_center: bool, max_value):
    """Scale all rows; x may be changed in place. Returns (result, mean, std)."""
    lo, hi = _bounds(max_value, zero_center)
    if is_sparse(x) and not zero_center:
        mean, std = _moments(x)
        if is_csc(x):
            x = x.astype(np.float64)  # scanpy's CSC path divides by the float64 std into a new matrix
        scale_sparse_inplace(x, std, hi)
        return x, mean, std
    if is_sparse(x):
        if is_csc(x):
            x = x.tocsr()
        mean, std = _moments(x)
        _densify_warning()
        # one pass from the sparse input into a dense float64 result (scanpy's dtype here)
        return scale_csr_to_dense(x, mean, std, lo, hi, np.float64), mean, std
    if placement(x) == "device" and not x.flags.c_contiguous:
        x = xp_of(x).ascontiguousarray(x)
    mean, std = _moments(x)
    scale_dense_inplace(x, mean if zero_center else None, std, lo, hi)
    return x, mean, std


def _check_array(x) -> None:
    """A TypeError for unsupported array types; for a dask array, a clear error unless it is
    split by rows only into chunks of a supported type (before anything changes)."""
    if is_dask(x):
        check_row_chunks(x, _FUNC)
    else:
        placement(x)


def _scale_dask(x, *, zero_center: bool, max_value, mask: np.ndarray | None):
    """(lazily scaled dask x, mean, std): one pass for the statistics, then a new dask array
    whose chunks are scaled as the in-memory path scales a matrix."""
    kind = check_row_chunks(x, _FUNC)
    mean, std = _moments(x, mask)  # the one pass
    lo, hi = _bounds(max_value, zero_center)
    sparse = kind.endswith("csr")
    dtype, meta = x.dtype, x._meta
    if sparse and zero_center:
        _densify_warning()
        if mask is None:  # dense float64 chunks, as scanpy's (and our in-memory) result
            dtype = np.dtype(np.float64)
            if kind.startswith("device"):
                import cupy as cp

                meta = cp.empty((0, 0), dtype)
            else:
                meta = np.empty((0, 0), dtype)
    centre = mean if zero_center else None

    def scale_chunk(block, *block_mask):
        rows = None if not block_mask else np.flatnonzero(block_mask[0])
        if is_sparse(block) and not zero_center:
            out = fresh_values(block)  # the stored values change, not the structure
            scale_sparse_inplace(out, std, hi, block_mask[0] if block_mask else None)
            return out
        xp = xp_of(block)
        if rows is None:
            if is_sparse(block):
                return scale_csr_to_dense(block, mean, std, lo, hi, np.float64)
            out = fresh_values(block)
            scale_dense_inplace(out, centre, std, lo, hi)
            return out
        if rows.size == 0:  # no cell of the mask in this chunk
            return block.copy()
        # only the mask's rows, as the in-memory path
        rows = xp.asarray(rows)
        if is_sparse(block):
            return _assign_sparse_rows(block, rows, scale_csr_to_dense(block[rows], mean, std, lo,
                                                                       hi, np.float64))
        out = fresh_values(block)
        sub = xp.ascontiguousarray(out[rows])
        scale_dense_inplace(sub, centre, std, lo, hi)
        out[rows] = sub
        return out

    per_row = () if mask is None else (mask,)
    return map_rows(x, _FUNC, scale_chunk, *per_row, dtype=dtype, meta=meta), mean, std


def _assign_sparse_rows(x, rows, values):
    """x with rows `rows` replaced by the dense `values` (as scanpy's x[mask, :] = values)."""
    xp = xp_of(x)
    if placement(x) == "device":
        from cupyx.scipy import sparse as sp
    else:
        from scipy import sparse as sp
    fmt, kind = x.format, type(x)
    csr = x.tocsr()
    keep = xp.flatnonzero(~xp.isin(xp.arange(x.shape[0]), rows))
    stacked = sp.vstack([csr[keep], sp.csr_matrix(values.astype(x.dtype, copy=False))], format="csr")
    order = xp.argsort(xp.concatenate([keep, rows]))
    return kind(stacked[order].asformat(fmt))


def _scale_array(x, *, zero_center: bool, max_value, mask: np.ndarray | None):
    """(scaled x, mean, std); x may be changed in place."""
    if x.dtype.kind != "f":
        logg.info("... as scaling leads to float results, integer input is cast to float, returning copy.")
        x = x.astype(np.float64)
    if is_dask(x):
        return _scale_dask(x, zero_center=zero_center, max_value=max_value, mask=mask)
    if x.shape[1] == 0:  # no genes: nothing to scale (scanpy's result, dense when centring)
        if is_sparse(x) and zero_center:
            _densify_warning()
            x = x.toarray().astype(np.float64)
        return x, np.zeros(0), np.ones(0)
    if is_sparse(x) and not zero_center:
        if mask is None:
            return _scale_unmasked(x, zero_center, max_value)
        if is_csc(x):
            x = x.tocsr()
        mean, std = _moments(x, mask)
        scale_sparse_inplace(x, std, _bounds(max_value, False)[1], mask)
        return x, mean, std
    if mask is None:
        return _scale_unmasked(x, zero_center, max_value)
    xp = xp_of(x)
    rows = xp.asarray(np.flatnonzero(mask))
    sub, mean, std = _scale_unmasked(x[rows], zero_center, max_value)
    if is_sparse(x):
        return _assign_sparse_rows(x, rows, sub), mean, std
    x[rows] = sub
    return x, mean, std


@renamed_data_arg
@old_positionals("zero_center", "max_value", "copy", "layer", "obsm")
@singledispatch
def scale(
    data,
    *,
    zero_center: bool = True,
    max_value: float | None = None,
    copy: bool = False,
    layer: str | None = None,
    obsm: str | None = None,
    mask_obs: np.ndarray | str | None = None,
):
    """Scale to unit variance and zero mean, as :func:`scanpy.pp.scale`.

    The standard deviation uses ``ddof=1`` (Bessel's correction), as scanpy; genes with zero
    standard deviation are divided by 1. Per-gene sums and sums of squares are accumulated in
    float64 in one pass (deterministic: per-slice buffers added in a fixed order, no floating
    atomics); a second pass scales, on the device with ``kernels/scale.cu`` and on the host
    with its numba twin.

    Output types follow scanpy 1.12: dense input stays dense (its float dtype, changed in
    place); sparse input with ``zero_center=False`` stays sparse (stored values divided and
    clipped above; CSR keeps its dtype, CSC becomes float64 as in scanpy); sparse input with
    ``zero_center=True`` gives a dense float64 matrix written in one pass from the sparse
    values (a UserWarning says it densifies). Integer input becomes float64. With
    ``mask_obs`` only the selected cells are used and changed (sparse input stays sparse).
    Device memory: the dense output when centring sparse input, plus the per-gene sums'
    float64 partials (rows in slices, a fixed order: at most 256 MiB,
    ``gpusc._kernels.moments``).

    A dask matrix chunked by rows (numpy, scipy CSR, cupy or cupyx CSR chunks) synchronises
    once: one pass for the per-gene mean and std (of the ``mask_obs`` cells); the scaling is
    then lazy, a new dask array of the same row chunks built chunk by chunk by the same kernels
    (the input chunks are not changed), with the output types and dtypes above (sparse chunks
    centred become dense float64 chunks; with ``mask_obs`` they stay sparse).

    Parameters
    ----------
    data
        An AnnData, or a matrix (cells × genes) on host or device.
    zero_center
        Subtract each gene's mean; ``False`` keeps sparse input sparse.
    max_value
        Clip to this value after scaling (and to ``-max_value`` when centring); ``None``: no
        clipping. Must be positive.
    copy
        Work on (and return) a copy.
    layer, obsm
        Scale this layer or obsm entry instead of X (AnnData only; an array with these
        raises scanpy's TypeError).
    mask_obs
        Boolean array over cells, or the name of a boolean obs column: derive the scaling
        from these cells and scale only them.

    ``X=`` (scanpy's old name of ``data``) and positional ``zero_center``, ``max_value``,
    ``copy``, ``layer``, ``obsm`` still work, with scanpy's FutureWarning; a view becomes an
    actual AnnData with scanpy's UserWarning. A matrix without genes is left as it is (dense
    float64 when centring sparse input), as scanpy does; one without cells raises.

    Returns
    -------
    For a matrix: the scaled matrix (a lazy dask array for a dask matrix). For an AnnData:
    ``None``, or the copy with ``copy=True``; X (or the layer/obsm) becomes the scaled matrix
    (lazy for dask), ``var['mean']`` and
    ``var['std']`` (float64) hold each gene's mean and standard deviation before scaling
    (``'mean of {mask_obs}'``/``'std of {mask_obs}'`` for an obs column mask,
    ``'mean with mask'``/``'std with mask'`` for an array mask). With ``obsm`` these hold the
    entry's column means and stds, as in scanpy, so the entry must have one column per
    gene (a ValueError before any change otherwise).
    """
    array_only_arguments(layer=layer, obsm=obsm)
    if is_backed_type(data):
        raise backed_error(data, _FUNC)
    _check_array(data)
    _check_max_value(max_value)
    _check_cells(data)
    mask = check_mask(None, mask_obs, "obs", data.shape[0], _FUNC, "mask_obs")
    if copy:
        data = data.copy()
    if not zero_center and max_value is not None:
        logg.info("... be careful when using `max_value` without `zero_center`.")
    return _scale_array(data, zero_center=zero_center, max_value=max_value, mask=mask)[0]


@scale.register(AnnData)
def _(
    data: AnnData,
    *,
    zero_center: bool = True,
    max_value: float | None = None,
    copy: bool = False,
    layer: str | None = None,
    obsm: str | None = None,
    mask_obs: np.ndarray | str | None = None,
):
    adata = data
    _check_max_value(max_value)
    x = get_matrix(adata, layer=layer, obsm=obsm, func=_FUNC)  # KeyError before any change
    if is_backed_type(x):
        raise backed_error(x, _FUNC)
    _check_array(x)
    _check_cells(x)
    if obsm is not None and x.shape[1] != adata.n_vars:
        # scanpy writes the columns' mean and std into adata.var, which pandas refuses after
        # the obsm entry was already scaled; here nothing is changed
        raise ValueError(
            f"{_FUNC}: obsm {obsm!r} has {x.shape[1]} columns and adata {adata.n_vars} genes; scanpy "
            f"stores the columns' mean and std in adata.var and fails there (Length of values "
            f"({x.shape[1]}) does not match length of index ({adata.n_vars})); scale the array "
            f"itself instead: adata.obsm[{obsm!r}] = scale(adata.obsm[{obsm!r}])")
    keys = ("mean", "std")
    if mask_obs is not None:
        keys = ((f"mean of {mask_obs}", f"std of {mask_obs}") if isinstance(mask_obs, str)
                else ("mean with mask", "std with mask"))
    mask = check_mask(adata, mask_obs, "obs", adata.n_obs, _FUNC, "mask_obs")
    if not zero_center and max_value is not None:
        logg.info("... be careful when using `max_value` without `zero_center`.")
    # in-place work on the matrix starts only after the moments pass, which rejects NaN/inf
    if copy:
        adata = adata.copy()
    view_to_actual(adata)  # scanpy's UserWarning "Received a view of an AnnData. Making a copy."
    x = get_matrix(adata, layer=layer, obsm=obsm, func=_FUNC)
    x, mean, std = _scale_array(x, zero_center=zero_center, max_value=max_value, mask=mask)
    set_matrix(adata, x, layer=layer, obsm=obsm)
    adata.var[keys[0]] = mean  # with obsm too, as scanpy
    adata.var[keys[1]] = std
    return adata if copy else None

