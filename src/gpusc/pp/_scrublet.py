"""scrublet and scrublet_simulate_doublets, as scanpy's preprocessing/_scrublet.

The same pipeline as scanpy 1.12 (itself Scrublet's, :cite:t:`Wolock2019`), step for step,
on gpusc's own steps so that the work runs where the count matrix lives:

1. ``filter_genes(min_cells=3)``, ``filter_cells(min_genes=3)``, ``normalize_total``,
   ``log1p`` and ``highly_variable_genes`` (seurat flavor) on the log data; the genes kept
   are the highly variable ones.
2. Doublets simulated from the raw counts of those genes: scanpy's draws, call for call
   (``sample_without_replacement`` over the n_obs² ordered pairs from the same RandomState,
   binomial thinning in the same CSC order for ``synthetic_doublet_umi_subsampling < 1``,
   and numpy's global generator where scanpy uses it), so the same ``random_state`` gives
   the same doublets.
3. Optional ``log1p`` of both, then ``normalize_total(target_sum=1e6)`` of both.
4. Gene means and standard deviations (ddof 1) of the observed cells; the z-scored matrix is
   never formed: its PCA is the PCA of X·diag(1/σ) (covariance from the float64 Gram matrix,
   ``pp._pca``'s exact path, or its randomized one past 10,000 genes), and the embedding
   (X − μ)·diag(1/σ)·V is a sparse product. Simulated doublets are projected with the
   observed cells' fit. ``mean_center=False`` gives the truncated SVD (no centring).
5. Exact kNN (``_kernels.topk``, ties aside) over observed and simulated cells together,
   ``k_adj = round(n_neighbors · (1 + n_sim / n_obs))``; each point's list is its
   ``k_adj − 1`` nearest other points (scanpy's lists: it drops the first column of the
   ``k_adj`` nearest, the point itself).
6. Doublet scores from the share of simulated neighbours (Scrublet's Bayesian estimate),
   and the threshold from ``skimage.filters.threshold_minimum`` on the simulated scores.

scanpy's kNN is exact (scikit-learn brute force) below 8,192 points in all or with
``use_approx_neighbors=False``, and approximate (PyNNDescent) otherwise; here it is exact
always, so where scanpy searches approximately the neighbour lists (and the scores of the
cells whose lists differ) differ too.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._core import logg
from .._core.adata import check_not_empty, get_matrix
from .._core.arrays import is_sparse, placement, to_host, xp_of
from .._core.compat import old_positionals, warn
from .._kernels import topk as _topk
from .._kernels.moments import gene_moments
from .._kernels.qc import qc_stats
from . import _pca
from ._hvg import highly_variable_genes
from ._normalize import normalize_total
from ._simple import filter_cells, filter_genes, log1p

MIN_CELLS = 3  # scanpy's filter_genes(min_cells=3) before the simulation
MIN_GENES = 3  # and filter_cells(min_genes=3)
SIM_TARGET_SUM = 1e6  # both matrices are normalised to this total before the embedding
N_PCS = 50  # scanpy's settings.N_PCS: a wider embedding is reduced by a PCA before the kNN
SKIMAGE_MISSING = ("`threshold` is None and thus scrublet requires `scikit-image`. "
                   "Please install `scanpy[scrublet]` (or `scikit-image` directly) and try again.")


class ScikitImageMissing(ImportError, ValueError):
    """scikit-image (gpusc's ``scrublet`` extra) is not installed and ``threshold`` is None.

    An ImportError naming the extra, and the ValueError scanpy raises in this case, so code
    written against scanpy's exception still catches it."""


@dataclass
class _Scored:
    """One run of Scrublet (all cells, or one batch)."""

    kept: np.ndarray  # positions of the cells that passed filter_cells, in the run's order
    n_genes: np.ndarray | None  # filter_cells' obs['n_genes'] of the kept cells (simulating only)
    scores: np.ndarray  # doublet score per kept cell, float64
    predicted: np.ndarray | bool  # per kept cell, or False where no threshold was found
    uns: dict


@old_positionals("batch_key", "sim_doublet_ratio", "expected_doublet_rate", "stdev_doublet_rate",
                 "synthetic_doublet_umi_subsampling", "knn_dist_metric", "normalize_variance",
                 "log_transform", "mean_center", "n_prin_comps", "use_approx_neighbors",
                 "get_doublet_neighbor_parents", "n_neighbors", "threshold", "verbose", "copy",
                 "random_state")
def scrublet(
    adata: AnnData,
    adata_sim: AnnData | None = None,
    *,
    batch_key: str | None = None,
    sim_doublet_ratio: float = 2.0,
    expected_doublet_rate: float = 0.05,
    stdev_doublet_rate: float = 0.02,
    synthetic_doublet_umi_subsampling: float = 1.0,
    knn_dist_metric: str = "euclidean",
    normalize_variance: bool = True,
    log_transform: bool = False,
    mean_center: bool = True,
    n_prin_comps: int = 30,
    use_approx_neighbors: bool | None = None,
    get_doublet_neighbor_parents: bool = False,
    n_neighbors: int | None = None,
    threshold: float | None = None,
    verbose: bool = True,
    copy: bool = False,
    random_state: Any = 0,
) -> AnnData | None:
    """Predict doublets with Scrublet, as :func:`scanpy.pp.scrublet`.

    See the module docstring for the steps. Everything up to the embedding runs where X
    lives (CUDA kernels and cuBLAS for device arrays, numba and BLAS on the host); the
    embedding (n_cells · (1 + sim_doublet_ratio) × n_prin_comps) comes to the host for the
    kNN, which runs on the GPU when X is on the device and ``k_adj`` fits the device search
    (k_adj ≤ 111), on the host otherwise. Memory: the raw and normalised counts of the kept
    genes, the simulated doublets (about ``sim_doublet_ratio`` × 2 the observed stored
    values, twice: counts and normalised), the scaled copies for the embedding (float64),
    the n_genes² float64 Gram matrix, and the kNN lists, n_total · (k_adj + 16) · 16 bytes.

    Parameters
    ----------
    adata
        Raw counts (cells × genes) in X, host or device, unless ``adata_sim`` is given: then
        the observed cells processed as ``adata_sim`` was (normalised, the same genes).
    adata_sim
        Simulated doublets from :func:`scrublet_simulate_doublets`, processed like
        ``adata``; skips steps 1–3. With ``batch_key``, every batch is scored against it,
        as in scanpy.
    batch_key
        ``obs`` column: each batch is scored on its own (its own genes, doublets, threshold).
    sim_doublet_ratio
        Doublets to simulate per observed cell (> 0).
    expected_doublet_rate, stdev_doublet_rate
        Prior doublet rate and its uncertainty.
    synthetic_doublet_umi_subsampling
        In (0, 1]: below 1 the summed counts of each doublet are thinned at this rate.
    knn_dist_metric
        ``"euclidean"``, ``"sqeuclidean"``, ``"cosine"`` or ``"manhattan"``.
    normalize_variance, mean_center
        Scale each gene to unit variance / centre it before the embedding (PCA when
        centred, truncated SVD otherwise).
    log_transform
        ``log1p`` both matrices before the normalisation to 10⁶.
    n_prin_comps
        Embedding dimensions: 1 ≤ n_prin_comps < min(cells, genes) of the matrix embedded.
        Above 50 the embedding is reduced to 50 by a PCA first, with scanpy's warning.
    use_approx_neighbors
        Accepted for scanpy's signature; the search is exact either way.
    get_doublet_neighbor_parents
        Also store the parents of each cell's simulated neighbours.
    n_neighbors
        Neighbours per cell; default ``round(0.5 · sqrt(n_cells))``.
    threshold
        Doublet score threshold; default from ``skimage.filters.threshold_minimum`` of the
        simulated scores (needs scikit-image: ``pip install 'gpusc[scrublet]'``).
    verbose
        Log the threshold and the doublet rates.
    copy
        Return a copy instead of writing to ``adata``.
    random_state
        Seed (int, None or a numpy RandomState) of the simulation. A RandomState is advanced
        as scanpy advances it (the simulation, then the draws of scikit-learn's ARPACK start
        vector), so later batches get scanpy's doublets too where scanpy's kNN is exact.

    Returns
    -------
    ``None``, or the AnnData with ``copy=True``. Writes:

    ``obs['doublet_score']`` : float64
        Doublet score of each cell (NaN for cells filter_cells removed).
    ``obs['predicted_doublet']`` : bool
        Score above the threshold (False everywhere where no threshold was found; object
        with NaN for removed cells).
    ``uns['scrublet']`` : dict
        ``doublet_scores_sim`` (float64, per simulated doublet), ``doublet_parents``
        (int64, n_sim × 2, positions in the filtered cells), ``parameters``
        (``expected_doublet_rate``, ``sim_doublet_ratio``, ``n_neighbors`` (int),
        ``random_state``), ``threshold`` (float64, when found or given) and, with
        ``get_doublet_neighbor_parents``, ``doublet_neighbor_parents`` (list of int64
        arrays). With ``batch_key``: ``{'batches': {batch: that dict}, 'batched_by':
        batch_key}``, and obs is rebuilt from the batches as scanpy does (it gains
        ``n_genes`` (int64) from filter_cells when doublets are simulated).

    Raises
    ------
    ValueError
        An unknown ``batch_key`` (scanpy's message), missing batch labels, a batch with no
        more cells than ``n_prin_comps``, NaN/inf or negative counts, ``n_prin_comps`` out
        of range, genes with zero variance under ``normalize_variance``, other bad
        arguments. Nothing is written to ``adata`` before the last batch is scored.
    ImportError
        ``threshold=None`` without scikit-image (the ``scrublet`` extra): a
        :class:`ScikitImageMissing`, also a ValueError with scanpy's message inside.
    """
    func = "scrublet"
    if threshold is None and not find_spec("skimage"):  # before any work, as scanpy checks
        raise ScikitImageMissing(f"{func}: {SKIMAGE_MISSING} For gpusc: pip install "
                                 "'gpusc[scrublet]' (scikit-image), or pass a threshold.",
                                 name="skimage")
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    _check_arguments(func, sim_doublet_ratio=sim_doublet_ratio,
                     synthetic_doublet_umi_subsampling=synthetic_doublet_umi_subsampling,
                     expected_doublet_rate=expected_doublet_rate, stdev_doublet_rate=stdev_doublet_rate,
                     knn_dist_metric=knn_dist_metric, n_prin_comps=n_prin_comps,
                     n_neighbors=n_neighbors, threshold=threshold)
    x = get_matrix(adata, func=func)
    placement(x)
    check_not_empty(x, func)
    _check_values(x, "adata.X", func, counts=adata_sim is None)
    if adata_sim is not None:
        _check_adata_sim(adata_sim, adata.n_vars, func)
    if batch_key is not None:
        if batch_key not in adata.obs.columns:
            raise ValueError(
                "`batch_key` must be a column of .obs in the input AnnData object,"
                f"but {batch_key!r} is not in {adata.obs.keys()!r}.")
        labels = adata.obs[batch_key]
        if labels.isna().any():
            raise ValueError(f"{func}: batch_key={batch_key!r} has {int(labels.isna().sum())} "
                             "missing labels; give every cell a batch (or drop those cells)")
        batches = np.unique(labels)
        for batch in batches:
            n_cells = int((labels == batch).sum())
            if n_cells <= n_prin_comps:
                raise ValueError(
                    f"{func}: batch {batch!r} of batch_key={batch_key!r} has {n_cells} cell(s); "
                    f"each batch needs more cells than n_prin_comps={n_prin_comps} (merge small "
                    "batches or lower n_prin_comps)")
    elif adata.n_obs <= n_prin_comps:
        raise ValueError(f"{func}: adata has {adata.n_obs} cells; Scrublet needs more cells than "
                         f"n_prin_comps={n_prin_comps}")

    start = logg.info("Running Scrublet")
    options = dict(sim_doublet_ratio=sim_doublet_ratio, expected_doublet_rate=expected_doublet_rate,
                   synthetic_doublet_umi_subsampling=synthetic_doublet_umi_subsampling,
                   knn_dist_metric=knn_dist_metric, normalize_variance=normalize_variance,
                   log_transform=log_transform, mean_center=mean_center, n_prin_comps=n_prin_comps,
                   use_approx_neighbors=use_approx_neighbors,
                   get_doublet_neighbor_parents=get_doublet_neighbor_parents,
                   n_neighbors=n_neighbors, threshold=threshold, verbose=verbose,
                   random_state=random_state)
    positions = pd.RangeIndex(adata.n_obs).astype(str)
    if batch_key is None:
        run = _run_scrublet(x, adata_sim, **options)
        scored = pd.DataFrame({"doublet_score": run.scores, "predicted_doublet": run.predicted},
                              index=positions[run.kept]).reindex(positions)
        if copy:
            adata = adata.copy()
        adata.obs["doublet_score"] = scored["doublet_score"].to_numpy()
        adata.obs["predicted_doublet"] = scored["predicted_doublet"].to_numpy()
        adata.uns["scrublet"] = run.uns
    else:
        labels = adata.obs[batch_key].to_numpy()
        frames, uns = [], {}
        for batch in batches:
            members = np.flatnonzero(labels == batch)
            rows = _take_rows(x, members)
            run = _run_scrublet(rows, adata_sim, **options)
            frame = adata.obs.iloc[members].set_axis(positions[members])
            frame = frame.iloc[run.kept].copy()
            if run.n_genes is not None:
                frame["n_genes"] = run.n_genes
            frame["doublet_score"] = run.scores
            frame["predicted_doublet"] = run.predicted
            frames.append(frame)
            uns[batch] = run.uns
        obs = pd.concat(frames).astype(adata.obs.dtypes).reindex(positions).set_axis(adata.obs_names)
        if copy:
            adata = adata.copy()
        adata.obs = obs
        adata.uns["scrublet"] = {"batches": uns, "batched_by": batch_key}
    logg.info("    Scrublet finished", time=start)
    return adata if copy else None


@old_positionals("layer", "sim_doublet_ratio", "synthetic_doublet_umi_subsampling", "random_seed")
def scrublet_simulate_doublets(
    adata: AnnData,
    *,
    layer: str | None = None,
    sim_doublet_ratio: float = 2.0,
    synthetic_doublet_umi_subsampling: float = 1.0,
    random_seed: Any = 0,
) -> AnnData:
    """Simulate doublets by adding the counts of random pairs of cells, as
    :func:`scanpy.pp.scrublet_simulate_doublets`.

    ``int(n_obs · sim_doublet_ratio)`` distinct ordered pairs (i, j) are drawn as scanpy
    draws them (the same pairs for the same ``random_seed``); each doublet is row i plus
    row j, gathered where the matrix lives. With ``synthetic_doublet_umi_subsampling < 1``
    each summed count is thinned binomially on the host (scanpy's draws, in its order),
    and the totals with numpy's global generator, as scanpy does.

    Parameters
    ----------
    adata
        Raw counts of the cells (and genes) to combine.
    layer
        Use this layer instead of X.
    sim_doublet_ratio
        Doublets per cell (> 0).
    synthetic_doublet_umi_subsampling
        Thinning rate in (0, 1].
    random_seed
        Seed (int, None or a numpy RandomState).

    Returns
    -------
    A new AnnData of n_sim doublets × n_vars: X holds the summed counts, sparse CSR where
    ``adata``'s matrix lives (scanpy: CSC; the same values), in the matrix's dtype (int64 on
    the host after thinning, as scanpy; float32 on the device, whose sparse matrices hold
    no integers). Sets:

    ``obs['n_counts']`` : the parents' summed totals (float32 for float32 counts, int64 for
        integer counts or after thinning).
    ``obsm['doublet_parents']`` : int64 (n_sim, 2), positions of the two parent cells.
    ``uns['scrublet']`` : ``{'parameters': {'sim_doublet_ratio': sim_doublet_ratio}}``.
    """
    func = "scrublet_simulate_doublets"
    _check_arguments(func, sim_doublet_ratio=sim_doublet_ratio,
                     synthetic_doublet_umi_subsampling=synthetic_doublet_umi_subsampling)
    x = get_matrix(adata, layer=layer, func=func)
    placement(x)
    check_not_empty(x, func)
    _check_values(x, f"layer {layer!r}" if layer else "adata.X", func, counts=True)
    sim, totals, parents = _simulate(x, sim_doublet_ratio, synthetic_doublet_umi_subsampling,
                                     random_seed, func)
    adata_sim = AnnData(sim)
    adata_sim.obs["n_counts"] = totals
    adata_sim.obsm["doublet_parents"] = parents
    adata_sim.uns["scrublet"] = {"parameters": {"sim_doublet_ratio": sim_doublet_ratio}}
    return adata_sim


# ---------------------------------------------------------------- checks

def _check_arguments(func: str, **args) -> None:
    """Errors that name the argument, before anything runs."""
    def number(name, low, high, *, low_open=True, high_open=False):
        value = args[name]
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        ok = ok and np.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
        if not ok:
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise ValueError(f"{func}: {name}={value!r} must be a number in {bounds}")

    number("sim_doublet_ratio", 0, np.inf, high_open=True)
    number("synthetic_doublet_umi_subsampling", 0, 1)
    if func == "scrublet_simulate_doublets":
        return
    number("expected_doublet_rate", 0, 1, high_open=True)
    number("stdev_doublet_rate", 0, np.inf, low_open=False, high_open=True)
    metric = args["knn_dist_metric"]
    if not isinstance(metric, str) or metric not in _topk.METRICS:
        raise ValueError(f"{func}: knn_dist_metric={metric!r} is not supported; use one of "
                         f"{tuple(_topk.METRICS)}")
    for name in ("n_prin_comps", "n_neighbors"):
        value = args[name]
        if name == "n_neighbors" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{func}: {name}={value!r} must be a positive integer")
    if args["threshold"] is not None and not np.isfinite(args["threshold"]):
        raise ValueError(f"{func}: threshold={args['threshold']!r} must be a finite number or None")


def _check_values(x, where: str, func: str, *, counts: bool) -> None:
    """NaN/inf anywhere; negative values where counts are expected (one pass, where x lives)."""
    stats = qc_stats(x, np.zeros((x.shape[1], 0), bool), np.zeros(0, np.int64), per_gene=False)
    if stats.nonfinite:
        raise ValueError(f"{func}: {where} contains NaN or inf; expected finite counts")
    if counts and stats.negative:
        raise ValueError(f"{func}: {where} has negative values; Scrublet simulates doublets from "
                         "raw counts (non-negative). Pass the raw counts, or simulated doublets "
                         "through adata_sim")


def _check_adata_sim(adata_sim, n_vars: int, func: str) -> None:
    if not isinstance(adata_sim, AnnData):
        raise TypeError(f"{func}: adata_sim must be an AnnData from scrublet_simulate_doublets, got "
                        f"{type(adata_sim).__name__}")
    if adata_sim.n_vars != n_vars:
        raise ValueError(f"{func}: adata_sim has {adata_sim.n_vars} genes but adata has {n_vars}; "
                         "process both the same way (same genes)")
    if "doublet_parents" not in adata_sim.obsm:
        raise ValueError(f"{func}: adata_sim.obsm['doublet_parents'] is missing; make adata_sim "
                         "with scrublet_simulate_doublets")
    x = get_matrix(adata_sim, func=func)
    placement(x)
    check_not_empty(x, func)
    _check_values(x, "adata_sim.X", func, counts=False)


def _check_n_prin_comps(n_comps: int, shape: tuple[int, int], mean_center: bool, func: str) -> None:
    """scikit-learn's PCA / TruncatedSVD with ARPACK need 1 <= n_comps < min(shape)."""
    low = min(shape)
    if n_comps < low:
        return
    theirs = (f"n_components={n_comps} must be strictly less than min(n_samples, n_features)={low} "
              "with svd_solver='arpack'" if mean_center
              else "`k` must be an integer satisfying `0 < k < min(A.shape)`.")
    raise ValueError(f"{func}: {theirs}; n_prin_comps={n_comps} must be below min(cells, genes) = "
                     f"{low} of the matrix embedded ({shape[0]} cells × {shape[1]} genes after "
                     "filtering and gene selection); lower n_prin_comps")


# ---------------------------------------------------------------- the pipeline

def _run_scrublet(x, adata_sim, *, sim_doublet_ratio, expected_doublet_rate,
                  synthetic_doublet_umi_subsampling, knn_dist_metric, normalize_variance,
                  log_transform, mean_center, n_prin_comps, use_approx_neighbors,
                  get_doublet_neighbor_parents, n_neighbors, threshold, verbose, random_state) -> _Scored:
    """Scrublet on one matrix of cells (all cells or one batch)."""
    func = "scrublet"
    kept = np.arange(x.shape[0])
    n_genes = None
    if adata_sim is None:
        genes, _ = filter_genes(x, min_cells=MIN_CELLS)
        x = _take_columns(x, np.flatnonzero(genes))
        cells, n_genes = filter_cells(x, min_genes=MIN_GENES)
        kept = np.flatnonzero(cells)
        n_genes = n_genes[kept]
        x = _take_rows(x, kept)
        if min(x.shape) == 0:
            raise ValueError(f"{func}: no cells with {MIN_GENES}+ genes and genes in {MIN_CELLS}+ "
                             f"cells are left ({x.shape}); Scrublet needs raw counts of many cells")
        normalized = normalize_total(AnnData(x), inplace=False)["X"]
        hvg = highly_variable_genes(AnnData(log1p(normalized, copy=True)), inplace=False)
        columns = np.flatnonzero(hvg["highly_variable"].to_numpy())
        raw, obs = _take_columns(x, columns), _take_columns(normalized, columns)
        _check_n_prin_comps(n_prin_comps, raw.shape, mean_center, func)
        sim, _, parents = _simulate(raw, sim_doublet_ratio, synthetic_doublet_umi_subsampling,
                                    random_state, func)
        sim_ratio = sim_doublet_ratio
        if log_transform:
            obs, sim = log1p(obs), log1p(sim)
        obs = normalize_total(AnnData(obs), target_sum=SIM_TARGET_SUM, inplace=False)["X"]
        sim = normalize_total(AnnData(sim), target_sum=SIM_TARGET_SUM, inplace=False)["X"]
    else:
        obs, sim = x, get_matrix(adata_sim, func=func)
        parents = adata_sim.obsm["doublet_parents"]
        sim_ratio = adata_sim.uns.get("scrublet", {}).get("parameters", {}).get("sim_doublet_ratio", None)
        _check_n_prin_comps(n_prin_comps, obs.shape, mean_center, func)
    _consume_arpack_draws(random_state, min(obs.shape))

    logg.info(f"Embedding transcriptomes using {'PCA' if mean_center else 'Truncated SVD'}...")
    manifold = _embed(obs, sim, mean_center=mean_center, normalize_variance=normalize_variance,
                      n_comps=n_prin_comps, random_state=random_state, func=func)
    n_obs = obs.shape[0]
    if n_neighbors is None:
        n_neighbors = round(0.5 * np.sqrt(n_obs))
    neighbors, k_adj = _doublet_neighbors(manifold, n_obs, n_neighbors, knn_dist_metric,
                                          drop_first=True if use_approx_neighbors else None,
                                          on_device=placement(obs) == "device")
    n_sim = manifold.shape[0] - n_obs
    scores = _doublet_scores(neighbors, n_obs, n_sim, k_adj, expected_doublet_rate)
    scores_obs, scores_sim = scores[:n_obs], scores[n_obs:]
    threshold = _threshold(scores_sim, threshold, verbose)
    uns = {
        "doublet_scores_sim": scores_sim,
        "doublet_parents": parents,
        "parameters": {"expected_doublet_rate": expected_doublet_rate, "sim_doublet_ratio": sim_ratio,
                       "n_neighbors": n_neighbors, "random_state": random_state},
    }
    predicted: np.ndarray | bool = False
    if threshold is not None:
        uns["threshold"] = threshold
        predicted = scores_obs > threshold
        if verbose:
            _log_rates(predicted, scores_sim > threshold, expected_doublet_rate)
    if get_doublet_neighbor_parents:
        uns["doublet_neighbor_parents"] = _neighbor_parents(neighbors[:n_obs], n_obs, np.asarray(parents))
    return _Scored(kept, n_genes, scores_obs, predicted, uns)


def _simulate(raw, ratio: float, subsampling: float, random_state, func: str):
    """scanpy's doublets: (summed counts where raw lives, totals, parents int64 (n_sim, 2))."""
    from sklearn.utils import check_random_state
    from sklearn.utils.random import sample_without_replacement

    rng = check_random_state(random_state)
    n_obs = raw.shape[0]
    n_sim = int(n_obs * ratio)
    if not 1 <= n_sim <= n_obs * n_obs:
        raise ValueError(f"{func}: sim_doublet_ratio={ratio!r} gives {n_sim} doublets from {n_obs} "
                         f"cells; choose it so that 1 <= n_obs · ratio <= n_obs² ({n_obs * n_obs})")
    pairs = sample_without_replacement(np.prod((n_obs, n_obs)), n_sim, random_state=rng, method="auto")
    parents = np.vstack(np.unravel_index(pairs, (n_obs, n_obs))).T
    rows = _csr(raw)
    totals = _row_totals(rows)
    totals = totals[parents[:, 0]] + totals[parents[:, 1]]
    if subsampling < 1:
        sim, totals = _thin(rows, parents, totals, subsampling, rng)
    else:
        xp = xp_of(rows)
        sim = rows[xp.asarray(parents[:, 0])] + rows[xp.asarray(parents[:, 1])]
    return sim, totals, parents


def _thin(rows, parents, totals, rate: float, rng):
    """scanpy's subsample_counts on the host: each stored count of the summed pair becomes
    Binomial(round(count), rate), drawn from ``rng`` in the order of scanpy's stored values
    (the same scipy operations on a CSC matrix: its row gathers leave the rows unsorted);
    the parents' counts that were not stored, from numpy's global generator, as scanpy does.
    Returns the thinned doublets (CSR where ``rows`` lives) and their totals."""
    on_device = placement(rows) == "device"
    by_column = (rows.get() if on_device else rows).tocsc()
    summed = by_column[parents[:, 0], :] + by_column[parents[:, 1], :]
    summed.data = rng.binomial(np.round(summed.data).astype(int), rate)
    current = np.asarray(summed.sum(1)).squeeze()
    unsampled = totals - current
    totals = current + np.random.binomial(np.round(unsampled).astype(int), rate)
    summed = summed.tocsr()
    if on_device:  # cupyx sparse matrices hold no integers: float32 counts
        from cupyx.scipy import sparse as cpsparse

        summed = cpsparse.csr_matrix(summed.astype(np.float32))
    return summed, totals


def _row_totals(x):
    """Each cell's total on the host, in the dtype numpy's sum gives (as scanpy stores it)."""
    sums = to_host(x.sum(axis=1)).ravel()
    return sums.astype(np.zeros(0, x.dtype).sum().dtype)


def _consume_arpack_draws(random_state, size: int) -> None:
    """scikit-learn's ARPACK start vector, drawn in scanpy's PCA / TruncatedSVD from the same
    RandomState as the simulation (or numpy's global one for None): draw it too, so the
    generator is where scanpy leaves it. An int seed makes a fresh generator: nothing to do."""
    if random_state is None or isinstance(random_state, np.random.RandomState):
        from sklearn.utils import check_random_state

        check_random_state(random_state).uniform(-1, 1, size)


def _embed(obs, sim, *, mean_center: bool, normalize_variance: bool, n_comps: int, random_state, func: str):
    """Observed and simulated cells in the observed cells' PCA (or SVD) coordinates, float64
    on the host, stacked (observed first)."""
    n_obs = obs.shape[0]
    moments = gene_moments(obs)
    mean = moments.sum[0] / n_obs
    if normalize_variance:
        var = (moments.sum_sq[0] - n_obs * mean * mean) / (n_obs - 1)
        flat = np.flatnonzero(~(var > 0))
        if flat.size:
            raise ValueError(
                f"{func}: {flat.size} genes (positions {flat[:5].tolist()}...) have zero variance "
                "in the observed cells, so normalize_variance=True would divide by 0 (scanpy gets "
                "NaN there); drop those genes or set normalize_variance=False")
        inv_std = 1.0 / np.sqrt(var)
        obs, sim = _scale_columns(obs, inv_std), _scale_columns(sim, inv_std)
        mean = mean * inv_std
    obs, sim = _pca_input(obs), _pca_input(sim)
    xp = xp_of(obs)
    if obs.shape[1] <= _pca.GRAM_MAX_VARS:
        components = _top_components(obs, n_comps, mean_center)
    else:  # no n_genes² Gram matrix: pp.pca's randomized solver, from a copy of the generator
        seed = _copy.deepcopy(random_state) if isinstance(random_state, np.random.RandomState) else random_state
        fit = _pca._fit(obs, n_comps, zero_center=mean_center, solver="randomized", chunk_size=None,
                        random_state=seed)
        components = xp.asarray(fit.components.T)
    center = xp.asarray(mean) if mean_center else None
    manifold = np.vstack([to_host(_pca._project(m, components, center, None)) for m in (obs, sim)])
    if n_comps > N_PCS:  # scanpy's Neighbors does not search more than 50 dimensions of X
        warn(f"You’re trying to run this on {n_comps} dimensions of `.X`, if you really want this, "
             "set `use_rep='X'`.\n         Falling back to preprocessing with `sc.pp.pca` and "
             "default params.", UserWarning)
        manifold = _pca._fit(manifold, N_PCS, zero_center=True, solver="gram", chunk_size=None,
                             random_state=0).x_pca.astype(np.float32)
    return manifold


def _top_components(x, k: int, centred: bool):
    """The top k eigenvectors (n_genes × k, where x lives) of the covariance of x (``centred``)
    or of XᵀX (truncated SVD), with ``pp._pca``'s symmetric eigensolver (LAPACK / cuSOLVER):
    exact, deterministic. From the float64 n_genes² Gram matrix (``_kernels.gram``), or, with
    fewer cells than genes, from the n_cells² one: the eigenvectors u of Z·Zᵀ (Z the centred x)
    give those of ZᵀZ as Zᵀu / sqrt(λ)."""
    n_obs, n_vars = x.shape
    xp = xp_of(x)
    if n_obs >= n_vars:
        gram_xx, sums = _pca._gram(x, None)
        if centred:
            mean = sums / n_obs
            gram_xx -= n_obs * xp.outer(mean, mean)
        return _pca._top_eigh(gram_xx, k, xp)[1]
    x = x if x.dtype == np.float64 else x.astype(np.float64)
    outer = x @ x.T
    outer = outer.toarray() if is_sparse(outer) else xp.asarray(outer)
    mean = xp.asarray(x.sum(axis=0)).ravel() / n_obs if centred else None
    if centred:
        projected = xp.asarray(x @ mean).ravel()  # Z = x − 1μᵀ: ZZᵀ = xxᵀ − xμ1ᵀ − 1μᵀxᵀ + μᵀμ
        outer += float(mean @ mean) - projected[:, None] - projected[None, :]  # synchronize!
    values, vectors = _pca._top_eigh(outer, k, xp)
    components = xp.asarray(x.T @ vectors)
    if centred:
        components -= xp.outer(mean, vectors.sum(axis=0))
    return components / xp.sqrt(xp.maximum(values, np.finfo(np.float64).tiny))[None, :]


def _pca_input(x):
    """What pp._pca's products take: CSR rather than CSC."""
    return x.tocsr() if is_sparse(x) and x.format == "csc" else x


def _scale_columns(x, factors: np.ndarray):
    """x · diag(factors) in float64, where x lives; sparse stays sparse."""
    xp = xp_of(x)
    factors = xp.asarray(factors)
    if is_sparse(x):
        x = _pca_input(x)
        scaled = x.astype(np.float64)  # a copy
        scaled.data *= factors[scaled.indices]
        return scaled
    return x.astype(np.float64) * factors[None, :]


def _doublet_neighbors(manifold: np.ndarray, n_obs: int, n_neighbors: int, metric: str, *,
                       drop_first: bool | None, on_device: bool):
    """The neighbour lists scanpy counts in (exact search; (distance, point itself, index)
    order), and k_adj.

    scanpy searches each point's k_adj nearest, the point itself first, then drops that first
    column, and puts the point back in front of every list unless some list then starts with
    the point itself. That happens when two points coincide (scikit-learn ranks the lower
    index first among equal distances): a doublet drawn as both (i, j) and (j, i) (about two
    such pairs in a run) or duplicated cells. So the lists are the k_adj − 1 nearest other
    points when two observed cells or two simulated doublets coincide (as the count goes,
    either copy), and the point itself plus those otherwise, where a simulated point counts
    itself. A doublet (i, i) may coincide with cell i here and not in scanpy (the float32
    roundings of the two normalisations differ in the last bit), so those pairs do not
    count. ``drop_first``
    (``use_approx_neighbors=True``: scanpy drops the column whatever the data) overrides the
    rule. Where k_adj exceeds the points, scanpy's Neighbors lowers it to 1 + n/2, with its
    warning.
    """
    n_total = manifold.shape[0]
    k_adj = round(n_neighbors * (1 + (n_total - n_obs) / float(n_obs)))
    k_search = k_adj
    if k_adj > n_total:
        k_search = 1 + int(0.5 * n_total)
        logg.warning(f"n_obs too small: adjusting to `n_neighbors = {k_search}`")
    if on_device and k_search + _topk.DEVICE_MARGIN <= _topk.TOPK_MAX:
        idx, dist, _ = _topk.knn_device(manifold, k_search, metric)
    else:
        idx, dist, _ = _topk.knn_host(manifold, k_search, metric)
    if drop_first is None:
        rows, cols = np.nonzero(dist[:, 1:] == 0)
        others = idx[:, 1:][rows, cols]
        drop_first = bool(((rows >= n_obs) == (others >= n_obs)).any())
    return (idx[:, 1:] if drop_first else idx), k_adj


def _doublet_scores(neighbors: np.ndarray, n_obs: int, n_sim: int, k_adj: int, rho: float) -> np.ndarray:
    """Scrublet's Bayesian doublet score of every point from its simulated-neighbour count."""
    n_sim_neigh = (neighbors >= n_obs).sum(axis=1).astype(np.float64)
    r = n_sim / float(n_obs)
    n = float(k_adj)
    q = (n_sim_neigh + 1) / (n + 2)
    return q * rho / r / (1 - rho - q * (1 - rho - rho / r))


def _threshold(scores_sim: np.ndarray, threshold, verbose: bool):
    """The given threshold, or skimage's threshold_minimum of the simulated scores (None, with
    scanpy's warning, where the histogram has no two modes)."""
    if threshold is not None:
        return threshold
    from skimage.filters import threshold_minimum

    try:
        threshold = threshold_minimum(scores_sim)
    except (RuntimeError, ValueError):  # scanpy catches any error here
        if verbose:
            logg.warning("Failed to automatically identify doublet score threshold. "
                         "Run `call_doublets` with user-specified threshold.")
        return None
    if verbose:
        logg.info(f"Automatically set threshold at doublet score = {threshold:.2f}")
    return threshold


def _log_rates(predicted: np.ndarray, detectable: np.ndarray, expected: float) -> None:
    detected_rate = predicted.sum() / float(len(predicted))
    detectable_fraction = detectable.sum() / float(len(detectable))
    overall = detected_rate / detectable_fraction if detectable_fraction else np.inf
    logg.info(f"Detected doublet rate = {100 * detected_rate:.1f}%\n"
              f"Estimated detectable doublet fraction = {100 * detectable_fraction:.1f}%\n"
              "Overall doublet rate:\n"
              f"\tExpected   = {100 * expected:.1f}%\n"
              f"\tEstimated  = {100 * overall:.1f}%")


def _neighbor_parents(neighbors_obs: np.ndarray, n_obs: int, parents: np.ndarray) -> list[np.ndarray]:
    """Per observed cell the distinct parents of its simulated neighbours (int64, sorted)."""
    out = []
    for row in neighbors_obs:
        sims = row[row >= n_obs] - n_obs
        out.append(np.unique(parents[sims].ravel()) if sims.size else np.array([], dtype=np.intp))
    return out


# ---------------------------------------------------------------- matrix helpers

def _csr(x):
    """CSR where x lives (scanpy makes the counts sparse too); x itself when it is CSR."""
    if is_sparse(x):
        return x if x.format == "csr" else x.tocsr()
    if placement(x) == "device":
        from cupyx.scipy import sparse as cpsparse

        return cpsparse.csr_matrix(x)
    return sparse.csr_matrix(x)


def _take_columns(x, columns: np.ndarray):
    if columns.size == x.shape[1]:
        return x
    if placement(x) == "device":
        import cupy as cp

        columns = cp.asarray(columns)
    if is_sparse(x) and x.format == "csc":
        x = x.tocsr()
    return x[:, columns]


def _take_rows(x, rows: np.ndarray):
    if rows.size == x.shape[0] and (rows == np.arange(rows.size)).all():
        return x
    if placement(x) == "device":
        import cupy as cp

        rows = cp.asarray(rows)
    if is_sparse(x) and x.format == "csc":
        x = x.tocsr()
    return x[rows]
