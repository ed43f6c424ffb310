"""scanpy's calling conventions: its warnings, its view handling and its deprecated arguments.

scanpy warns through a helper that points the warning at the user's line (not at a
scanpy file), turns a view into an actual AnnData with a UserWarning, and keeps old
positional arguments and the renamed ``X`` argument working with a FutureWarning.
These are the same behaviours, built on :mod:`legacy_api_wrap` (scanpy's own dependency).
"""

from __future__ import annotations

import sys
import warnings
from functools import partial, wraps
from pathlib import Path

import legacy_api_wrap
import numpy as np
import pandas as pd
from anndata import AnnData

from .arrays import to_host

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_LEGACY_DIR = str(Path(legacy_api_wrap.__file__).resolve().parent)
VIEW_WARNING = "Received a view of an AnnData. Making a copy."


def check_random_state(seed) -> np.random.RandomState:
    """scikit-learn's ``check_random_state`` (scanpy's seeds: None, an int, a RandomState), with
    its error, without importing scikit-learn (about a second) for it."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, int | np.integer):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"{seed!r} cannot be used to seed a numpy.random.RandomState instance")


def warn(message: str, category: type[Warning]) -> None:
    """A warning attributed to the first frame outside gpusc (the caller's own line)."""
    skip = (_PACKAGE_DIR, _LEGACY_DIR)
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, skip_file_prefixes=skip)
        return
    # Python 3.11 has no skip_file_prefixes: count the frames it would skip. stacklevel 2 is
    # warn's caller; each frame inside gpusc or legacy_api_wrap moves it one further out.
    frame, stacklevel = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, stacklevel = frame.f_back, stacklevel + 1
    warnings.warn(message, category, stacklevel=stacklevel)


def view_to_actual(adata: AnnData) -> None:
    """A view becomes an actual AnnData before it is written to, with scanpy's UserWarning."""
    if adata.is_view:
        warn(VIEW_WARNING, UserWarning)
        adata._init_as_actual(adata.copy())


# Parameters that were positional in older scanpy: accepted positionally with a FutureWarning.
old_positionals = partial(legacy_api_wrap.legacy_api, category=FutureWarning,
                          skip_file_prefixes=(_PACKAGE_DIR,))


def renamed_data_arg(func):
    """scanpy's ``renamed_arg("X", "data", pos_0=True)``: ``f(X=m)`` still works, with scanpy's
    FutureWarning, and passes ``m`` as the first positional argument."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        if "X" in kwargs:
            name = func.__name__
            warn(f"In function `{name}`, argument `X` was renamed to `data` at first position. "
                 f"Call it as `{name}(val, ...)` instead of `{name}(X=val, ...)`.", FutureWarning)
            args = (kwargs.pop("X"), *args)
        return func(*args, **kwargs)

    return wrapper


def array_only_arguments(**kwargs) -> None:
    """scanpy's TypeError for AnnData-only arguments given with an array."""
    given = [k for k, v in kwargs.items() if v is not None]
    if given:
        raise TypeError(f"Arguments {given} are only valid if an AnnData object is passed.")


def is_sparse_dataset(x) -> bool:
    """anndata's on-disk CSR/CSC matrix of a backed AnnData."""
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(x, CSRDataset | CSCDataset)


def is_backed_type(x) -> bool:
    """An on-disk matrix of a backed AnnData (scanpy's ``is_backed_type``)."""
    import h5py

    return isinstance(x, h5py.Dataset | h5py.File) or is_sparse_dataset(x)


def backed_error(x, method: str) -> NotImplementedError:
    """scanpy's error for a function given an on-disk matrix."""
    return NotImplementedError(f"{method} is not implemented for matrices of type {type(x)}")


def check_mask(adata: AnnData | None, mask, dim: str, n: int, func: str, arg: str):
    """scanpy's ``_check_mask`` with its messages (after ``"{func}: {arg}: "``): a boolean numpy
    mask over ``n`` obs or var from an array or the name of an ``adata.obs``/``adata.var``
    column; ``None`` stays ``None``."""
    if mask is None:
        return None
    where = f"{func}: {arg}{f'={mask!r}' if isinstance(mask, str) else ''}:"
    if isinstance(mask, str):
        if adata is None:
            raise ValueError(f"{where} Cannot refer to mask with string without providing anndata "
                             "object as argument")
        annot = getattr(adata, dim)
        if mask not in annot.columns:
            raise ValueError(f"{where} Did not find `adata.{dim}[{mask!r}]`. Either add the mask first "
                             f"to `adata.{dim}`or consider using the mask argument with an array.")
        values = annot[mask].to_numpy()
    else:
        values = mask.to_numpy() if isinstance(mask, pd.Series) else to_host(mask)
        if values.ndim != 1 or len(values) != n:
            raise ValueError(f"{where} The shape of the mask do not match the data. "
                             f"(mask shape {values.shape}, {n} {dim})")
    if not pd.api.types.is_bool_dtype(values.dtype):
        raise ValueError(f"{where} Mask array must be boolean. (got dtype {values.dtype})")
    return np.asarray(values, dtype=bool)
