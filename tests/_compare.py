"""Helpers for comparing gpusc.pp results with scanpy (the oracle) run on an identical copy.

Nothing here computes expected numbers: expectations always come from scanpy.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from conftest import SCANPY_112, tolerance


def adata_of(x, batches=None) -> ad.AnnData:
    """An AnnData around ``x`` with named cells and genes and, given, obs['batch']."""
    n_obs, n_vars = x.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_obs)])
    if batches is not None:
        obs["batch"] = batches
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_vars)]))


# ---------------------------------------------------------------- array placement

def is_device(x) -> bool:
    return type(x).__module__.split(".")[0] in {"cupy", "cupyx"}


def to_host(x):
    """A device array (cupy dense or cupyx sparse) as its numpy/scipy twin; host arrays as is."""
    if is_device(x):
        return x.get()
    return x


def dense(x) -> np.ndarray:
    """Any supported matrix (host or device, dense or sparse) as a numpy array."""
    x = to_host(x)
    if sparse.issparse(x):
        return x.toarray()
    return np.asarray(x)


def host_copy(x):
    """An independent host copy of a matrix made by the ``array_type`` fixture (the oracle's input)."""
    return scanpy_input(to_host(x))


def scanpy_input(x):
    """A copy of the host matrix ``x`` for scanpy to work on. scanpy 1.11 (Python 3.11) mishandles
    SciPy's sparse arrays: log1p, scale and calculate_qc_metrics raise on a csr_array/csc_array
    and normalize_total returns an (n_obs, 1) matrix; there it gets the csr_matrix/csc_matrix of
    the same values, whose result scanpy 1.12 gives for both. gpusc still gets the sparse array."""
    if not SCANPY_112 and isinstance(x, sparse.sparray) and x.format in ("csr", "csc"):
        return (sparse.csr_matrix if x.format == "csr" else sparse.csc_matrix)(x, copy=True)
    return x.copy()


def scanpy_float64_input(x):
    """The host matrix ``x`` for a scanpy step that must sum float32 values in float64, as
    scanpy 1.12 does (rank_genes_groups' t-test moments, score_genes' means). scanpy 1.11
    (Python 3.11) sums them in float32: its t-test variance (``_get_mean_var``) squares float32
    values in float32 and takes E[x²] - E[x]², and score_genes' sparse means are SciPy's
    ``sum(dtype="float64")``, which SciPy 1.17 accumulates in float32. There it gets a float64
    copy of the same values (exact), whose result scanpy 1.12 gives for both; elsewhere, and
    for any other dtype, ``x`` itself."""
    if SCANPY_112 or x.dtype != np.float32:
        return x
    return x.astype(np.float64)


def make_pair(x_host: np.ndarray, array_type, **kwargs):
    """Two identical AnnData objects: one for scanpy (host twin) and one for gpusc (``array_type``).

    ``kwargs`` are extra AnnData fields (``var=``, ``obs=``...) copied into both.
    """
    x_test = array_type(x_host.copy())
    x_ref = host_copy(x_test)
    obs = kwargs.pop("obs", None)
    var = kwargs.pop("var", None)
    n_obs, n_vars = x_host.shape
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_obs)]) if obs is None else obs
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_vars)]) if var is None else var
    ref = ad.AnnData(x_ref, obs=obs.copy(), var=var.copy())
    test = ad.AnnData(x_test, obs=obs.copy(), var=var.copy())
    return ref, test


# ---------------------------------------------------------------- comparisons

def assert_matrix_close(got, expected, dtype, *, err_msg: str = ""):
    """Densely compare a gpusc matrix with scanpy's, with DESIGN.md's tolerance for ``dtype``."""
    g, e = dense(got), dense(expected)
    assert g.shape == e.shape, f"{err_msg}: shape {g.shape} != scanpy {e.shape}"
    np.testing.assert_allclose(g, e, equal_nan=True, err_msg=err_msg, **tolerance(dtype))


