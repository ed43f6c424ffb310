"""pca, as in scanpy's preprocessing/_pca: covariance (Gram) + eigh, or, for wide matrices, an
implicitly centred restarted Lanczos bidiagonalisation (or randomized subspace iteration when
asked); sparse input is never densified. In memory (host or device) or on a dask array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from .._core.adata import check_not_empty, get_matrix
from .._core.arrays import canonical, is_csc, is_sparse, placement, to_host, xp_of
from .._core.compat import check_mask, check_random_state, is_backed_type, warn
from .._core.dask import check_block, check_row_chunks, is_dask
from .._core.dask import compute as dask_compute
from .._kernels.gram import DenseRows, gram, matmat, rmatmat
from ._lanczos import lanczos_svd

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

# Every svd_solver name scanpy 1.12 knows (any estimator), and gpusc's "cuml".
SOLVERS = ("auto", "full", "arpack", "randomized", "covariance_eigh", "lobpcg", "tsqr", "cuml", "lanczos")
GPUSC_SOLVERS = ("cuml", "lanczos")  # not scanpy names: no scanpy warnings or fallbacks for them
# scanpy's estimators: the names each accepts, the one it uses instead (with a warning) and
# how scanpy's warning names it.
_SCANPY_ESTIMATORS = {
    "pca": (("auto", "full", "randomized", "arpack", "covariance_eigh"), "arpack",
            "sklearn.decomposition._pca.PCA"),
    "pca_sparse": (("arpack", "covariance_eigh"), "arpack",
                   "sklearn.decomposition._pca.PCA (with sparse input)"),
    "truncated_svd": (("arpack", "randomized"), "randomized",
                      "sklearn.decomposition._truncated_svd.TruncatedSVD"),
}


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
    eigenvectors (``cupy.linalg.eigh`` / ``scipy.linalg.eigh``). Wider input (or
    ``svd_solver="lanczos"``) uses a thick-restarted Golub-Kahan-Lanczos bidiagonalisation
    (``pp/_lanczos.py``: a basis of ``2·n_comps + 20`` vectors, full reorthogonalisation,
    restarts until every residual is below 1e-11 of the largest singular value; ARPACK's
    answer, which scanpy uses, to rounding) on products X·v and Xᵀ·u only, with the centring
    applied implicitly (``X·v − (μ·v)1``, ``Xᵀ·u − μ Σu``): host CSR products are numba
    kernels on all cores, dense ones BLAS, device ones cuBLAS/cuSPARSE. A randomized solver
    named as scanpy runs it is a randomized subspace iteration (block size
    ``max(2·n_comps, n_comps+10)``, QR after every product, 4 to 50 power iterations until
    the singular value estimates settle) on the same implicitly centred products. The
    centred matrix is never formed. Genes that are 0 in every cell get loadings of exactly 0.

    ``svd_solver`` follows scanpy's choice of solver and its warnings: where the estimator
    scanpy would use (scikit-learn's PCA, PCA with sparse input, or TruncatedSVD with
    ``zero_center=False``) does not take the name, the same UserWarning ("Ignoring
    svd_solver=... and using ...") and the solver scanpy falls back to; ``"lobpcg"`` with
    centred sparse input gives scanpy's FutureWarning. ``"randomized"`` when scanpy runs it
    (named for dense centred input or with ``zero_center=False``, or put in place of
    another name by TruncatedSVD) is the subspace iteration seeded by ``random_state``;
    every other name, and ``None``, the exact path. A name scanpy does not know at all (a
    typo) raises a ValueError, where scanpy would warn and run its default. ``"lanczos"`` (a
    gpusc name, not scanpy's: scanpy's ``"arpack"`` keeps the exact Gram path below
    ``GRAM_MAX_VARS`` genes) asks for the Lanczos solver at any width, seeded by
    ``random_state`` (its start vector); n_comps up to min(n_obs, n_vars) − 1. ``"cuml"`` (a
    gpusc extension, not a scanpy name) hands dense device input to cuML's PCA (the
    ``rapids-cu13``/``rapids-cu12`` extra; centred, not chunked); its numbers come from cuML.
    Results follow scikit-learn's sign convention (the largest loading of each component is
    positive). Deterministic: the same input and ``random_state`` give the same result on the
    same device; the exact path does not depend on ``random_state`` (scanpy's default ARPACK
    does, in the last digits).

    ``chunked=True`` accumulates XᵀX over chunks of ``chunk_size`` cells, then projects chunk
    by chunk: the exact PCA (scanpy's IncrementalPCA approximates it); ``zero_center``,
    ``svd_solver`` and ``random_state`` are ignored, as in scanpy. Backed AnnData is not
    supported.

    A dask X (or layer) chunked by rows, with numpy, scipy CSR, cupy or cupyx CSR chunks,
    is read chunk by chunk through the same functions (one Gram or product per chunk), never
    whole. It synchronises: the Gram path makes one pass (``dask.compute``) for XᵀX and the
    column sums (per-chunk partials summed as a tree, so at most a few n_vars² partials are
    held at once), then one pass for X_pca; Lanczos makes one pass for the column
    statistics, two per Lanczos step (X·v, then Xᵀ·u: about 2 × 260 passes for 50
    components on pbmc3k's 13,714 genes; the Gram path suits data read from disk far
    better below ``GRAM_MAX_VARS`` genes), and one for X_pca; the randomized solver two per
    power iteration. X_pca comes back as an in-memory numpy array (n_obs × n_comps is small)
    whatever the chunks (scanpy returns a lazy one). To keep it lazy, pass ``chunked=True``:
    then X_pca is a dask array with X's row chunks and the step makes the Gram pass only
    (``chunk_size`` is not used: the dask chunks are the chunks). NaN or inf in X are found
    from the first pass's column sums (the same ValueError, before the AnnData changes).
    Differences from scanpy's dask PCA: the variance divides by n_obs − 1 as scanpy does in
    memory (its dask covariance divides by n_obs), sums are float64 for float32 input,
    ``zero_center=False`` works on sparse chunks (scanpy raises) and dense chunks need no
    dask-ml; ``svd_solver`` is honoured, so scanpy's "Ignoring svd_solver/random_state when
    using a sparse dask array" warnings are not given. As scanpy, ``random_state`` must be an
    int (TypeError otherwise).

    Memory (on the device for device input): the n_vars² float64 Gram plus eigh's workspace
    (about another n_vars² float64); a CSR copy of CSC input; a copy of the selected genes
    with ``mask_var`` (not for device CSR: its row blocks skip the other genes); float64 row
    chunks of at most 64 MiB; X_pca as n_obs × n_comps float64. The randomized path needs
    no n_vars² matrix: n_obs × block and n_vars × block float64; Lanczos neither:
    (2·n_comps + 21) vectors of n_vars and (2·n_comps + 20) of n_obs float64 (for dask, on
    the host or the device of the chunks), plus, for host CSR, up to 64 MiB of per-thread
    partial sums of Xᵀ·u. Sparse input is never
    densified whole.

    Parameters
    ----------
    data
        AnnData, or a cells × genes matrix: numpy, scipy CSR/CSC, cupy, cupyx CSR/CSC, or a
        dask array of row chunks of numpy, scipy CSR, cupy or cupyx CSR.
    n_comps
        Number of components; default 50, or min(n_obs, n_vars) − 1 when that is smaller.
        From 1 to min(n_obs, n_vars), and below that where scanpy's solver needs it (ARPACK,
        the default, and ``chunked``); outside, a ValueError with scikit-learn's message
        where scanpy fails too. (scanpy also accepts 0 with ``"full"`` and up to n_vars
        with ``zero_center=False``; gpusc does not.)
    layer, obsm
        Use this layer or obsm entry instead of X (not with ``chunked``).
    zero_center
        Centre the genes (PCA), or not (truncated SVD).
    svd_solver
        See above.
    chunked, chunk_size
        Work on ``chunk_size`` cells at a time (default 6000). With a dask X: keep X_pca
        lazy (see above).
    random_state
        Seed of the randomized solver (int, None or a numpy RandomState; checked as scanpy
        does, by scikit-learn's ``check_random_state``): different seeds give (slightly)
        different results, the same seed the same.
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
        n_obs × n_comps, ``dtype``; a cupy array when the matrix lives on the device; a
        numpy array for a dask X (a dask array with ``chunked=True``).
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
        n_comps out of range, NaN or inf in the matrix, an empty matrix, a bad mask (scanpy's
        messages), an unknown ``svd_solver``; a dask array split along genes.
    TypeError
        A dask array with CSC chunks, chunks of an unsupported type or not all of one type, or
        a ``random_state`` that is not an int (scanpy's message).
    KeyError
        A missing layer or obsm key.
    NotImplementedError
        ``chunked`` with ``layer`` or ``obsm``, a backed AnnData (scanpy's messages).
    ImportError
        ``svd_solver="cuml"`` without cuML installed.
    """
    func = "pca"
    if svd_solver is not None and svd_solver not in SOLVERS:
        # scanpy warns "Ignoring svd_solver=..." and runs its default: a typo would go unnoticed
        raise ValueError(f"{func}: unknown svd_solver={svd_solver!r}; use one of "
                         f"{', '.join(map(repr, SOLVERS))} or None (the default)")
    if (layer is not None or obsm is not None) and chunked:
        raise NotImplementedError(f"{func}: Cannot use `layer`/`obsm` and `chunked` at the same time.")
    if return_anndata := isinstance(data, AnnData):
        if layer is None and obsm is None and is_backed_type(data.X):
            if not chunked:
                raise NotImplementedError(f"PCA is not implemented for matrices of type {type(data.X)} "
                                          "with chunked as False")
            raise NotImplementedError(f"{func}: a backed AnnData is not supported (scanpy's chunked "
                                      "IncrementalPCA reads it); load it into memory first")
        adata = data
    else:
        if not is_dask(data):
            placement(data)  # a TypeError for unsupported array types
        adata = None

    mask_var_param, mask = _handle_mask_var(adata, data.shape, mask_var, obsm=obsm,
                                            use_highly_variable=use_highly_variable)
    x = data if adata is None else get_matrix(adata, layer=layer, obsm=obsm, func=func)
    on_dask = is_dask(x)
    if on_dask:
        chunks = check_row_chunks(x, func)  # clear errors for gene-split, CSC or unknown chunks
        if not isinstance(random_state, int):
            raise TypeError(f"random_state needs to be an int, not a {type(random_state).__name__} "
                            "when passing a dask array")
    else:
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
    if isinstance(n_comps, bool) or not isinstance(n_comps, int | np.integer):
        raise ValueError(f"{func}: n_comps={n_comps!r} must be an integer")
    n_comps = int(n_comps)
    if chunked:
        chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
            raise ValueError(f"{func}: chunk_size={chunk_size!r} must be a positive integer")
    sparse = chunks.endswith("csr") if on_dask else is_sparse(x) or isinstance(x, DenseRows)
    scanpy_solver = _scanpy_solver(svd_solver, sparse=sparse,
                                   zero_center=zero_center, chunked=chunked)
    _check_n_comps(n_comps, n_obs, n_vars, scanpy_solver, zero_center=zero_center, chunked=chunked)
    solver = _solver(svd_solver, scanpy_solver, n_vars, chunked)
    if solver == "cuml" and (on_dask or placement(x) != "device" or is_sparse(x) or not zero_center
                             or chunked):
        raise ValueError(f"{func}: svd_solver='cuml' takes dense device input with zero_center=True "
                         "and chunked=False; leave svd_solver unset for gpusc's own solvers")
    if solver in ("randomized", "lanczos"):
        random_state = check_random_state(random_state)  # scanpy's accepted seeds and its errors
    where = f"layer {layer!r}" if layer else f"obsm {obsm!r}" if obsm else "adata.X" if adata else "the matrix"
    nonfinite = f"{func}: {where} contains NaN or inf; PCA needs finite values (remove or impute them first)"
    if not on_dask and not _all_finite(x):  # dask: found from the first pass's column sums
        raise ValueError(nonfinite)

    fit = _fit(x, n_comps, zero_center=zero_center or chunked, solver=solver,
               chunk_size=int(chunk_size) if chunked else None, random_state=random_state,
               lazy=on_dask and chunked, nonfinite=nonfinite)
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


