"""diffmap, as scanpy's tools/_diffmap.py: the top eigenpairs of the symmetric transitions.

scanpy (``Neighbors.compute_transitions`` and ``compute_eigen``) builds the matrix
``T = Z D⁻¹ C D⁻¹ Z`` from the connectivities ``C`` (``D``: C's column sums, the density
normalisation of Coifman and Lafon; ``Z``: the inverse square roots of the column sums of
``D⁻¹ C D⁻¹``), then asks ARPACK (``eigsh``, ``which="LM"``, a start ``v0`` drawn from
``random_state``) for its ``n_comps`` largest eigenpairs in float64. Both factors are
diagonal, so ``T = W C W`` with ``w = 1 / (d z)``: here the product ``T x = w ⊙ C (w ⊙ x)``
is built from the stored connectivities in one numba pass (no sparse products).
Same eigensolver, same start: the same eigenpairs to ARPACK's tolerance.
"""

from __future__ import annotations

from textwrap import indent
from typing import Any, Literal

import numba
import numpy as np
from anndata import AnnData
from scipy import sparse

from .._core import logg
from .._core.adata import actualize_view
from .._core.arrays import placement
from .._core.compat import check_random_state
from .._kernels.umap import weak_components_host
from .._settings import resolve_device

# scanpy's own messages, quoted inside ours
NO_NEIGHBORS = "You need to run `pp.neighbors` first to compute a neighborhood graph."
SMALL_N_COMPS = "Provide any value greater than 2 for `n_comps`. "