def assert_same_kind(got, expected):
    """Loose format check: sparse stays sparse, dense stays dense (as in scanpy)."""
    g = to_host(got)
    assert sparse.issparse(g) == sparse.issparse(expected), (
        f"gpusc returned {type(got).__name__}, scanpy {type(expected).__name__}"
    )


def _is_int(dt) -> bool:
    return np.dtype(dt).kind in "iu"


def assert_frame_like_scanpy(got: pd.DataFrame, expected: pd.DataFrame, dtype, *, int_cols=()):
    """Same index, same column set, integer columns exactly equal, float columns close (NaN == NaN)."""
    assert isinstance(got, pd.DataFrame), type(got)
    pd.testing.assert_index_equal(got.index, expected.index)
    assert set(got.columns) == set(expected.columns), (
        f"columns differ: only gpusc {sorted(set(got.columns) - set(expected.columns))}, "
        f"only scanpy {sorted(set(expected.columns) - set(got.columns))}"
    )
    for col in expected.columns:
        if not pd.api.types.is_numeric_dtype(expected[col]) and not pd.api.types.is_bool_dtype(expected[col]):
            # annotation columns the function must not touch (labels, categories)
            pd.testing.assert_series_equal(got[col], expected[col], check_names=True)
            continue
        g = np.asarray(got[col])
        e = np.asarray(expected[col])
        if col in int_cols or _is_int(e.dtype):
            assert _is_int(g.dtype), f"{col}: gpusc dtype {g.dtype}, scanpy {e.dtype} (integer)"
            np.testing.assert_array_equal(g, e, err_msg=col)
        elif e.dtype == bool:
            np.testing.assert_array_equal(g, e, err_msg=col)
        else:
            assert g.dtype.kind == "f", f"{col}: gpusc dtype {g.dtype}, scanpy {e.dtype}"
            np.testing.assert_allclose(
                g.astype(np.float64), e.astype(np.float64), equal_nan=True, err_msg=col, **tolerance(dtype)
            )


def snapshot(adata: ad.AnnData) -> dict:
    """Deep host copy of everything a pp function may touch."""
    return {
        "X": None if adata.X is None else dense(adata.X).copy(),
        "X_type": type(adata.X),
        "X_dtype": None if adata.X is None else adata.X.dtype,
        "obs": adata.obs.copy(deep=True),
        "var": adata.var.copy(deep=True),
        "obs_names": adata.obs_names.copy(),
        "var_names": adata.var_names.copy(),
        "uns": copy.deepcopy(dict(adata.uns)),
        "layers": {k: dense(v).copy() for k, v in adata.layers.items()},
        "obsm": {k: dense(v).copy() for k, v in adata.obsm.items()},
        "varm": {k: dense(v).copy() for k, v in adata.varm.items()},
        "obsp": {k: dense(v).copy() for k, v in adata.obsp.items()},
        "raw": None if adata.raw is None else dense(adata.raw.X).copy(),
    }