def _handle_mask_var(adata, shape, mask_var, *, obsm, use_highly_variable):
    """``(the mask_var parameter as scanpy records it, a boolean numpy mask or None)``, with
    scanpy's warning and errors (array input counts as an AnnData without var columns)."""
    if obsm:
        if mask_var is not _empty and mask_var is not None:
            raise ValueError("pca: Argument `mask_var` is incompatible with `obsm`.")
        return None, None
    if adata is None:
        adata = AnnData(shape=shape)  # what scanpy wraps array input in: no var columns
    hint = ('Use_highly_variable=True can be called through mask_var="highly_variable". '
            "Use_highly_variable=False can be called through mask_var=None")
    if use_highly_variable is not None:
        warn(f"Argument `use_highly_variable` is deprecated, consider using the mask argument. {hint}",
             FutureWarning)
        if mask_var is not _empty:
            raise ValueError(f"pca: These arguments are incompatible. {hint}")
    if use_highly_variable or (use_highly_variable is None and mask_var is _empty
                               and "highly_variable" in adata.var.columns):
        mask_var = "highly_variable"
    if mask_var is _empty or mask_var is None:
        return None, None
    return mask_var, check_mask(adata, mask_var, "var", adata.n_vars, "pca", "mask_var")


def _scanpy_solver(svd_solver, *, sparse: bool, zero_center: bool, chunked: bool):
    """The solver scanpy 1.12 runs for these arguments (None: its default), with its warnings."""
    if chunked or svd_solver in GPUSC_SOLVERS:
        return svd_solver  # scanpy's IncrementalPCA ignores svd_solver without a warning
    if zero_center and sparse and svd_solver == "lobpcg":
        warn(f"{svd_solver=} for sparse relies on legacy code and will not be supported in the future. "
             "Also the lobpcg solver has been observed to be inaccurate. Please use 'arpack' instead.",
             FutureWarning)
        return svd_solver
    estimator = "truncated_svd" if not zero_center else "pca_sparse" if sparse else "pca"
    valid, default, name = _SCANPY_ESTIMATORS[estimator]
    if svd_solver is None or svd_solver in valid:
        return svd_solver
    warn(f"Ignoring {svd_solver=} and using {default}, {name} only supports dict_keys({list(valid)}).",
         UserWarning)
    return default