def diffmap(
    adata: AnnData,
    n_comps: int = 15,
    *,
    neighbors_key: str | None = None,
    random_state: Any = 0,
    copy: bool = False,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """Diffusion map of the neighbourhood graph, as :func:`scanpy.tl.diffmap`.

    The symmetric transition matrix of scanpy's ``Neighbors.compute_transitions`` (with the
    density normalisation) and its ``n_comps`` eigenpairs of largest magnitude, in decreasing
    order, from a Lanczos eigensolver started at scanpy's random vector:

    * on the CPU: scipy's ``eigsh`` (ARPACK) with scanpy's arguments in single precision, on
      the matrix built in one numba pass (``nnz`` float64 values besides the graph, and a
      float32 copy), then one float64 Rayleigh-Ritz step on its vectors (``n · k`` float64);
    * on the GPU: cupyx's ``eigsh`` (thick-restart Lanczos) on the matrix built on the
      device (``nnz`` float64 values and int32 indices; ``n · (2 n_comps + 10)`` float64 for
      the Krylov basis).

    Eigenvalues match scanpy's to the solver's tolerance; eigenvectors match up to sign where
    the eigenvalue is simple (a disconnected graph has eigenvalue 1 once per component, and
    any basis of that eigenspace is as good).

    Parameters
    ----------
    adata
        Annotated data matrix with a neighbourhood graph (:func:`gpusc.pp.neighbors`).
    n_comps
        Number of eigenpairs (at least 3; at most ``n_obs - 1`` are computed).
    neighbors_key
        The ``uns`` key of the graph (``None``: ``"neighbors"``); its ``connectivities_key``
        names the ``obsp`` matrix.
    random_state
        Seed (int), RandomState or ``None`` of the eigensolver's start vector, as scanpy.
    copy
        Return a copy instead of writing to ``adata``.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsm['X_diffmap']`` : numpy.ndarray, float32 (n_obs, n_comps)
        The eigenvectors of the transition matrix as columns; column 0 is the steady state.
    ``uns['diffmap_evals']`` : numpy.ndarray, float32 (n_comps,)
        The eigenvalues, in decreasing order.
    """
    func = "diffmap"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    key = "neighbors" if neighbors_key is None else neighbors_key
    if key not in adata.uns:
        raise ValueError(f"{func}: no neighbourhood graph in adata.uns[{key!r}]. {NO_NEIGHBORS}")
    if isinstance(n_comps, bool) or not isinstance(n_comps, int | np.integer):
        raise TypeError(f"{func}: n_comps={n_comps!r} must be an integer")
    if n_comps <= 2:
        raise ValueError(f"{func}: n_comps={n_comps}. {SMALL_N_COMPS}")
    connectivities = _connectivities(adata, key, func)
    n = connectivities.shape[0]
    if n < 2:
        raise ValueError(f"{func}: the graph has {n} cell(s); a diffusion map needs at least 2")
    where = resolve_device(device)

    start = logg.info(f"computing Diffusion Maps using n_comps={n_comps}(=n_dcs)")
    scale = transition_scale(connectivities, func)
    k = min(n - 1, int(n_comps))
    v0 = check_random_state(random_state).standard_normal(n)  # scanpy's start vector
    if where == "gpu":
        evals, evecs = _eigen_device(connectivities, scale, k, v0)
    else:
        evals, evecs = _eigen_host(connectivities, scale, k, v0)
    evals, evecs = evals[::-1].astype(np.float32), np.ascontiguousarray(evecs[:, ::-1], np.float32)
    logg.info(f"    eigenvalues of transition matrix\n{indent(str(evals), '    ')}")
    if weak_components_host(connectivities) > len(evals) / 2:  # scipy's connected_components
        logg.warning("Transition matrix has many disconnected components!")

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    adata.obsm["X_diffmap"] = evecs
    adata.uns["diffmap_evals"] = evals
    logg.info("    finished", time=start, deep=(
        "added\n"
        "    'X_diffmap', diffmap coordinates (adata.obsm)\n"
        "    'diffmap_evals', eigenvalues of transition matrix (adata.uns)"))
    return adata if copy else None


def _connectivities(adata: AnnData, key: str, func: str) -> sparse.csr_matrix:
    """The graph's connectivities as a host CSR (float32 or float64 values, as stored)."""
    neighbors = adata.uns[key]
    if not isinstance(neighbors, dict):
        raise TypeError(f"{func}: adata.uns[{key!r}] is not a neighbors entry. {NO_NEIGHBORS}")
    ckey = neighbors.get("connectivities_key", "connectivities")
    if ckey not in adata.obsp:
        raise KeyError(f"{func}: obsp[{ckey!r}] (uns[{key!r}]['connectivities_key']) not found; "
                       f"run pp.neighbors again. {NO_NEIGHBORS}")
    c = adata.obsp[ckey]
    if placement(c) == "device":
        c = c.get()  # synchronize!
    c = sparse.csr_matrix(c)
    if not c.has_canonical_format:
        c = c.copy()
        c.sum_duplicates()
    if c.dtype not in (np.float32, np.float64):
        c = c.astype(np.float64)
    if not np.isfinite(c.data).all():
        raise ValueError(f"{func}: obsp[{ckey!r}] contains NaN or inf; run pp.neighbors again")
    return c


def transition_scale(connectivities: sparse.csr_matrix, func: str = "diffmap") -> np.ndarray:
    """``w`` (float64) with scanpy's symmetric transition matrix ``T = diag(w) C diag(w)``.

    ``d = C.sum(axis=0)`` (density), ``z = sqrt(colsum(D⁻¹ C D⁻¹))`` and ``w = 1 / (d z)``;
    ``colsum(D⁻¹ C D⁻¹)_j = (Cᵀ d⁻¹)_j / d_j``. A cell without edges (d = 0) makes scanpy's
    matrix NaN: a clear error here. Both column sums are one pass over C's CSR arrays each.
    """
    c = connectivities
    density = _column_sums(c.indptr, c.indices, c.data, np.ones(c.shape[0]), c.shape[1])
    if (density <= 0).any():
        cells = np.flatnonzero(density <= 0)
        raise ValueError(f"{func}: {cells.size} cell(s) have no edge in the neighbourhood graph "
                         f"(first: {cells[:5].tolist()}); their transition probabilities are "
                         "undefined. Recompute pp.neighbors or drop those cells")
    inv_density = 1.0 / density
    z = np.sqrt(_column_sums(c.indptr, c.indices, c.data, inv_density, c.shape[1]) * inv_density)
    return inv_density / z


def transition_matrix(c: sparse.csr_matrix, scale: np.ndarray) -> sparse.csr_matrix:
    """``T = diag(w) C diag(w)`` in float64, in one pass over C's values (scanpy makes it with
    two sparse products and a float64 copy); T shares C's index arrays."""
    return sparse.csr_matrix((_scaled_values(c.indptr, c.indices, c.data, scale), c.indices, c.indptr),
                             shape=c.shape)


@numba.njit(cache=True)
def _column_sums(indptr, indices, data, row_weights, n_cols):
    """``Σ_i row_weights[i] c_ij`` for each column j, float64, in CSR order (as scipy's)."""
    out = np.zeros(n_cols, np.float64)
    for i in range(indptr.size - 1):
        weight = row_weights[i]
        for p in range(indptr[i], indptr[i + 1]):
            out[indices[p]] += weight * np.float64(data[p])
    return out


@numba.njit(cache=True)
def _scaled_values(indptr, indices, data, scale):
    """``c_ij (w_i w_j)`` for each stored value, float64. w_i w_j first: a product of two numbers
    is the same either way round, so T is exactly symmetric when C is (Lanczos assumes it)."""
    values = np.empty(data.size, np.float64)
    for i in range(indptr.size - 1):
        wi = scale[i]
        for p in range(indptr[i], indptr[i + 1]):
            values[p] = np.float64(data[p]) * (wi * scale[indices[p]])
    return values


# Largest residual ||T x - λ x|| accepted from a single-precision solve after the float64
# Rayleigh-Ritz step (T's norm is 1). Converged float32 Lanczos vectors leave ~7e-7 on a
# 3,000-cell blob graph (ARPACK's float32 tolerance); 1e-5 keeps a wide margin above that and
# turns away vectors that stopped short, which then go to the float64 solve.
SINGLE_RESIDUAL_MAX = 1e-5
# Lanczos steps allowed to cupyx's single-precision eigsh (its default is 10 n: a solve that
# cannot reach its tolerance in float32 would run that long); ARPACK needed ~200-300 products
# for k = 15 on 50k cells. Past this the float64 solve runs.
SINGLE_MAX_STEPS = 4000


def _rayleigh_ritz(t, vectors, xp=np):
    """One float64 Rayleigh-Ritz step of T on the span of ``vectors`` (n x k, any precision;
    host or device arrays, ``xp`` their module): the generalised eigenpairs of VᵀTV and VᵀV,
    without orthonormalising V first (the pairs' y are VᵀV-orthonormal, so V y is
    orthonormal). Returns (eigenvalues increasing, host float64; eigenvectors, as V's module),
    or None where V does not span k directions or the largest residual ||T x - λ x|| is above
    SINGLE_RESIDUAL_MAX."""
    from scipy.linalg import eigh

    v = vectors.astype(xp.float64)
    tv = t @ v
    gram, h = v.T @ v, v.T @ tv
    if xp is not np:
        gram, h = xp.asnumpy(gram), xp.asnumpy(h)  # k x k: the small problem on the host
    if np.linalg.eigvalsh(gram).min() <= 1e-6:  # ~ the identity for orthonormal float32 vectors
        return None
    evals, rotation = eigh((h + h.T) / 2, (gram + gram.T) / 2)
    rotation = xp.asarray(rotation)
    x = v @ rotation
    residual = xp.sqrt(((tv @ rotation - x * xp.asarray(evals)[None, :]) ** 2).sum(axis=0)).max()
    if float(residual) > SINGLE_RESIDUAL_MAX:
        return None
    return evals, x


def _eigen_host(c: sparse.csr_matrix, scale: np.ndarray, k: int, v0: np.ndarray):
    """scanpy's eigenpairs (k, which="LM", ARPACK's default ncv and tol, its start vector) of T:
    ARPACK in single precision on T rounded to float32, then one Rayleigh-Ritz step in float64
    on the span of its k vectors V (the generalised eigenpairs of VᵀTV and VᵀV).

    Why: ARPACK is the floor here. At 50k cells (1.2M edges) it asks for ~280 products and its
    own reorthogonalisation and restarts (BLAS-2 over the n x 31 Lanczos basis) take most of
    the time; both move half the bytes in float32 (0.70 s -> 0.26 s on this 2-core machine).
    The float64 Rayleigh-Ritz step brings the eigenvalues back to float64 accuracy: their
    error is the square of the vectors' (measured 4e-11 relative of float64 ARPACK's, the
    simple eigenvectors' |cos| 1.000000; the outputs are float32). Eigenvalue 1, repeated
    once per connected component, was found four times on that 4-component graph, as float64
    ARPACK finds it. Where single-precision ARPACK does not converge, or its vectors do not
    span k dimensions, the float64 call runs instead.
    Earlier tries that did not pay: deflating the known eigenvalue-1 vectors (1.35x),
    Chebyshev filtering and per-component solves (no gain)."""
    from scipy.sparse.linalg import ArpackNoConvergence, eigsh

    t = transition_matrix(c, scale)
    if k < c.shape[0] - 1:  # ARPACK's range (scipy refuses k >= n - 1 for a sparse matrix)
        t32 = sparse.csr_matrix((t.data.astype(np.float32), t.indices, t.indptr), shape=t.shape)
        try:
            _, vectors = eigsh(t32, k=k, which="LM", ncv=None, v0=v0.astype(np.float32))
        except ArpackNoConvergence:
            vectors = None
        refined = None if vectors is None else _rayleigh_ritz(t, vectors)
        if refined is not None:
            return refined
    return eigsh(t, k=k, which="LM", ncv=None, v0=v0)


def _eigen_device(c: sparse.csr_matrix, scale: np.ndarray, k: int, v0: np.ndarray):
    """The host path's solve on the device: T built there (values w_i c_ij w_j in float64),
    cupyx's eigsh (thick-restart Lanczos) in single precision on T rounded to float32 (at most
    SINGLE_MAX_STEPS Lanczos steps), then the float64 Rayleigh-Ritz step; cupyx's float64
    eigsh where that step turns the vectors away."""
    import cupy as cp
    from cupyx.scipy import sparse as cpsparse
    from cupyx.scipy.sparse.linalg import eigsh

    index = np.int64 if c.nnz > np.iinfo(np.int32).max else np.int32
    indptr = cp.asarray(c.indptr.astype(index, copy=False))
    indices = cp.asarray(c.indices.astype(index, copy=False))
    w = cp.asarray(scale)
    rows = cp.searchsorted(indptr[1:], cp.arange(c.nnz, dtype=index), side="right")
    values = cp.asarray(c.data).astype(np.float64) * (w[rows] * w[indices])  # exactly symmetric
    del rows
    t = cpsparse.csr_matrix((values, indices, indptr), shape=c.shape)
    t32 = cpsparse.csr_matrix((values.astype(np.float32), indices, indptr), shape=c.shape)
    # tol: cupyx's default in float32 is float32's epsilon on the recurrence's residual
    # estimate, which single precision may never reach; 1e-6 is what converged vectors show
    _, vectors = eigsh(t32, k=k, which="LM", v0=cp.asarray(v0, np.float32), tol=1e-6,
                       maxiter=SINGLE_MAX_STEPS)
    del t32
    refined = _rayleigh_ritz(t, vectors, cp)
    if refined is not None:
        return refined[0], cp.asnumpy(refined[1])  # synchronize!
    evals, evecs = eigsh(t, k=k, which="LM", v0=cp.asarray(v0))
    order = cp.argsort(evals)  # increasing, as scipy's
    return cp.asnumpy(evals[order]), cp.asnumpy(evecs[:, order])  # synchronize!