def _uns_equal(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_uns_equal(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def assert_unchanged(adata: ad.AnnData, snap: dict):
    """The AnnData equals the snapshot taken before the call (values, keys, names)."""
    assert type(adata.X) is snap["X_type"], f"X type changed to {type(adata.X)}"
    if snap["X"] is None:
        assert adata.X is None, "X was set"
    else:
        assert adata.X.dtype == snap["X_dtype"], f"X dtype changed from {snap['X_dtype']} to {adata.X.dtype}"
        np.testing.assert_array_equal(dense(adata.X), snap["X"], err_msg="X changed")
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    pd.testing.assert_index_equal(adata.obs_names, snap["obs_names"])
    pd.testing.assert_index_equal(adata.var_names, snap["var_names"])
    assert _uns_equal(dict(adata.uns), snap["uns"]), f"uns changed: {dict(adata.uns)} != {snap['uns']}"
    assert set(adata.layers.keys()) == set(snap["layers"]), "layers keys changed"
    for k, v in snap["layers"].items():
        np.testing.assert_array_equal(dense(adata.layers[k]), v, err_msg=f"layer {k} changed")
    assert set(adata.obsm.keys()) == set(snap["obsm"]), "obsm keys changed"
    for k, v in snap["obsm"].items():
        np.testing.assert_array_equal(dense(adata.obsm[k]), v, err_msg=f"obsm {k} changed")
    for field in ("varm", "obsp"):
        stored = getattr(adata, field)
        assert set(stored.keys()) == set(snap[field]), f"{field} keys changed"
        for k, v in snap[field].items():
            np.testing.assert_array_equal(dense(stored[k]), v, err_msg=f"{field} {k} changed")
    if snap["raw"] is None:
        assert adata.raw is None
    else:
        np.testing.assert_array_equal(dense(adata.raw.X), snap["raw"], err_msg="raw changed")


def assert_same_signature(ours, theirs):
    """Same parameter names, kinds and defaults as scanpy's function."""
    a = inspect.signature(ours).parameters
    b = inspect.signature(theirs).parameters
    assert list(a) == list(b), f"parameters {list(a)} != scanpy {list(b)}"
    for name in b:
        assert a[name].kind == b[name].kind, f"{name}: kind {a[name].kind} != scanpy {b[name].kind}"
        assert a[name].default == b[name].default, (
            f"{name}: default {a[name].default!r} != scanpy {b[name].default!r}"
        )


# ---------------------------------------------------------------- warnings

@contextmanager
def quiet():
    """Run scanpy without letting its RuntimeWarnings (0/0 on empty cells) or UserWarnings leak."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_recording(fn, *args, **kwargs):
    """Call fn, return (result, list of warning messages)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [str(w.message) for w in rec]


def assert_warns_like(ref_msgs, got_msgs, needle: str):
    """gpusc emits a warning containing ``needle`` exactly when scanpy did."""
    ref_has = any(needle in m for m in ref_msgs)
    got_has = any(needle in m for m in got_msgs)
    assert ref_has == got_has, (
        f"scanpy {'did' if ref_has else 'did not'} warn {needle!r}; gpusc warnings: {got_msgs}"
    )


BAD_INPUT_ERRORS = (KeyError, ValueError)

__all__ = [
    "BAD_INPUT_ERRORS",
    "assert_frame_like_scanpy",
    "assert_matrix_close",
    "assert_same_kind",
    "assert_same_signature",
    "assert_unchanged",
    "assert_warns_like",
    "dense",
    "host_copy",
    "is_device",
    "make_pair",
    "quiet",
    "run_recording",
    "scanpy_float64_input",
    "scanpy_input",
    "snapshot",
    "to_host",
]


# ---------------------------------------------------------------- non-canonical sparse input

def noncanonical(x: np.ndarray, fmt: str = "csr", *, duplicates: bool = True, seed: int = 0):
    """``x`` as a CSR/CSC matrix with unsorted indices and (optionally) duplicate entries.

    Each stored value v >= 2 at every third position is split into two entries (v - 1, 1) for the
    same (row, col); the entries of each row (column for CSC) are then shuffled. The dense value
    is unchanged, so scanpy's result on the same object is the oracle.
    """
    rng = np.random.default_rng(seed)
    base = x if fmt == "csr" else x.T
    data, indices, indptr = [], [], [0]
    for row in base:
        cols = np.flatnonzero(row)
        vals = list(row[cols])
        cols = list(cols)
        if duplicates:
            for k in range(0, len(cols), 3):
                if vals[k] >= 2:
                    vals[k] -= 1
                    cols.append(cols[k])
                    vals.append(row.dtype.type(1))
        order = rng.permutation(len(cols))
        data.extend(np.asarray(vals, dtype=x.dtype)[order] if cols else [])
        indices.extend(np.asarray(cols, dtype=np.int32)[order] if cols else [])
        indptr.append(len(data))
    cls = sparse.csr_matrix if fmt == "csr" else sparse.csc_matrix
    m = cls((np.asarray(data, dtype=x.dtype), np.asarray(indices, dtype=np.int32),
             np.asarray(indptr, dtype=np.int32)), shape=x.shape)
    assert not m.has_sorted_indices
    assert m.has_canonical_format is False
    np.testing.assert_array_equal(m.toarray(), x)
    return m
