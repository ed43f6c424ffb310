"""normalize_pearson_residuals, as in scanpy's experimental/pp/_normalization.py."""

from __future__ import annotations

import numpy as np
from anndata import AnnData

from .._core import logg
from .._core.adata import check_not_empty, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import is_csc, is_sparse, placement, xp_of
from .._core.compat import view_to_actual, warn
from .._core.dask import check_row_chunks, is_dask, map_rows
from .._kernels.moments import gene_moments
from .._kernels.normalize import row_sums
from .._kernels.scale import pearson_residuals

_FUNC = "normalize_pearson_residuals"


def normalize_pearson_residuals(
    adata: AnnData,
    *,
    theta: float = 100,
    clip: float | None = None,
    check_values: bool = True,
    layer: str | None = None,
    obsm: str | None = None,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | dict | None:
    """Analytic Pearson residuals, as :func:`scanpy.experimental.pp.normalize_pearson_residuals`.

    ``mu = cell_total * gene_total / total``, residual ``(x - mu) / sqrt(mu + mu² / theta)``
    clipped to ``[-clip, clip]``. One pass gives the per-gene totals and the value checks
    (``kernels/scale.cu``), one the per-cell totals (``kernels/normalize.cu``), and one more
    writes the dense residuals straight from CSR or dense counts (no densified copy of the
    counts); all sums in float64. Cells or genes with no counts give NaN, as in scanpy.
    Device memory: the dense result (CSC input is first converted to CSR).

    A dask X (or layer, obsm entry) chunked by rows (numpy, scipy CSR, cupy or cupyx CSR
    chunks) synchronises once: one pass for the gene totals and the value checks; the
    residuals are then a lazy dask array of dense chunks (each chunk's cell totals from the
    chunk itself), with the same row chunks and dtype as in memory. scanpy 1.12 takes dense
    dask chunks only (and returns an in-memory array); its sparse path calls
    ``sum(keepdims=...)`` on the chunks and fails.

    Parameters
    ----------
    adata
        Cells × genes raw counts; X, the layer or the obsm entry may live on host or device.
    theta
        Overdispersion of the negative binomial model, shared by all genes; > 0.
    clip
        Clip residuals to this absolute value; ``None``: ``sqrt(n_obs)``. ≥ 0.
    check_values
        Warn (UserWarning, as scanpy) when the counts hold negative or non-integer values.
        NaN/inf always raise a ValueError.
    layer, obsm
        Compute on this layer or obsm entry instead of X.
    inplace
        Update ``adata``, or return the results.
    copy
        Work on (and return) a copy of ``adata``; not with ``inplace=False``.

    Returns
    -------
    With ``inplace=False``: ``{"X": residuals, "theta", "clip", "computed_on"}``. Otherwise
    ``None`` (or the copy with ``copy=True``); X (or the layer/obsm) becomes the dense
    residuals (numpy or cupy, or a lazy dask array of those for dask input; float32 for
    float32 counts with a Python-number ``clip``, float64 otherwise, as scanpy) and ``uns['pearson_residuals_normalization']`` holds
    ``theta``, ``clip`` (as given) and ``computed_on`` (the layer or obsm name, or
    ``'adata.X'``).
    """
    if copy and not inplace:
        raise ValueError("`copy=True` cannot be used with `inplace=False`.")
    if theta <= 0:
        raise ValueError("Pearson residuals require theta > 0")
    x = get_matrix(adata, layer=layer, obsm=obsm, func=_FUNC)  # KeyError before any change
    chunks = check_row_chunks(x, _FUNC) if is_dask(x) else None
    if chunks is None:
        placement(x)
    check_not_empty(x, _FUNC)
    clip_value = np.sqrt(x.shape[0]) if clip is None else clip
    if clip_value < 0:
        raise ValueError("Pearson residuals require `clip>=0` or `clip=None`.")
    computed_on = layer or obsm or "adata.X"
    start = logg.info(f"computing analytic Pearson residuals on {computed_on}")

    if chunks is not None:
        pass  # row chunks: CSR or dense, made contiguous chunk by chunk below
    elif is_csc(x):
        x = x.tocsr()
    elif placement(x) == "device" and not is_sparse(x) and not x.flags.c_contiguous:
        x = xp_of(x).ascontiguousarray(x)  # the device row kernels index C-ordered rows
    if x.dtype.kind != "f":
        x = x.astype(np.float64)  # exact for counts; scanpy's integer sums end in float64 too
    # scanpy computes in the input's precision and clips against `clip`: numpy's promotion
    # of those two gives the output dtype (float32 stays float32 only for a weak Python clip)
    out_dtype = np.result_type(np.zeros(0, x.dtype), clip_value)
    moments = gene_moments(x, check_integer=check_values)
    if moments.nonfinite:
        raise nonfinite_error(_FUNC, f"layer {layer!r}" if layer else (f"obsm {obsm!r}" if obsm else "adata.X"))
    if check_values and (moments.negative or moments.noninteger):
        warn("`normalize_pearson_residuals()` expects raw count data, but non-integers were found.",
             UserWarning)
    gene_sums = moments.sum[0]
    total = float(gene_sums.sum())
    if chunks is not None:
        residuals = _residuals_dask(x, chunks, gene_sums, total, float(theta), float(clip_value),
                                    out_dtype)
    else:
        cell_sums, _ = row_sums(x)
        residuals = pearson_residuals(x, cell_sums, gene_sums, total, float(theta),
                                      float(clip_value), out_dtype)

    settings = dict(theta=theta, clip=clip, computed_on=computed_on)
    if copy:
        adata = adata.copy()
    view_to_actual(adata)  # scanpy's UserWarning, with inplace=False too
    if not inplace:
        logg.info("    finished ({time_passed})", time=start)
        return dict(X=residuals, **settings)
    set_matrix(adata, residuals, layer=layer, obsm=obsm)
    adata.uns["pearson_residuals_normalization"] = settings
    logg.info("    finished ({time_passed})", time=start)
    return adata if copy else None


def _residuals_dask(x, chunks: str, gene_sums, total, theta, clip, out_dtype):
    """The residuals of a dask x as a lazy dask array of dense chunks (no pass here)."""
    on_device = chunks.startswith("device")
    if on_device:
        import cupy as cp

        meta = cp.empty((0, 0), out_dtype)
    else:
        meta = np.empty((0, 0), out_dtype)

    def residual_chunk(block):
        if on_device and not is_sparse(block):
            block = cp.ascontiguousarray(block)  # the device kernel indexes C-ordered rows
        cell_sums, _ = row_sums(block)
        return pearson_residuals(block, cell_sums, gene_sums, total, theta, clip, out_dtype)

    return map_rows(x, _FUNC, residual_chunk, dtype=out_dtype, meta=meta)
