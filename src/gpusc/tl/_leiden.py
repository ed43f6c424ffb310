"""leiden and louvain, as scanpy's tools/_leiden.py and _louvain.py.

On the GPU the graph goes to pylibcugraph (imported inside the functions); without a GPU
scanpy's own igraph/leidenalg code runs with the same arguments. Both paths write the
same keys, and both report the partition's modularity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._core.adata import actualize_view
from .._core.arrays import placement
from .._settings import resolve_device

_NO_PLC = ("pylibcugraph is not installed: {func} runs scanpy's CPU (igraph) path instead; "
           "install gpusc[rapids-cu13] (or rapids-cu12) to cluster on the GPU")


def leiden(
    adata: AnnData,
    resolution: float | Sequence[float] = 1,
    *,
    restrict_to: tuple[str, Sequence[str]] | None = None,
    random_state: Any = 0,
    key_added: str = "leiden",
    adjacency: Any = None,
    directed: bool | None = None,
    use_weights: bool = True,
    n_iterations: int = -1,
    partition_type: Any = None,
    neighbors_key: str | None = None,
    obsp: str | None = None,
    copy: bool = False,
    flavor: Literal["leidenalg", "igraph"] | None = None,
    device: Literal["auto", "gpu", "cpu"] | None = None,
    **clustering_args,
) -> AnnData | None:
    """Leiden clustering of the neighbourhood graph, as :func:`scanpy.tl.leiden`.

    On the GPU (``device``, default ``gpusc.settings.device``) pylibcugraph's Leiden
    clusters the graph (treated as undirected: a non-symmetric adjacency is symmetrised
    as (A + Aᵀ)/2, self-loops are dropped; ``use_weights=False`` gives every edge weight 1).
    Without a GPU, or without pylibcugraph (one warning), scanpy's own path runs with the
    same arguments (``flavor``, ``partition_type``, ``**clustering_args`` apply there only;
    on the GPU they raise).

    ``resolution`` may be a list (a gpusc extra): one clustering per value, stored under
    ``f"{key_added}_{r}"`` (e.g. ``leiden_0.5``, ``leiden_1.0``) in obs and uns.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obs[key]`` : categorical of str
        Cluster labels ``'0'``, ``'1'``, ...; on the GPU numbered by size (largest ``'0'``).
        ``key`` is ``key_added`` (``leiden_R`` with restrict_to and the default key).
        With restrict_to, cells outside the categories keep their old label and the others
        get ``"<categories joined by '-'>,<cluster>"``, as scanpy.
    ``uns[key]['params']`` : dict
        ``resolution``, ``random_state``, ``n_iterations`` (as scanpy).
    ``uns[key]['modularity']`` : float
        The partition's modularity, as scanpy's flavor reports it: with ``flavor="igraph"``
        weighted (when use_weights) at the given resolution, otherwise (leidenalg) the
        unweighted modularity at resolution 1. The GPU path computes the same quantity on
        the host. With restrict_to: of the restricted subgraph.
    """
    return _cluster("leiden", adata, resolution, restrict_to=restrict_to,
                    random_state=random_state, key_added=key_added, adjacency=adjacency,
                    directed=directed, use_weights=use_weights, n_iterations=n_iterations,
                    partition_type=partition_type, neighbors_key=neighbors_key, obsp=obsp,
                    copy=copy, flavor=flavor, device=device, extra=clustering_args)


def louvain(
    adata: AnnData,
    resolution: float | Sequence[float] | None = None,
    *,
    random_state: Any = 0,
    restrict_to: tuple[str, Sequence[str]] | None = None,
    key_added: str = "louvain",
    adjacency: Any = None,
    flavor: Literal["vtraag", "igraph"] = "vtraag",
    directed: bool = True,
    use_weights: bool = False,
    partition_type: Any = None,
    partition_kwargs: Mapping[str, Any] = MappingProxyType({}),
    neighbors_key: str | None = None,
    obsp: str | None = None,
    copy: bool = False,
    device: Literal["auto", "gpu", "cpu"] | None = None,
) -> AnnData | None:
    """Louvain clustering of the neighbourhood graph, as :func:`scanpy.tl.louvain`.

    On the GPU pylibcugraph's Louvain (resolution ``None`` means 1); on the CPU scanpy's
    path (``flavor="vtraag"`` needs the ``louvain`` package, ``flavor="igraph"`` does
    not). ``resolution`` may be a list, as in :func:`leiden`.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets ``obs[key]`` (categorical),
    ``uns[key]['params']`` (``resolution``, ``random_state``, as scanpy) and, a gpusc
    extra on both paths, ``uns[key]['modularity']``: the partition's modularity at
    resolution 1, weighted when ``use_weights``.
    """
    if flavor == "rapids":
        raise ValueError("louvain: flavor='rapids' is scanpy's deprecated cuGraph path; gpusc "
                         "clusters on the GPU with device='gpu'")
    if flavor not in ("vtraag", "igraph"):
        raise ValueError(f"louvain: flavor={flavor!r} is not one of ('vtraag', 'igraph')")
    return _cluster("louvain", adata, resolution, restrict_to=restrict_to,
                    random_state=random_state, key_added=key_added, adjacency=adjacency,
                    directed=directed, use_weights=use_weights, n_iterations=None,
                    partition_type=partition_type, neighbors_key=neighbors_key, obsp=obsp,
                    copy=copy, flavor=flavor, device=device, extra=dict(partition_kwargs))


# ---------------------------------------------------------------- shared flow

def _cluster(func, adata, resolution, *, restrict_to, random_state, key_added, adjacency,
             directed, use_weights, n_iterations, partition_type, neighbors_key, obsp, copy,
             flavor, device, extra):
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    graph = _choose_graph(adata, adjacency, obsp, neighbors_key, func)
    mask = None
    if restrict_to is not None:
        mask = _restrict_mask(adata, restrict_to, func)
    resolutions, keys = _keys(func, resolution, key_added, restrict_to is not None)
    where = resolve_device(device)
    if where == "gpu":
        try:
            import pylibcugraph  # noqa: F401
        except ImportError:
            warnings.warn(_NO_PLC.format(func=func), UserWarning, stacklevel=3)
            where = "cpu"
    if where == "gpu":
        if partition_type is not None or extra:
            raise ValueError(
                f"{func}: partition_type and extra clustering arguments are scanpy's "
                "(leidenalg/igraph) options; on the GPU only resolution, random_state, "
                f"n_iterations and use_weights apply. Pass device='cpu' to use them")
    elif func == "louvain" and flavor == "vtraag":
        try:
            import louvain  # noqa: F401
        except ImportError as exc:
            raise ImportError("louvain: flavor='vtraag' (the CPU default) needs the `louvain` "
                              "package; install it or pass flavor='igraph'") from exc

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    if where == "cpu":
        _run_scanpy(func, adata, graph, resolutions, keys, restrict_to, random_state, directed,
                    use_weights, n_iterations, partition_type, flavor, extra)
        return adata if copy else None

    sub = graph if mask is None else graph[mask][:, mask]
    for r, key in zip(resolutions, keys, strict=True):
        labels = _gpu_partition(func, sub, r, random_state, use_weights, n_iterations)
        labels = _by_size(labels)
        if func == "leiden":
            q = _leiden_modularity(sub, labels, flavor, r, use_weights)
            params = dict(resolution=r, random_state=random_state, n_iterations=n_iterations)
        else:
            q = modularity(sub, labels, weighted=use_weights)
            params = dict(resolution=r, random_state=random_state)
        _store(adata, key, labels, mask, restrict_to)
        adata.uns[key] = {"params": params, "modularity": float(q)}
    return adata if copy else None


def _run_scanpy(func, adata, graph, resolutions, keys, restrict_to, random_state, directed,
                use_weights, n_iterations, partition_type, flavor, extra):
    import scanpy as sc

    mask = None if restrict_to is None else _restrict_mask(adata, restrict_to, func)
    for r, key in zip(resolutions, keys, strict=True):
        if func == "leiden":
            # flavor=None is scanpy 1.12's default; scanpy 1.11 (Python 3.11) rejects it
            chosen = {} if flavor is None else {"flavor": flavor}
            sc.tl.leiden(adata, resolution=r, restrict_to=restrict_to, random_state=random_state,
                         key_added=key, adjacency=graph, directed=directed,
                         use_weights=use_weights, n_iterations=n_iterations,
                         partition_type=partition_type, **chosen, **extra)
            if "modularity" not in adata.uns[key]:  # scanpy < 1.12 does not record it
                labels = adata.obs[key].cat.codes.to_numpy()
                sub = graph
                if mask is not None:
                    sub, labels = graph[mask][:, mask], labels[mask]
                adata.uns[key]["modularity"] = float(
                    _leiden_modularity(sub, labels, flavor or "leidenalg", r, use_weights))
        else:
            with warnings.catch_warnings():  # scanpy deprecates its louvain; ours is not
                warnings.filterwarnings("ignore", message=r".*[Ll]ouvain.*deprecated.*")
                warnings.filterwarnings("ignore", message=r".*Use :func:`scanpy.tl.leiden`.*")
                sc.tl.louvain(adata, resolution=r, random_state=random_state,
                              restrict_to=restrict_to, key_added=key, adjacency=graph,
                              flavor=flavor, directed=directed, use_weights=use_weights,
                              partition_type=partition_type, partition_kwargs=extra)
            labels = adata.obs[key].cat.codes.to_numpy()
            sub = graph
            if mask is not None:
                sub, labels = graph[mask][:, mask], labels[mask]
            adata.uns[key]["modularity"] = float(modularity(sub, labels, weighted=use_weights))


def _leiden_modularity(graph, labels, flavor, resolution, use_weights) -> float:
    """The modularity scanpy 1.12's leiden records for ``flavor``."""
    if flavor == "igraph":
        return modularity(graph, labels, resolution=1.0 if resolution is None else resolution,
                          weighted=use_weights)
    return modularity(graph, labels, weighted=False)  # leidenalg's: unweighted, resolution 1


