"""highly_variable_genes(flavor="poisson_gene_selection"): scvi-tools' poisson_gene_selection.

Not in scanpy. Genes are ranked by how much more often they are zero than a Poisson model
with each cell's library size predicts (M3Drop's idea), per batch, and merged across batches
as :func:`scvi.data.poisson_gene_selection` does. scvi estimates ``P(observed zero > expected
zero)`` from 10,000 Bernoulli draws; here it is the exact value, so the result is deterministic.

``_kernels.moments.gene_moments`` gives each (batch, gene)'s count sum and expressed cells in one
pass over the matrix; ``_kernels.hvg.poisson_expected_zeros`` gives the expected fraction of
zeros from each batch's distinct cell totals (never the cells x genes outer product). Ranks,
medians across batches and the selection are computed on the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core.adata import actualize_view, check_not_empty, get_matrix, nonfinite_error
from .._core.arrays import canonical, is_csc, is_sparse, placement, to_host
from .._core.dask import block_partials, check_row_chunks, compute, is_dask
from .._kernels.hvg import poisson_expected_zeros
from .._kernels.moments import COUNT_POSITIVE, add_moments, gene_moments
from .._kernels.normalize import row_sums
from ._hvg_pearson import _batches

_FUNC = "highly_variable_genes"
_FLAVOR = "poisson_gene_selection"
DEFAULT_N_TOP_GENES = 2000
STATS = ("observed_fraction_zeros", "expected_fraction_zeros", "prob_zero_enriched_nbatches",
         "prob_zero_enrichment", "prob_zero_enrichment_rank")


def poisson_gene_selection(
    adata: AnnData,
    *,
    layer: str | None = None,
    n_top_genes: int | None = None,
    batch_key: str | None = None,
    subset: bool = False,
    inplace: bool = True,
    check_values: bool = True,
) -> pd.DataFrame | None:
    """The body of ``highly_variable_genes(flavor="poisson_gene_selection")``; see its docstring."""
    n_top_genes = _check_n_top_genes(n_top_genes)
    x = get_matrix(adata, layer=layer, func=_FUNC)  # KeyError before any change
    on_device = _check_array(x)
    check_not_empty(x, _FUNC)
    labels, codes = _batches(adata, batch_key)
    n_batches = labels.size
    if x.dtype.kind != "f":
        x = x.astype(np.float32)  # the kernels take float32/float64; counts fit exactly below 2^24
    if is_dask(x):
        moments, cell_totals = _dask_pass(x, codes, n_batches, check_values)
    else:
        if is_sparse(x):
            x = canonical(x)  # one copy if needed; scipy's CSC row sums would sum x's duplicates in place
        moments = gene_moments(x, codes, n_batches, count=COUNT_POSITIVE,
                               check_integer=check_values)
        cell_totals = None  # after the checks below
    where = f"layer {layer!r}" if layer else "adata.X"
    if moments.nonfinite:
        raise nonfinite_error(_FUNC, where)
    if moments.negative:
        raise ValueError(f"{_FUNC}: flavor={_FLAVOR!r} expects raw counts, but {where} has "
                         "negative values; pass layer= with the counts")
    if check_values and moments.noninteger:
        raise ValueError(f"{_FUNC}: flavor={_FLAVOR!r} expects raw count data, but {where} has "
                         "non-integer values (scvi-tools raises here too); pass layer= with the "
                         "counts, or check_values=False to use the values as they are")
    batch_sums = moments.sum.sum(axis=1)
    if (batch_sums == 0).any():
        empty = labels[batch_sums == 0].tolist()
        raise ValueError(f"{_FUNC}: flavor={_FLAVOR!r} needs counts in every batch, but "
                         + (f"batches {empty} of adata.obs[{batch_key!r}] have none" if batch_key
                            else f"{where} holds only zeros"))

    # Per batch: each gene's share of the batch's counts; a cell with total t then has a gene
    # at zero with probability exp(-share * t) under the Poisson model.
    scaled_means = moments.sum / batch_sums[:, None]
    if cell_totals is None:
        cell_totals = _cell_totals(x)
    totals, weights, batch_start = _distinct_totals(cell_totals, codes, n_batches)
    if on_device:
        import cupy as cp

        scaled_means = cp.asarray(scaled_means)  # the expected zeros are computed on the device
    expected = poisson_expected_zeros(scaled_means, totals, weights, batch_start)
    n_cells = np.bincount(codes, minlength=n_batches)[:, None]
    observed = 1.0 - moments.count / n_cells
    # P(Bernoulli(observed) > Bernoulli(expected)) for independent draws, which scvi's
    # n_samples draws estimate
    prob = observed * (1.0 - expected)

    # scvi's merge: ascending ranks per batch (stable: exact ties by gene order), medians
    # across batches, and the number of batches where a gene is among the top n_top_genes
    n_vars = x.shape[1]
    ranks = np.argsort(np.argsort(prob, axis=1, kind="stable"), axis=1, kind="stable")
    nbatches = np.sum(ranks >= n_vars - n_top_genes, axis=0).astype(np.int64)
    median_rank = np.median(ranks, axis=0)
    df = pd.DataFrame({
        "observed_fraction_zeros": np.median(observed, axis=0),
        "expected_fraction_zeros": np.median(expected, axis=0),
        "prob_zero_enriched_nbatches": nbatches,
        "prob_zero_enrichment": np.median(prob, axis=0),
        "prob_zero_enrichment_rank": median_rank,
    }, index=adata.var_names)
    # scvi's nlargest(n_top_genes, [nbatches, rank]): most batches, then the higher median
    # rank; equal pairs by gene order (pandas' keep="first")
    order = np.lexsort((-median_rank, -nbatches))
    selected = np.zeros(n_vars, bool)
    selected[order[:n_top_genes]] = True
    df["highly_variable"] = selected

    if not inplace:
        if batch_key is None:
            df = df.drop(columns="prob_zero_enriched_nbatches")
        return df.iloc[selected] if subset else df
    actualize_view(adata)
    adata.uns["hvg"] = {"flavor": "poisson_zeros"}  # scvi's key
    for key in ("highly_variable", *STATS):  # scvi writes nbatches without batches too
        adata.var[key] = df[key].to_numpy()
    if subset:
        adata._inplace_subset_var(selected)
    return None


def _check_n_top_genes(n_top_genes) -> int:
    if n_top_genes is None:
        warnings.warn(f"`flavor={_FLAVOR!r}` expects `n_top_genes` to be defined, defaulting to "
                      f"{DEFAULT_N_TOP_GENES} HVGs", UserWarning, stacklevel=4)
        return DEFAULT_N_TOP_GENES
    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, int | np.integer) \
            or n_top_genes < 1:
        raise ValueError(f"{_FUNC}: n_top_genes={n_top_genes!r} must be a positive integer")
    return int(n_top_genes)


def _check_array(x) -> bool:
    """Whether x (or a dask x's chunks) lives on the device; a TypeError for unsupported array
    types, and for a dask array not split by rows only into chunks of a supported type."""
    if is_dask(x):
        return check_row_chunks(x, _FUNC).startswith("device")
    return placement(x) == "device"


def _dask_pass(x, codes: np.ndarray, n_batches: int, check_values: bool):
    """One pass over a dask x's chunks: the moments (as gene_moments gives them) and every
    cell's total (float64, host)."""
    def per_chunk(block, block_codes):
        return (gene_moments(block, block_codes, n_batches, count=COUNT_POSITIVE,
                             check_integer=check_values), _cell_totals(block))

    parts = compute(*block_partials(x, _FUNC, per_chunk, codes))
    return add_moments(p[0] for p in parts), np.concatenate([p[1] for p in parts])


def _cell_totals(x) -> np.ndarray:
    """Each cell's count total in float64, on the host."""
    if is_csc(x):  # row_sums reads rows; a CSC matrix's row sums are one scattered pass
        return to_host(x.sum(axis=1, dtype=np.float64)).ravel()
    sums, _ = row_sums(x)  # NaN/inf were already ruled out by gene_moments
    return to_host(sums)


def _distinct_totals(totals: np.ndarray, codes: np.ndarray,
                     n_batches: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each batch's distinct cell totals (ascending), how many cells have each (float64), and
    where each batch's run starts (int64, n_batches + 1)."""
    order = np.lexsort((totals, codes))
    b, t = codes[order], totals[order]
    first = np.flatnonzero(np.r_[True, (b[1:] != b[:-1]) | (t[1:] != t[:-1])])
    weights = np.diff(np.r_[first, t.size]).astype(np.float64)
    per_batch = np.bincount(b[first], minlength=n_batches)
    return t[first], weights, np.r_[0, np.cumsum(per_batch)].astype(np.int64)
