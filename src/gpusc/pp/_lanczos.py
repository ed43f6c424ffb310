"""A thick-restarted Golub-Kahan-Lanczos bidiagonalisation: the top singular triplets of a
matrix A seen only through the products A·v and Aᵀ·u (matrix-free).

pca uses it for wide input with A = X − 1μᵀ applied implicitly (A·v = X·v − (μ·v)1,
Aᵀ·u = Xᵀ·u − μ Σu), so a sparse X is never densified and the centred matrix never formed.
Written once over an array namespace: NumPy, CuPy, or host vectors fed to per-chunk dask
products. Only the small m × m projected matrix is decomposed, on the host.

The method (Baglama & Reichel 2005, "Augmented implicitly restarted Lanczos
bidiagonalization methods", the thick-restart form also used by IRLBA and scipy's PROPACK
wrapper): build orthonormal bases V (right, n_vars × m) and P (left, n_obs × m) with
A V = P B and Aᵀ P = V Bᵀ + r e_mᵀ, B small and upper triangular (bidiagonal plus one
dense column after a restart); the SVD of B gives Ritz triplets whose residual is
‖r‖·|last row of B's left singular vector|. Restart by keeping the best ``keep`` Ritz
vectors and r/‖r‖, and extend the bases again. Every new vector is orthogonalised against
the whole basis twice (classical Gram-Schmidt, twice is enough: Giraud et al. 2005): full
reorthogonalisation, so no ghost singular values. B's entries are read off the
Gram-Schmidt coefficients, which keeps B = PᵀAV to rounding even after many restarts.
"""

from __future__ import annotations

import numpy as np

from .._core.compat import check_random_state

# Converged when every wanted triplet's residual ‖Aᵀu − σv‖ is at most TOL × σ₁. The error
# of σ is about residual²/gap and of a vector residual/gap: at 1e-11 the components agree
# with ARPACK's (tol 0, machine precision) to 1 − |cos| ~ 1e-15 on real data.
TOL = 1e-11
MAX_RESTARTS = 500
REORTH_RATIO = 1 / np.sqrt(2)


def basis_size(k: int, min_dim: int) -> int:
    """m, the largest basis held: 2k + 20 (a basis twice the wanted size converges in a
    handful of restarts), at most min_dim."""
    return max(min(2 * k + 20, min_dim), min(k + 1, min_dim))


