"""Fetching and storing the matrix a pp function works on, with errors that name the argument."""

from __future__ import annotations

import numpy as np
from anndata import AnnData


def get_matrix(adata: AnnData, *, layer: str | None = None, obsm: str | None = None,
               use_raw: bool = False, func: str = ""):
    """X, a layer, an obsm entry or raw.X, chosen like scanpy; KeyError naming the argument."""
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if sum(v not in (None, False) for v in (layer, obsm, use_raw)) > 1:
        raise ValueError(f"{func}: only one of `layer`, `obsm` or `use_raw` can be specified")
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"{func}: layer={layer!r} not found; adata.layers has {[k for k in adata.layers if k is not None]}")  # anndata 0.13 lists X as None
        return adata.layers[layer]
    if obsm is not None:
        if obsm not in adata.obsm:
            raise KeyError(f"{func}: obsm={obsm!r} not found; adata.obsm has {list(adata.obsm)}")
        return adata.obsm[obsm]
    if use_raw:
        if adata.raw is None:
            raise ValueError(f"{func}: use_raw=True but adata.raw is None; set adata.raw or use use_raw=False")
        return adata.raw.X
    if adata.X is None:
        raise ValueError(f"{func}: adata.X is None; pass layer= to choose a layer")
    return adata.X


def set_matrix(adata: AnnData, value, *, layer: str | None = None, obsm: str | None = None) -> None:
    if layer is not None:
        adata.layers[layer] = value
    elif obsm is not None:
        adata.obsm[obsm] = value
    else:
        adata.X = value


def actualize_view(adata: AnnData) -> None:
    """A view becomes a real AnnData before it is written to (as scanpy does)."""
    if adata.is_view:
        adata._init_as_actual(adata.copy())


def check_not_empty(x, func: str) -> None:
    if 0 in x.shape:
        raise ValueError(f"{func}: the matrix is empty (shape {x.shape}); nothing to compute")


def nonfinite_error(func: str, arg: str = "adata.X") -> ValueError:
    return ValueError(
        f"{func}: {arg} contains NaN or inf; expected finite values (remove or impute them first)"
    )


def ensure_float(x):
    """Integer matrices become float32 (scanpy's choice); float matrices are left alone."""
    if x.dtype.kind == "f":
        return x
    return x.astype(np.float32)


def device_oom_hint(func):
    """Turn a device out-of-memory error (CuPy's is a MemoryError) into one that says
    what to do; the functions check their input first, so nothing was written yet."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except MemoryError as err:
            raise MemoryError(
                f"{func.__name__}: out of device memory ({err}). Free device arrays, use managed "
                "memory (gpusc.memory.configure('managed')), or keep the matrix on the host "
                "(gpusc.get.anndata_to_CPU) and process it there"
            ) from err

    return wrapper
