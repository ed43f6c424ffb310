"""highly_variable_genes: scanpy's seurat, cell_ranger, seurat_v3 and seurat_v3_paper flavors.

pearson_residuals (``_hvg_pearson``) and poisson_gene_selection (``_hvg_poisson``) have their
own modules; this one only dispatches to them.

The per-gene statistics (sums, sums of squares, expressed cells; per batch) come from one
pass of ``_kernels.moments.gene_moments`` over the matrix where it lives. Everything after that
works on one point per gene on the host: binning, normalised dispersions, the loess fit
(scikit-misc, as scanpy), ranks and the selection.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core.adata import check_not_empty, get_matrix, nonfinite_error
from .._core.arrays import placement
from .._core.compat import old_positionals, warn
from .._core.dask import check_row_chunks, is_dask
from .._kernels.moments import (COUNT_NONE, COUNT_POSITIVE, MODE_CLIP, MODE_EXPM1, MODE_IDENTITY,
                                Moments, gene_moments)
from ._hvg_pearson import highly_variable_genes_pearson_residuals
from ._hvg_poisson import poisson_gene_selection

FLAVORS = ("seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper")
_CUTOFF_DEFAULTS = {"min_disp": 0.5, "max_disp": np.inf, "min_mean": 0.0125, "max_mean": 3}
_MAD_SCALE = 0.6744897501960817  # the normal distribution's 3/4 quantile (statsmodels' mad)


@old_positionals("layer", "n_top_genes", "min_disp", "max_disp", "min_mean", "max_mean", "span",
                 "n_bins", "flavor", "subset", "inplace", "batch_key", "check_values")
def highly_variable_genes(
    adata: AnnData,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    min_disp: float = 0.5,
    max_disp: float = np.inf,
    min_mean: float = 0.0125,
    max_mean: float = 3,
    span: float = 0.3,
    n_bins: int = 20,
    flavor: Literal["seurat", "cell_ranger", "seurat_v3", "seurat_v3_paper",
                    "pearson_residuals", "poisson_gene_selection"] = "seurat",
    subset: bool = False,
    inplace: bool = True,
    batch_key: str | None = None,
    filter_unexpressed_genes: bool | None = None,
    check_values: bool = True,
) -> pd.DataFrame | None:
    """Annotate highly variable genes, as :func:`scanpy.pp.highly_variable_genes`.

    Same flavors, arguments, defaults, columns and dtypes as scanpy 1.12. One pass over the
    matrix (CUDA kernel for cupy arrays, numba for host arrays) gives every per-gene and
    per-batch statistic, with or without ``batch_key``; seurat_v3 reads the matrix twice (the
    clipped second moment needs the loess fit of the first). The seurat flavor's expm1 is
    applied on the fly: the matrix is neither copied nor changed. The pass reads rows in
    slices and adds them in a fixed order (:mod:`gpusc._kernels.moments`: deterministic, no
    transpose, no atomics). Device peak beyond the matrix: the slices' float64 partial sums,
    at most 256 MiB plus one slice (``3 x n_vars`` doubles) per batch, and 8 bytes per cell;
    CSC input with ``batch_key`` is read through one CSR copy.

    A dask X (or layer) chunked by rows (numpy, scipy CSR, cupy or cupyx CSR chunks) goes
    chunk by chunk through the same kernels, and the chunks' sums are added on the host; X
    stays lazy and unchanged. Where it synchronises: seurat and cell_ranger once (one pass,
    every batch's statistics included), seurat_v3 and seurat_v3_paper twice (the clipped
    second moment needs the loess fit of the first pass), pearson_residuals twice (gene
    totals, then residual sums), poisson_gene_selection once (moments and cell totals
    together). Chunks split along genes, CSC chunks or chunks of mixed types raise before
    anything in ``adata`` changes.
    Ties in the selection are resolved by gene order (stable sorts), as pandas does. The
    formerly positional arguments still work, with scanpy's FutureWarning.

    ``flavor="pearson_residuals"`` is :func:`scanpy.experimental.pp.highly_variable_genes`
    with its defaults ``theta=100, clip=None`` (scanpy 1.12's ``sc.pp.highly_variable_genes``
    does not accept this flavor; :func:`gpusc.pp.highly_variable_genes_pearson_residuals`
    takes ``theta``, ``clip`` and ``chunksize`` as well): genes ranked by the
    variance of their clipped analytic Pearson residuals (Lause et al. 2021), per batch
    with ``batch_key``, then by the number of batches in which they are among the top
    ``n_top_genes`` and their median rank there. The residual matrix is never built: one
    kernel pass gives each (batch, gene)'s residual sum and sum of squares in float64, the
    implicit zeros of sparse counts included analytically (``n_obs x n_vars`` arithmetic,
    no densified copy). Device peak beyond the matrix: as the moments pass above (CSC input
    is read through one CSR copy).

    ``flavor="poisson_gene_selection"`` is not in scanpy: it is scvi-tools'
    :func:`scvi.data.poisson_gene_selection` (also a flavor of rapids-singlecell) with the
    sampled probability replaced by the exact one. Per batch (all cells without ``batch_key``),
    a gene's share of the batch's counts ``m`` and each cell's total ``t`` give the Poisson
    model's expected fraction of zeros, the mean over cells of ``exp(-m t)``; the observed
    fraction is the share of cells where the gene is 0. scvi estimates the probability that a
    Bernoulli(observed) draw exceeds an independent Bernoulli(expected) one from ``n_samples``
    draws (standard deviation up to 0.005 with its 10,000); here it is the exact
    ``observed * (1 - expected)``: deterministic, and no draws to pay for. Genes are
    ranked per batch (ascending; exact ties by gene order, where scvi's unstable sort leaves
    them unspecified), and selected as scvi does: most batches in which the gene is among the
    top ``n_top_genes``, then the highest median rank. The expected zeros are summed in float64
    over each batch's distinct cell totals (counts share totals: a few thousand per batch),
    never over the ``n_obs x n_vars`` outer product; on the device one CUDA thread per (batch,
    gene). Device peak: as the other flavors' moments pass.

    Parameters
    ----------
    adata
        Cells × genes; log-normalised data for seurat/cell_ranger, counts for seurat_v3.
    layer
        Use ``adata.layers[layer]`` instead of X.
    n_top_genes
        Number of genes to select (default 2000 for seurat_v3); the cutoffs are then ignored.
        Larger than ``n_vars``: every gene (with a normalised dispersion) is selected, with
        scanpy's warning for the dispersion flavors. poisson_gene_selection: default 2000
        with a UserWarning, as rapids-singlecell's flavor and our seurat_v3 (scvi's own
        function defaults to 4000).
    min_disp, max_disp, min_mean, max_mean
        Cutoffs on normalised dispersion and mean (dispersion flavors, no ``n_top_genes``).
    span
        Fraction of genes in each loess fit (seurat_v3).
    n_bins
        Number of mean bins (seurat).
    flavor
        ``"seurat"``, ``"cell_ranger"``, ``"seurat_v3"``, ``"seurat_v3_paper"``,
        ``"pearson_residuals"`` or ``"poisson_gene_selection"``.
    subset
        Keep only the highly variable genes (in place, or in the returned frame; scvi's
        poisson_gene_selection writes into ``adata`` whenever ``subset``, we do not with
        ``inplace=False``).
    inplace
        Write into ``adata.var``/``adata.uns`` instead of returning a DataFrame.
    batch_key
        Column of ``adata.obs``: select within each batch and merge, as scanpy.
    filter_unexpressed_genes
        Leave genes expressed in no cell out of the dispersion statistics (always on with
        ``batch_key``).
    check_values
        seurat_v3, pearson_residuals: warn (UserWarning, as scanpy) when the values are not
        integers (negative values raise). poisson_gene_selection: raise a ValueError
        for non-integer values, as scvi-tools does; ``False`` uses the values as they are.

    Returns
    -------
    A DataFrame with scanpy's columns when ``inplace=False``; else writes ``adata.uns['hvg']``
    (``{'flavor': flavor}``) and these ``adata.var`` columns (a view becomes actual on the
    first write, with anndata's warning, as in scanpy; with ``batch_key``, seurat and
    cell_ranger turn string columns of ``obs``/``var`` into categoricals, as scanpy's
    sanitize_anndata does, whatever ``inplace``):

    seurat, cell_ranger
        ``highly_variable`` (bool), ``means`` (float64), ``dispersions`` (float64),
        ``dispersions_norm`` (float32); with ``batch_key`` also ``highly_variable_nbatches``
        (int64) and ``highly_variable_intersection`` (bool).
    seurat_v3, seurat_v3_paper
        ``highly_variable`` (bool), ``highly_variable_rank`` (float32), ``means`` (float64),
        ``variances`` (float64), ``variances_norm`` (float64); with ``batch_key`` also
        ``highly_variable_nbatches`` (int64).
    pearson_residuals
        ``means`` (float64), ``variances`` (float64), ``residual_variances`` (float64, mean
        over batches), ``highly_variable_rank`` (float32, median over the batches where the
        gene is in the top ``n_top_genes``, NaN elsewhere), ``highly_variable`` (bool); with
        ``batch_key`` also ``highly_variable_nbatches`` (int64) and
        ``highly_variable_intersection`` (bool). ``adata.uns['hvg']`` is
        ``{'flavor': 'pearson_residuals', 'computed_on': layer or 'adata.X'}``.
    poisson_gene_selection
        scvi's columns, the float ones medians over batches: ``highly_variable`` (bool),
        ``observed_fraction_zeros`` (float64), ``expected_fraction_zeros`` (float64; scvi's is
        float32), ``prob_zero_enriched_nbatches`` (int64, written with or without
        ``batch_key`` as scvi does; left out of the returned frame without ``batch_key``),
        ``prob_zero_enrichment`` (float64; scvi's float32), ``prob_zero_enrichment_rank``
        (float64, 0 = least enriched). ``adata.uns['hvg']`` is ``{'flavor': 'poisson_zeros'}``
        (scvi's value).

    Raises
    ------
    KeyError
        A missing layer or ``batch_key``.
    ValueError
        Not an AnnData, an unknown flavor, NaN/inf in the matrix, negative values for
        seurat_v3 (scanpy only warns), missing values in the batch column, an empty matrix;
        seurat_v3 when scikit-misc's loess cannot fit a batch's genes (scanpy raises the same
        error: too few genes with a non-zero variance, e.g. almost empty data);
        pearson_residuals without ``n_top_genes``, ``theta <= 0``, ``clip < 0`` or negative
        counts;
        poisson_gene_selection with negative values, non-integer values (``check_values``),
        a batch without counts, or ``n_top_genes`` not a positive integer.
    """
    func = "highly_variable_genes"
    if not isinstance(adata, AnnData):
        raise ValueError("`pp.highly_variable_genes` expects an `AnnData` argument, "
                         "pass `inplace=False` if you want to return a `pd.DataFrame`.")
    if flavor == "pearson_residuals":
        # scanpy's experimental defaults (theta=100, clip=None); the full signature is
        # highly_variable_genes_pearson_residuals
        return highly_variable_genes_pearson_residuals(
            adata, n_top_genes=n_top_genes, batch_key=batch_key, check_values=check_values,
            layer=layer, subset=subset, inplace=inplace)
    if flavor == "poisson_gene_selection":
        return poisson_gene_selection(adata, layer=layer, n_top_genes=n_top_genes,
                                      batch_key=batch_key, subset=subset, inplace=inplace,
                                      check_values=check_values)
    if flavor not in FLAVORS:
        raise ValueError(f"{func}: flavor={flavor!r} is not one of "
                         f"{(*FLAVORS, 'pearson_residuals', 'poisson_gene_selection')} "
                         '(scanpy: `flavor` needs to be "seurat" or "cell_ranger")')
    x = get_matrix(adata, layer=layer, func=func)
    _check_array(x, func)
    check_not_empty(x, func)
    codes, n_batches = _batch_codes(adata, batch_key, func)
    if x.dtype.kind != "f":
        x = x.astype(np.float32)  # the kernels take float32/float64; counts fit exactly below 2^24

    if flavor in ("seurat_v3", "seurat_v3_paper"):
        df = _seurat_v3(x, adata.var_names, codes, n_batches, flavor=flavor,
                        n_top_genes=2000 if n_top_genes is None else n_top_genes, span=span,
                        check_values=check_values, func=func, layer=layer)
        if not inplace:
            if batch_key is None:
                df = df.drop(columns="highly_variable_nbatches")
            return df.iloc[df["highly_variable"].to_numpy()] if subset else df
        # a view: the first write lets anndata make it actual, with its warning, as in scanpy
        adata.uns["hvg"] = {"flavor": flavor}
        for key in ("highly_variable", "highly_variable_rank", "means", "variances"):
            adata.var[key] = df[key].to_numpy()
        adata.var["variances_norm"] = df["variances_norm"].to_numpy().astype(np.float64, copy=False)
        if batch_key is not None:
            adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"].to_numpy()
        if subset:
            adata._inplace_subset_var(df["highly_variable"].to_numpy())
        return None

    cutoff = _cutoff(n_top_genes, min_disp=min_disp, max_disp=max_disp, min_mean=min_mean,
                     max_mean=max_mean)
    if batch_key is not None and filter_unexpressed_genes is False:
        warn(f"filter_unexpressed_genes is set to False, but will ignored for "
             f"batch-aware flavor={flavor!r} HVG computation", UserWarning)
    base = adata.uns.get("log1p", {}).get("base")
    moments = _moments(x, codes, n_batches, func=func, layer=layer,
                       mode=MODE_EXPM1 if flavor == "seurat" else MODE_IDENTITY,
                       scale=1.0 if base is None or flavor != "seurat" else float(np.log(base)),
                       count=COUNT_POSITIVE if batch_key is not None or filter_unexpressed_genes
                       else COUNT_NONE)
    if batch_key is not None:  # after the pass, whose errors leave adata as it was
        adata.strings_to_categoricals()  # scanpy's sanitize_anndata, with inplace=False too
    counts = np.bincount(codes, minlength=n_batches)
    if batch_key is None:
        df = _dispersion_batch(moments, 0, counts[0], flavor=flavor, n_bins=n_bins,
                               cutoff=cutoff, filter_unexpressed=bool(filter_unexpressed_genes))
        df.index = adata.var_names
    else:
        df = _dispersion_batched(moments, counts, adata.var_names, flavor=flavor,
                                 n_bins=n_bins, cutoff=cutoff)
    if not inplace:
        return df.loc[df["highly_variable"]] if subset else df
    adata.uns["hvg"] = {"flavor": flavor}  # a view becomes actual here, with anndata's warning
    adata.var["highly_variable"] = df["highly_variable"]
    adata.var["means"] = df["means"]
    adata.var["dispersions"] = df["dispersions"]
    adata.var["dispersions_norm"] = df["dispersions_norm"].astype(np.float32)
    if batch_key is not None:
        adata.var["highly_variable_nbatches"] = df["highly_variable_nbatches"]
        adata.var["highly_variable_intersection"] = df["highly_variable_intersection"]
    if subset:
        adata._inplace_subset_var(adata.var["highly_variable"].to_numpy())
    return None


# ---------------------------------------------------------------- shared

def _check_array(x, func: str) -> None:
    """A TypeError for unsupported array types; for a dask array, a clear error unless it is
    split by rows only into chunks of a supported type (before anything changes)."""
    if is_dask(x):
        check_row_chunks(x, func)
    else:
        placement(x)


def _batch_codes(adata: AnnData, batch_key: str | None, func: str) -> tuple[np.ndarray, int]:
    """Each cell's batch as 0..n_batches-1 (categories in order, unused ones dropped)."""
    if batch_key is None:
        return np.zeros(adata.n_obs, np.int32), 1
    if batch_key not in adata.obs.columns:
        raise KeyError(f"{func}: batch_key={batch_key!r} is not a column of adata.obs; "
                       f"columns are {list(adata.obs.columns)}")
    batches = pd.Categorical(adata.obs[batch_key]).remove_unused_categories()
    if (batches.codes < 0).any():
        raise ValueError(f"{func}: adata.obs[{batch_key!r}] has missing values; give every "
                         "cell a batch")
    return batches.codes.astype(np.int32), len(batches.categories)


def _moments(x, codes, n_batches, *, func, layer, **kwargs) -> Moments:
    moments = gene_moments(x, codes, n_batches, **kwargs)
    if moments.nonfinite:
        raise nonfinite_error(func, f"layer {layer!r}" if layer else "adata.X")
    return moments


def _mean_var(sum_: np.ndarray, sum_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased variance from sums (scanpy's E[x²] - E[x]² with correction=1)."""
    mean = sum_ / n
    var = sum_sq / n - mean**2
    if n != 1:
        var *= n / (n - 1)
    return mean, var


# ---------------------------------------------------------------- seurat, cell_ranger

def _cutoff(n_top_genes, **cutoffs) -> dict | int:
    if n_top_genes is None:
        return cutoffs
    if cutoffs != _CUTOFF_DEFAULTS:
        warn("If you pass `n_top_genes`, all cutoffs are ignored.", UserWarning)
    return n_top_genes


def _in_bounds(mean, disp_norm, cutoff: dict) -> np.ndarray:
    return ((mean > cutoff["min_mean"]) & (mean < cutoff["max_mean"])
            & (disp_norm > cutoff["min_disp"]) & (disp_norm < cutoff["max_disp"]))


def _dispersion_batch(moments: Moments, b: int, n_cells: int, *, flavor, n_bins, cutoff,
                      filter_unexpressed: bool) -> pd.DataFrame:
    """scanpy's single-batch dispersion table for batch ``b`` (genes in moments' order)."""
    n_vars = moments.sum.shape[1]
    keep = moments.count[b] > 0 if filter_unexpressed else np.ones(n_vars, bool)
    mean, var = _mean_var(moments.sum[b, keep], moments.sum_sq[b, keep], n_cells)
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        if flavor == "seurat":  # logarithmised, as Seurat
            dispersion[dispersion == 0] = np.nan
            dispersion = np.log(dispersion)
            mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": dispersion})
    df["mean_bin"] = _mean_bins(df["means"], flavor, n_bins)
    avg, dev = _bin_stats(df, flavor)
    with np.errstate(divide="ignore", invalid="ignore"):  # a bin's zero MAD: NaN/inf, silent as pandas
        df["dispersions_norm"] = (df["dispersions"].to_numpy() - avg) / dev
    df["highly_variable"] = _select(mean, df["dispersions_norm"].to_numpy(), cutoff)
    if keep.all():
        return df
    # genes expressed nowhere: zeros in every column, as scanpy
    full = pd.DataFrame(np.zeros((n_vars, df.shape[1])), columns=df.columns)
    full["highly_variable"] = False
    full["mean_bin"] = full["mean_bin"].astype(object)
    rows = np.flatnonzero(keep)
    for column in df.columns:
        values = df[column].to_numpy()
        if column == "mean_bin":
            values = values.astype(object)
        full.iloc[rows, full.columns.get_loc(column)] = values
    return full


def _mean_bins(means: pd.Series, flavor: str, n_bins: int) -> pd.Series:
    if flavor == "seurat":
        bins = n_bins
    else:
        bins = np.r_[-np.inf, np.percentile(means, np.arange(10, 105, 5)), np.inf]
    binned = pd.cut(means, bins=bins)
    return binned.cat.set_categories(binned.cat.categories.astype("string"), rename=True)


def _bin_stats(df: pd.DataFrame, flavor: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene centre and scale of its bin's dispersions."""
    grouped = df.groupby("mean_bin", observed=True)["dispersions"]
    if flavor == "seurat":
        stats = grouped.agg(avg="mean", dev="std")
        # a bin holding one gene has no std: its genes get normalised dispersion 1
        single = stats["dev"].isna()
        stats.loc[single, "dev"] = stats.loc[single, "avg"]
        stats.loc[single, "avg"] = 0
    else:
        stats = grouped.agg(avg="median", dev=_mad)
    per_gene = stats.loc[df["mean_bin"]]
    return per_gene["avg"].to_numpy(), per_gene["dev"].to_numpy()


def _mad(values: pd.Series) -> float:
    a = values.to_numpy()
    return float(np.median(np.abs(a - np.median(a))) / _MAD_SCALE)


def _select(mean: np.ndarray, disp_norm: np.ndarray, cutoff: dict | int) -> np.ndarray:
    if isinstance(cutoff, dict):
        return _in_bounds(mean, np.nan_to_num(disp_norm), cutoff)
    n = min(cutoff, disp_norm.size)
    valid = disp_norm[~np.isnan(disp_norm)]
    if n > valid.size:
        warn(f"`n_top_genes` (={n}) > number of normalized dispersions (={valid.size}), "
             "returning all genes with normalized dispersions.", UserWarning)
        n = valid.size
    threshold = np.sort(valid)[::-1][n - 1]
    return np.nan_to_num(disp_norm, nan=-np.inf) >= threshold


def _dispersion_batched(moments: Moments, counts: np.ndarray, var_names: pd.Index, *, flavor,
                        n_bins, cutoff) -> pd.DataFrame:
    """Per-batch tables (unexpressed genes left out) averaged over batches, as scanpy."""
    n_batches = counts.size
    tables = [_dispersion_batch(moments, b, counts[b], flavor=flavor, n_bins=n_bins,
                                cutoff=cutoff, filter_unexpressed=True) for b in range(n_batches)]
    stacked = {c: np.stack([t[c].to_numpy(dtype=np.float64) for t in tables])
               for c in ("means", "dispersions", "dispersions_norm")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN genes stay NaN, as pandas
        df = pd.DataFrame({c: np.nanmean(v, axis=0) for c, v in stacked.items()}, index=var_names)
    nbatches = np.sum([t["highly_variable"].to_numpy(dtype=bool) for t in tables], axis=0)
    df["highly_variable"] = nbatches.astype(np.int64)
    df["highly_variable_nbatches"] = nbatches.astype(np.int64)
    df["highly_variable_intersection"] = nbatches == n_batches
    if isinstance(cutoff, int):
        # most batches first, then the larger normalised dispersion; NaN last, stable
        disp = df["dispersions_norm"].to_numpy()
        order = np.lexsort((np.where(np.isnan(disp), np.inf, -disp), -nbatches))
        selected = np.zeros(len(df), bool)
        selected[order[:cutoff]] = True
        df["highly_variable"] = selected
    else:
        df["dispersions_norm"] = df["dispersions_norm"].fillna(0)  # as Seurat
        df["highly_variable"] = _in_bounds(df["means"].to_numpy(),
                                           df["dispersions_norm"].to_numpy(), cutoff)
        df = df.sort_index()  # scanpy's groupby returns the genes sorted by name here
    return df


# ---------------------------------------------------------------- seurat_v3

def _seurat_v3(x, var_names, codes, n_batches, *, flavor, n_top_genes, span, check_values,
               func, layer) -> pd.DataFrame:
    try:
        from skmisc.loess import loess
    except ImportError as e:
        e.add_note("Please install `scikit-misc` and try again.")
        raise
    first = _moments(x, codes, n_batches, func=func, layer=layer, mode=MODE_IDENTITY,
                     check_integer=check_values)
    if first.negative:
        raise ValueError(f"{func}: flavor={flavor!r} expects raw counts, but the matrix has "
                         "negative values; pass layer= with the counts")
    if check_values and first.noninteger:
        warn(f"`flavor={flavor!r}` expects raw count data, but non-integers were found.", UserWarning)
    counts = np.bincount(codes, minlength=n_batches)
    means, variances = _mean_var(first.sum.sum(axis=0), first.sum_sq.sum(axis=0), codes.size)

    batch_means = np.empty_like(first.sum)
    reg_std = np.empty_like(first.sum)
    clip = np.empty_like(first.sum)
    for b in range(n_batches):
        mean, var = _mean_var(first.sum[b], first.sum_sq[b], counts[b])
        fitted = np.zeros(mean.size)
        not_const = var > 0
        if not_const.any():
            model = loess(np.log10(mean[not_const]), np.log10(var[not_const]), span=span, degree=2)
            try:
                model.fit()
            except ValueError as err:  # scanpy raises skmisc's error as it is
                raise ValueError(
                    f"{func}: flavor={flavor!r}: scikit-misc's loess could not fit the variance of "
                    f"the {int(not_const.sum())} genes with non-zero variance"
                    f"{f' in batch {b}' if n_batches > 1 else ''} (span={span}): {err}; scanpy "
                    "fails here too. Use more cells or genes, a larger span, or another flavor"
                ) from err
            fitted[not_const] = model.outputs.fitted_values
        batch_means[b], reg_std[b] = mean, np.sqrt(10**fitted)
        clip[b] = reg_std[b] * np.sqrt(counts[b]) + mean  # clip large values as in Seurat
    second = gene_moments(x, codes, n_batches, mode=MODE_CLIP, clip=clip)

    n = counts[:, None].astype(np.float64)
    norm_var = (1 / ((n - 1) * np.square(reg_std))) * (
        n * np.square(batch_means) + second.sum_sq - 2 * second.sum * batch_means)
    # rank 0 = most variable, within each batch
    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1)  # as scanpy (ties too)
    ranks = ranks.astype(np.float32)
    nbatches = np.sum(ranks < n_top_genes, axis=0).astype(np.int64)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)

    df = pd.DataFrame({"means": means, "variances": variances}, index=var_names)
    df["gene_name"] = df.index
    df["highly_variable_nbatches"] = nbatches
    df["highly_variable_rank"] = median_rank
    df["variances_norm"] = np.mean(norm_var, axis=0)
    rank_key = np.where(np.isnan(median_rank), np.inf, median_rank)
    if flavor == "seurat_v3":  # median rank first, more batches break ties; NaN last, stable
        order = np.lexsort((-nbatches, rank_key))
    else:
        order = np.lexsort((rank_key, -nbatches))
    selected = np.zeros(len(df), bool)
    selected[order[: int(n_top_genes)]] = True
    df["highly_variable"] = selected
    return df
