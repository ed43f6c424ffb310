"""regress_out, as in scanpy's preprocessing/_simple.py.

scanpy fits each gene separately (numpy for numeric keys with a non-singular design,
statsmodels' Gaussian GLM otherwise). Here every gene is fitted at once: one pass over
the rows accumulates ``Rᵀ X`` in float64 (matrix products on the device or host, rows in
chunks so sparse input is never densified whole), the small k × k system is solved on the
host, and a second pass writes ``X - R · coef``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numba
import numpy as np
import pandas as pd
from anndata import AnnData

from .._core import logg
from .._core.adata import check_not_empty, get_matrix, nonfinite_error, set_matrix
from .._core.arrays import is_csc, is_csr, is_sparse, placement, to_host, xp_of
from .._core.compat import old_positionals, view_to_actual
from .._core.dask import block_partials, check_row_chunks, compute, is_dask, map_rows

_FUNC = "regress_out"
# Elements of X densified (as float64) at a time.
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(x):
    """(start, stop, float64 dense rows) over x, CHUNK_ELEMENTS values at a time."""
    xp = xp_of(x)
    step = max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        rows = x[start:stop]
        rows = rows.toarray() if is_sparse(rows) else rows
        yield start, stop, xp.asarray(rows, dtype=np.float64)


def _rhs(x, design: Callable):
    """Rᵀ X in float64 (k × n_vars): one sparse product for sparse x (no densifying; scipy
    and cuSPARSE accumulate in float64), float64 row chunks through BLAS for dense x."""
    if is_sparse(x):
        r = design(0, x.shape[0])
        if placement(x) == "device":  # cuSPARSE wants one dtype on both sides
            x = x.astype(np.float64)
        return (x.T @ r).T
    rhs = None
    for start, stop, rows in _row_chunks(x):
        part = design(start, stop).T @ rows
        rhs = part if rhs is None else rhs + part
    return rhs


def _gene_range(x):
    """Each gene's min and max over all cells (implicit zeros count)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    if is_sparse(x):
        lo, hi = lo.toarray().ravel(), hi.toarray().ravel()
    return lo, hi


def _residuals(x, fitted: Callable, dtype, linear=None):
    """A new dense C-ordered X - fitted, computed in float64 and stored as `dtype`.

    ``linear=(R, coef)`` says fitted = R @ coef: host CSR then takes one fused numba pass."""
    xp = xp_of(x)
    out = xp.empty(x.shape, dtype)
    if placement(x) == "host" and is_csr(x) and linear is not None:
        r, coef = linear
        _residuals_csr_host(x.data, x.indices, x.indptr, r, coef, out)
        return out
    step = max(1, CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        rows = x[start:stop]
        rows = rows.toarray() if is_sparse(rows) else rows
        # float64 arithmetic (the fit is float64), cast once into the output: no temporaries
        xp.subtract(rows, fitted(start, stop), out=out[start:stop], casting="unsafe")
    return out


@numba.njit(parallel=True, cache=True)
def _residuals_csr_host(data, indices, indptr, r, coef, out):
    # one row per iteration: the fitted row written negated, then the stored values added
    # (in float64, cast once); every output value is written by one thread, in order
    n_rows, n_cols = out.shape
    k = r.shape[1]
    for i in numba.prange(n_rows):
        row = np.empty(n_cols)
        for j in range(n_cols):
            f = 0.0
            for q in range(k):
                f += r[i, q] * coef[q, j]
            row[j] = -f
        for p in range(indptr[i], indptr[i + 1]):
            row[indices[p]] += data[p]
        for j in range(n_cols):
            out[i, j] = row[j]


def _regressor_columns(adata: AnnData, keys: list[str]):
    """('categorical', codes, n_categories) or ('numeric', float64 design with intercept)."""
    missing = [k for k in keys if k not in adata.obs.columns]
    if missing:
        raise KeyError(f"{_FUNC}: keys {missing} not found in adata.obs; "
                       f"it has {list(adata.obs.columns)}")
    obs = adata.obs[keys] if keys else adata.obs
    if obs.shape[1] == 0:
        raise ValueError(f"{_FUNC}: no keys given and adata.obs has no columns to regress on")
    first = obs.iloc[:, 0]
    # scanpy's sanitize_anndata turns string columns into categoricals first
    if isinstance(first.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(first.dtype):
        if obs.shape[1] > 1:
            raise ValueError("If providing categorical variable, only a single one is allowed. "
                             "For this one we regress on the mean for each category.")
        cat = first if isinstance(first.dtype, pd.CategoricalDtype) else first.astype("category")
        return "categorical", cat.cat.codes.to_numpy().astype(np.int64), len(cat.cat.categories)
    for name, col in obs.items():
        if not (pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype)) \
                or isinstance(col.dtype, pd.CategoricalDtype):
            raise ValueError(f"{_FUNC}: obs column {name!r} has dtype {col.dtype}; regress on numeric "
                             "columns, or on one categorical column alone")
    values = obs.to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{_FUNC}: obs columns {list(obs.columns)} contain NaN or inf; "
                         "fill or drop those cells first")
    return "numeric", np.column_stack([np.ones(len(values)), values])