def _check_n_comps(n_comps: int, n_obs: int, n_vars: int, scanpy_solver, *, zero_center: bool,
                   chunked: bool) -> None:
    """A ValueError where scanpy (scikit-learn) rejects n_comps, with its message, or where
    gpusc's solvers cannot give it (outside 1..min(n_obs, n_vars))."""
    min_dim = min(n_obs, n_vars)
    upper = min_dim
    theirs = None
    if chunked:
        upper = min_dim - 1  # gpusc's bound here, as before (IncrementalPCA's depends on the chunks)
        if n_comps > n_vars:
            theirs = (f"n_components={n_comps} invalid for n_features={n_vars}, need more rows than "
                      "columns for IncrementalPCA processing")
    elif not zero_center:
        if n_comps < 1:
            theirs = (f"The 'n_components' parameter of TruncatedSVD must be an int in the range "
                      f"[1, inf). Got {n_comps} instead.")
        elif scanpy_solver == "arpack":  # scipy's svds
            upper = min_dim - 1
            if n_comps > upper:
                theirs = "`k` must be an integer satisfying `0 < k < min(A.shape)`."
        elif n_comps > n_vars:
            theirs = f"n_components({n_comps}) must be <= n_features({n_vars})."
    elif scanpy_solver == "lanczos":
        upper = min_dim - 1  # as ARPACK: the centred matrix has rank below min(n_obs, n_vars)
    else:
        solver = "arpack" if scanpy_solver in (None, "lobpcg") else scanpy_solver
        solver = "full" if solver == "auto" else solver  # what scikit-learn picks for most n_comps
        lowest = 1 if solver in ("arpack", "randomized") else 0
        if solver == "arpack":
            upper = min_dim - 1
        if n_comps < 0:
            theirs = ("The 'n_components' parameter of PCA must be an int in the range [0, inf), a "
                      f"float in the range (0.0, 1.0), a str among {{'mle'}} or None. Got {n_comps} "
                      "instead.")
        elif not lowest <= n_comps <= min_dim:
            theirs = (f"n_components={n_comps} must be between {lowest} and min(n_samples, "
                      f"n_features)={min_dim} with svd_solver={solver!r}")
        elif solver == "arpack" and n_comps == min_dim:
            theirs = (f"n_components={n_comps} must be strictly less than min(n_samples, "
                      f"n_features)={min_dim} with svd_solver='arpack'")
    if theirs is None and 1 <= n_comps <= upper:
        return
    limit = "min(n_obs, n_vars) - 1" if upper < min_dim else "min(n_obs, n_vars)"
    raise ValueError(
        f"pca: {theirs or 'gpusc computes 1 to min(n_obs, n_vars) components'}; n_comps={n_comps} "
        f"must be between 1 and {limit} = {upper} here (the matrix used is {n_obs} × {n_vars}); "
        "pass a smaller n_comps")


