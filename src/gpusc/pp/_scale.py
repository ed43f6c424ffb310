"""scale, as in scanpy's preprocessing/_scale.py."""

from __future__ import annotations

import warnings
from functools import singledispatch

import numpy as np
import pandas as pd
from anndata import AnnData
from scanpy import logging as logg

from .._core.adata import actualize_view, check_not_empty, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import is_csc, is_sparse, placement, to_host, xp_of
from .._kernels.scale import (FLAG_NONFINITE, gene_moments, scale_csr_to_dense, scale_dense_inplace,
                              scale_sparse_inplace)

_FUNC = "scale"


def _check_max_value(max_value) -> None:
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise ValueError(f"{_FUNC}: max_value={max_value!r} must be a positive number (or None: no clipping)")


def _obs_mask(mask, n_obs: int, obs: pd.DataFrame | None) -> np.ndarray | None:
    """mask_obs as a numpy bool array, checked like scanpy's ``_check_mask``."""
    if mask is None:
        return None
    if isinstance(mask, str):
        if obs is None:
            raise ValueError(f"{_FUNC}: mask_obs={mask!r} names an obs column, which needs an AnnData")
        if mask not in obs.columns:
            raise ValueError(f"{_FUNC}: did not find adata.obs[{mask!r}]; add the mask to adata.obs "
                             "or pass a boolean array as mask_obs")
        mask = obs[mask].to_numpy()
    else:
        mask = to_host(mask) if not isinstance(mask, pd.Series) else mask.to_numpy()
        if len(mask) != n_obs:
            raise ValueError(f"{_FUNC}: mask_obs has {len(mask)} entries but the data has {n_obs} cells")
    if not pd.api.types.is_bool_dtype(mask.dtype):
        raise ValueError(f"{_FUNC}: mask_obs must be boolean, got dtype {mask.dtype}")
    return np.asarray(mask, bool)


def _mean_std(moments, n: int):
    """scanpy's mean and std (ddof=1, fast_array_utils' formula), genes with zero std -> 1."""
    sums, squares = to_host(moments.sums), to_host(moments.squares)  # synchronize!
    mean = sums / n
    var = squares / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    std = np.sqrt(np.maximum(var, 0))  # rounding may leave a constant gene at -1e-18
    std[std == 0] = 1
    return mean, std


def _moments(x, row_mask=None):
    moments = gene_moments(x, row_mask)
    if moments.flags & FLAG_NONFINITE:
        raise nonfinite_error(_FUNC, "the data")
    n = x.shape[0] if row_mask is None else int(np.count_nonzero(row_mask))
    return _mean_std(moments, n)


def _bounds(max_value, zero_center: bool) -> tuple[float, float]:
    """Clip range: both sides when centred, only above otherwise (as scanpy's clip)."""
    if max_value is None:
        return -np.inf, np.inf
    return (-max_value if zero_center else -np.inf), float(max_value)


def _densify_warning() -> None:
    warnings.warn("zero-centering a sparse array/matrix densifies it.", UserWarning, stacklevel=4)


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
    Device memory: the dense output when centring sparse input, plus per-slice float64
    buffers of at most 128 MiB for the per-gene sums.

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
        Scale this layer or obsm entry instead of X (AnnData only).
    mask_obs
        Boolean array over cells, or the name of a boolean obs column: derive the scaling
        from these cells and scale only them.

    Returns
    -------
    For a matrix: the scaled matrix. For an AnnData: ``None``, or the copy with
    ``copy=True``; X (or the layer/obsm) becomes the scaled matrix, ``var['mean']`` and
    ``var['std']`` (float64) hold each gene's mean and standard deviation before scaling
    (``'mean of {mask_obs}'``/``'std of {mask_obs}'`` for an obs column mask,
    ``'mean with mask'``/``'std with mask'`` for an array mask).
    """
    if layer is not None:
        raise ValueError(f"`layer` argument inappropriate for value of type {type(data)}")
    if obsm is not None:
        raise ValueError(f"`obsm` argument inappropriate for value of type {type(data)}")
    placement(data)
    _check_max_value(max_value)
    check_not_empty(data, _FUNC)
    mask = _obs_mask(mask_obs, data.shape[0], None)
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
    placement(x)
    check_not_empty(x, _FUNC)
    keys = ("mean", "std")
    if mask_obs is not None:
        keys = ((f"mean of {mask_obs}", f"std of {mask_obs}") if isinstance(mask_obs, str)
                else ("mean with mask", "std with mask"))
    mask = _obs_mask(mask_obs, adata.n_obs, adata.obs)
    if not zero_center and max_value is not None:
        logg.info("... be careful when using `max_value` without `zero_center`.")
    # in-place work on the matrix starts only after the moments pass, which rejects NaN/inf
    if copy:
        adata = adata.copy()
    actualize_view(adata)
    x = get_matrix(adata, layer=layer, obsm=obsm, func=_FUNC)
    x, mean, std = _scale_array(x, zero_center=zero_center, max_value=max_value, mask=mask)
    set_matrix(adata, x, layer=layer, obsm=obsm)
    if obsm is None:
        adata.var[keys[0]] = mean
        adata.var[keys[1]] = std
    return adata if copy else None