def _keys(func, resolution, key_added, restricted):
    base = key_added
    if restricted and key_added == func:
        base = f"{func}_R"  # scanpy's default key with restrict_to
    if isinstance(resolution, Sequence | np.ndarray) and not isinstance(resolution, str):
        values = [None if r is None else float(r) for r in resolution]
        if not values:
            raise ValueError(f"{func}: resolution is an empty list")
        if len(set(values)) != len(values):
            raise ValueError(f"{func}: resolution={list(resolution)} repeats a value")
        return values, [f"{base}_{r}" for r in values]
    return [resolution], [base]


def _choose_graph(adata, adjacency, obsp, neighbors_key, func):
    """The adjacency to cluster, with errors that say what to run (nothing is changed)."""
    if adjacency is not None:
        graph = adjacency
    elif obsp is not None and neighbors_key is not None:
        raise ValueError(f"{func}: pass only one of obsp= and neighbors_key=")
    elif obsp is not None:
        if obsp not in adata.obsp:
            raise KeyError(f"{func}: obsp={obsp!r} not found; adata.obsp has {list(adata.obsp)}")
        graph = adata.obsp[obsp]
    else:
        key = "neighbors" if neighbors_key is None else neighbors_key
        if key not in adata.uns:
            if neighbors_key is None:
                raise ValueError(f"{func}: no neighbourhood graph (adata.uns['neighbors'] is "
                                 "missing); run pp.neighbors first")
            raise KeyError(f"{func}: neighbors_key={neighbors_key!r} not found in adata.uns; "
                           f"run pp.neighbors(..., key_added={neighbors_key!r}) first")
        ckey = adata.uns[key].get("connectivities_key", "connectivities") \
            if isinstance(adata.uns[key], Mapping) else None
        if ckey is None or ckey not in adata.obsp:
            raise ValueError(f"{func}: uns[{key!r}] names no connectivities in adata.obsp; "
                             "run pp.neighbors first")
        graph = adata.obsp[ckey]
    if placement(graph) == "device":
        graph = graph.get()  # synchronize!
    graph = sparse.csr_matrix(graph)
    if graph.shape != (adata.n_obs, adata.n_obs):
        raise ValueError(f"{func}: the adjacency has shape {graph.shape}; expected "
                         f"(n_obs, n_obs) = {(adata.n_obs, adata.n_obs)}")
    return graph