def _solver(svd_solver, scanpy_solver, n_vars: int, chunked: bool) -> str:
    """gpusc's method: ``"gram"``, ``"randomized"``, ``"lanczos"`` or ``"cuml"``.

    ``"randomized"`` when scanpy runs a randomized solver by name (given, or put in place
    of a name TruncatedSVD does not take); the exact Gram path for the other names and for
    ``None`` (scanpy's default ARPACK, and TruncatedSVD's default randomized too: its exact
    answer); above ``GRAM_MAX_VARS`` genes, or when named, the restarted Lanczos
    bidiagonalisation (converged to ARPACK's answer).
    """
    if svd_solver == "cuml":
        return "cuml"
    if chunked or scanpy_solver == "covariance_eigh":
        return "gram"
    if scanpy_solver == "randomized" and svd_solver is not None:
        return "randomized"
    if svd_solver == "lanczos" or n_vars > GRAM_MAX_VARS:
        return "lanczos"
    return "gram"


def _select_columns(x, mask: np.ndarray):
    if mask.all():
        return x
    cols = np.flatnonzero(mask)
    if is_dask(x):
        kind = check_row_chunks(x, "pca")
        if kind.startswith("device"):
            import cupy as cp

            cols = cp.asarray(cols)
        return x.map_blocks(lambda block: check_block(block, kind, "pca")[:, cols],
                            chunks=(x.chunks[0], (cols.size,)), dtype=x.dtype, meta=x._meta)
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


