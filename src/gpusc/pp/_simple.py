"""filter_cells, filter_genes and log1p, as in scanpy's preprocessing/_simple.py."""

from __future__ import annotations

from functools import partial, singledispatch
from numbers import Number

import numpy as np
from anndata import AnnData

from .._core import logg
from .._core.adata import device_oom_hint, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import canonical, is_sparse, placement, to_host, xp_of
from .._core.compat import (array_only_arguments, is_backed_type, is_sparse_dataset, old_positionals,
                            renamed_data_arg, view_to_actual)
from .._core.dask import block_partials, check_row_chunks, compute, fresh_values, is_dask, map_rows
from .._kernels.normalize import log1p_inplace
from .._kernels.qc import qc_stats


def _counts_and_nnz(x, func: str, per_gene: bool):
    """Per-cell (and, with per_gene, per-gene) totals and expressed counts, from one pass
    (for a dask x: one dask computation over its row chunks)."""
    if is_dask(x):
        check_row_chunks(x, func)
    else:
        placement(x)
    stats = qc_stats(x, np.zeros((x.shape[1], 0), bool), np.zeros(0, np.int64), per_gene=per_gene)
    if stats.nonfinite:
        raise nonfinite_error(func)
    return stats


def _positive_counts(x, axis: int, func: str) -> np.ndarray:
    """Values > 0 per cell (axis 0) or per gene (axis 1), as int64 on the host."""
    if is_dask(x):  # one dask computation: per-cell counts joined, per-gene counts added
        parts = compute(*block_partials(x, func, lambda block: _positive_counts(block, axis, func)))
        return np.concatenate(parts) if axis == 0 else np.sum(parts, axis=0)
    if is_sparse(x):
        summed = canonical(x)  # a (cell, gene) stored twice counts once
        x = summed.copy() if summed is x else summed
        x.data = (x.data > 0).astype(np.float64)  # cupyx sparse holds no integers; exact counts
        counts = x.sum(axis=1 - axis)
    else:
        counts = (x > 0).sum(axis=1 - axis)
    return to_host(xp_of(x).asarray(counts).ravel()).astype(np.int64)


