"""score_genes and score_genes_cell_cycle, as scanpy's tools/_score_genes.py: the mean of a gene
set minus the mean of expression-matched control genes, per cell."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core import logg
from .._core.adata import device_oom_hint, get_matrix
from .._core.arrays import is_sparse, placement, to_host, xp_of
from .._core.dask import check_row_chunks, is_dask
from .._kernels.moments import COUNT_NONE, gene_moments
from .._kernels.qc import qc_stats


@device_oom_hint
def score_genes(
    adata: AnnData,
    gene_list: Sequence[str] | pd.Index,
    *,
    ctrl_as_ref: bool = True,
    ctrl_size: int = 50,
    gene_pool: Sequence[str] | pd.Index | None = None,
    n_bins: int = 25,
    score_name: str = "score",
    random_state=0,
    copy: bool = False,
    use_raw: bool | None = None,
    layer: str | None = None,
) -> AnnData | None:
    """Score a set of genes, as :func:`scanpy.tl.score_genes` (Tirosh et al. 2016).

    The score of a cell is the mean expression of ``gene_list`` minus the mean expression of
    control genes: the genes of the pool are cut into ``n_bins`` bins by their mean expression,
    and from each bin a gene of the list falls into ``ctrl_size`` genes are drawn. The bins and
    the draws are scanpy's own (``numpy.random.seed(random_state)``, then pandas' ``sample``
    in the same order), so the same ``random_state`` gives the same control genes and scores
    as scanpy.

    How: the genes' means come from one pass of the moments family over the matrix
    (:func:`gpusc._kernels.moments.gene_moments`, float64; for dense float32 input rounded to
    float32, the dtype scanpy's ``nanmean`` ranks them in); the two per-cell means from the
    columns of the list's and the control genes (a copy of those genes only, as scanpy takes
    them) and one pass over its rows (``kernels/qc.cu``'s per-cell sums over gene masks,
    float64). Both run where the matrix lives (a device matrix on the device); only per-gene
    and per-cell vectors come to the host. NaN in the matrix is ignored as scanpy's ``nanmean`` ignores it (then the
    means are computed again with NaN left out: a second, slower pass).

    Parameters
    ----------
    adata
        The annotated data matrix.
    gene_list
        The genes to score (names of var, or of raw.var with ``use_raw``).
    ctrl_as_ref
        Allow the genes of the list to be drawn as controls (scanpy's default).
    ctrl_size
        Control genes drawn from each bin.
    gene_pool
        Genes to draw controls from; default all genes.
    n_bins
        Number of expression bins.
    score_name
        Name of the obs column written.
    random_state
        Seed of numpy's global random state before the draws (None: not seeded).
    copy
        Score a copy and return it.
    use_raw
        Use ``adata.raw``; default True when ``adata.raw`` is set and no layer is given.
    layer
        Score this layer instead of X.

    Returns
    -------
    None, or the scored copy with ``copy=True``. Writes ``adata.obs[score_name]`` (float64).

    Raises
    ------
    ValueError
        No gene of the list (or the pool) is in var_names; several of layer / use_raw.
    RuntimeError
        No control genes were found.
    KeyError
        A missing layer.
    ValueError
        A dask matrix with NaN or inf (scanpy's NaN-skipping means run in memory), or whose
        chunks are split along genes.
    TypeError
        An unsupported matrix type; dask chunks in CSC or not all of one type.

    A dask matrix split by rows is read in two passes over its chunks (the genes' means,
    then the cells' means over the list and control genes); nothing is gathered.
    """
    fn = "score_genes"
    start = logg.info(f"computing score {score_name!r}")
    adata = adata.copy() if copy else adata
    if use_raw is None:
        use_raw = False if layer is not None else adata.raw is not None
    x = _matrix(adata, layer, use_raw, fn)
    if random_state is not None:
        np.random.seed(random_state)
    var_names = adata.raw.var_names if use_raw else adata.var_names
    gene_list, gene_pool = _checked_genes(gene_list, gene_pool, var_names)

    gene_means = _gene_means(x)
    # as scanpy: the pool's means in the matrix's column order when the pool is as long as
    # var_names (scanpy takes the whole matrix then), else the pool's genes picked out
    columns = (slice(None) if len(gene_pool) == len(var_names)
               else var_names.get_indexer(gene_pool))
    pool_means = pd.Series(gene_means[columns], index=gene_pool)
    control_genes = pd.Index([], dtype="string")
    for drawn in _control_draws(gene_list, pool_means, ctrl_as_ref=ctrl_as_ref,
                                ctrl_size=ctrl_size, n_bins=n_bins, pool_size=len(gene_pool)):
        control_genes = control_genes.union(drawn)
    if len(control_genes) == 0:
        msg = "No control genes found in any cut."
        if ctrl_as_ref:
            msg += " Try setting `ctrl_as_ref=False`."
        raise RuntimeError(msg)

    masks = np.zeros((len(var_names), 2), bool)
    masks[var_names.get_indexer(gene_list), 0] = True
    masks[var_names.get_indexer(control_genes), 1] = True
    means = _cell_means(x, masks)
    adata.obs[score_name] = pd.Series(means[:, 0] - means[:, 1], index=adata.obs_names,
                                      dtype="float64")
    logg.info("    finished", time=start, deep=(
        f"added\n    {score_name!r}, score of gene set (adata.obs).\n"
        f"    {len(control_genes)} total control genes are used."))
    return adata if copy else None


def _matrix(adata: AnnData, layer, use_raw: bool, fn: str):
    if layer is not None and use_raw:
        raise ValueError(f"{fn}: Only one of `layer`, or `use_raw` can be specified.")
    x = get_matrix(adata, layer=layer, use_raw=use_raw, func=fn)
    if is_dask(x):
        check_row_chunks(x, fn)
    else:
        placement(x)  # a TypeError naming the supported types otherwise
    return x if x.dtype.kind == "f" else x.astype(np.float64)  # integers: float64, as nanmean


def _checked_genes(gene_list, gene_pool, var_names: pd.Index) -> tuple[pd.Index, pd.Index]:
    """gene_list and gene_pool restricted to var_names, with scanpy's warning and errors."""
    gene_list = pd.Index([gene_list] if isinstance(gene_list, str) else gene_list)
    ignored = gene_list.difference(var_names, sort=False)
    gene_list = gene_list.intersection(var_names)
    if len(ignored) > 0:
        logg.warning(f"genes are not in var_names and ignored: {ignored}")
    if len(gene_list) == 0:
        raise ValueError("No valid genes were passed for scoring.")
    if gene_pool is None:
        gene_pool = var_names.astype("string")
    else:
        gene_pool = pd.Index(gene_pool, dtype="string").intersection(var_names)
    if len(gene_pool) == 0:
        raise ValueError("No valid genes were passed for reference set.")
    return gene_list, gene_pool


def _control_draws(gene_list: pd.Index, pool_means: pd.Series, *, ctrl_as_ref: bool,
                   ctrl_size: int, n_bins: int, pool_size: int):
    """Control genes for each expression bin of the list's genes: scanpy's binning (rank of
    the mean, ``method="min"``, floor-divided by the bin width) and its draws from numpy's
    global random state (pandas ``sample``), made in the same order."""
    pool_means = pool_means[np.isfinite(pool_means)]  # a gene without finite values has no bin
    bin_width = int(np.round(len(pool_means) / (n_bins - 1)))
    bins = pool_means.rank(method="min") // bin_width
    excluded = np.False_ if ctrl_as_ref else bins.index.isin(gene_list)
    for cut in np.unique(bins.loc[gene_list]):
        candidates = bins[(bins == cut) & ~excluded].index
        if len(candidates) == 0:
            logg.warning(f"No control genes for {cut=}. You might want to increase "
                         f"gene_pool size (current size: {pool_size})")
        if ctrl_size < len(candidates):
            candidates = candidates.to_series().sample(ctrl_size).index
        if ctrl_as_ref:  # else the list's genes were never candidates
            candidates = candidates.difference(gene_list)
        yield candidates


def _gene_means(x) -> np.ndarray:
    """Each gene's mean over the cells, NaN left out (numpy's nanmean), on the host; float32
    for dense float32 input (numpy's nanmean dtype, in which scanpy ranks the genes)."""
    moments = gene_moments(x, squares=False, count=COUNT_NONE)
    if moments.nonfinite:
        means = _nan_means(_in_memory(x), np.ones(x.shape[1], bool), axis=0)
    else:
        means = moments.sum[0] / x.shape[0]
    dense = check_row_chunks(x, "score_genes").endswith("dense") if is_dask(x) else not is_sparse(x)
    return means.astype(np.float32) if x.dtype == np.float32 and dense else means


def _in_memory(x):
    """``x`` itself; a dask matrix with NaN is refused (the NaN-skipping means run in memory)."""
    if is_dask(x):
        raise ValueError("score_genes: the dask matrix contains NaN or inf; its NaN-skipping means "
                         "(numpy's nanmean, as scanpy) need the matrix in memory: compute it first")
    return x


def _cell_means(x, masks: np.ndarray) -> np.ndarray:
    """(n_obs, n_masks) float64 mean of each cell's values over each gene mask, NaN left out:
    the masks' genes taken out (a copy of those columns only), then one pass over its rows
    (qc's per-cell sums over gene masks; a CSC copy goes through CSR)."""
    genes = np.flatnonzero(masks.any(axis=1))
    sub = x[:, genes if is_dask(x) else xp_of(x).asarray(genes)]
    masks = masks[genes]
    stats = qc_stats(sub, masks, np.zeros(0, np.int64), per_gene=False)
    if stats.nonfinite:
        return np.stack([_nan_means(_in_memory(sub), m, axis=1) for m in masks.T], axis=1)
    return stats.row_qc / masks.sum(axis=0)


def _nan_means(x, genes: np.ndarray, axis: int) -> np.ndarray:
    """numpy's nanmean over cells (axis 0, every gene) or over the ``genes`` of each cell
    (axis 1), on the host or the device where x lives; float64 (float32 for dense float32
    over cells, as numpy). The path for matrices with NaN: elementwise array operations."""
    xp = xp_of(x)
    if not is_sparse(x):
        if axis == 0:
            return to_host(xp.nanmean(x, axis=0))
        return to_host(xp.nanmean(x[:, xp.asarray(np.flatnonzero(genes))], axis=1,
                                  dtype=np.float64))
    entries = x.tocoo()
    keep = xp.asarray(genes)[entries.col]
    values = xp.where(keep, entries.data, 0).astype(np.float64)
    missing = xp.isnan(values)
    position = entries.col if axis == 0 else entries.row
    n_out = x.shape[1 - axis]
    totals = xp.bincount(position, weights=xp.where(missing, 0.0, values), minlength=n_out)
    n_missing = xp.bincount(position, weights=missing.astype(np.float64), minlength=n_out)
    n_values = x.shape[0] if axis == 0 else int(genes.sum())
    return to_host(totals / (n_values - n_missing))


def score_genes_cell_cycle(
    adata: AnnData,
    *,
    s_genes: Sequence[str],
    g2m_genes: Sequence[str],
    copy: bool = False,
    **kwargs,
) -> AnnData | None:
    """Score the cell cycle phases, as :func:`scanpy.tl.score_genes_cell_cycle` (Satija 2015).

    :func:`score_genes` of ``s_genes`` and of ``g2m_genes`` with
    ``ctrl_size=min(len(s_genes), len(g2m_genes))``, then each cell's phase: ``G2M`` when its
    G2M score is above its S score, else ``S``, and ``G1`` when both scores are negative.

    Parameters
    ----------
    adata
        The annotated data matrix.
    s_genes, g2m_genes
        Genes of the S and of the G2M phase.
    copy
        Score a copy and return it.
    **kwargs
        Passed to :func:`score_genes` (not ``ctrl_size``).

    Returns
    -------
    None, or the scored copy with ``copy=True``. Writes ``adata.obs['S_score']`` and
    ``adata.obs['G2M_score']`` (float64) and ``adata.obs['phase']`` (strings ``S``, ``G2M``,
    ``G1``; the dtype pandas gives a column of strings, as scanpy).
    """
    logg.info("calculating cell cycle phase")
    adata = adata.copy() if copy else adata
    ctrl_size = min(len(s_genes), len(g2m_genes))
    for genes, name in ((s_genes, "S_score"), (g2m_genes, "G2M_score")):
        score_genes(adata, genes, score_name=name, ctrl_size=ctrl_size, **kwargs)
    scores = adata.obs[["S_score", "G2M_score"]]
    phase = pd.Series("S", index=scores.index)
    phase[scores["G2M_score"] > scores["S_score"]] = "G2M"
    phase[np.all(scores < 0, axis=1)] = "G1"
    adata.obs["phase"] = phase
    logg.hint("    'phase', cell cycle phase (adata.obs)")
    return adata if copy else None