def _float_x(x):
    """scanpy's casting of integer input: float32 up to 4-byte integers, float64 beyond."""
    if x.dtype.kind == "f":
        return x
    return x.astype(np.float32 if x.dtype.itemsize <= 4 else np.float64)


def _fit_numeric(x, design: np.ndarray):
    xp = xp_of(x)
    r = xp.asarray(design)
    rhs = _rhs(x, lambda s, e: r[s:e])
    _check_finite(rhs)
    coef, dtype = _numeric_model(rhs, design, lambda: _gene_range(x))
    return _residuals(x, lambda s, e: r[s:e] @ coef, x.dtype if dtype is None else dtype,
                      linear=(r, coef))


def _singular(design: np.ndarray) -> bool:
    return np.linalg.det(design.T @ design) == 0  # scanpy's test for its numpy path


def _numeric_model(rhs, design: np.ndarray, gene_range: Callable):
    """(coef, result dtype: None for X's own) from Rᵀ X; ``gene_range()`` gives each gene's
    (min, max), asked for only with a singular design."""
    xp = xp_of(rhs)
    gram = design.T @ design
    if not _singular(design):
        return xp.asarray(np.linalg.inv(gram)) @ rhs, None
    # scanpy's GLM path: least squares (minimum norm), constant genes left as they are, float64
    coef = xp.asarray(np.linalg.pinv(gram)) @ rhs
    lo, hi = gene_range()
    coef[:, lo == hi] = 0
    return coef, np.float64


def _one_hot(codes, n_cat: int, xp):
    """[1 | category indicators] for rows s:e of the cells whose category codes are ``codes``."""
    codes = xp.asarray(codes)

    def design(s, e):
        block = xp.zeros((e - s, n_cat + 1), np.float64)
        block[:, 0] = 1
        c = codes[s:e]
        rows = xp.flatnonzero(c >= 0)
        block[rows, c[rows] + 1] = 1
        return block

    return design


def _fit_categorical(x, codes: np.ndarray, n_cat: int):
    """The float64 residuals of the fit of :func:`_categorical_model` (in memory)."""
    xp = xp_of(x)
    rhs = _rhs(x, _one_hot(codes, n_cat, xp))
    _check_finite(rhs)
    lo, hi = _gene_range(x)
    intercept, table = _categorical_model(rhs, lo, hi, codes, n_cat, x.shape[0])
    codes_d = xp.asarray(codes)
    return _residuals(x, lambda s, e: intercept + table[codes_d[s:e] + 1], np.float64)


