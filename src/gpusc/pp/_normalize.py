"""normalize_total, as in scanpy's preprocessing/_normalization.py."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from .._core.adata import (check_not_empty, device_oom_hint, ensure_float, get_matrix, nonfinite_error,
                           set_matrix)
from .._core.arrays import is_csc, is_sparse, placement, to_host, xp_of
from .._core.compat import old_positionals, view_to_actual, warn
from .._kernels.normalize import high_genes, row_sums, scale_rows_inplace


@old_positionals("target_sum", "exclude_highly_expressed", "max_fraction", "key_added", "layer",
                 "inplace", "copy")
@device_oom_hint
def normalize_total(
    adata: AnnData,
    *,
    target_sum: float | None = None,
    exclude_highly_expressed: bool = False,
    max_fraction: float = 0.05,
    key_added: str | None = None,
    layer: str | None = None,
    obsm: str | None = None,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | dict[str, np.ndarray] | None:
    """Normalize counts per cell, as :func:`scanpy.pp.normalize_total`.

    Each cell is divided by its total over all genes (or over the genes that are not
    highly expressed) times ``target_sum``. Sums are in float64; the matrix is scaled in
    place where it lives (a CUDA kernel for device arrays, numba on the host). Passes:
    one for the sums (it also rejects NaN/inf before anything changes), two more with
    ``exclude_highly_expressed``, one to scale. Device memory: no copy of the matrix
    unless ``inplace=False``, the input is CSC (scanpy's CSR conversion) or integer
    (scanpy's float32 conversion). As in scanpy, a view becomes an actual AnnData first (with
    scanpy's UserWarning, also with ``inplace=False``), and the formerly positional arguments
    still work, with its FutureWarning.

    Parameters
    ----------
    adata
        Cells × genes; X, the layer or the obsm entry may live on host or device.
    target_sum
        Total of each cell after normalization; ``None``: the median of the cells'
        non-zero totals before normalization.
    exclude_highly_expressed
        Leave genes with more than ``max_fraction`` of some cell's total out of the totals.
    max_fraction
        See above; between 0 and 1.
    key_added
        obs column for the normalization factor (cell total / target_sum).
    layer, obsm
        Normalize this layer or obsm entry instead of X.
    inplace
        Update ``adata``, or return the results.
    copy
        Work on (and return) a copy of ``adata``; not with ``inplace=False``.

    Returns
    -------
    With ``inplace=False``: ``{"X": normalized matrix (where the input lives, float dtype T),
    "norm_factor": numpy (n_obs,) T}``. With ``copy=True`` the new AnnData, else ``None``;
    X (or the layer/obsm) becomes the normalized matrix (CSR for CSC input) and, with
    ``key_added``, ``obs[key_added]`` (T) holds the normalization factor.
    """
    func = "normalize_total"
    if copy and not inplace:
        raise ValueError("`copy=True` cannot be used with `inplace=False`.")
    if not 0 <= max_fraction <= 1:
        raise ValueError(f"{func}: Choose max_fraction between 0 and 1. (got {max_fraction})")
    if target_sum is not None and not (np.isfinite(target_sum) and target_sum > 0):
        raise ValueError(f"{func}: target_sum={target_sum!r} must be a positive number "
                         "(or None for the median of the cell totals)")
    x = get_matrix(adata, layer=layer, obsm=obsm, func=func)  # KeyError before any change
    placement(x)
    check_not_empty(x, func)
    if copy:
        adata = adata.copy()
    view_to_actual(adata)  # scanpy's UserWarning "Received a view of an AnnData. Making a copy."
    x = get_matrix(adata, layer=layer, obsm=obsm, func=func)
    # CSC becomes CSR (as in scanpy), integers float32, strided dense C-ordered: each a new
    # matrix already, so inplace=False needs no further copy
    dense_strided = not is_sparse(x) and not x.flags.c_contiguous
    fresh = is_csc(x) or x.dtype.kind != "f" or dense_strided
    if is_csc(x):
        x = x.tocsr()
    elif dense_strided:
        x = xp_of(x).ascontiguousarray(x)
    x = ensure_float(x)

    start = logg.info("normalizing counts per cell")
    sums, nonfinite = row_sums(x)
    if nonfinite:
        raise nonfinite_error(func, f"layer {layer!r}" if layer else ("obsm" if obsm else "adata.X"))
    if exclude_highly_expressed:
        excluded = high_genes(x, sums, max_fraction)
        sums, _ = row_sums(x, excluded)
        names = adata.var_names[to_host(excluded).astype(bool)].tolist()
        logg.info("The following highly-expressed genes are not considered during "
                  f"normalization factor computation:\n{names}")
    xp = xp_of(x)
    if target_sum is None:
        positive = sums[sums > 0]
        target_sum = float(xp.median(positive)) if positive.size else 1.0  # synchronize!
    norm_factor = sums / target_sum
    if not inplace and not fresh:
        x = x.copy()
    scale_rows_inplace(x, norm_factor + (norm_factor == 0))  # empty cells stay zero
    norm_factor = to_host(norm_factor).astype(x.dtype)
    if not np.all(norm_factor > 0):
        warn("Some cells have zero counts", UserWarning)

    if inplace:
        if key_added is not None:
            adata.obs[key_added] = norm_factor
        set_matrix(adata, x, layer=layer, obsm=obsm)
    logg.info("    finished ({time_passed})", time=start)
    if copy:
        return adata
    if not inplace:
        return {"X": x, "norm_factor": norm_factor}
    return None
