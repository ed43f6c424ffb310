"""calculate_qc_metrics: every scanpy QC column from one pass over the matrix."""

from __future__ import annotations

import warnings
from collections.abc import Collection

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core.adata import check_not_empty, device_oom_hint, get_matrix, nonfinite_error
from .._core.arrays import is_sparse, placement
from .._core.compat import is_backed_type
from .._core.dask import backed_rows, check_row_chunks, is_dask
from .._kernels.qc import qc_stats


@device_oom_hint
def calculate_qc_metrics(
    adata: AnnData,
    *,
    expr_type: str = "counts",
    var_type: str = "genes",
    qc_vars: Collection[str] | str = (),
    percent_top: Collection[int] | None = (50, 100, 200, 500),
    layer: str | None = None,
    use_raw: bool = False,
    inplace: bool = False,
    log1p: bool = True,
    parallel: bool | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Calculate quality control metrics, as :func:`scanpy.pp.calculate_qc_metrics`.

    One pass over the rows computes every per-cell statistic (a CUDA kernel for device
    arrays, one block per cell; a numba kernel for host arrays), a second one the per-gene
    columns (the moments family: rows in slices, a fixed order of additions, no atomics, so
    the result is the same run to run). Explicitly stored zeros are not counted as expressed
    genes (scanpy removes them first; we leave the matrix untouched). CSC input is read
    through one CSR copy (peak: 2x the matrix), and so is sparse input with duplicate entries
    (summed first, as a dense view of it would be). Device peak beyond that: 8 doubles per
    cell and float64 per-gene partial sums of at most 256 MiB (``gpusc._kernels.moments``).

    A dask X (chunked by rows; numpy, scipy CSR, cupy or cupyx CSR chunks) synchronises
    once: one ``dask.compute`` runs both passes on every chunk, each chunk returning its
    per-cell columns and per-gene sums (small), which are joined on the host (per-gene sums
    added in chunk order). The matrix is never gathered, so workers need memory for one
    chunk, not the matrix (scanpy 1.12's dask path gathers it for ``n_cells_by_counts``).
    Chunk types are checked before anything is computed. A backed AnnData
    (``read_h5ad(path, backed="r")``, dense or CSR on disk) is read the same way, 6,000 cells
    at a time (scanpy 1.12 cannot compute QC metrics of a backed AnnData).

    Parameters
    ----------
    adata
        Cells × genes. X (or the layer) may be numpy, scipy CSR/CSC, cupy or cupyx CSR/CSC,
        or a dask array of row chunks of those (CSR, not CSC, chunks).
    expr_type, var_type
        Names used in the keys, e.g. ``total_{expr_type}``.
    qc_vars
        Boolean columns of ``adata.var`` to report totals and percentages for.
    percent_top
        Report the percentage of counts in each cell's top ``n`` genes, for each ``n``.
    layer, use_raw
        Compute on this layer, or on ``adata.raw.X``.
    inplace
        Write into ``adata.obs`` and ``adata.var`` instead of returning the frames.
    log1p
        Also write the ``log1p_*`` columns.
    parallel
        Deprecated in scanpy; ignored with a FutureWarning.

    Returns
    -------
    ``(obs_metrics, var_metrics)`` when ``inplace=False``; else writes them into ``adata``.
    The dtypes are scanpy's: with ``I`` the matrix's index dtype (int64 for dense), ``S`` the
    dtype numpy sums it in (float X: its dtype; integer or bool X: int64, uint64 for unsigned)
    and ``F`` its float dtype for means (float X: its dtype; integer or bool X: float64):

    obs
        ``n_{var_type}_by_{expr_type}`` (I), ``log1p_n_{var_type}_by_{expr_type}`` (float64),
        ``total_{expr_type}`` (S), ``log1p_total_{expr_type}`` (F),
        ``pct_{expr_type}_in_top_{n}_{var_type}`` (float64), and per qc_var ``q``:
        ``total_{expr_type}_{q}`` (S), ``log1p_total_{expr_type}_{q}``, ``pct_{expr_type}_{q}`` (F).
    var
        ``n_cells_by_{expr_type}`` (int64), ``mean_{expr_type}`` (F), ``log1p_mean_{expr_type}``
        (F), ``pct_dropout_by_{expr_type}`` (float64), ``total_{expr_type}`` (S),
        ``log1p_total_{expr_type}`` (F).

    Raises
    ------
    KeyError
        A missing layer or qc_var.
    ValueError
        NaN, inf or negative values (checked in the same pass), an empty matrix; a dask X
        split along genes.
    TypeError
        A dask X with CSC chunks, unsupported chunks, or chunks not all of one type.
    IndexError
        A ``percent_top`` position outside 1..n_vars.
    """
    func = "calculate_qc_metrics"
    if parallel is not None:
        warnings.warn("Argument `parallel` is deprecated, and currently has no effect.",
                      FutureWarning, stacklevel=2)
    x = get_matrix(adata, layer=layer, use_raw=use_raw, func=func)
    if is_backed_type(x):  # a backed AnnData: its file read chunk by chunk (scanpy fails here)
        x = backed_rows(x, func)
    if is_dask(x):
        check_row_chunks(x, func)  # gene-split, CSC or unsupported chunks: an error now
    else:
        placement(x)  # a TypeError for unsupported array types
    check_not_empty(x, func)
    n_obs, n_vars = x.shape
    # qc_vars live in adata.var (as in scanpy), or in raw.var when raw has other genes
    var = adata.raw.var if use_raw and adata.raw.n_vars != adata.n_vars else adata.var
    qc_vars = [qc_vars] if isinstance(qc_vars, str) else list(qc_vars)
    masks = np.zeros((n_vars, len(qc_vars)), dtype=bool)
    for i, name in enumerate(qc_vars):
        if name not in var.columns:
            raise KeyError(f"{func}: qc_vars entry {name!r} is not a column of adata.var; "
                           f"add a boolean column first, e.g. adata.var[{name!r}] = ...")
        column = var[name].to_numpy()
        if column.dtype != bool:
            raise ValueError(f"{func}: qc_vars entry {name!r} must be a boolean column of "
                             f"adata.var, got dtype {column.dtype}")
        masks[:, i] = column
    ns = sorted(percent_top) if percent_top else []
    if ns and not (max(ns) <= n_vars and min(ns) > 0):
        raise IndexError(f"{func}: Positions outside range of features. (percent_top={ns}, n_vars={n_vars})")

    stats = qc_stats(x, masks, np.asarray(ns, dtype=np.int64))
    if stats.nonfinite:
        raise nonfinite_error(func, f"layer {layer!r}" if layer else "the matrix")
    if stats.negative:
        raise ValueError(f"{func}: the matrix has negative values; QC metrics expect counts "
                         "(pass layer= with raw counts)")

    # scanpy's dtypes: totals as numpy sums X (integers and bool: int64/uint64, exact below
    # 2**53 from the float64 sums), means of integers in float64
    dtype = np.zeros(0, x.dtype).sum().dtype
    mean_dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
    chunk = x._meta if is_dask(x) else x  # a dask array's meta: its chunks' type
    nnz_dtype = chunk.indices.dtype if is_sparse(chunk) else np.dtype(np.int64)
    obs_names = adata.obs_names
    var_names = adata.raw.var_names if use_raw else adata.var_names
    obs: dict[str, np.ndarray] = {}
    obs[f"n_{var_type}_by_{expr_type}"] = stats.row_nnz.astype(nnz_dtype)
    if log1p:
        obs[f"log1p_n_{var_type}_by_{expr_type}"] = np.log1p(stats.row_nnz.astype(np.float64))
    total = stats.row_total.astype(dtype)
    obs[f"total_{expr_type}"] = total
    if log1p:
        obs[f"log1p_total_{expr_type}"] = np.log1p(total)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty cells: NaN, as scanpy
        for m, n in enumerate(ns):
            obs[f"pct_{expr_type}_in_top_{n}_{var_type}"] = stats.row_top[:, m] / stats.row_total * 100
        for i, name in enumerate(qc_vars):
            qc_total = stats.row_qc[:, i].astype(dtype)
            obs[f"total_{expr_type}_{name}"] = qc_total
            if log1p:
                obs[f"log1p_total_{expr_type}_{name}"] = np.log1p(qc_total)
            obs[f"pct_{expr_type}_{name}"] = qc_total / total * dtype.type(100)
    var_metrics: dict[str, np.ndarray] = {}
    var_metrics[f"n_cells_by_{expr_type}"] = stats.col_nnz
    mean = (stats.col_total / n_obs).astype(mean_dtype)
    var_metrics[f"mean_{expr_type}"] = mean
    if log1p:
        var_metrics[f"log1p_mean_{expr_type}"] = np.log1p(mean)
    var_metrics[f"pct_dropout_by_{expr_type}"] = (1 - stats.col_nnz / n_obs) * 100
    col_total = stats.col_total.astype(dtype)
    var_metrics[f"total_{expr_type}"] = col_total
    if log1p:
        var_metrics[f"log1p_total_{expr_type}"] = np.log1p(col_total)

    obs_df = pd.DataFrame(obs, index=obs_names)
    var_df = pd.DataFrame(var_metrics, index=var_names)
    if not inplace:
        return obs_df, var_df
    adata.obs[obs_df.columns] = obs_df
    adata.var[var_df.columns] = var_df
    return None
