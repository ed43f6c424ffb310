"""pca, as in scanpy's preprocessing/_pca: covariance (Gram) + eigh, or an implicitly
centred randomized subspace iteration for wide matrices; sparse input is never densified."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from .._core.adata import check_not_empty, get_matrix
from .._core.arrays import is_csc, is_sparse, placement, to_host, xp_of
from .._kernels.gram import DenseRows, gram

N_PCS = 50  # scanpy's settings.N_PCS
CHUNK_SIZE = 6000  # AnnData.chunked_X's default chunk_size
# Above this many genes the n_vars² covariance is not formed (unless
# svd_solver="covariance_eigh"): the randomized subspace iteration runs instead.
GRAM_MAX_VARS = 10_000
# Randomized subspace iteration: block size max(2 n_comps, n_comps + 10); power iterations
# until the top n_comps singular value estimates move less than RITZ_RTOL × the largest.
N_OVERSAMPLES = 10
MIN_POWER_ITER = 4
MAX_POWER_ITER = 50
RITZ_RTOL = 1e-10
PROJECT_CHUNK_BYTES = 64 << 20  # float64 row chunk of X converted at a time

_EXACT = frozenset({"auto", "full", "arpack", "covariance_eigh", "lobpcg"})
_SOLVERS = _EXACT | {"randomized", "cuml"}


class _Empty:
    """The default of ``mask_var``: use ``var['highly_variable']`` when it exists."""

    def __repr__(self) -> str:
        return "_empty"


_empty = _Empty()


def pca(
    data,
    n_comps: int | None = None,
    *,
    layer: str | None = None,
    obsm: str | None = None,
    zero_center: bool = True,
    svd_solver: str | None = None,
    chunked: bool = False,
    chunk_size: int | None = None,
    random_state=0,
    return_info: bool = False,
    mask_var=_empty,
    use_highly_variable: bool | None = None,
    dtype="float32",
    key_added: str | None = None,
    copy: bool = False,
):
    r"""Principal component analysis, as :func:`scanpy.pp.pca`.

    With ``zero_center=True`` (or ``chunked=True``) the PCA of the matrix; with
    ``zero_center=False`` a truncated SVD of the uncentred matrix (scanpy's TruncatedSVD).

    How: for up to ``GRAM_MAX_VARS`` (10,000) genes, XᵀX and the column sums in float64
    (device CSR: float64 row blocks of at most 64 MiB filled by a CUDA kernel and multiplied
    on cuBLAS; host CSR: a numba kernel over the stored values; dense: BLAS/cuBLAS on float64
    row chunks), the covariance ``(XᵀX − n·μμᵀ)/(n−1)``, and its top
    eigenvectors (``cupy.linalg.eigh`` / ``scipy.linalg.eigh``). Wider input, or
    ``svd_solver="randomized"``, uses a randomized subspace iteration (block size
    ``max(2·n_comps, n_comps+10)``, QR after every product, 4 to 50 power iterations until
    the singular value estimates settle) on products X·V and Xᵀ·U with
    the centring applied implicitly; the centred matrix is never formed. ``"arpack"``,
    ``"full"``, ``"auto"``, ``"covariance_eigh"`` (and ``None``) take the exact path; other
    names warn and are ignored, as in scanpy. ``"cuml"`` (a gpusc extension, not a scanpy
    name) hands dense device input to cuML's PCA (the ``rapids-cu13``/``rapids-cu12`` extra;
    centred, not chunked); its numbers come from cuML. Results follow scikit-learn's sign convention
    (the largest loading of each component is positive). Deterministic: the same input and
    ``random_state`` give the same result on the same device.

    ``chunked=True`` accumulates XᵀX over chunks of ``chunk_size`` cells, then projects chunk
    by chunk: the exact PCA (scanpy's IncrementalPCA approximates it); ``zero_center``,
    ``svd_solver`` and ``random_state`` are ignored, as in scanpy. Backed AnnData is not
    supported.

    Memory (on the device for device input): the n_vars² float64 Gram plus eigh's workspace
    (about another n_vars² float64); a CSR copy of CSC input; a copy of the selected genes
    with ``mask_var`` (not for device CSR: its row blocks skip the other genes); float64 row
    chunks of at most 64 MiB; X_pca as n_obs × n_comps float64. The randomized path needs
    no n_vars² matrix: n_obs × block and n_vars × block float64. Sparse input is never
    densified whole.

    Parameters
    ----------
    data
        AnnData, or a cells × genes matrix: numpy, scipy CSR/CSC, cupy, cupyx CSR/CSC.
    n_comps
        Number of components; default 50, or min(n_obs, n_vars) − 1 when that is smaller.
        Must be between 1 and min(n_obs, n_vars) − 1.
    layer, obsm
        Use this layer or obsm entry instead of X (not with ``chunked``).
    zero_center
        Centre the genes (PCA), or not (truncated SVD).
    svd_solver
        See above.
    chunked, chunk_size
        Work on ``chunk_size`` cells at a time (default 6000).
    random_state
        Seed of the randomized solver (int, None or a numpy RandomState).
    return_info
        With array input, also return components, variance ratio and variance.
    mask_var
        Boolean mask or name of a boolean ``var`` column: the genes to use. By default
        ``var['highly_variable']`` when that column exists.
    use_highly_variable
        Deprecated (FutureWarning); ``mask_var="highly_variable"``.
    dtype
        dtype of the X_pca written.
    key_added
        Keys for obsm, varm and uns instead of ``"X_pca"``, ``"PCs"``, ``"pca"``.
    copy
        Return an updated copy of the AnnData.

    Returns
    -------
    For array input, X_pca (where the matrix lives), or with ``return_info``
    ``(X_pca, components (n_comps × n_genes), variance_ratio, variance)`` (the last three
    as numpy). For AnnData, ``None`` (or the copy) with:

    ``obsm['X_pca' | key_added]``
        n_obs × n_comps, ``dtype``; a cupy array when the matrix lives on the device.
    ``varm['PCs' | key_added]``
        n_vars × n_comps numpy loadings (float64 with zeros outside ``mask_var``; else
        float32 for float32 input, float64 otherwise). With ``obsm``, stored instead as
        ``uns[...]['components']``.
    ``uns['pca' | key_added]``
        ``variance`` and ``variance_ratio`` (numpy; float32 for float32 input, float64 for
        other input or ``chunked``) and ``params``: ``zero_center``,
        ``use_highly_variable``, ``mask_var`` (and ``layer`` / ``obsm`` when given).

    Raises
    ------
    ValueError
        n_comps out of range, NaN or inf in the matrix, an empty matrix, a bad mask.
    KeyError
        A missing layer or obsm key.
    NotImplementedError
        ``chunked`` with ``layer`` or ``obsm``.
    ImportError
        ``svd_solver="cuml"`` without cuML installed.
    """
    func = "pca"
    if (layer is not None or obsm is not None) and chunked:
        raise NotImplementedError(f"{func}: cannot use `layer`/`obsm` and `chunked` at the same time")
    if return_anndata := isinstance(data, AnnData):
        if data.isbacked and layer is None and obsm is None:
            raise NotImplementedError(f"{func}: backed AnnData is not supported; load it into memory first")
        adata = data
    else:
        placement(data)  # a TypeError for unsupported array types
        adata = None

    mask_var_param, mask = _handle_mask_var(adata, data.shape[1] if adata is None else adata.n_vars,
                                            mask_var, obsm=obsm, use_highly_variable=use_highly_variable)
    x = data if adata is None else get_matrix(adata, layer=layer, obsm=obsm, func=func)
    placement(x)
    check_not_empty(x, func)
    source_dtype = x.dtype  # the output dtypes follow it (a device CSR is read as float64 blocks)
    if mask is not None:
        if not mask.any():
            raise ValueError(f"{func}: mask_var selects no genes")
        x = _select_columns(x, mask)
    n_obs, n_vars = x.shape

    min_dim = min(n_obs, n_vars)
    if n_comps is None:
        n_comps = min_dim - 1 if min_dim <= N_PCS else N_PCS
    if isinstance(n_comps, bool) or not isinstance(n_comps, int | np.integer) or not 1 <= n_comps < min_dim:
        raise ValueError(
            f"{func}: n_comps={n_comps!r} must be an integer between 1 and "
            f"min(n_obs, n_vars) - 1 = {min_dim - 1} (the matrix used is {n_obs} × {n_vars}); "
            "pass a smaller n_comps"
        )
    n_comps = int(n_comps)
    if chunked:
        chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise ValueError(f"{func}: chunk_size={chunk_size!r} must be a positive integer")
    solver = _solver(svd_solver, n_vars, chunked)
    if solver == "cuml" and (placement(x) != "device" or is_sparse(x) or not zero_center or chunked):
        raise ValueError(f"{func}: svd_solver='cuml' takes dense device input with zero_center=True "
                         "and chunked=False; leave svd_solver unset for gpusc's own solvers")
    if not _all_finite(x):
        where = f"layer {layer!r}" if layer else f"obsm {obsm!r}" if obsm else "adata.X" if adata else "the matrix"
        raise ValueError(f"{func}: {where} contains NaN or inf; PCA needs finite values "
                         "(remove or impute them first)")

    fit = _fit(x, n_comps, zero_center=zero_center or chunked, solver=solver,
               chunk_size=int(chunk_size) if chunked else None, random_state=random_state)
    out_dtype = np.dtype(np.float64) if chunked or source_dtype != np.float32 else np.dtype(np.float32)
    components = fit.components.astype(out_dtype)
    variance = fit.variance.astype(out_dtype)
    variance_ratio = fit.variance_ratio.astype(out_dtype)
    x_pca = fit.x_pca.astype(dtype)

    if not return_anndata:
        if return_info:
            return x_pca, components, variance_ratio, variance
        return x_pca

    adata = data.copy() if copy else data
    key_obsm, key_varm, key_uns = ("X_pca", "PCs", "pca") if key_added is None else [key_added] * 3
    adata.obsm[key_obsm] = x_pca
    if obsm:
        pass  # components go to uns
    elif mask is not None:
        loadings = np.zeros((adata.n_vars, n_comps))
        loadings[mask] = components.T
        adata.varm[key_varm] = loadings
    else:
        adata.varm[key_varm] = components.T
    adata.uns[key_uns] = dict(
        params=dict(
            zero_center=zero_center,
            use_highly_variable=isinstance(mask_var_param, str) and mask_var_param == "highly_variable",
            mask_var=mask_var_param,
            **(dict(layer=layer) if layer is not None else {}),
            **(dict(obsm=obsm) if obsm is not None else {}),
        ),
        variance=variance,
        variance_ratio=variance_ratio,
        **(dict(components=components.T) if obsm is not None else {}),
    )
    return adata if copy else None


def _handle_mask_var(adata, n_vars, mask_var, *, obsm, use_highly_variable):
    """``(the mask_var parameter as scanpy records it, a boolean numpy mask or None)``."""
    if obsm:
        if mask_var is not _empty and mask_var is not None:
            raise ValueError("pca: mask_var cannot be used with obsm")
        return None, None
    hint = ('use mask_var="highly_variable" for use_highly_variable=True, '
            "mask_var=None for use_highly_variable=False")
    if use_highly_variable is not None:
        warnings.warn(f"Argument `use_highly_variable` is deprecated, consider using the mask argument: {hint}",
                      FutureWarning, stacklevel=3)
        if mask_var is not _empty:
            raise ValueError(f"pca: use_highly_variable and mask_var cannot both be given; {hint}")
    has_hvg = adata is not None and "highly_variable" in adata.var.columns
    if use_highly_variable or (use_highly_variable is None and mask_var is _empty and has_hvg):
        mask_var = "highly_variable"
    if mask_var is _empty or mask_var is None:
        return None, None
    if isinstance(mask_var, str):
        if adata is None:
            raise ValueError(f"pca: mask_var={mask_var!r} names a var column, which needs an AnnData; "
                             "pass a boolean array instead")
        if mask_var not in adata.var.columns:
            raise ValueError(f"pca: mask_var={mask_var!r} is not a column of adata.var; add it first "
                             "(e.g. with pp.highly_variable_genes) or pass a boolean array")
        mask = adata.var[mask_var].to_numpy()
    else:
        mask = mask_var.get() if hasattr(mask_var, "get") else np.asarray(mask_var)
        if mask.ndim != 1 or mask.shape[0] != n_vars:
            raise ValueError(f"pca: mask_var has shape {mask.shape}; expected ({n_vars},), one entry per gene")
    if mask.dtype != bool:
        raise ValueError(f"pca: mask_var must be boolean, got dtype {mask.dtype}")
    return mask_var, mask


def _solver(svd_solver, n_vars: int, chunked: bool) -> str:
    """``"gram"``, ``"randomized"`` or ``"cuml"``."""
    if svd_solver is not None and svd_solver not in _SOLVERS:
        warnings.warn(f"Ignoring svd_solver={svd_solver!r}: gpusc's pca supports {sorted(_SOLVERS)}",
                      UserWarning, stacklevel=3)
        svd_solver = None
    if svd_solver == "cuml":
        return "cuml"
    if chunked or svd_solver == "covariance_eigh":
        return "gram"
    if svd_solver == "randomized" or n_vars > GRAM_MAX_VARS:
        return "randomized"
    return "gram"


def _select_columns(x, mask: np.ndarray):
    if mask.all():
        return x
    cols = np.flatnonzero(mask)
    if placement(x) == "device":
        if is_sparse(x) and cols.size <= GRAM_MAX_VARS:
            # a column map instead of a copy; dense row blocks of at most GRAM_MAX_VARS genes
            # make every product a cuBLAS one (wider input stays sparse for cuSPARSE)
            return DenseRows(x.tocsr() if is_csc(x) else x, cols)
        import cupy as cp

        cols = cp.asarray(cols)
    return x[:, cols]


def _row_chunks(n_rows: int, n_cols: int, chunk_size: int | None = None):
    step = chunk_size or max(1, PROJECT_CHUNK_BYTES // (8 * max(n_cols, 1)))
    for start in range(0, n_rows, step):
        yield start, min(start + step, n_rows)


def _as_float64(chunk):
    return chunk.astype(np.float64) if chunk.dtype != np.float64 else chunk


def _all_finite(x) -> bool:
    xp = xp_of(x)
    if isinstance(x, DenseRows):
        return x.all_finite()  # from the stored values: no block is densified for this
    if is_sparse(x):
        return bool(xp.isfinite(x.data).all())  # synchronize!
    if x.dtype.kind != "f":
        return True
    return all(bool(xp.isfinite(x[a:b]).all()) for a, b in _row_chunks(*x.shape))  # synchronize!


@dataclass
class _Fit:
    components: np.ndarray  # (n_comps, n_vars) float64, host, sign-fixed
    variance: np.ndarray  # (n_comps,) float64
    variance_ratio: np.ndarray  # (n_comps,) float64
    x_pca: object  # (n_obs, n_comps) float64, where x lives


def _fit(x, n_comps: int, *, zero_center: bool, solver: str, chunk_size: int | None, random_state) -> _Fit:
    """PCA (or truncated SVD) of a cells × genes matrix; arrays only."""
    if solver == "cuml":
        return _fit_cuml(x, n_comps)
    xp = xp_of(x)
    if is_csc(x):
        x = x.tocsr()  # rows are sliced below; one CSR copy
    if placement(x) == "device" and is_sparse(x) and x.shape[1] <= GRAM_MAX_VARS:
        x = DenseRows(x)  # every product below becomes a dense cuBLAS one, a row block at a time
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    n_obs, n_vars = x.shape
    if solver == "gram":
        gram_xx, sums = _gram(x, chunk_size)
        mean = sums / n_obs
        sum_squares = float(xp.trace(gram_xx))  # synchronize!
        if zero_center:
            gram_xx -= n_obs * xp.outer(mean, mean)
            gram_xx /= n_obs - 1
        eigenvalues, vectors = _top_eigh(gram_xx, n_comps, xp)
        del gram_xx
        singular_sq = eigenvalues * (n_obs - 1) if zero_center else eigenvalues
    else:
        mean = _col_sums(x) / n_obs
        sum_squares = _sum_squares(x)
        singular, vectors = _subspace_iteration(x, mean if zero_center else None, n_comps, random_state)
        singular_sq = singular**2
    components = to_host(vectors.T).copy()
    signs = _flip_signs(components)
    components *= signs[:, None]
    signs_x = xp.asarray(signs)
    x_pca = _project(x, vectors * signs_x[None, :], mean if zero_center else None, chunk_size)

    mean_sq = float((mean @ mean))  # synchronize!
    if zero_center:
        total_var = (sum_squares - n_obs * mean_sq) / (n_obs - 1)
        variance = np.maximum(to_host(singular_sq), 0.0) / (n_obs - 1)
    else:
        # TruncatedSVD: the (ddof 0) variance of each projection over the genes' total
        total_var = (sum_squares - n_obs * mean_sq) / n_obs
        variance = to_host(x_pca.var(axis=0))
    return _Fit(components, variance, variance / total_var, x_pca)


def _fit_cuml(x, n_comps: int) -> _Fit:
    """cuML's PCA of dense device input (imported here: an optional dependency)."""
    try:
        from cuml.decomposition import PCA
    except ImportError as exc:
        raise ImportError("pca: svd_solver='cuml' needs cuML; install gpusc[rapids-cu13] (or "
                          "rapids-cu12), or leave svd_solver unset") from exc
    import cupy as cp

    model = PCA(n_components=n_comps, svd_solver="full", output_type="cupy")
    x_pca = cp.asarray(model.fit_transform(x), dtype=np.float64)
    components = to_host(cp.asarray(model.components_, dtype=np.float64))
    signs = _flip_signs(components)  # cuML's own signs are not scikit-learn's
    components *= signs[:, None]
    x_pca *= cp.asarray(signs)[None, :]
    return _Fit(components, to_host(cp.asarray(model.explained_variance_, dtype=np.float64)),
                to_host(cp.asarray(model.explained_variance_ratio_, dtype=np.float64)), x_pca)


def _gram(x, chunk_size):
    if chunk_size is None:
        return gram(x)
    total = sums = None
    for start, stop in _row_chunks(x.shape[0], x.shape[1], chunk_size):
        g, s = gram(x[start:stop])
        total, sums = (g, s) if total is None else (total + g, sums + s)
    return total, sums


def _top_eigh(c, k: int, xp):
    """The k largest eigenvalues (descending) of a symmetric matrix and their vectors."""
    n = c.shape[0]
    if xp is np:
        from scipy.linalg import eigh

        w, v = eigh(c, subset_by_index=(n - k, n - 1))
    else:
        w, v = xp.linalg.eigh(c)
        w, v = w[n - k:], v[:, n - k:]
    return w[::-1].copy(), v[:, ::-1].copy()


def _flip_signs(components: np.ndarray) -> np.ndarray:
    """scikit-learn's svd_flip(u_based_decision=False): each row's largest |loading| positive."""
    top = components[np.arange(components.shape[0]), np.argmax(np.abs(components), axis=1)]
    return np.where(top < 0, -1.0, 1.0)


def _col_sums(x):
    xp = xp_of(x)
    sums = xp.zeros(x.shape[1], np.float64)
    for a, b in _row_chunks(*x.shape):
        sums += xp.asarray(_as_float64(x[a:b]).sum(axis=0)).ravel()
    return sums


def _sum_squares(x) -> float:
    if is_sparse(x):
        data = x.data.astype(np.float64)
        return float(data @ data)  # synchronize!
    total = 0.0
    for a, b in _row_chunks(*x.shape):
        chunk = _as_float64(x[a:b])
        total += float((chunk * chunk).sum())  # synchronize!
    return total


def _matmul(x, v):
    """X·V in float64, a row chunk of X at a time."""
    xp = xp_of(v)
    out = xp.empty((x.shape[0], v.shape[1]), np.float64)
    for a, b in _row_chunks(*x.shape):
        out[a:b] = _as_float64(x[a:b]) @ v
    return out


def _rmatmul(x, u):
    """Xᵀ·U in float64, summed over row chunks in order."""
    xp = xp_of(u)
    out = xp.zeros((x.shape[1], u.shape[1]), np.float64)
    for a, b in _row_chunks(*x.shape):
        out += _as_float64(x[a:b]).T @ u[a:b]
    return out


def _project(x, v, mean, chunk_size):
    xp = xp_of(v)
    out = xp.empty((x.shape[0], v.shape[1]), np.float64)
    for a, b in _row_chunks(x.shape[0], x.shape[1], chunk_size):
        out[a:b] = _as_float64(x[a:b]) @ v
    if mean is not None:
        out -= (mean @ v)[None, :]
    return out


def _subspace_iteration(x, mean, k: int, random_state):
    """Top-k singular values and right singular vectors (n_vars × k) of X − 1μᵀ (or X).

    Randomized subspace iteration with QR after every product (Halko et al. 2011,
    algorithm 4.4), stopped when the top k singular value estimates settle;
    products with the centred matrix are X·V − 1(μᵀV) and Xᵀ·U − μ(1ᵀU).
    """
    from sklearn.utils import check_random_state

    xp = xp_of(x)
    n_obs, n_vars = x.shape
    block = min(max(2 * k, k + N_OVERSAMPLES), min(n_obs, n_vars))
    omega = xp.asarray(check_random_state(random_state).standard_normal((n_vars, block)))

    def a_times(v):
        out = _matmul(x, v)
        return out if mean is None else out - (mean @ v)[None, :]

    def at_times(u):
        out = _rmatmul(x, u)
        return out if mean is None else out - xp.outer(mean, u.sum(axis=0))

    q, _ = xp.linalg.qr(a_times(omega))
    previous = None
    for it in range(MAX_POWER_ITER):
        # AᵀQ = Z R, so the SVD of R gives QᵀA's: singular values s, right vectors Z·U
        z, r = xp.linalg.qr(at_times(q))
        u, s, _ = xp.linalg.svd(r)
        top = to_host(s[:k])
        if it >= MIN_POWER_ITER and np.all(np.abs(top - previous) <= RITZ_RTOL * top[0]):
            break
        previous = top
        if it + 1 < MAX_POWER_ITER:
            q, _ = xp.linalg.qr(a_times(z))
    return s[:k], z @ u[:, :k]
