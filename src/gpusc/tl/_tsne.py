"""tsne, as scanpy's tools/_tsne.py: scikit-learn's Barnes-Hut t-SNE, with gpusc's exact kNN.

scanpy hands the representation to ``sklearn.manifold.TSNE``, whose first step is an exact
kNN search (``NearestNeighbors``, ``3 * perplexity + 1`` neighbours) and whose start is a PCA
of the representation. Here the kNN comes from gpusc's brute-force search
(:func:`gpusc._kernels.topk.knn_host`, or ``knn_device`` on the GPU) and goes to the same
TSNE as a sparse precomputed distance graph, with the same PCA start computed as sklearn
computes it (sklearn refuses ``init="pca"`` with precomputed distances); the affinities and
the optimisation are sklearn's. With cuML installed, the GPU runs cuML's TSNE instead; without
it, gpusc's own (:mod:`gpusc._kernels.tsne`: sklearn's affinities and optimiser, the
repulsion from an FFT-convolved grid as FIt-SNE computes it) for 2 components.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._core import logg
from .._core.adata import actualize_view
from .._kernels import topk as _topk
from .._kernels import tsne as _ktsne
from .._settings import resolve_device
from ..pp._neighbors import _pca_first, _representation

# scanpy's own warning for n_jobs != 1 (its MulticoreTSNE back-compat), quoted as scanpy does
N_JOBS_WARNING = (
    "In previous versions of scanpy, calling tsne with `n_jobs` > 1 would use MulticoreTSNE. "
    "Now this uses the scikit-learn version of TSNE by default. "
    "If you’d like the old behaviour (which is deprecated), pass `use_fast_tsne=True`. "
    "Note, MulticoreTSNE is not actually faster anymore."
)


def tsne(
    adata: AnnData,
    n_pcs: int | None = None,
    *,
    n_components: int = 2,
    use_rep: str | None = None,
    perplexity: float = 30,
    metric: str = "euclidean",
    early_exaggeration: float = 12,
    learning_rate: float = 1000,
    random_state: Any = 0,
    use_fast_tsne: bool = False,
    n_jobs: int | None = None,
    key_added: str | None = None,
    copy: bool = False,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """t-SNE of the representation, as :func:`scanpy.tl.tsne`.

    Where it runs (``device``, default ``gpusc.settings.device``):

    * on the CPU: scikit-learn's ``TSNE`` (Barnes-Hut) as scanpy calls it, fed gpusc's exact
      kNN (``min(n - 1, int(3 * perplexity + 1))`` neighbours) as a precomputed distance graph
      and sklearn's own PCA start;
    * on the GPU with cuML installed (``gpusc[rapids-cu13]`` or ``rapids-cu12``): cuML's
      ``TSNE`` (Barnes-Hut, 2 components);
    * on the GPU without cuML: gpusc's own for 2 components (the same kNN, sklearn's
      affinities, its optimiser's 1,000 steps from the same PCA start, the repulsion
      interpolated on a grid and convolved by FFT); sklearn's path (with the kNN on the GPU)
      for 1 or 3.

    ``metric`` is one of gpusc's kNN metrics (``euclidean``, ``sqeuclidean``, ``cosine``,
    ``manhattan``). ``use_fast_tsne`` (MulticoreTSNE) is not supported.

    Parameters
    ----------
    adata
        Annotated data matrix.
    n_pcs, use_rep
        The representation, as scanpy's ``_choose_representation`` (X_pca by default; PCA is
        computed first, with a warning, when there is none and X has more than 50 genes).
    n_components
        Dimensions of the embedding (at most 3, Barnes-Hut).
    perplexity, early_exaggeration, learning_rate
        sklearn's TSNE parameters (scanpy's defaults 30, 12, 1000).
    metric
        Distance of the kNN search.
    random_state
        Seed of the PCA start (and cuML's optimiser), as scanpy.
    use_fast_tsne
        Must be False.
    n_jobs
        sklearn's ``n_jobs`` (``None``: ``scanpy.settings.n_jobs``, as scanpy); recorded in
        ``uns``. sklearn's optimiser runs on its OpenMP threads either way.
    key_added
        Store in ``obsm[key_added]`` and ``uns[key_added]`` instead of ``X_tsne``/``tsne``.
    copy
        Return a copy instead of writing to ``adata``.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsm['X_tsne' | key_added]`` : numpy.ndarray, float32 (n_obs, n_components)
        t-SNE coordinates.
    ``uns['tsne' | key_added]`` : dict
        ``params``: perplexity, early_exaggeration, learning_rate, n_jobs, metric, use_rep,
        n_components (those not None), as scanpy.
    """
    func = "tsne"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    if use_fast_tsne:
        raise NotImplementedError(f"{func}: use_fast_tsne=True (MulticoreTSNE, deprecated in "
                                  "scanpy) is not supported; use scanpy.tl.tsne")
    if metric not in _topk.METRICS:
        raise ValueError(f"{func}: metric={metric!r} is not one of {tuple(_topk.METRICS)}")
    if isinstance(n_components, bool) or not isinstance(n_components, int | np.integer) \
            or not 1 <= n_components <= 3:
        raise ValueError(f"{func}: n_components={n_components!r}; 'n_components' should be "
                         "inferior to 4 for the barnes_hut algorithm as it relies on quad-tree "
                         "or oct-tree.")
    if not perplexity > 0:
        raise ValueError(f"{func}: perplexity={perplexity!r} must be positive")
    if adata.n_obs < 2:
        raise ValueError(f"{func}: t-SNE needs at least 2 cells, got {adata.n_obs}")
    x = _representation(adata, use_rep, n_pcs, func)
    where = resolve_device(device)
    if n_jobs is None:
        from scanpy import settings as scanpy_settings

        n_jobs = scanpy_settings.n_jobs  # as scanpy
    if n_jobs != 1:
        warnings.warn(N_JOBS_WARNING, UserWarning, stacklevel=2)

    start = logg.info("computing tSNE")
    if copy:
        adata = adata.copy()
    actualize_view(adata)
    if x is None:
        x = _pca_first(adata, n_pcs, func)
    embedding = None
    if where == "gpu":
        embedding = _cuml_tsne(x, n_components, perplexity, early_exaggeration, learning_rate,
                               metric, random_state)
        if embedding is None and n_components == 2:
            logg.info("    using gpusc's t-SNE on the device (FFT-interpolated repulsion)")
            embedding = _ktsne.embed(np.asarray(x), pca_start(x, 2, random_state),
                                     perplexity=perplexity, early_exaggeration=early_exaggeration,
                                     learning_rate=learning_rate, metric=metric, on_device=True)
    if embedding is None:
        logg.info("    using sklearn.manifold.TSNE")
        embedding = sklearn_tsne(x, n_components=n_components, perplexity=perplexity,
                                 early_exaggeration=early_exaggeration,
                                 learning_rate=learning_rate, metric=metric,
                                 random_state=random_state, n_jobs=n_jobs,
                                 on_device=where == "gpu")

    params = {"perplexity": perplexity, "early_exaggeration": early_exaggeration,
                  "learning_rate": learning_rate, "n_jobs": n_jobs, "metric": metric, "use_rep": use_rep,
                  "n_components": n_components}
    key_uns, key_obsm = ("tsne", "X_tsne") if key_added is None else (key_added, key_added)
    adata.obsm[key_obsm] = embedding
    adata.uns[key_uns] = {"params": {k: v for k, v in params.items() if v is not None}}
    logg.info("    finished", time=start, deep=(
        f"added\n    {key_obsm!r}, tSNE coordinates (adata.obsm)\n"
        f"    {key_uns!r}, tSNE parameters (adata.uns)"))
    return adata if copy else None


def knn_distance_graph(x: np.ndarray, k: int, metric: str, on_device: bool = False):
    """The exact kNN of the rows of ``x`` as sklearn's precomputed input: a CSR with, per
    row, the row itself (an explicit 0; sklearn's query-is-train search drops it) and its
    ``k`` nearest other rows, at their (unsquared) distances."""
    n = x.shape[0]
    search = _topk.knn_device if on_device and k + 1 + _topk.DEVICE_MARGIN <= _topk.TOPK_MAX \
        else _topk.knn_host
    idx, dist, _ = search(x, k + 1, metric)  # the row itself first, as scanpy's kNN
    graph = sparse.csr_matrix((dist.ravel().astype(np.float64), idx.ravel(),
                               np.arange(0, n * (k + 1) + 1, k + 1)), shape=(n, n))
    graph.sort_indices()
    return graph


def sklearn_tsne(x: np.ndarray, *, n_components: int, perplexity: float,
                 early_exaggeration: float, learning_rate: float, metric: str,
                 random_state: Any, n_jobs: int | None, on_device: bool = False) -> np.ndarray:
    """sklearn's TSNE as scanpy calls it, with gpusc's kNN and sklearn's PCA start."""
    from sklearn.manifold import TSNE

    n = x.shape[0]
    k = min(n - 1, int(3.0 * perplexity + 1))  # sklearn's n_neighbors
    graph = knn_distance_graph(x, k, metric, on_device)
    start = pca_start(x, n_components, random_state)
    model = TSNE(n_components=n_components, perplexity=perplexity,
                 early_exaggeration=early_exaggeration, learning_rate=learning_rate,
                 metric="precomputed", init=start, random_state=random_state, n_jobs=n_jobs,
                 verbose=False)
    return np.asarray(model.fit_transform(graph), dtype=np.float32)


def pca_start(x: np.ndarray, n_components: int, random_state: Any) -> np.ndarray:
    """sklearn's init="pca", step for step: the same draw from the same RandomState, the first
    component scaled to standard deviation 1e-4 (float32)."""
    from sklearn.decomposition import PCA
    from sklearn.utils import check_random_state

    pca = PCA(n_components=n_components, random_state=check_random_state(random_state))
    pca.set_output(transform="default")
    start = pca.fit_transform(x).astype(np.float32, copy=False)
    return start / np.std(start[:, 0]) * 1e-4


def _cuml_tsne(x, n_components, perplexity, early_exaggeration, learning_rate, metric,
               random_state):
    """cuML's TSNE, or None when cuML is not installed (or cannot take these options)."""
    try:
        from cuml.manifold import TSNE
    except ImportError:
        return None
    if n_components != 2 or metric == "sqeuclidean":
        return None  # cuML's TSNE embeds in 2-D only; our path takes the rest
    seed = random_state if isinstance(random_state, int | np.integer) else None
    model = TSNE(n_components=2, perplexity=perplexity, early_exaggeration=early_exaggeration,
                 learning_rate=learning_rate, metric=metric, random_state=seed,
                 method="barnes_hut", output_type="numpy")
    return np.asarray(model.fit_transform(np.ascontiguousarray(x, np.float32)), np.float32)