def _restrict_mask(adata, restrict_to, func):
    key, categories = restrict_to
    if key not in adata.obs:
        raise KeyError(f"{func}: restrict_to key {key!r} not found in adata.obs")
    column = adata.obs[key]
    if not isinstance(column.dtype, pd.CategoricalDtype):
        raise ValueError(f"{func}: restrict_to needs a categorical obs column; {key!r} is "
                         f"{column.dtype}")
    if len(categories) == 0 or not isinstance(categories[0], str):
        raise ValueError("You need to use strings to label categories, e.g. '1' instead of 1.")
    for c in categories:
        if c not in column.cat.categories:
            raise ValueError(f"{c!r} is not a valid category for {key!r}")
    return column.isin(categories).to_numpy()


def _store(adata, key, labels, mask, restrict_to):
    from natsort import natsorted

    groups = labels.astype("U")
    if mask is not None:  # scanpy's rename_groups
        restrict_key, categories = restrict_to
        all_groups = adata.obs[restrict_key].astype("U").to_numpy().astype(object)
        prefix = f"{'-'.join(categories)},"
        all_groups[mask] = [prefix + g for g in groups]
        groups = all_groups.astype("U")
    adata.obs[key] = pd.Categorical(values=groups, categories=natsorted(np.unique(groups)))


