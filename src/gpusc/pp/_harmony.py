"""harmony_integrate, as scanpy.external.pp.harmony_integrate: Harmony batch integration.

Our own implementation of Harmony (Korsunsky et al. 2019) in the form harmonypy 2.x runs it
(R harmony2's algorithm, the same parameters and defaults): soft k-means on the
cosine-normalised embedding with a diversity penalty per batch, then a mixture-of-experts
ridge correction per cluster, alternated until the objective settles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._core import logg
from .._core.adata import actualize_view
from .._kernels import harmony as _harmony
from .._settings import resolve_device

FUNC = "harmony_integrate"
WINDOW = 3  # objectives compared by the k-means convergence test (harmonypy's window_size)
KMEANS_START_STEPS = 10  # Lloyd steps of the k-means start (harmonypy: 10)


@dataclass
class HarmonyResult:
    """What :func:`harmonize` returns (host arrays, in the input's cell order)."""

    z_corr: np.ndarray  # (n, d) float32: the corrected embedding
    r_sorted: np.ndarray  # (n, K) float32: the last soft assignments, in the order of the run
    inverse: np.ndarray  # (n,) int64: each input cell's row in r_sorted
    centroids: np.ndarray  # (K, d) float32, unit rows
    initial_centroids: np.ndarray  # (K, d) float32, unit rows
    objective_harmony: list[float] = field(default_factory=list)
    objective_kmeans: list[float] = field(default_factory=list)
    kmeans_rounds: list[int] = field(default_factory=list)
    converged: bool = False

    @property
    def r(self) -> np.ndarray:
        """(n, K) float32: the last soft assignments, in the input's order (built on request:
        harmony_integrate does not keep them, and the gather costs 3% of a run)."""
        return self.r_sorted[self.inverse]


def harmony_integrate(
    adata: AnnData,
    key: str | Sequence[str],
    *,
    basis: str = "X_pca",
    adjusted_basis: str = "X_pca_harmony",
    theta: float | Sequence[float] | None = None,
    lamb: float | Sequence[float] | None = None,
    sigma: float | Sequence[float] = 0.1,
    nclust: int | None = None,
    tau: float = 0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_kmeans: int = 4,
    epsilon_cluster: float = 1e-3,
    epsilon_harmony: float = 1e-2,
    alpha: float = 0.2,
    batch_prop_cutoff: float = 1e-5,
    verbose: bool = True,
    random_state: int | None = 0,
    ncores: int = 0,
    init_centroids: np.ndarray | None = None,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> None:
    """Integrate batches with Harmony, as :func:`scanpy.external.pp.harmony_integrate`.

    scanpy's function hands ``adata.obsm[basis]`` to ``harmonypy.run_harmony``; this one runs
    our own Harmony with harmonypy 2.x's parameters and defaults (R harmony2's algorithm):

    1. each cell's coordinates are scaled to unit length; ``nclust`` centroids start from
       harmony2's k-means start (each from a random cell, a cell drawn with probability
       proportional to its cosine distance from it, then 10 Lloyd steps);
    2. soft clustering: ``max_iter_kmeans`` passes over the cells in a seeded random order,
       ``1 / block_size`` blocks per pass; a block's cells get
       ``R = softmax(-dist / sigma + sum over their batches of theta log((2E + 1) / (O + E + 1)))``
       with O and E the observed and expected per-batch cluster sizes of the other cells;
    3. correction: per cluster, a ridge regression of the embedding on the batches weighted
       by R (penalty ``lamb``, or ``alpha`` times the expected size when ``lamb`` is None), the
       intercept giving the next centroid and the batch terms subtracted, weighted by R;
    4. repeated ``max_iter_harmony`` times or until the objective's relative decrease is
       below ``epsilon_harmony``.

    Where it runs (``device``, default ``gpusc.settings.device``): the embedding is read from
    ``obsm`` on the host, as scanpy stores it. On the GPU the cells' state lives on the
    device (cuBLAS products and ``kernels/harmony.cu``); on the CPU in NumPy/BLAS and numba
    kernels; per-cluster ridge systems are solved on the host in double precision either way.
    The same input and ``random_state`` give identical results run to run on one machine
    (per-batch sums of R in exact fixed point, every float sum in a fixed order). Progress is
    logged per Harmony iteration with scanpy's logging (info level with ``verbose``, debug
    level without). Device memory: the embedding four times in float32, two cells × clusters
    float32 arrays, and float64 copies of R and of the embedding with a column of ones for up
    to 2**18 cells at a time.

    Parameters
    ----------
    adata
        The annotated data matrix, with the embedding in ``obsm[basis]``.
    key
        The ``obs`` column (or columns, to integrate over several covariates at once) naming
        each cell's batch. Missing labels are an error.
    basis
        The ``obsm`` key of the embedding to correct (default ``"X_pca"``).
    adjusted_basis
        The ``obsm`` key the corrected embedding is written to.
    theta
        Diversity penalty: one number for all batches, one per covariate of ``key``, or one per
        batch (each covariate's labels in sorted order). ``None``: 2.
    lamb
        Ridge penalty, given like ``theta`` (non-negative); one per batch may be preceded by
        the intercept's penalty. ``None`` or -1: estimated per cluster as ``alpha`` times the
        batch's expected size in it.
    sigma
        Width of the soft clustering: one number, or one per cluster.
    nclust
        Number of clusters; ``None``: ``min(round(n_obs / 30), 100)``.
    tau
        Protection against over-correcting small batches: ``theta`` is scaled by
        ``1 - exp(-(n_b / (nclust tau))^2)`` when ``tau > 0``.
    block_size
        Fraction of the cells updated per block of a clustering pass, in (0, 1].
    max_iter_harmony
        At most this many rounds of clustering and correction. 0 leaves the embedding as it
        is (harmonypy returns it scaled to unit rows then).
    max_iter_kmeans
        Clustering passes per round (harmony2 tests convergence only after 4).
    epsilon_cluster, epsilon_harmony
        Relative objective changes below which clustering, and Harmony, stop.
    alpha
        The penalty factor when ``lamb`` is estimated.
    batch_prop_cutoff
        A cluster corrects a batch only if more than this fraction of the batch's cells
        (summed soft assignments) is in it.
    verbose
        Log progress at info level (else debug).
    random_state
        Seed of the k-means start and of the order of the cells in each pass (``None``: 0,
        as harmonypy).
    ncores
        Threads of the host kernels (numba); 0: numba's default. The result does not depend
        on it.
    init_centroids
        ``(nclust, n_dims)`` starting centroids instead of the k-means start (scaled to unit
        length), e.g. harmonypy's: ``run_harmony(..., max_iter_harmony=0).Y.T``.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``. Sets:

    ``obsm[adjusted_basis]`` : numpy.ndarray, float64 (n_obs, n_dims)
        The corrected embedding (computed in float32; float64 as scanpy stores harmonypy's).
    """
    if not isinstance(adata, AnnData):
        raise TypeError(f"{FUNC}: expected an AnnData, got {type(adata).__name__}")
    z = _embedding(adata, basis)
    keys = [key] if isinstance(key, str) else list(key)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise TypeError(f"{FUNC}: key must be an obs column name or a list of them, got {key!r}")
    codes, levels = _batch_codes(adata, keys)
    n_obs = adata.n_obs
    n_clusters = _n_clusters(nclust, n_obs)
    params = _parameters(levels, n_obs, codes, n_clusters, theta=theta, lamb=lamb, sigma=sigma,
                         tau=tau, alpha=alpha, block_size=block_size,
                         max_iter_harmony=max_iter_harmony, max_iter_kmeans=max_iter_kmeans,
                         epsilon_cluster=epsilon_cluster, epsilon_harmony=epsilon_harmony,
                         batch_prop_cutoff=batch_prop_cutoff)
    init = _init_centroids(init_centroids, n_clusters, z.shape[1])
    if isinstance(ncores, bool) or not isinstance(ncores, int | np.integer) or ncores < 0:
        raise ValueError(f"{FUNC}: ncores={ncores!r} must be a non-negative integer")
    where = resolve_device(device)
    steps = _harmony.DeviceSteps if where == "gpu" else _harmony.HostSteps
    level = logg.info if verbose else logg.debug
    start = level(f"running Harmony on obsm[{basis!r}] ({n_obs} cells, {z.shape[1]} dims) by "
                  f"{keys} ({', '.join(str(len(lv)) for lv in levels)} batches), "
                  f"{n_clusters} clusters, on the {where.upper()}")

    import numba

    threads = numba.get_num_threads()
    if ncores:
        numba.set_num_threads(min(int(ncores), numba.config.NUMBA_NUM_THREADS))
    from threadpoolctl import threadpool_limits

    try:
        # BLAS on one thread: its products here are small, and OpenBLAS's threads spin between
        # calls on the cores that numba's block kernels need (2 threads were slower than 1)
        with threadpool_limits(1, user_api="blas"):
            result = harmonize(z, codes, [len(lv) for lv in levels], n_clusters=n_clusters,
                               random_state=0 if random_state is None else int(random_state),
                               init_centroids=init, steps=steps, log=level, **params)
    finally:
        numba.set_num_threads(threads)

    actualize_view(adata)
    adata.obsm[adjusted_basis] = result.z_corr.astype(np.float64)
    level("    finished", time=start)


# ---------------------------------------------------------------- input checks


def _embedding(adata: AnnData, basis: str) -> np.ndarray:
    if basis not in adata.obsm:
        raise KeyError(f"{FUNC}: basis={basis!r} is not in adata.obsm ({list(adata.obsm)}); "
                       "run pp.pca first or pass the key of the embedding to correct")
    z = adata.obsm[basis]
    if hasattr(z, "to_numpy"):
        z = z.to_numpy()
    if hasattr(z, "get"):  # a device array: Harmony reads host embeddings, as scanpy stores them
        z = z.get()
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] != adata.n_obs or z.shape[1] < 1 or z.dtype.kind not in "biuf":
        raise ValueError(f"{FUNC}: obsm[{basis!r}] must be a numeric (n_obs, n_dims) array, got "
                         f"{z.dtype} {z.shape}")
    if adata.n_obs == 0:
        raise ValueError(f"{FUNC}: adata has no cells")
    if not np.isfinite(z).all():
        raise ValueError(f"{FUNC}: obsm[{basis!r}] has NaN or infinite values (harmonypy: "
                         "data_mat must not contain NaN or infinite values); remove those cells")
    return z


def _batch_codes(adata: AnnData, keys: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(n_keys, n_obs) int64 batch numbers, each key's labels numbered in sorted order after
    the labels of the keys before it (one number per batch over all keys), and each key's
    sorted labels."""
    codes = np.empty((len(keys), adata.n_obs), np.int64)
    levels, offset = [], 0
    for i, k in enumerate(keys):
        if k not in adata.obs.columns:
            raise KeyError(f"{FUNC}: key {k!r} is not a column of adata.obs "
                           f"({list(adata.obs.columns)})")
        values = adata.obs[k].to_numpy()
        try:
            number, labels = pd.factorize(values, sort=True)
        except TypeError:  # labels that cannot be compared: numbered as they first appear
            number, labels = pd.factorize(values, sort=False)
        if (number < 0).any():
            raise ValueError(f"{FUNC}: meta_data[{k!r}] has missing labels (None, NaN or NaT); "
                             "label those cells or remove them")
        codes[i] = number + offset
        levels.append(np.asarray(labels))
        offset += len(labels)
    return codes, levels


def _n_clusters(nclust, n_obs: int) -> int:
    if nclust is None:
        return max(1, int(min(round(n_obs / 30.0), 100)))
    if isinstance(nclust, bool) or not isinstance(nclust, int | np.integer) \
            or not 1 <= nclust <= n_obs:
        raise ValueError(f"{FUNC}: nclust={nclust!r} must be an integer from 1 to n_obs "
                         f"({n_obs})")
    return int(nclust)


def _numbers(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind == "O":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{FUNC}: {name} must be a number or a sequence of numbers") from err
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{FUNC}: {name} must be a number or a sequence of numbers, not "
                         f"{array.dtype}")
    return array.astype(np.float64).reshape(-1) if array.ndim else array.astype(np.float64)


def _per_batch(values, n_levels: list[int], name: str, other: str | None = None) -> np.ndarray:
    """One value for all batches, one per key, or one per batch -> one per batch."""
    array = _numbers(values, name)
    if array.ndim == 0:
        return np.full(sum(n_levels), float(array))
    if array.size == len(n_levels):
        return np.repeat(array, n_levels)
    if array.size == sum(n_levels):
        return array
    forms = ["one number", f"one per key ({len(n_levels)})", f"one per batch ({sum(n_levels)})"]
    forms += [other] if other else []
    raise ValueError(f"{FUNC}: {name} must be {', '.join(forms[:-1])} or {forms[-1]}; got "
                     f"{array.size} values")


def _parameters(levels, n_obs, codes, n_clusters, *, theta, lamb, sigma, tau, alpha, block_size,
                max_iter_harmony, max_iter_kmeans, epsilon_cluster, epsilon_harmony,
                batch_prop_cutoff) -> dict:
    n_levels = [len(lv) for lv in levels]
    n_batches = sum(n_levels)
    batch_sizes = np.bincount(codes.reshape(-1), minlength=n_batches).astype(np.float64)
    theta = _per_batch(2.0 if theta is None else theta, n_levels, "theta")
    if not np.isfinite(theta).all():
        raise ValueError(f"{FUNC}: theta must be finite")
    for name, value in (("tau", tau), ("alpha", alpha), ("batch_prop_cutoff", batch_prop_cutoff),
                        ("epsilon_cluster", epsilon_cluster),
                        ("epsilon_harmony", epsilon_harmony)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
                or not np.isfinite(value):
            raise ValueError(f"{FUNC}: {name}={value!r} must be a finite number")
    if tau > 0:
        theta = theta * (1 - np.exp(-((batch_sizes / (n_clusters * tau)) ** 2)))
    lamb_values = None if lamb is None else _numbers(lamb, "lamb")
    if lamb_values is None or (lamb_values.size == 1 and float(lamb_values.reshape(-1)[0]) == -1):
        lamb_values = None
        if alpha < 0:
            raise ValueError(f"{FUNC}: alpha={alpha!r} must be finite and not negative "
                             "(harmonypy: alpha must be finite and not negative)")
    else:
        if lamb_values.ndim != 1 or lamb_values.size != n_batches + 1:
            other = f"the intercept's penalty and then one per batch ({n_batches + 1})"
            lamb_values = np.concatenate([[0.0], _per_batch(lamb_values, n_levels, "lamb", other)])
        if not np.isfinite(lamb_values).all() or (lamb_values < 0).any():
            raise ValueError(f"{FUNC}: lamb must be finite and not negative (harmonypy: lamb "
                             "must be finite and not negative)")
    sigma = _numbers(sigma, "sigma")
    sigma = np.full(n_clusters, float(sigma)) if sigma.ndim == 0 else sigma
    if sigma.size != n_clusters:
        raise ValueError(f"{FUNC}: sigma must have one value per cluster (nclust = {n_clusters}),"
                         f" got {sigma.size}")
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError(f"{FUNC}: sigma must be finite and positive")
    if isinstance(block_size, bool) or not isinstance(block_size, int | float | np.floating) \
            or not 0 < block_size <= 1:
        raise ValueError(f"{FUNC}: block_size={block_size!r} must be in (0, 1]")
    for name, value in (("max_iter_harmony", max_iter_harmony),
                        ("max_iter_kmeans", max_iter_kmeans)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{FUNC}: {name}={value!r} must be a non-negative integer")
    return {"theta": theta, "lamb": lamb_values, "alpha": float(alpha), "sigma": sigma,
            "block_size": float(block_size), "max_iter_harmony": int(max_iter_harmony),
            "max_iter_kmeans": int(max_iter_kmeans), "epsilon_cluster": float(epsilon_cluster),
            "epsilon_harmony": float(epsilon_harmony),
            "batch_prop_cutoff": float(batch_prop_cutoff)}


def _init_centroids(init, n_clusters: int, n_dims: int) -> np.ndarray | None:
    if init is None:
        return None
    init = np.asarray(init, dtype=np.float64)
    if init.shape != (n_clusters, n_dims) or not np.isfinite(init).all():
        raise ValueError(f"{FUNC}: init_centroids must be a finite (nclust, n_dims) = "
                         f"({n_clusters}, {n_dims}) array, got shape {init.shape}")
    return init


# ---------------------------------------------------------------- the algorithm (arrays only)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (host; a zero row stays zero), float32."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt((x * x).sum(axis=1, keepdims=True))
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _kmeans_converged(objective: list[float], epsilon: float) -> bool:
    if len(objective) <= WINDOW + 1:
        return False
    old = sum(objective[-2 - i] for i in range(WINDOW))
    new = sum(objective[-1 - i] for i in range(WINDOW))
    return abs(old - new) / abs(old) < epsilon


def _harmony_converged(objective: list[float], epsilon: float) -> bool:
    old, new = objective[-2], objective[-1]
    if not (np.isfinite(old) and np.isfinite(new)):
        return False
    if old == 0:
        return new == 0
    delta = (old - new) / abs(old)
    return 0 <= delta < epsilon


def harmonize(z, codes, n_levels, *, n_clusters, theta, lamb, alpha, sigma, block_size,
              max_iter_harmony, max_iter_kmeans, epsilon_cluster, epsilon_harmony,
              batch_prop_cutoff, random_state=0, init_centroids=None,
              steps=_harmony.HostSteps, log=logg.debug) -> HarmonyResult:
    """Harmony on an (n, d) embedding ``z`` with batch numbers ``codes`` ((n_keys, n) int, the
    batches of key i numbered after those of key i - 1; ``n_levels`` batches per key).

    The cells are processed sorted by their combination of batches (one batch per key), so
    the correction's per-combination products read contiguous rows; results come back in the
    input's order. ``steps`` is :class:`~gpusc._kernels.harmony.HostSteps` or
    :class:`~gpusc._kernels.harmony.DeviceSteps`.
    """
    n, n_dims = z.shape
    n_batches = int(sum(n_levels))
    combinations, combination = _combinations(codes, n_levels)
    # cells grouped by combination, in a seeded random order within each: the tiles of
    # consecutive cells that the passes visit together hold random cells
    rng = np.random.default_rng(random_state)
    shuffled = rng.permutation(n)
    shuffled_combination = combination[shuffled]
    if len(combinations) <= np.iinfo(np.uint16).max:  # numpy sorts 16 bits by radix: faster
        shuffled_combination = shuffled_combination.astype(np.uint16)
    order = shuffled[np.argsort(shuffled_combination, kind="stable")]
    segments = np.concatenate([[0], np.cumsum(np.bincount(combination,
                                                          minlength=len(combinations)))])
    batch_sizes = np.bincount(codes.reshape(-1), minlength=n_batches).astype(np.float64)
    batch_share = batch_sizes / n
    batch_key = np.repeat(np.arange(len(n_levels)), n_levels)

    z_sorted = np.ascontiguousarray(z[order], dtype=np.float32)
    z_orig = steps.to_array(z_sorted, np.float32)
    cell_batches = steps.to_array(codes.T[order], np.int32)
    sigma_array = steps.to_array(sigma, np.float32)
    inv_sigma = steps.to_array(1.0 / sigma.astype(np.float32), np.float32)
    theta_array = steps.to_array(theta, np.float64)
    share_array = steps.to_array(batch_share, np.float64)
    z_cos = steps.unit_rows(z_orig)
    z_corr = steps.empty((n, n_dims), np.float32)
    z_corr[...] = z_orig

    if init_centroids is not None:
        centroids = _unit(init_centroids)
    else:
        centroids = _kmeans_start(z_cos, n, n_clusters, rng, steps)
    result = HarmonyResult(z_corr=z_sorted, r_sorted=np.empty((0, n_clusters), np.float32),
                           inverse=np.arange(0), centroids=centroids,
                           initial_centroids=centroids.copy())

    every_cell = _harmony.Pass.every_cell(n)
    half = _harmony.feistel_half_bits(every_cell.n_tiles)

    def record(terms, o_sums_host):
        o = o_sums_host[:n_batches] / _harmony.FIXED_SCALE
        e = batch_share[:, None] * (o_sums_host[n_batches] / _harmony.FIXED_SCALE)[None, :]
        cross = float((np.log((o + e + 1) / (2 * e + 1)) * theta[:, None] * sigma[None, :]
                       * o).sum())
        result.objective_kmeans.append((terms[0] + terms[1] + cross) * 2000.0 / n)

    dist = steps.similarity(z_cos, centroids)
    r = steps.empty((n, n_clusters), np.float32)
    o_sums, terms = steps.assign(dist, sigma_array, inv_sigma, None, cell_batches, n_batches, r,
                                 every_cell, similarity=True)
    record(terms, steps.to_host(o_sums))
    result.objective_harmony.append(result.objective_kmeans[-1])

    pass_index = 0
    for iteration in range(1, max_iter_harmony + 1):
        log(f"    Harmony iteration {iteration} of {max_iter_harmony}")
        if iteration > 1:  # the new centroids and the corrected cells: start again from them
            steps.unit_rows(z_corr, out=z_cos)
            steps.similarity(z_cos, centroids, out=dist)
            o_sums, _ = steps.assign(dist, sigma_array, inv_sigma, None, cell_batches, n_batches,
                                     r, every_cell, similarity=True)
        rounds = 0
        for i in range(max_iter_kmeans):
            keys = _harmony.pass_keys(random_state, pass_index)
            pass_index += 1
            terms = np.zeros(2)
            parts = _harmony.blocks(n, block_size, keys, half)
            removed = steps.batch_sums(r, cell_batches, n_batches, parts[0])
            for b, block in enumerate(parts):
                log_div = steps.log_diversity(o_sums, removed, share_array, theta_array)
                if b + 1 < len(parts):  # the next block's current sums in the same call
                    added, block_terms, following = steps.assign_then_sums(
                        dist, sigma_array, inv_sigma, log_div, cell_batches, n_batches, r, block,
                        parts[b + 1])
                else:
                    added, block_terms = steps.assign(dist, sigma_array, inv_sigma, log_div,
                                                      cell_batches, n_batches, r, block)
                    following = None
                steps.apply_delta(o_sums, removed, added)
                removed = following
                terms += block_terms
            record(terms, steps.to_host(o_sums))
            rounds = i + 1
            if i > WINDOW and _kmeans_converged(result.objective_kmeans, epsilon_cluster):
                break
        result.kmeans_rounds.append(rounds)
        result.objective_harmony.append(result.objective_kmeans[-1])

        o_host = steps.to_host(o_sums)
        o = o_host[:n_batches] / _harmony.FIXED_SCALE
        e = batch_share[:, None] * (o_host[n_batches] / _harmony.FIXED_SCALE)[None, :]
        sums = steps.ridge_sums(r, z_orig, segments)
        centroids, corrections = ridge_correction(
            sums, combinations, batch_key, n_levels, o, e, batch_sizes, centroids, lamb=lamb,
            alpha=alpha, cutoff=batch_prop_cutoff)
        steps.correct(z_orig, r, corrections, segments, z_corr)

        if _harmony_converged(result.objective_harmony, epsilon_harmony):
            result.converged = True
            log(f"    Harmony converged after {iteration} iteration{'s' if iteration > 1 else ''}")
            break
    else:
        if max_iter_harmony:
            log("    Harmony stopped before convergence")

    inverse = np.empty(n, np.int64)
    inverse[order] = np.arange(n)
    result.z_corr = steps.to_host(z_corr)[inverse]
    result.r_sorted, result.inverse = steps.to_host(r), inverse
    result.centroids = centroids
    return result


def _combinations(codes: np.ndarray, n_levels) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``codes.T`` (each cell's batches), sorted, and each cell's row
    number among them: ``np.unique(codes.T, axis=0, return_inverse=True)``, through one number
    per cell (the batches as digits, the first key's most significant) where that fits."""
    offsets = np.concatenate([[0], np.cumsum(n_levels)[:-1]]).astype(np.int64)
    if np.prod(np.asarray(n_levels, np.float64)) >= 2.0**62:
        combinations, combination = np.unique(codes.T, axis=0, return_inverse=True)
        return combinations, combination.reshape(-1)
    number = np.zeros(codes.shape[1], np.int64)
    for v, levels in enumerate(n_levels):
        number = number * levels + (codes[v] - offsets[v])
    distinct, combination = np.unique(number, return_inverse=True)
    combinations = np.empty((distinct.size, len(n_levels)), codes.dtype)
    for v in range(len(n_levels) - 1, -1, -1):
        combinations[:, v] = distinct % n_levels[v] + offsets[v]
        distinct = distinct // n_levels[v]
    return combinations, combination.reshape(-1)


def _kmeans_start(z_cos, n: int, n_clusters: int, rng, steps) -> np.ndarray:
    """harmony2's k-means start on the unit rows: for each centroid a random cell, and a cell
    drawn with probability proportional to its distance 2 (1 - cos) from it (no cell twice);
    then Lloyd steps (an empty cluster keeps its mean). Unit rows, float32 (K, d)."""
    seed_rows = rng.integers(0, n, n_clusters)
    race_seed = int(rng.integers(0, 2**63))
    picks = steps.race_winners(z_cos, seed_rows, race_seed)
    means = np.asarray(steps.to_host(z_cos[steps.to_array(picks, np.int64)]), np.float32)
    for _ in range(KMEANS_START_STEPS):
        sums, counts = steps.kmeans_step(z_cos, means)
        filled = counts > 0
        means[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return _unit(means)


def ridge_correction(sums, combinations, batch_key, n_levels, o, e, batch_sizes, centroids, *,
                     lamb, alpha, cutoff):
    """Each cluster's ridge regression of the embedding on its batches, weighted by R.

    ``sums``: (C, K, d + 1) float64 R-weighted coordinate sums (and, last, sums of R) per
    combination of batches; ``combinations``: (C, n_keys) the batches of each combination;
    ``o``, ``e``: (B, K) observed and expected cluster sizes. A cluster corrects batch b when
    more than ``cutoff`` of b's cells are in it and b's key has two such batches; its cells
    (those with any corrected batch) give the design ``[1, one-hot batches]`` with the penalty
    ``alpha E`` per batch (``lamb`` None) or ``lamb[1 + b]`` (and ``lamb[0]`` on the intercept
    when every batch is corrected). The batches of the key with the most levels share no cells,
    so their block is diagonal and is eliminated first (the Schur complement is the intercept
    and the other keys' batches); the rest is solved in double precision.

    Returns (new unit centroids (K, d) float32: the intercepts of the clusters that correct
    something, the old ones elsewhere; (C, K, d) float32 corrections per combination).
    """
    n_comb, n_clusters, width = sums.shape
    n_dims = width - 1
    n_batches = o.shape[0]
    totals = sums[:, :, n_dims]  # (C, K)
    coords = sums[:, :, :n_dims]  # (C, K, d)

    above = (o / batch_sizes[:, None]).T > cutoff  # (K, B)
    above_per_key = np.stack([above[:, batch_key == v].sum(axis=1) for v in range(len(n_levels))],
                             axis=1)
    keep = above & (above_per_key[:, batch_key] > 1)
    active = keep.any(axis=1)
    if lamb is None:
        penalty = alpha * e.T  # (K, B)
        intercept_penalty = np.zeros(n_clusters)
    else:
        penalty = np.broadcast_to(lamb[1:], (n_clusters, n_batches))
        intercept_penalty = np.where(keep.all(axis=1), lamb[0], 0.0)

    # per-batch totals (K, B) and sums (K, B, d), from the combinations
    o_batch = np.zeros((n_clusters, n_batches))
    s_batch = np.zeros((n_clusters, n_batches, n_dims))
    for v in range(combinations.shape[1]):
        np.add.at(o_batch, (slice(None), combinations[:, v]), totals.T)
        np.add.at(s_batch, (slice(None), combinations[:, v]), coords.transpose(1, 0, 2))
    included = keep[:, combinations].any(axis=2)  # (K, C): cells with a corrected batch
    a00 = (included * totals.T).sum(axis=1) + intercept_penalty
    r0 = np.einsum("kc,ckd->kd", included, coords)

    diag_key = int(np.argmax(n_levels))
    diag = np.flatnonzero(batch_key == diag_key)  # (m,)
    dense = np.flatnonzero(batch_key != diag_key)  # (nd,)
    position = np.full(n_batches, -1)
    position[diag] = np.arange(diag.size)
    position[dense] = np.arange(dense.size)
    keep_q, keep_d = keep[:, diag], keep[:, dense]
    size = 1 + dense.size

    block = np.zeros((n_clusters, size, size))
    block[:, 0, 0] = a00
    block[:, 0, 1:] = block[:, 1:, 0] = o_batch[:, dense] * keep_d
    coupling = np.zeros((n_clusters, size, diag.size))
    coupling[:, 0, :] = o_batch[:, diag] * keep_q
    overlap = np.zeros((n_clusters, dense.size, dense.size))
    other = np.zeros((n_clusters, dense.size, diag.size))
    for v in range(combinations.shape[1]):
        if v == diag_key:
            continue
        np.add.at(other, (slice(None), position[combinations[:, v]],
                          position[combinations[:, diag_key]]), totals.T)
        for w in range(v + 1, combinations.shape[1]):
            if w == diag_key:
                continue
            a, b = position[combinations[:, v]], position[combinations[:, w]]
            np.add.at(overlap, (slice(None), a, b), totals.T)
            np.add.at(overlap, (slice(None), b, a), totals.T)
    block[:, 1:, 1:] = overlap * keep_d[:, :, None] * keep_d[:, None, :]
    idx = np.arange(dense.size)
    block[:, 1 + idx, 1 + idx] = np.where(keep_d, o_batch[:, dense] + penalty[:, dense], 1.0)
    coupling[:, 1:, :] = other * keep_d[:, :, None] * keep_q[:, None, :]
    diagonal = np.where(keep_q, o_batch[:, diag] + penalty[:, diag], 1.0)  # (K, m)
    rhs = np.zeros((n_clusters, size, n_dims))
    rhs[:, 0] = r0
    rhs[:, 1:] = s_batch[:, dense] * keep_d[:, :, None]
    rhs_q = s_batch[:, diag] * keep_q[:, :, None]

    centroids = np.array(centroids, dtype=np.float32, copy=True)
    corrections = np.zeros((n_comb, n_clusters, n_dims), np.float32)
    if not active.any():
        return centroids, corrections
    act = np.flatnonzero(active)
    scaled = coupling[act] / diagonal[act, None, :]
    schur = block[act] - scaled @ coupling[act].transpose(0, 2, 1)
    schur_rhs = rhs[act] - scaled @ rhs_q[act]
    largest = np.max(np.diagonal(block[act], axis1=1, axis2=2), axis=1)
    try:
        factor = np.linalg.cholesky(schur)
    except np.linalg.LinAlgError:
        factor = None
    if factor is None or (np.diagonal(factor, axis1=1, axis2=2) ** 2
                          <= 1e-10 * largest[:, None]).any():
        raise RuntimeError(f"{FUNC}: Harmony numerical error during ridge correction: ridge "
                           "system is singular; lamb (or alpha) is zero or too small")
    w_dense = np.linalg.solve(schur, schur_rhs)  # (A, size, d)
    w_diag = (rhs_q[act] - coupling[act].transpose(0, 2, 1) @ w_dense) / diagonal[act, :, None]
    centroids[act] = _unit(w_dense[:, 0])
    per_batch = np.zeros((n_clusters, n_batches, n_dims))
    per_batch[np.ix_(act, dense)] = w_dense[:, 1:]
    per_batch[np.ix_(act, diag)] = w_diag
    for v in range(combinations.shape[1]):
        corrections += per_batch[:, combinations[:, v]].transpose(1, 0, 2).astype(np.float32)
    return centroids, corrections