def _fit(x, n_comps: int, *, zero_center: bool, solver: str, chunk_size: int | None, random_state,
         lazy: bool = False, nonfinite: str = "the matrix contains NaN or inf") -> _Fit:
    """PCA (or truncated SVD) of a cells × genes matrix; arrays only.

    A dask ``x`` (row chunks, checked by the caller) is read per chunk through the same
    functions; its non-finite values are found from the first pass's column sums (the
    ValueError ``nonfinite``), and X_pca comes back as a host array, or lazy with ``lazy``.
    """
    if solver == "cuml":
        return _fit_cuml(x, n_comps)
    on_dask = is_dask(x)
    xp = _dask_xp(x) if on_dask else xp_of(x)
    if not on_dask:
        if is_csc(x):
            x = x.tocsr()  # rows are sliced below; one CSR copy
        if placement(x) == "device" and is_sparse(x) and x.shape[1] <= GRAM_MAX_VARS:
            x = DenseRows(x)  # every product below becomes a dense cuBLAS one, a row block at a time
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    n_obs, n_vars = x.shape
    if solver == "gram":
        gram_xx, sums = _gram(x, chunk_size)
        if on_dask and not bool(xp.isfinite(sums).all()):  # synchronize!
            raise ValueError(nonfinite)
        mean = sums / n_obs
        gene_squares = xp.diag(gram_xx).copy()
        sum_squares = float(xp.trace(gram_xx))  # synchronize!
        if zero_center:
            gram_xx -= n_obs * xp.outer(mean, mean)
            gram_xx /= n_obs - 1
        eigenvalues, vectors = _top_eigh(gram_xx, n_comps, xp)
        del gram_xx
        singular_sq = eigenvalues * (n_obs - 1) if zero_center else eigenvalues
    else:
        sums, gene_squares = _col_stats(x)
        if on_dask and not bool(xp.isfinite(sums).all()):  # synchronize!
            raise ValueError(nonfinite)
        mean = sums / n_obs
        sum_squares = float(gene_squares.sum())  # synchronize!
        centre = mean if zero_center else None
        if solver == "lanczos":
            # one BLAS thread: the basis updates are thousands of small, memory-bound GEMVs,
            # for which OpenBLAS' threads cost more than they give (pbmc3k, 13,714 genes:
            # 14 s with two threads, 4-5 s with one, on a busy 2-core machine)
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                singular, vectors = lanczos_svd(
                    lambda v: _centred_matmat(x, v[:, None], centre)[:, 0],
                    lambda u: _centred_rmatmat(x, u[:, None], centre)[:, 0],
                    (n_obs, n_vars), n_comps, xp=xp, random_state=random_state)
            singular = xp.asarray(singular)
        else:
            singular, vectors = _subspace_iteration(x, centre, n_comps, random_state)
        singular_sq = singular**2
    # A gene that is 0 in every cell has a zero row and column in XᵀX and in the covariance, so
    # its loadings are exactly 0; eigh/QR leave rounding residue (1e-17..1e-48) there instead
    vectors[gene_squares == 0] = 0
    components = to_host(vectors.T).copy()
    signs = _flip_signs(components)
    components *= signs[:, None]
    signs_x = xp.asarray(signs)
    x_pca = _project(x, vectors * signs_x[None, :], mean if zero_center else None, chunk_size)
    if on_dask and not lazy:
        (x_pca,) = dask_compute(x_pca)
        x_pca = to_host(x_pca)

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
    if is_dask(x):
        # one Gram per dask chunk (chunk_size does not apply), summed as a tree: one pass
        return _dask_gene_sums(x, gram)
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