def _by_size(labels):
    """Clusters renumbered by size, largest 0 (ties: the cluster met first)."""
    labels = np.asarray(labels)
    uniq, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True,
                                             return_counts=True)
    order = np.lexsort((first, -counts))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.ravel()]


# ---------------------------------------------------------------- GPU (pylibcugraph)

def _gpu_partition(func, graph, resolution, random_state, use_weights, n_iterations):
    """Cluster labels (host int array) of a host CSR adjacency with pylibcugraph."""
    import cupy as cp
    import pylibcugraph as plc

    a = sparse.csr_matrix(graph, dtype=np.float64 if graph.dtype == np.float64 else np.float32)
    if (a != a.T).nnz:  # pylibcugraph wants every edge stored both ways, equal weights
        a = ((a + a.T) * 0.5).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    a.sort_indices()
    n = a.shape[0]
    if a.nnz == 0:
        return np.arange(n)
    index = np.int64 if a.nnz > np.iinfo(np.int32).max or n > np.iinfo(np.int32).max else np.int32
    offsets = cp.asarray(a.indptr.astype(index))
    indices = cp.asarray(a.indices.astype(index))
    weights = cp.asarray(a.data) if use_weights else cp.ones(a.nnz, dtype=a.dtype)
    handle = plc.ResourceHandle()
    g = plc.SGGraph(resource_handle=handle,
                    graph_properties=plc.GraphProperties(is_symmetric=True, is_multigraph=False),
                    src_or_offset_array=offsets, dst_or_index_array=indices,
                    weight_array=weights, store_transposed=False, renumber=False,
                    do_expensive_check=False, input_array_format="CSR")
    r = 1.0 if resolution is None else float(resolution)
    if func == "leiden":
        seed = _seed(random_state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:  # pylibcugraph with n_iterations (igraph's meaning, -1: until stable)
                vertices, clusters, _ = plc.leiden(resource_handle=handle, random_state=seed,
                                                   graph=g, resolution=r,
                                                   n_iterations=int(n_iterations))
            except TypeError:  # pylibcugraph 25.x: levels, not iterations
                vertices, clusters, _ = plc.leiden(resource_handle=handle, random_state=seed,
                                                   graph=g, max_level=100, resolution=r,
                                                   theta=1.0, do_expensive_check=False)
    else:
        vertices, clusters, _ = plc.louvain(resource_handle=handle, graph=g, max_level=100,
                                            threshold=1e-7, resolution=r,
                                            do_expensive_check=False)
    labels = np.empty(n, np.int64)
    labels[cp.asnumpy(vertices)] = cp.asnumpy(clusters)  # synchronize!
    return labels


def _seed(random_state):
    """pylibcugraph's seed: an int as it is (low 32 bits), else one drawn from the RandomState."""
    if random_state is None:
        return None
    if isinstance(random_state, int | np.integer):
        return int(random_state) & 0xFFFFFFFF
    rs = random_state if hasattr(random_state, "randint") else np.random.RandomState(random_state)
    return int(rs.randint(0, 2**31 - 1))


# ---------------------------------------------------------------- modularity (host)

def modularity(adjacency, labels, *, resolution: float = 1.0, weighted: bool = True) -> float:
    """Newman modularity of a partition: (1/W) Σ_ij [A_ij − γ k_i^out k_j^in / W] δ(c_i, c_j).

    W is the sum of all entries, k^out/k^in the row/column sums; for a symmetric matrix
    this equals igraph's undirected and directed modularity of the graph scanpy builds
    from it. ``weighted=False`` counts every stored non-zero as 1.
    """
    a = sparse.coo_matrix(adjacency)
    a.sum_duplicates()
    keep = a.data != 0
    rows, cols = a.row[keep], a.col[keep]
    data = a.data[keep].astype(np.float64) if weighted else np.ones(int(keep.sum()))
    total = data.sum()
    if total == 0:
        return float("nan")
    codes = pd.factorize(np.asarray(labels))[0]
    n_clusters = codes.max() + 1
    inside = data[codes[rows] == codes[cols]].sum()
    k_out = np.bincount(codes[rows], weights=data, minlength=n_clusters)
    k_in = np.bincount(codes[cols], weights=data, minlength=n_clusters)
    return float(inside / total - resolution * (k_out * k_in).sum() / total**2)