def lanczos_svd(a_times, at_times, shape: tuple[int, int], k: int, *, xp=np, random_state=0,
                tol: float = TOL, max_restarts: int = MAX_RESTARTS):
    """Top-k singular values (descending, numpy float64) and right singular vectors
    (n_vars × k float64, xp) of the n_obs × n_vars operator given by ``a_times`` (v of
    length n_vars → A·v of length n_obs) and ``at_times`` (u → Aᵀ·u), both xp float64
    vectors.

    ``random_state`` seeds the start vector (int, None or numpy RandomState, as scikit-learn
    takes it): the same seed gives the same result. Memory: (m + 1) vectors of n_vars and m of
    n_obs float64, m = ``basis_size(k, min(shape))``. Work: one Aᵀ·u for the start vector
    (in A's row space), m products of each kind, then m − keep of each per restart,
    keep = k + (m − k) / 2 (pbmc3k, 13,714 genes, k = 50: 4 restarts, 260 of each).
    """
    n_obs, n_vars = shape
    min_dim = min(shape)
    if not 1 <= k <= min_dim:
        raise ValueError(f"lanczos_svd: k={k} must be between 1 and min(shape)={min_dim}")
    rng = check_random_state(random_state)
    m = basis_size(k, min_dim)
    keep = min(k + (m - k) // 2, m - 1) if m > k else k
    # the bases as rows (contiguous vectors): V, and the next vector r/‖r‖ in the last row; P
    right = xp.zeros((m + 1, n_vars))
    left = xp.zeros((m, n_obs))
    b = np.zeros((m, m))  # B = Pᵀ A V, upper triangular, on the host

    def orthogonalise(w, basis, n):
        """w minus its projection on the rows basis[:n] (classical Gram-Schmidt; a second
        pass when the first removed more than 1 − 1/√2 of w's norm, the DGKS criterion), and
        the coefficients (host)."""
        coef = np.zeros(n)
        if not n:
            return w, coef
        norm = float(xp.linalg.norm(w))  # synchronize!
        for _ in range(2):
            c = basis[:n] @ w
            w = w - c @ basis[:n]
            coef += np.asarray(_host(c))  # synchronize!
            after = float(xp.linalg.norm(w))  # synchronize!
            if after > REORTH_RATIO * norm:
                break
            norm = after
        return w, coef

    def new_direction(n):
        """A random unit vector orthogonal to right[:n] (start, and after a breakdown)."""
        for _ in range(3):
            w = xp.asarray(rng.standard_normal(n_vars))
            w, _ = orthogonalise(w, right, n)
            norm = float(xp.linalg.norm(w))  # synchronize!
            if norm > 1e-8 * np.sqrt(n_vars):
                return w / norm
        raise RuntimeError("lanczos_svd: could not find a new direction (the operator's rank "
                           f"is below k={k})")

    # start in A's row space (Aᵀ times a random vector): a basis of min(n_obs, n_vars)
    # vectors is then an invariant subspace, exact, even when n_vars > n_obs
    start_vector = at_times(xp.asarray(rng.standard_normal(n_obs)))
    norm = float(xp.linalg.norm(start_vector))  # synchronize!
    right[0] = start_vector / norm if norm > 0 else new_direction(0)
    start = 0
    scale = 0.0  # the largest singular value estimate, for breakdown and convergence
    for _ in range(max_restarts + 1):
        for j in range(start, m):
            p, coef = orthogonalise(a_times(right[j]), left, j)
            alpha = float(xp.linalg.norm(p))  # synchronize!
            b[:j, j] = coef
            b[j, j] = alpha
            scale = max(scale, alpha)
            if alpha <= 1e-14 * max(scale, 1e-300):
                # A·v_j lies in span(P): any unit vector orthogonal to P keeps the bases going
                p = _unit_orthogonal(xp, rng, left, j, n_obs)
                b[j, j] = 0.0
            else:
                p = p / alpha
            left[j] = p
            r, _ = orthogonalise(at_times(p), right, j + 1)
            beta = float(xp.linalg.norm(r))  # synchronize!
            if beta > 1e-14 * max(scale, 1e-300):
                right[j + 1] = r / beta
            else:  # an invariant subspace: continue from a fresh direction
                beta = 0.0
                if j + 1 < n_vars:
                    right[j + 1] = new_direction(j + 1)
        u_b, sigma, wt_b = np.linalg.svd(b)
        scale = max(scale, float(sigma[0]))
        residuals = beta * np.abs(u_b[m - 1, :k])
        if np.all(residuals <= tol * sigma[0]):
            break
        # thick restart: the best `keep` Ritz vectors and r/‖r‖ span the new start
        next_right = right[m].copy()
        right[:keep] = xp.asarray(wt_b[:keep]) @ right[:m]
        right[keep] = next_right
        left[:keep] = xp.asarray(u_b[:, :keep].T) @ left
        b[:] = 0.0
        b[np.arange(keep), np.arange(keep)] = sigma[:keep]
        # B's column `keep` (β times the Ritz vectors' last entries) comes from the
        # Gram-Schmidt coefficients of the next A·v
        start = keep
    else:
        raise RuntimeError(f"lanczos_svd: no convergence after {max_restarts} restarts "
                           f"(largest relative residual {residuals.max() / sigma[0]:.2e})")
    vectors = (xp.asarray(wt_b[:k]) @ right[:m]).T
    return sigma[:k].copy(), xp.ascontiguousarray(vectors)


def _unit_orthogonal(xp, rng, basis, n, length):
    w = xp.asarray(rng.standard_normal(length))
    for _ in range(2):
        w = w - (basis[:n] @ w) @ basis[:n]
    return w / xp.linalg.norm(w)


def _host(a):
    return a.get() if hasattr(a, "get") else a
