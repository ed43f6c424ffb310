"""filter_cells, filter_genes and log1p, as in scanpy's preprocessing/_simple.py."""

from __future__ import annotations

from functools import singledispatch
from numbers import Number

import numpy as np
from anndata import AnnData
from scanpy import logging as logg

from .._core.adata import actualize_view, device_oom_hint, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import float_dtype, is_sparse, placement
from .._kernels.normalize import log1p_inplace
from .._kernels.qc import qc_stats


def _counts_and_nnz(x, func: str, per_gene: bool):
    """Per-cell (and, with per_gene, per-gene) totals and expressed counts, from one pass."""
    placement(x)
    stats = qc_stats(x, np.zeros((x.shape[1], 0), bool), np.zeros(0, np.int64), per_gene=per_gene)
    if stats.nonfinite:
        raise nonfinite_error(func)
    return stats


def _filter(data, axis: int, func: str, options: dict[str, float | None], count_key: str,
            expressed_key: str, inplace: bool, copy: bool):
    """The shared body of filter_cells (axis 0) and filter_genes (axis 1)."""
    if copy:
        logg.warning("`copy` is deprecated, use `inplace` instead.")
    given = {k: v for k, v in options.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"{func}: only provide one of the optional parameters "
                         f"{', '.join(f'`{k}`' for k in options)} per call.")
    (option, threshold), = given.items()
    by_counts = option.endswith("counts")
    if isinstance(data, AnnData):
        adata = data.copy() if copy else data
        subset, number = _filter(adata.X, axis, func, options, count_key, expressed_key,
                                 inplace=False, copy=False)
        if not inplace:
            return subset, number
        annotation = adata.obs if axis == 0 else adata.var
        annotation[count_key if by_counts else expressed_key] = number
        (adata._inplace_subset_obs if axis == 0 else adata._inplace_subset_var)(subset)
        return adata if copy else None

    stats = _counts_and_nnz(data, func, per_gene=axis == 1)
    if by_counts:
        number = (stats.row_total if axis == 0 else stats.col_total).astype(float_dtype(data.dtype))
    else:
        number = (stats.row_nnz if axis == 0 else stats.col_nnz).astype(np.int64)
    subset = number >= threshold if option.startswith("min") else number <= threshold
    n_out = int((~subset).sum())
    if n_out:
        what = "cells that have " if axis == 0 else "genes that are detected "
        bound = "less than " if option.startswith("min") else "more than "
        unit = ("counts" if by_counts else ("genes expressed" if axis == 0 else "cells"))
        logg.info(f"filtered out {n_out} {what}{'' if axis == 0 else 'in '}{bound}{threshold} {unit}")
    return subset, number


@device_oom_hint
def filter_cells(
    data,
    *,
    min_counts: int | None = None,
    min_genes: int | None = None,
    max_counts: int | None = None,
    max_genes: int | None = None,
    inplace: bool = True,
    copy: bool = False,
):
    """Filter cells on total counts or expressed genes, as :func:`scanpy.pp.filter_cells`.

    One pass over the matrix (kernel on the device for device arrays). Give exactly one
    of the four thresholds. A gene counts as expressed where its value is non-zero.

    Returns
    -------
    ``(cells_subset, number_per_cell)`` (host numpy: bool, and T or int64) when
    ``inplace=False`` or ``data`` is an array; else subsets ``adata`` and writes
    ``obs['n_counts']`` (T, the matrix's float dtype) or ``obs['n_genes']`` (int64).
    """
    return _filter(data, 0, "filter_cells",
                   dict(min_counts=min_counts, min_genes=min_genes, max_counts=max_counts,
                        max_genes=max_genes), "n_counts", "n_genes", inplace, copy)


@device_oom_hint
def filter_genes(
    data,
    *,
    min_counts: int | None = None,
    min_cells: int | None = None,
    max_counts: int | None = None,
    max_cells: int | None = None,
    inplace: bool = True,
    copy: bool = False,
):
    """Filter genes on total counts or expressing cells, as :func:`scanpy.pp.filter_genes`.

    Returns
    -------
    ``(gene_subset, number_per_gene)`` when ``inplace=False`` or ``data`` is an array; else
    subsets ``adata`` and writes ``var['n_counts']`` (T) or ``var['n_cells']`` (int64).
    """
    return _filter(data, 1, "filter_genes",
                   dict(min_counts=min_counts, min_cells=min_cells, max_counts=max_counts,
                        max_cells=max_cells), "n_counts", "n_cells", inplace, copy)


@singledispatch
def log1p(
    data,
    *,
    base: Number | None = None,
    copy: bool = False,
    chunked: bool | None = None,
    chunk_size: int | None = None,
    layer: str | None = None,
    obsm: str | None = None,
):
    """Logarithmize the data matrix, ``X = log(X + 1) / log(base)``, as :func:`scanpy.pp.log1p`.

    In place, one pass over the stored values (sparse structure untouched), so
    ``chunked``/``chunk_size`` are accepted but not needed: no extra memory is used.
    Integer input becomes float64, as in scanpy.

    Returns
    -------
    The transformed array for array input; for an AnnData, a copy when ``copy=True``,
    else ``None``. Writes ``uns['log1p'] = {'base': base}``.
    """
    if layer is not None or obsm is not None:
        raise TypeError("log1p: `layer`/`obsm` apply only to an AnnData")
    return _log1p_array(data, base=base, copy=copy)


@log1p.register(AnnData)
def _(adata: AnnData, *, base=None, copy=False, chunked=None, chunk_size=None, layer=None, obsm=None):
    if base is not None and not (base > 0 and base != 1):
        raise ValueError(f"log1p: base={base!r} must be positive and not 1")
    get_matrix(adata, layer=layer, obsm=obsm, func="log1p")  # KeyError before any change
    if "log1p" in adata.uns:
        logg.warning("adata.X seems to be already log-transformed.")
    adata = adata.copy() if copy else adata
    actualize_view(adata)
    x = get_matrix(adata, layer=layer, obsm=obsm, func="log1p")
    set_matrix(adata, _log1p_array(x, base=base, copy=False), layer=layer, obsm=obsm)
    adata.uns["log1p"] = {"base": base}
    return adata if copy else None


def _log1p_array(x, *, base, copy: bool):
    placement(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)  # scanpy's choice for integers
    elif copy:
        x = x.copy()
    values = x.data if is_sparse(x) else x
    if values.flags.c_contiguous or values.flags.f_contiguous:
        log1p_inplace(values.reshape(-1, order="C" if values.flags.c_contiguous else "F"), base)
    else:  # a strided view: no flat alias exists
        xp = np if isinstance(values, np.ndarray) else __import__("cupy")
        xp.log1p(values, out=values)
        if base is not None:
            values /= np.log(base)
    return x
