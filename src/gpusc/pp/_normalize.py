"""normalize_total, as in scanpy's preprocessing/_normalization.py."""

from __future__ import annotations

from functools import partial

import numpy as np
from anndata import AnnData

from .._core import logg
from .._core.adata import (check_not_empty, device_oom_hint, ensure_float, get_matrix, nonfinite_error,
                           set_matrix)
from .._core.arrays import is_csc, is_sparse, placement, to_host, xp_of
from .._core.compat import is_backed_type, old_positionals, view_to_actual, warn
from .._core.dask import (backed_rows, block_partials, check_row_chunks, compute, fresh_values, is_dask,
                          map_rows)
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

    A dask X (row chunks: numpy, scipy CSR, cupy or cupyx CSR) gives a lazy X: each chunk
    is summed and scaled into a new chunk when computed. With a ``target_sum`` and no
    ``key_added`` nothing is computed at the call. Synchronising passes (each one
    ``dask.compute`` over all chunks, returning per-cell or per-gene vectors only): one for
    the highly-expressed genes with ``exclude_highly_expressed``; one for the cell totals
    when ``target_sum=None`` (their median) or ``key_added`` is given. Chunk types are
    checked at the call; NaN/inf are found in those passes, or, in a fully lazy call, raise
    when the chunk is computed. "Some cells have zero counts" is warned only when the
    totals were computed (scanpy never warns for dask).

    A backed AnnData (``read_h5ad(path, backed="r")``, dense or CSR on disk) is read 6,000
    cells at a time the same way (one pass for the totals, one to scale), and X is then an
    in-memory matrix, as scanpy leaves it (scanpy reads only dense backed X, all at once).

    Parameters
    ----------
    adata
        Cells × genes; X, the layer or the obsm entry may live on host or device, or be a
        dask array of row chunks.
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
    "norm_factor": numpy (n_obs,) T}`` (for a dask X: X lazy, and norm_factor a lazy dask
    vector unless a pass computed the totals). With ``copy=True`` the new AnnData, else ``None``;
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
    backed = is_backed_type(x)
    if backed:
        x = backed_rows(x, func)
    if is_dask(x):
        check_row_chunks(x, func)  # gene-split, CSC or unsupported chunks: an error now
    else:
        placement(x)
    check_not_empty(x, func)
    if copy:
        adata = adata.copy()
    view_to_actual(adata)  # scanpy's UserWarning "Received a view of an AnnData. Making a copy."
    x = get_matrix(adata, layer=layer, obsm=obsm, func=func)
    if backed:
        x = backed_rows(x, func)
    if is_dask(x):
        start = logg.info("normalizing counts per cell")
        x, norm_factor = _normalize_dask(
            x, target_sum=target_sum, exclude_highly_expressed=exclude_highly_expressed,
            max_fraction=max_fraction, factors_needed=(inplace and key_added is not None) or backed,
            var_names=adata.var_names, where=f"layer {layer!r}" if layer else ("obsm" if obsm else "adata.X"))
        if backed:  # as scanpy: X in memory afterwards; read and scaled chunk by chunk
            x = x.compute()
        return _finish(adata, x, norm_factor, key_added=key_added, layer=layer, obsm=obsm,
                       inplace=inplace, copy=copy, start=start)
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
        _log_excluded(adata.var_names, excluded)
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
    return _finish(adata, x, norm_factor, key_added=key_added, layer=layer, obsm=obsm,
                   inplace=inplace, copy=copy, start=start)


def _finish(adata, x, norm_factor, *, key_added, layer, obsm, inplace, copy, start):
    """Write (or return) the normalized matrix and the factors, as scanpy does."""
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


def _log_excluded(var_names, excluded) -> None:
    names = var_names[to_host(excluded).astype(bool)].tolist()
    logg.info("The following highly-expressed genes are not considered during "
              f"normalization factor computation:\n{names}")


def _chunk_high_genes(block, *, max_fraction: float):
    """A chunk's highly-expressed gene mask (host uint8) and whether it holds NaN/inf."""
    sums, nonfinite = row_sums(block)
    return to_host(high_genes(block, sums, max_fraction)), nonfinite


def _chunk_sums(block, *, excluded):
    sums, nonfinite = row_sums(block, excluded)
    return to_host(sums), nonfinite


def _chunk_normalized(block, *, excluded, target_sum: float, where: str):
    """A new chunk: each row divided by its total (without ``excluded`` genes) / target_sum,
    the totals summed here, chunk-local, as the in-memory path sums them."""
    sums, nonfinite = row_sums(block, excluded)
    if nonfinite:
        raise nonfinite_error("normalize_total", where)
    factor = sums / target_sum
    return _chunk_divided(block, factor + (factor == 0))  # empty cells stay zero


def _chunk_divided(block, divisor):
    out = fresh_values(block)  # a dask chunk is never changed in place
    scale_rows_inplace(out, divisor)
    return out


def _chunk_factors(block, *, excluded, target_sum: float):
    return to_host(row_sums(block, excluded)[0] / target_sum).astype(block.dtype)


def _normalize_dask(x, *, target_sum, exclude_highly_expressed: bool, max_fraction: float,
                    factors_needed: bool, var_names, where: str):
    """The dask path: (normalized X, lazily; norm_factor, host numpy when the totals were
    computed, else a lazy dask vector). Passes: one for the highly-expressed genes, one for
    the totals when the median or the factors are needed; the scaling is lazy."""
    func = "normalize_total"
    if x.dtype.kind != "f":  # scanpy's float32 for integers, chunk by chunk
        x = map_rows(x, func, ensure_float, dtype=np.float32, meta=ensure_float(x._meta))
    excluded = None
    if exclude_highly_expressed:  # one pass: each chunk flags genes above max_fraction of a cell
        parts = compute(*block_partials(x, func, partial(_chunk_high_genes, max_fraction=max_fraction)))
        if any(nonfinite for _, nonfinite in parts):
            raise nonfinite_error(func, where)
        excluded = np.bitwise_or.reduce([mask for mask, _ in parts])
        _log_excluded(var_names, excluded)
    if target_sum is None or factors_needed:  # one pass for the totals
        parts = compute(*block_partials(x, func, partial(_chunk_sums, excluded=excluded)))
        if any(nonfinite for _, nonfinite in parts):
            raise nonfinite_error(func, where)
        sums = np.concatenate([s for s, _ in parts])
        if target_sum is None:
            positive = sums[sums > 0]
            target_sum = float(np.median(positive)) if positive.size else 1.0
        divisor = sums / target_sum
        norm_factor = divisor.astype(x.dtype)
        if not np.all(norm_factor > 0):
            warn("Some cells have zero counts", UserWarning)
        # each chunk gets its rows' divisors: no second sum over the values
        return map_rows(x, func, _chunk_divided, divisor + (divisor == 0)), norm_factor
    normalized = map_rows(x, func, partial(_chunk_normalized, excluded=excluded, target_sum=target_sum,
                                           where=where))
    norm_factor = x.map_blocks(partial(_chunk_factors, excluded=excluded, target_sum=target_sum),
                               drop_axis=1, dtype=x.dtype, meta=np.empty(0, x.dtype))  # lazy, as scanpy's
    return normalized, norm_factor
