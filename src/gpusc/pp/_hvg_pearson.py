"""highly_variable_genes(flavor="pearson_residuals"), as scanpy.experimental.pp.highly_variable_genes.

Genes are ranked by the variance (over a batch's cells) of their clipped analytic Pearson
residuals. The residual matrix is never built: ``_kernels.moments.gene_moments`` gives the
per-batch gene totals (and means, variances, value checks) in one pass, and
``_kernels.moments.pearson_residual_sums`` gives each (batch, gene)'s sum of residuals and of
squared residuals in float64 (implicit zeros of sparse input included analytically). Ranks,
median ranks across batches and the selection are computed on the host as scanpy does.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core.adata import check_not_empty, get_matrix, nonfinite_error
from .._core.arrays import is_sparse, placement
from .._core.compat import view_to_actual, warn
from .._core.dask import block_partials, check_row_chunks, compute, is_dask
from .._kernels.moments import gene_moments, pearson_residual_sums

_FUNC = "highly_variable_genes"


def highly_variable_genes_pearson_residuals(
    adata: AnnData,
    *,
    theta: float = 100,
    clip: float | None = None,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    chunksize: int = 1000,
    flavor: Literal["pearson_residuals"] = "pearson_residuals",
    check_values: bool = True,
    layer: str | None = None,
    subset: bool = False,
    inplace: bool = True,
) -> pd.DataFrame | None:
    """Highly variable genes by analytic Pearson residuals, as :func:`scanpy.experimental.pp.highly_variable_genes`.

    Same arguments, defaults, columns and dtypes as scanpy 1.12's experimental function
    (which ``highly_variable_genes(flavor="pearson_residuals")`` also reaches, with the
    defaults below). For each batch (all cells without ``batch_key``), genes with counts
    in the batch get ``mu = cell_total * gene_total / batch_total`` and the residual
    ``(x - mu) / sqrt(mu + mu² / theta)`` clipped to ``[-clip, clip]``; a gene's residual
    variance is the (biased) variance over the batch's cells, 0 for genes without counts in
    the batch. Genes are ranked per batch, then sorted by the number of batches in which they
    are among the top ``n_top_genes`` and, among those, by their median rank there.

    The dense residual matrix is never built: one pass over the counts (CUDA kernel for cupy
    arrays, numba for host arrays) gives every (batch, gene)'s sum of residuals and of
    squared residuals in float64; the implicit zeros of sparse counts are added analytically
    (``n_obs x n_vars`` arithmetic, no matrix read). Rows are read in slices and added in a
    fixed order (:mod:`gpusc._kernels.moments`). Device peak beyond the matrix: float64
    partial sums of at most 256 MiB plus one slice (``3 x n_vars`` doubles) per batch, 8 bytes
    per cell; CSC counts are read through one CSR copy. Ranks ties are
    broken as scanpy's (``np.argsort`` on the same values, pandas' sort).

    A dask X (or layer) chunked by rows (numpy, scipy CSR, cupy or cupyx CSR chunks) goes
    chunk by chunk through the same kernels (each chunk's cell totals from the chunk itself)
    and synchronises twice: one pass for the per-batch gene totals and value checks, one for
    the residual sums (a third, to look for values below 0, only when the first saw a sign
    bit). X stays lazy and unchanged. scanpy 1.12 refuses dask here (its sparse path calls
    ``sum(keepdims=...)`` on the chunks, its dense path indexes with a dask mask).

    Parameters
    ----------
    adata
        Cells × genes raw counts (X or ``layer``) on host or device.
    theta
        Overdispersion of the negative binomial model, shared by all genes; > 0.
    clip
        Clip residuals to this absolute value; ``None``: ``sqrt(n)`` with ``n`` the number
        of cells of the first batch in sorted label order (scanpy fixes it there and keeps it
        for the other batches). ≥ 0.
    n_top_genes
        Number of genes to select; required.
    batch_key
        Column of ``adata.obs``: rank within each batch and merge, as scanpy.
    chunksize
        Accepted for scanpy's signature and, as in scanpy, not used (the kernels tile on
        their own).
    flavor
        Only ``"pearson_residuals"``.
    check_values
        Warn (UserWarning, as scanpy) when the counts hold non-integer values. NaN/inf and
        negative values always raise a ValueError.
    layer
        Use ``adata.layers[layer]`` instead of X.
    subset
        Keep only the highly variable genes (in place, or in the returned frame).
    inplace
        Write into ``adata.var``/``adata.uns`` instead of returning a DataFrame.

    Returns
    -------
    With ``inplace=False`` a DataFrame indexed by ``var_names``, else None after writing
    these ``adata.var`` columns: ``means`` (float64), ``variances`` (float64, ddof 1),
    ``residual_variances`` (float64, mean over batches), ``highly_variable_rank`` (float32,
    median over the batches where the gene is in the top ``n_top_genes``, NaN elsewhere),
    ``highly_variable`` (bool); with ``batch_key`` also ``highly_variable_nbatches`` (int64)
    and ``highly_variable_intersection`` (bool). ``adata.uns['hvg']`` becomes
    ``{'flavor': 'pearson_residuals', 'computed_on': layer or 'adata.X'}``.

    Raises
    ------
    KeyError
        A missing layer or ``batch_key``.
    ValueError
        Not an AnnData, another flavor, no ``n_top_genes``, ``theta <= 0``, ``clip < 0``,
        NaN/inf or negative values in the counts (scanpy warns, then ranks NaN variances),
        missing values in the batch column, an empty matrix. Nothing in ``adata`` is changed
        before these are raised.
    """
    if not isinstance(adata, AnnData):
        raise ValueError("`pp.highly_variable_genes` expects an `AnnData` argument, pass "
                         "`inplace=False` if you want to return a `pd.DataFrame`.")
    if flavor != "pearson_residuals":
        raise ValueError("This is an experimental API and only `flavor=pearson_residuals` is "
                         "available.")
    if n_top_genes is None:
        raise ValueError("`pp.highly_variable_genes` requires the argument `n_top_genes` for "
                         "`flavor='pearson_residuals'`")
    if theta <= 0:
        raise ValueError("Pearson residuals require theta > 0")
    x = get_matrix(adata, layer=layer, func=_FUNC)  # KeyError before any change
    if is_dask(x):
        check_row_chunks(x, _FUNC)
    else:
        placement(x)  # a TypeError for unsupported array types
    check_not_empty(x, _FUNC)
    batches, codes = _batches(adata, batch_key)
    n_batches = batches.size
    counts = np.bincount(codes, minlength=n_batches)
    # scanpy sets clip=None to sqrt(n_obs) of the first batch (sorted order) and keeps it
    clip_value = float(np.sqrt(counts[0])) if clip is None else clip
    if clip_value < 0:
        raise ValueError("Pearson residuals require `clip>=0` or `clip=None`.")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)  # the kernels take float32/float64; exact for counts

    moments = gene_moments(x, codes, n_batches, check_integer=check_values)
    computed_on = layer if layer else "adata.X"
    if moments.nonfinite:
        raise nonfinite_error(_FUNC, f"layer {layer!r}" if layer else "adata.X")
    if moments.negative and _has_negative(x):
        # scanpy only warns and then ranks genes by NaN residual variances
        raise ValueError(f"{_FUNC}: `flavor='pearson_residuals'` expects raw count data, but "
                         "the matrix has negative values, for which the Pearson residuals are "
                         "undefined; pass layer= with the raw counts")
    if check_values and (moments.negative or moments.noninteger):
        warn("`flavor='pearson_residuals'` expects raw count data, but non-integers were found.",
             UserWarning)
    view_to_actual(adata)  # scanpy's UserWarning, with inplace=False too (before any change above)

    res_sum, res_sum_sq = pearson_residual_sums(x, codes, n_batches, moments.sum,
                                                theta=float(theta), clip=float(clip_value))
    n = counts[:, None].astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean = res_sum / n
        residual_var = np.where(moments.sum != 0, res_sum_sq / n - mean * mean, 0.0)

    # rank within each batch (0 = most variable); top genes' median rank across batches
    ranks = np.argsort(np.argsort(-residual_var, axis=1), axis=1).astype(np.float32)
    nbatches = np.sum(ranks < n_top_genes, axis=0).astype(np.int64)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)

    n_obs = x.shape[0]
    means = moments.sum.sum(axis=0) / n_obs
    variances = moments.sum_sq.sum(axis=0) / n_obs - means**2
    if n_obs > 1:
        variances *= n_obs / (n_obs - 1)
    df = pd.DataFrame(
        {"means": means, "variances": variances,
         "residual_variances": residual_var.mean(axis=0),
         "highly_variable_rank": median_rank,
         "highly_variable_nbatches": nbatches,
         "highly_variable_intersection": nbatches == n_batches},
        index=adata.var_names,
    )
    # most batches first, then the smaller median rank (NaN last); pandas' stable lexsort
    order = df.reset_index(drop=True).sort_values(
        ["highly_variable_nbatches", "highly_variable_rank"], ascending=[False, True],
        na_position="last").index.to_numpy()
    selected = np.zeros(len(df), bool)
    selected[order[:n_top_genes]] = True
    df["highly_variable"] = selected

    if not inplace:
        if batch_key is None:
            df = df.drop(columns=["highly_variable_nbatches", "highly_variable_intersection"])
        return df.iloc[df["highly_variable"].to_numpy()] if subset else df
    adata.uns["hvg"] = {"flavor": "pearson_residuals", "computed_on": computed_on}
    keys = ["means", "variances", "residual_variances", "highly_variable_rank"]
    if batch_key is not None:
        keys += ["highly_variable_nbatches", "highly_variable_intersection"]
    for key in [*keys, "highly_variable"]:
        adata.var[key] = df[key].to_numpy()
    if subset:
        adata._inplace_subset_var(df["highly_variable"].to_numpy())
    return None


def _has_negative(x) -> bool:
    """A value below 0 (the kernels' flag also counts -0.0, which is a count of 0)."""
    if is_dask(x):  # one more pass, only where the moments pass saw a sign bit
        return any(compute(*block_partials(x, _FUNC, _has_negative)))
    values = x.data if is_sparse(x) else x
    return values.size > 0 and bool(values.min() < 0)  # synchronize!


def _batches(adata: AnnData, batch_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Batch labels in sorted order (scanpy loops over ``np.unique``) and each cell's code."""
    if batch_key is None:
        return np.zeros(1, np.int32), np.zeros(adata.n_obs, np.int32)
    if batch_key not in adata.obs.columns:
        raise KeyError(f"{_FUNC}: batch_key={batch_key!r} is not a column of adata.obs; "
                       f"columns are {list(adata.obs.columns)}")
    column = adata.obs[batch_key]
    if column.isna().any():
        raise ValueError(f"{_FUNC}: adata.obs[{batch_key!r}] has missing values; give every "
                         "cell a batch")
    labels, codes = np.unique(np.asarray(column.to_numpy()), return_inverse=True)
    return labels, codes.astype(np.int32).ravel()