def _col_stats(x):
    """Each gene's sum and sum of squares, float64, where x lives (dask: in one pass)."""
    if is_dask(x):
        return _dask_gene_sums(x, _col_stats)
    return _col_sums(x), _col_sum_squares(x)


def _col_sums(x):
    xp = xp_of(x)
    sums = xp.zeros(x.shape[1], np.float64)
    for a, b in _row_chunks(*x.shape):
        sums += xp.asarray(_as_float64(x[a:b]).sum(axis=0)).ravel()
    return sums


def _col_sum_squares(x):
    """Each gene's sum of squares, float64, where x lives."""
    xp = xp_of(x)
    if is_sparse(x):
        x = canonical(x.tocsr() if is_csc(x) else x)  # a duplicate entry is one value, squared once
        data = x.data.astype(np.float64)
        return xp.bincount(x.indices, weights=data * data, minlength=x.shape[1])
    out = xp.zeros(x.shape[1], np.float64)
    for a, b in _row_chunks(*x.shape):
        chunk = _as_float64(x[a:b])
        out += (chunk * chunk).sum(axis=0)
    return out


def _matmul(x, v):
    """X·V in float64 (dask: one pass, the blocks concatenated where the chunks live)."""
    if is_dask(x):
        bounds = _chunk_bounds(x)
        parts = dask_compute(*_per_block(x, matmat, [(v,)] * (len(bounds) - 1)))
        return _dask_xp(x).concatenate(parts, axis=0)
    return matmat(x, v)