def _categorical_model(rhs, lo, hi, codes: np.ndarray, n_cat: int, n: int):
    """Per gene, least squares on [1, m] with m the gene's float32 category mean for the
    cell's category (0 for cells without one), as scanpy's ``_create_regressor_categorical``
    and GLM; solved in closed form with m centred, for all genes at once, from Rᵀ X of the
    one-hot design. Returns (intercept, table): the fit of a cell of category c is
    ``intercept + table[c + 1]`` (row 0 for cells without a category)."""
    xp = xp_of(rhs)
    counts = np.bincount(codes[codes >= 0], minlength=n_cat).astype(np.float64)
    cat_sums = rhs[1:]  # n_cat × n_vars
    counts_d = xp.asarray(counts)[:, None]
    means = xp.where(counts_d > 0, cat_sums / xp.where(counts_d > 0, counts_d, 1), 0)
    means = means.astype(np.float32).astype(np.float64)  # scanpy's float32 regressor
    m_bar = (counts_d * means).sum(axis=0) / n  # cells without a category have m = 0
    y_sum = rhs[0]
    n_none = n - counts.sum()
    sxy = ((means - m_bar) * cat_sums).sum(axis=0) - m_bar * (y_sum - cat_sums.sum(axis=0))
    sxx = (counts_d * (means - m_bar) ** 2).sum(axis=0) + n_none * m_bar**2
    slope = xp.where(sxx > 0, sxy / xp.where(sxx > 0, sxx, 1), 0)
    intercept = y_sum / n - slope * m_bar
    constant = xp.asarray(lo == hi)  # scanpy leaves these genes untouched
    slope[constant] = 0
    intercept[constant] = 0
    table = xp.concatenate([xp.zeros((1, rhs.shape[1])), slope * means], axis=0)
    return intercept, table


def _regress_dask(x, chunks: str, regressors):
    """The corrected dask x: one pass for Rᵀ X (and each gene's min and max where constant
    genes matter), the small fit on the host, then lazy residual chunks."""
    numeric = regressors[0] == "numeric"
    per_row = regressors[1]  # the numeric design, or the category codes
    need_range = not numeric or _singular(per_row)

    def chunk_stats(block, rows):
        block = _float_x(block)
        xp = xp_of(block)
        n_vars = block.shape[1]
        if block.shape[0] == 0:
            k = rows.shape[1] if numeric else regressors[2] + 1
            return np.zeros((k, n_vars)), np.full(n_vars, np.inf), np.full(n_vars, -np.inf)
        if numeric:
            r = xp.asarray(rows)
            rhs = _rhs(block, lambda s, e: r[s:e])
        else:
            rhs = _rhs(block, _one_hot(rows, regressors[2], xp))
        lo, hi = _gene_range(block) if need_range else (np.zeros(n_vars), np.zeros(n_vars))
        return to_host(rhs), to_host(lo).astype(np.float64), to_host(hi).astype(np.float64)

    parts = compute(*block_partials(x, _FUNC, chunk_stats, per_row))
    rhs = np.sum([p[0] for p in parts], axis=0)
    _check_finite(rhs)
    lo = np.min([p[1] for p in parts], axis=0)
    hi = np.max([p[2] for p in parts], axis=0)
    on_device = chunks.startswith("device")
    if numeric:
        coef, dtype = _numeric_model(rhs, per_row, lambda: (lo, hi))
        dtype = np.dtype(_float_x(x).dtype if dtype is None else dtype)
    else:
        intercept, table = _categorical_model(rhs, lo, hi, per_row, regressors[2], x.shape[0])
        dtype = np.dtype(np.float64)

    def residual_chunk(block, rows):
        block = _float_x(block)
        xp = xp_of(block)
        if numeric:
            r, c = xp.asarray(rows), xp.asarray(coef)
            return _residuals(block, lambda s, e: r[s:e] @ c, dtype, linear=(r, c))
        icpt, tab, codes = xp.asarray(intercept), xp.asarray(table), xp.asarray(rows)
        return _residuals(block, lambda s, e: icpt + tab[codes[s:e] + 1], dtype)

    if on_device:
        import cupy as cp

        meta = cp.empty((0, 0), dtype)
    else:
        meta = np.empty((0, 0), dtype)
    return map_rows(x, _FUNC, residual_chunk, per_row, dtype=dtype, meta=meta)