def _filter(data, axis: int, func: str, options: dict[str, float | None], count_key: str,
            expressed_key: str, inplace: bool, copy: bool):
    """The shared body of filter_cells (axis 0) and filter_genes (axis 1)."""
    if copy:
        logg.warning("`copy` is deprecated, use `inplace` instead.")
    given = {k: v for k, v in options.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"{func}: Only provide one of the optional parameters "
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
        # scanpy's dtype: as numpy sums X (integers and bool: int64/uint64)
        number = (stats.row_total if axis == 0 else stats.col_total).astype(np.zeros(0, data.dtype).sum().dtype)
    elif stats.negative:
        # scanpy counts values > 0, which differs from the kernel's non-zero count only here
        number = _positive_counts(data, axis, func)
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


@old_positionals("min_counts", "min_genes", "max_counts", "max_genes", "inplace", "copy")
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
    of the four thresholds. A dask X (row chunks) synchronises once: one ``dask.compute``
    of every chunk's per-cell totals and counts (two with negative values, see below); the
    subsetting of the AnnData then stays lazy, and the returned arrays are host numpy
    (scanpy returns dask arrays for dask input). A gene counts as expressed where its
    value is positive, as in scanpy (one more pass over the matrix when it holds negative
    values). The formerly positional arguments still work, with scanpy's FutureWarning
    (filter_genes too).

    Returns
    -------
    ``(cells_subset, number_per_cell)`` (host numpy: bool, and T or int64) when
    ``inplace=False`` or ``data`` is an array; else subsets ``adata`` and writes
    ``obs['n_counts']`` (S: the matrix's float dtype; int64/uint64 for integer or bool X, as
    numpy sums it) or ``obs['n_genes']`` (int64).
    """
    return _filter(data, 0, "filter_cells",
                   dict(min_counts=min_counts, min_genes=min_genes, max_counts=max_counts,
                        max_genes=max_genes), "n_counts", "n_genes", inplace, copy)


@old_positionals("min_counts", "min_cells", "max_counts", "max_cells", "inplace", "copy")
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
    subsets ``adata`` and writes ``var['n_counts']`` (S, as in :func:`filter_cells`) or
    ``var['n_cells']`` (int64, cells where the gene's value is positive).

    A dask X synchronises once, as in :func:`filter_cells`: one ``dask.compute`` of every
    row chunk's per-gene sums and counts, added on the host; subsetting stays lazy.
    """
    return _filter(data, 1, "filter_genes",
                   dict(min_counts=min_counts, min_cells=min_cells, max_counts=max_counts,
                        max_cells=max_cells), "n_counts", "n_cells", inplace, copy)


@renamed_data_arg
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

    In place, one pass over the stored values (sparse structure untouched), after one pass
    that rejects values below -1 (where scanpy would write NaN). In memory, ``chunked`` and
    ``chunk_size`` change nothing: no extra memory is used either way. A backed AnnData
    (``X`` an HDF5 dataset opened ``r+``) needs ``chunked=True``, as in scanpy: ``chunk_size``
    cells (default 6000) are read, transformed and written back at a time, after a first
    read of the chunks for the value check. Integer input becomes float64, as in scanpy.
    A dask X (or array) stays lazy: a new dask array of the same row chunks, each computed
    from its input chunk (never changed in place); the check for values below -1 runs as
    each chunk is computed, so it raises then, not at the call.
    ``X=`` (scanpy's old name of ``data``) still works, with scanpy's FutureWarning.

    Returns
    -------
    The transformed array for array input; for an AnnData, a copy when ``copy=True``,
    else ``None``. Writes ``uns['log1p'] = {'base': base}``.

    Raises
    ------
    ValueError
        Values below -1, ``base`` not positive or 1, a backed integer X (floats cannot be
        written into it).
    TypeError
        ``chunked``, ``chunk_size``, ``layer`` or ``obsm`` with array input (scanpy's message).
    NotImplementedError
        As scanpy: ``chunked`` with ``layer``/``obsm``, a backed X without ``chunked=True``
        or not opened ``r+``; and a backed sparse X.
    """
    array_only_arguments(chunked=chunked, chunk_size=chunk_size, layer=layer, obsm=obsm)
    _check_base(base)
    _check_log1p_domain(data)
    return _log1p_array(data, base=base, copy=copy)


@log1p.register(AnnData)
def _(adata: AnnData, *, base=None, copy=False, chunked=None, chunk_size=None, layer=None, obsm=None):
    _check_base(base)
    if chunked and (layer is not None or obsm is not None):
        raise NotImplementedError("Currently cannot perform chunked operations on arrays not stored in X.")
    x = get_matrix(adata, layer=layer, obsm=obsm, func="log1p")  # KeyError before any change
    backed = is_backed_type(x)
    if backed:
        _check_backed_log1p(adata, x, chunked, chunk_size)
    else:
        _check_log1p_domain(x)
    if "log1p" in adata.uns:
        logg.warning("adata.X seems to be already log-transformed.")
    adata = adata.copy() if copy else adata
    view_to_actual(adata)  # scanpy's UserWarning "Received a view of an AnnData. Making a copy."
    if backed:
        for chunk, start, stop in adata.chunked_X(chunk_size):
            adata.X[start:stop] = _log1p_array(chunk, base=base, copy=False)
    else:
        x = get_matrix(adata, layer=layer, obsm=obsm, func="log1p")
        set_matrix(adata, _log1p_array(x, base=base, copy=False), layer=layer, obsm=obsm)
    adata.uns["log1p"] = {"base": base}
    return adata if copy else None


def _check_base(base) -> None:
    if base is not None and not (base > 0 and base != 1):
        raise ValueError(f"log1p: base={base!r} must be positive and not 1")


def _below_minus_one(x) -> bool:
    values = x.data if is_sparse(x) else x
    return values.size > 0 and bool(values.min() < -1)  # synchronize!


def _domain_error() -> ValueError:
    return ValueError("log1p: the matrix has values below -1, where log(1 + x) is undefined "
                      "(scanpy writes NaN there, with numpy's RuntimeWarning 'invalid value "
                      "encountered in log1p'); expected counts or normalized counts")


def _check_log1p_domain(x) -> None:
    if is_dask(x):  # lazy: each chunk's values are checked as it is computed (_log1p_chunk)
        check_row_chunks(x, "log1p")
        return
    placement(x)  # a TypeError for unsupported array types
    if _below_minus_one(x):
        raise _domain_error()


def _check_backed_log1p(adata: AnnData, x, chunked, chunk_size) -> None:
    """scanpy's rules for a backed X, and ours: a dense float dataset, no value below -1."""
    if not chunked:
        raise NotImplementedError(f"log1p is not implemented for matrices of type {type(x)} "
                                  "without `chunked=True`")
    if adata.file._filemode != "r+":
        raise NotImplementedError("log1p is not implemented for backed AnnData with backed mode not r+")
    if is_sparse_dataset(x):
        raise NotImplementedError(f"log1p: a backed sparse X ({type(x).__name__}) is not supported; "
                                  "load it into memory (adata.to_memory()) first")
    if x.dtype.kind != "f":
        raise ValueError(f"log1p: the backed X is stored as {x.dtype}, which cannot hold the "
                         "logarithms; write it as float first")
    if any(_below_minus_one(chunk) for chunk, _, _ in adata.chunked_X(chunk_size)):
        raise _domain_error()


def _log1p_chunk(block, *, base):
    """One chunk of a dask X: checked, then transformed into a new chunk (never in place)."""
    if _below_minus_one(block):
        raise _domain_error()
    return _log1p_array(fresh_values(block, _log1p_dtype(block)), base=base, copy=False)


def _log1p_dtype(x) -> np.dtype:
    return x.dtype if x.dtype.kind == "f" else np.dtype(np.float64)  # scanpy's choice for integers


def _log1p_array(x, *, base, copy: bool):
    if is_dask(x):  # lazy: a new dask array of the same chunks
        meta = fresh_values(x._meta, _log1p_dtype(x))  # the chunks' type, without running a kernel
        return map_rows(x, "log1p", partial(_log1p_chunk, base=base), dtype=meta.dtype, meta=meta)
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