def _rmatmul(x, u):
    """Xᵀ·U in float64 (dask: one pass, per-chunk products summed as a tree)."""
    if is_dask(x):
        bounds = _chunk_bounds(x)
        parts = _per_block(x, rmatmat, [(u[a:b],) for a, b in zip(bounds[:-1], bounds[1:])])
        (out,) = dask_compute(_tree_sum(parts))
        return out
    return rmatmat(x, u)


def _centred_matmat(x, v, mean):
    out = _matmul(x, v)
    return out if mean is None else out - (mean @ v)[None, :]


def _centred_rmatmat(x, u, mean):
    out = _rmatmul(x, u)
    return out if mean is None else out - mean[:, None] * u.sum(axis=0)[None, :]


# ---------------------------------------------------------------- dask: per-chunk partials


def _dask_xp(x):
    """numpy for host chunks, cupy for device chunks (the kind was checked by pca)."""
    if check_row_chunks(x, "pca").startswith("device"):
        import cupy

        return cupy
    return np


def _chunk_bounds(x) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(x.chunks[0])]).astype(np.int64)


def _per_block(x, per_block, args_per_block) -> list:
    """One lazy ``per_block(chunk, *args)`` per row chunk, each chunk checked to be of the
    array's chunk kind as it is computed."""
    import dask

    kind = check_row_chunks(x, "pca")

    def checked(block, *args):
        return per_block(check_block(block, kind, "pca"), *args)

    blocks = x.to_delayed().ravel()
    return [dask.delayed(checked, pure=True)(block, *args) for block, args in zip(blocks, args_per_block)]


def _add(a, b):
    if isinstance(a, tuple):
        return tuple(p + q for p, q in zip(a, b))
    return a + b


def _tree_sum(parts: list):
    """The sum of lazy partials as a binary tree: a worker holds a few partials at a time
    (n_vars² Grams from hundreds of chunks never sit in memory together), and the order of
    the additions is fixed by the number of chunks."""
    import dask

    while len(parts) > 1:
        pairs = [dask.delayed(_add, pure=True)(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = pairs + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _dask_gene_sums(x, per_block):
    """``per_block`` (a chunk → per-gene partial or tuple of them) summed over all chunks:
    one compute."""
    (out,) = dask_compute(_tree_sum(_per_block(x, per_block, [()] * len(x.chunks[0]))))
    return out


def _project(x, v, mean, chunk_size):
    """(X − 1μᵀ)·V (or X·V without ``mean``) in float64; for dask a lazy array of X's row
    chunks."""
    if is_dask(x):
        kind = check_row_chunks(x, "pca")

        def project_block(block):
            return _project(check_block(block, kind, "pca"), v, mean, None)

        meta = _dask_xp(x).empty((0, v.shape[1]), np.float64)
        return x.map_blocks(project_block, chunks=(x.chunks[0], (v.shape[1],)), dtype=np.float64,
                            meta=meta)
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
    xp = _dask_xp(x) if is_dask(x) else xp_of(x)
    n_obs, n_vars = x.shape
    block = min(max(2 * k, k + N_OVERSAMPLES), min(n_obs, n_vars))
    omega = xp.asarray(check_random_state(random_state).standard_normal((n_vars, block)))

    def a_times(v):
        return _centred_matmat(x, v, mean)

    def at_times(u):
        return _centred_rmatmat(x, u, mean)

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