def _check_finite(rhs) -> None:
    # every design has an intercept column, so a NaN/inf anywhere in X reaches Rᵀ X
    if not bool(xp_of(rhs).isfinite(rhs).all()):  # synchronize!
        raise nonfinite_error(_FUNC, "the data")


@old_positionals("layer", "n_jobs", "copy")
def regress_out(
    adata: AnnData,
    keys: str | Sequence[str],
    *,
    layer: str | None = None,
    n_jobs: int | None = None,
    copy: bool = False,
) -> AnnData | None:
    """Regress out unwanted sources of variation, as :func:`scanpy.pp.regress_out`.

    Linear regression of every gene on the obs columns ``keys`` (numeric columns with an
    intercept, or one categorical column: the gene's per-category mean as regressor, as
    scanpy), all genes at once: ``coef = solve(RᵀR, RᵀX)``, result ``X - R · coef``.
    Products run where X lives (cuBLAS through CuPy on the device, BLAS on the host), in
    float64, over chunks of rows. Like scanpy, the result is dense: X's float dtype
    (integers: float32 up to 4 bytes, float64 beyond) for numeric keys; float64 for a
    categorical key or a singular design, where genes constant over all cells are left as
    they are. Device memory: the dense result plus float64 chunks of about 32 MiB.

    A dask X (or layer) chunked by rows (numpy, scipy CSR, cupy or cupyx CSR chunks)
    synchronises once: the per-cell regressors are small host arrays, sliced to each chunk;
    one pass over the chunks gives ``Rᵀ X`` (and each gene's min and max, for a categorical key
    or a singular design, to find the constant genes), the k × k fit runs on the host, and the
    result is a lazy dask array of dense chunks (same row chunks, dtype as above). scanpy 1.12
    refuses dask here (its numba regression loop cannot type a dask array).
    ``layer``, ``n_jobs`` and ``copy`` may still be given positionally, with scanpy's
    FutureWarning.

    Parameters
    ----------
    adata
        Cells × genes; X or the layer may live on host or device.
    keys
        obs columns to regress on: numeric ones, or a single categorical (or string) one.
    layer
        Regress this layer instead of X.
    n_jobs
        Accepted for scanpy compatibility; the fit is one batched solve, so it is unused.
    copy
        Work on (and return) a copy of ``adata``.

    Returns
    -------
    ``None``, or the copy with ``copy=True``; X (or the layer) becomes the dense corrected
    matrix (numpy or cupy, or a dask array of those for dask input; dtype as above). As in scanpy, string columns of ``obs`` and
    ``var`` become categoricals (scanpy's sanitize_anndata) and a view becomes an actual
    AnnData with scanpy's UserWarning.
    """
    del n_jobs
    keys = [keys] if isinstance(keys, str) else list(keys)
    x = get_matrix(adata, layer=layer, func=_FUNC)  # KeyError before any change
    chunks = check_row_chunks(x, _FUNC) if is_dask(x) else None
    if chunks is None:
        placement(x)
    check_not_empty(x, _FUNC)
    regressors = _regressor_columns(adata, keys)
    start = logg.info(f"regressing out {keys}")
    if is_sparse(x) or (chunks or "").endswith("csr"):
        logg.info("    sparse input is densified and may lead to high memory use")
        if is_csc(x):
            x = x.tocsr()  # row chunks
    x = _float_x(x)
    if chunks is not None:
        result = _regress_dask(x, chunks, regressors)
    elif regressors[0] == "categorical":
        result = _fit_categorical(x, regressors[1], regressors[2])
    else:
        result = _fit_numeric(x, regressors[1])
    if copy:
        adata = adata.copy()
    adata.strings_to_categoricals()  # scanpy's sanitize_anndata (a view with strings: anndata's warning)
    view_to_actual(adata)  # scanpy's UserWarning "Received a view of an AnnData. Making a copy."
    set_matrix(adata, result, layer=layer)
    logg.info("    finished", time=start)
    return adata if copy else None

