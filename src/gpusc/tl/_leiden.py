"""leiden and louvain, as scanpy's tools/_leiden.py and _louvain.py.

On the GPU the graph goes to pylibcugraph (imported inside the functions). Without a GPU
leiden's flavor="igraph" is scanpy's igraph flavor redone here on python-igraph (the same
graph, arguments and random numbers, so the same labels; scanpy is not imported), and
the other flavors and louvain run scanpy's own code with the same arguments. All paths
write the same keys, and all report the partition's modularity.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import numba
import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._core.adata import actualize_view
from .._core.arrays import placement
from .._core.compat import check_random_state
from .._settings import resolve_device

# Rows per parallel work item of the host graph passes: fixed, so their float sums are added
# in one order whatever the number of threads.
ROWS_PER_CHUNK = 16384
# Most per-chunk partial column sums by cluster (float64) modularity keeps: 32 MiB.
IN_PARTIAL_LIMIT = 1 << 22

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
    Without a GPU, or without pylibcugraph (one warning), scanpy's CPU path runs with the
    same arguments (``flavor``, ``partition_type``, ``**clustering_args`` apply there only;
    on the GPU they raise): ``flavor="igraph"`` as gpusc's own copy of scanpy 1.12's igraph
    flavor (identical labels and uns, no scanpy import), the other flavors in scanpy.

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
    if func == "leiden" and flavor == "igraph" and directed:
        # scanpy's first check of its igraph flavor; on the GPU too, where directed is ignored
        raise ValueError("Cannot use igraph’s leiden implementation with a directed graph.")
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

    if where == "cpu" and func == "leiden" and flavor == "igraph":
        _check_igraph_flavor(partition_type, random_state)

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    if where == "cpu":
        _run_scanpy(func, adata, graph, resolutions, keys, restrict_to, random_state, directed,
                    use_weights, n_iterations, partition_type, flavor, extra)
        return adata if copy else None

    sub = _canonical_csr(graph if mask is None else graph[mask][:, mask])
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
    mask = None if restrict_to is None else _restrict_mask(adata, restrict_to, func)
    if func == "leiden" and flavor == "igraph":
        # scanpy's igraph flavor done here: importing scanpy (and sklearn) costs ~1 s
        for r, key in zip(resolutions, keys, strict=True):
            _leiden_igraph(adata, graph, mask, r, key, restrict_to, random_state, use_weights,
                           n_iterations, extra)
        return

    import scanpy as sc

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


# ---------------------------------------------------------------- scanpy's igraph flavor

def _check_igraph_flavor(partition_type, random_state):
    """scanpy 1.12's other errors for flavor="igraph" (directed: see _cluster), raised before
    the AnnData changes."""
    if partition_type is not None:
        raise ValueError("Do not pass in partition_type argument when using igraph.")
    try:
        import igraph  # noqa: F401
    except ImportError as exc:
        raise ImportError("Please install the igraph package: `conda install -c conda-forge "
                          "python-igraph` or `pip install igraph`.") from exc
    check_random_state(random_state)


def _leiden_igraph(adata, graph, mask, resolution, key, restrict_to, random_state, use_weights,
                   n_iterations, extra):
    """One ``scanpy.tl.leiden(flavor="igraph")`` on ``graph`` (restricted to ``mask``):
    the same igraph Graph, arguments and random numbers, so the same labels."""
    import random

    import igraph

    sub = graph if mask is None else graph[mask, :][:, mask]  # as scanpy's restrict_adjacency
    g = _igraph_from_csr(sub)
    clustering_args = dict(extra)
    clustering_args["n_iterations"] = n_iterations
    if use_weights:
        clustering_args["weights"] = "weight"
    if resolution is not None:
        clustering_args["resolution"] = resolution
    clustering_args.setdefault("objective_function", "modularity")
    igraph.set_random_number_generator(_IgraphRandom(random_state))
    try:
        part = g.community_leiden(**clustering_args)
    finally:
        igraph.set_random_number_generator(random)  # igraph's default, as scanpy leaves it
    _store(adata, key, np.asarray(part.membership), mask, restrict_to)
    adata.uns[key] = {
        "params": {"resolution": resolution, "random_state": random_state,
                   "n_iterations": n_iterations},
        "modularity": part.modularity,
    }


def _igraph_from_csr(adjacency):
    """scanpy's ``get_igraph_from_adjacency(adjacency, directed=False)``: one undirected edge
    per stored non-zero in row-major order (so each edge of a symmetric graph twice), with
    its value as the "weight" attribute; duplicate entries each get their sum, as scanpy's
    ``adjacency[sources, targets]`` gives them."""
    import igraph

    coo = adjacency.tocoo()  # scanpy's .nonzero(): the stored order, zeros dropped
    keep = coo.data != 0
    sources, targets = coo.row[keep], coo.col[keep]
    if adjacency.has_canonical_format:
        weights = coo.data[keep]
    else:
        weights = np.asarray(adjacency[sources, targets]).ravel()
    # python ints and floats (float32 -> float64 exactly) convert fastest into igraph
    edges = list(zip(sources.tolist(), targets.tolist(), strict=True))
    return igraph.Graph(n=adjacency.shape[0], edges=edges, directed=False,
                        edge_attrs={"weight": weights.tolist()})


class _IgraphRandom:
    """igraph's random numbers drawn from a NumPy RandomState exactly as scanpy's _RNGIgraph
    draws them (igraph calls these four), leaving Python's and NumPy's global seeds alone."""

    def __init__(self, random_state):
        self._rng = check_random_state(random_state)

    def getrandbits(self, k):
        return self._rng.tomaxint() & ((1 << k) - 1)

    def randint(self, a, b):
        return self._rng.randint(a, b + 1)

    def random(self):
        return self._rng.random()

    def gauss(self, mu, sigma):
        return self._rng.normal(mu, sigma)


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
    if not (sparse.issparse(graph) and graph.format == "csr"):
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

    if mask is None and labels.dtype.kind in "iu" and labels.size and labels.min() == 0 \
            and np.bincount(labels).all():
        # labels 0..k-1 (by size): categories "0".."k-1" are natsorted already; no strings per cell
        categories = [str(i) for i in range(int(labels.max()) + 1)]
        adata.obs[key] = pd.Categorical.from_codes(labels, categories=categories)
        return
    groups = labels.astype("U")
    if mask is not None:  # scanpy's rename_groups
        restrict_key, categories = restrict_to
        all_groups = adata.obs[restrict_key].astype("U").to_numpy().astype(object)
        prefix = f"{'-'.join(categories)},"
        all_groups[mask] = [prefix + g for g in groups]
        groups = all_groups.astype("U")
    adata.obs[key] = pd.Categorical(values=groups, categories=natsorted(np.unique(groups)))


def _by_size(labels):
    """Clusters renumbered by size, largest 0 (ties: the cluster met first); int64."""
    labels = np.asarray(labels).ravel()
    if labels.dtype.kind in "iu" and labels.size and labels.min() >= 0 \
            and labels.max() < 2 * labels.size:  # pylibcugraph's: vertex numbers
        first_seen = _numbered_as_met(labels, int(labels.max()) + 1)
    else:
        _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
        met = np.empty_like(first)
        met[np.argsort(first)] = np.arange(first.size)
        first_seen = met[inverse.ravel()]
    counts = np.bincount(first_seen)
    order = np.argsort(-counts, kind="stable")  # equal sizes stay in the order met
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    return rank[first_seen]


@numba.njit(cache=True)
def _numbered_as_met(labels, n_values):
    """Each label's number in the order labels are first met (0, 1, ...)."""
    number = np.full(n_values, -1, np.int64)
    out = np.empty(labels.size, np.int64)
    k = 0
    for i in range(labels.size):
        if number[labels[i]] < 0:
            number[labels[i]] = k
            k += 1
        out[i] = number[labels[i]]
    return out


# ---------------------------------------------------------------- GPU (pylibcugraph)

def _gpu_partition(func, graph, resolution, random_state, use_weights, n_iterations):
    """Cluster labels (host int array) of a canonical host CSR adjacency with pylibcugraph.

    pylibcugraph wants every edge stored both ways at equal weights, no self-loops: the
    graph goes to the device as it is and is tested there (:func:`device_symmetry`); only
    a graph that needs symmetrising or cleaning is made :func:`undirected_graph` on the
    host and sent again.
    """
    import cupy as cp
    import pylibcugraph as plc

    n = graph.shape[0]
    offsets, indices, weights = _to_device(cp, graph)
    symmetric, dropped = device_symmetry(cp, offsets, indices, weights, n)
    if not symmetric or dropped:
        undirected, _ = undirected_graph(graph, symmetric=symmetric)
        offsets, indices, weights = _to_device(cp, undirected)
    if indices.size == 0:
        return np.arange(n)
    if not use_weights:
        weights = cp.ones(indices.size, dtype=weights.dtype)
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


def _to_device(xp, graph):
    """CSR arrays on the device: indices of one dtype (int64 only past 2^31), float32
    weights unless float64 (as the host cleaning would make them)."""
    index = np.int64 if graph.nnz > np.iinfo(np.int32).max or graph.shape[0] > np.iinfo(np.int32).max \
        else np.int32
    value = np.float64 if graph.dtype == np.float64 else np.float32
    return (xp.asarray(graph.indptr.astype(index, copy=False)),
            xp.asarray(graph.indices.astype(index, copy=False)),
            xp.asarray(graph.data).astype(value, copy=False))


def device_symmetry(xp, indptr, indices, data, n: int) -> tuple[bool, int]:
    """(A = Aᵀ, self-loops and zeros stored) of a canonical CSR on the device (``xp``:
    cupy, or numpy for host arrays), exactly as scipy's ``(A != A.T).nnz == 0``: every
    stored non-zero (i, j, v) must find (j, i) stored with the same v (NaN never does).

    Every entry's (row, column) key is looked up among the sorted keys (binary search).
    Device memory: about 50 bytes per stored entry while it runs.
    """
    nnz = int(indices.size)
    rows = xp.searchsorted(indptr[1:], xp.arange(nnz), side="right")
    cols = indices.astype(np.int64)
    keys = rows * n + cols  # sorted: the CSR is canonical
    mirrors = cols * n + rows
    at = xp.minimum(xp.searchsorted(keys, mirrors), max(nnz - 1, 0))
    zero = data == 0
    ok = zero | ((keys[at] == mirrors) & (data[at] == data))
    symmetric = bool(ok.all())  # synchronize!
    dropped = int((zero | (rows == cols)).sum())  # synchronize!
    return symmetric, dropped


def _seed(random_state):
    """pylibcugraph's seed: an int as it is (low 32 bits), else one drawn from the RandomState."""
    if random_state is None:
        return None
    if isinstance(random_state, int | np.integer):
        return int(random_state) & 0xFFFFFFFF
    rs = random_state if hasattr(random_state, "randint") else np.random.RandomState(random_state)
    return int(rs.randint(0, 2**31 - 1))


# ---------------------------------------------------------------- host graph passes (numba)

def _canonical_csr(graph) -> sparse.csr_matrix:
    """``graph`` as CSR with sorted indices and no duplicates (summed); a copy only if needed."""
    if not (sparse.issparse(graph) and graph.format == "csr"):
        graph = sparse.csr_matrix(graph)
    if not graph.has_canonical_format:
        graph = graph.copy()
        graph.sum_duplicates()
    return graph


def undirected_graph(graph, symmetric: bool | None = None) -> tuple[sparse.csr_matrix, bool]:
    """pylibcugraph's input: ``graph`` with every edge stored both ways at equal weights,
    without self-loops and zeros, indices sorted; and whether ``graph`` was symmetric.

    As scipy's ``a = (A + Aᵀ) / 2`` if A ≠ Aᵀ, then ``a.setdiag(0); a.eliminate_zeros();
    a.sort_indices()`` on float32 weights (float64 stay float64), in one numba pass over
    the rows (two: lengths, then entries). ``symmetric``: A = Aᵀ when the caller knows it
    (:func:`device_symmetry`), else a numba pass finds out (it also counts what is to drop:
    a symmetric graph without self-loops and zeros is used as it is, no copy).
    """
    a = _canonical_csr(graph)
    data = a.data
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float32)
    dropped = None
    if symmetric is None:
        unmatched, upper, lower, dropped = _symmetry_counts(a.indptr, a.indices, data)
        symmetric = bool(unmatched == 0 and upper == lower)
    if symmetric and dropped == 0:
        if data is a.data:
            return a, True
        return _csr(data, a.indices, a.indptr, a.shape), True
    if symmetric:  # only drop self-loops and zeros
        t_indptr, t_indices, t_data = np.zeros(1, a.indptr.dtype), a.indices[:0], data[:0]
    else:  # merge each row with the same row of the transpose (scipy's csr_tocsc: sorted)
        t = sparse.csr_matrix((data, a.indices, a.indptr), shape=a.shape).T.tocsr()
        t_indptr, t_indices, t_data = t.indptr, t.indices, t.data
    scale = data.dtype.type(1.0 if symmetric else 0.5)
    indptr = np.zeros(a.indptr.size, np.int64)
    empty_i, empty_d = a.indices[:0], data[:0]
    _merge_rows(a.indptr, a.indices, data, t_indptr, t_indices, t_data, not symmetric, scale,
                indptr, empty_i, empty_d, False)
    np.cumsum(indptr, out=indptr)
    index = np.int64 if indptr[-1] > np.iinfo(np.int32).max else a.indices.dtype
    indptr = indptr.astype(index)
    indices, values = np.empty(indptr[-1], index), np.empty(indptr[-1], data.dtype)
    _merge_rows(a.indptr, a.indices, data, t_indptr, t_indices, t_data, not symmetric, scale,
                indptr, indices, values, True)
    return _csr(values, indices, indptr, a.shape), symmetric


def _csr(data, indices, indptr, shape) -> sparse.csr_matrix:
    out = sparse.csr_matrix((data, indices, indptr), shape=shape, copy=False)
    out.has_canonical_format = True
    return out


@numba.njit(cache=True, parallel=True)
def _symmetry_counts(indptr, indices, data):
    """(entries above the diagonal without an equal mirror, entries above, entries below,
    self-loops and zeros). Zeros count as absent. A is symmetric iff the first is 0 and
    above = below: every entry above then has its mirror, and no entry below is left over."""
    n = indptr.size - 1
    n_chunks = (n + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    counts = np.zeros((n_chunks, 4), np.int64)
    for c in numba.prange(n_chunks):
        unmatched = above = below = dropped = 0
        for i in range(c * ROWS_PER_CHUNK, min(n, (c + 1) * ROWS_PER_CHUNK)):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                v = data[p]
                if j == i or v == 0:
                    dropped += 1
                    unmatched += np.isnan(v)  # a NaN self-loop: NaN != NaN, as in A != Aᵀ
                elif j < i:
                    below += 1
                else:
                    above += 1
                    end = np.int64(indptr[j + 1])
                    at = _find_sorted(indices, np.int64(indptr[j]), end, i)
                    if at == end or data[at] != v:  # NaN never matches, as in A != Aᵀ
                        unmatched += 1
        counts[c, 0] = unmatched
        counts[c, 1] = above
        counts[c, 2] = below
        counts[c, 3] = dropped
    total = counts.sum(axis=0)
    return total[0], total[1], total[2], total[3]


@numba.njit(cache=True, inline="always")
def _find_sorted(indices, lo, hi, value):
    """Position of ``value`` in the sorted ``indices[lo:hi]``, or ``hi``."""
    end = hi
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo if lo < end and indices[lo] == value else end


@numba.njit(cache=True, parallel=True)
def _merge_rows(indptr, indices, data, t_indptr, t_indices, t_data, merge, scale, out_indptr,
                out_indices, out_data, write):
    """Row i of ``(A + T) * scale`` (T's row only when ``merge``) without the diagonal and
    zeros: its length into out_indptr[i + 1] (write=False), or its entries from
    out_indptr[i] (write=True). Entries in one of A and T keep their value times scale."""
    n = indptr.size - 1
    for i in numba.prange(n):
        p, p_end = indptr[i], indptr[i + 1]
        t = t_end = 0
        if merge:
            t, t_end = t_indptr[i], t_indptr[i + 1]
        q = out_indptr[i] if write else 0
        while p < p_end or t < t_end:
            if t == t_end or (p < p_end and indices[p] < t_indices[t]):
                j, v = indices[p], data[p] * scale
                p += 1
            elif p == p_end or t_indices[t] < indices[p]:
                j, v = t_indices[t], t_data[t] * scale
                t += 1
            else:
                j, v = indices[p], (data[p] + t_data[t]) * scale
                p += 1
                t += 1
            if j != i and v != 0:
                if write:
                    out_indices[q] = j
                    out_data[q] = v
                q += 1
        if not write:
            out_indptr[i + 1] = q


# ---------------------------------------------------------------- modularity (host)

def modularity(adjacency, labels, *, resolution: float = 1.0, weighted: bool = True) -> float:
    """Newman modularity of a partition: (1/W) Σ_ij [A_ij − γ k_i^out k_j^in / W] δ(c_i, c_j).

    W is the sum of all entries, k^out/k^in the row/column sums; for a symmetric matrix
    this equals igraph's undirected and directed modularity of the graph scanpy builds
    from it. ``weighted=False`` counts every stored non-zero as 1.

    Straight from the CSR in one parallel numba pass over fixed chunks of rows, the chunks'
    partial sums added in chunk order: the same number whatever the thread count.
    """
    a = _canonical_csr(adjacency)
    codes, n_clusters = _cluster_codes(labels)
    if a.shape[0] != a.shape[1] or codes.size != a.shape[0]:
        raise ValueError(f"modularity: {codes.size} labels for an adjacency of shape {a.shape}; "
                         "expected a square matrix and one label per row")
    if a.nnz == 0:
        return float("nan")
    n_chunks = -(-a.shape[0] // ROWS_PER_CHUNK)
    # column sums by cluster: per chunk of rows when that is small, else in a serial pass
    by_chunk = n_chunks * n_clusters <= IN_PARTIAL_LIMIT
    in_partial = np.zeros((n_chunks, n_clusters) if by_chunk else (0, 0))
    out_weight = np.empty(a.shape[0])
    sums = _modularity_sums(a.indptr, a.indices, a.data, codes, weighted, out_weight, in_partial)
    total, inside = sums[:, 0].sum(), sums[:, 1].sum()
    if total == 0:
        return float("nan")
    k_out = np.bincount(codes, weights=out_weight, minlength=n_clusters)
    if by_chunk:
        k_in = in_partial.sum(axis=0)
    else:
        k_in = _column_sums_by_cluster(a.indices, a.data, codes, weighted, n_clusters)
    return float(inside / total - resolution * (k_out * k_in).sum() / total**2)


def _cluster_codes(labels) -> tuple[np.ndarray, int]:
    """Labels as cluster numbers 0..k-1 (as they are when they already are small ints)."""
    labels = np.asarray(labels).ravel()
    if not (labels.dtype.kind in "iu" and labels.size and labels.min() >= 0
            and labels.max() < labels.size):
        labels = pd.factorize(labels)[0]
        if labels.size and labels.min() < 0:
            raise ValueError("modularity: the labels contain missing values")
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    return np.ascontiguousarray(labels, dtype=np.int32 if n_clusters < 2**31 else np.int64), n_clusters


@numba.njit(cache=True, parallel=True)
def _modularity_sums(indptr, indices, data, codes, weighted, row_sums, in_partial):
    """Per chunk of rows: (weight, weight within clusters); each row's weight into
    row_sums, and when in_partial has a row per chunk the chunk's column sums by cluster."""
    n = indptr.size - 1
    n_chunks = (n + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
    by_chunk = in_partial.shape[0] == n_chunks
    sums = np.zeros((n_chunks, 2))
    for c in numba.prange(n_chunks):
        total = inside = 0.0
        for i in range(c * ROWS_PER_CHUNK, min(n, (c + 1) * ROWS_PER_CHUNK)):
            ci = codes[i]
            row = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                v = data[p]
                if v == 0:
                    continue
                w = np.float64(v) if weighted else 1.0
                row += w
                cj = codes[indices[p]]
                if cj == ci:
                    inside += w
                if by_chunk:
                    in_partial[c, cj] += w
            row_sums[i] = row
            total += row
        sums[c, 0] = total
        sums[c, 1] = inside
    return sums


@numba.njit(cache=True)
def _column_sums_by_cluster(indices, data, codes, weighted, n_clusters):
    out = np.zeros(n_clusters)
    for p in range(indices.size):
        v = data[p]
        if v != 0:
            out[codes[indices[p]]] += np.float64(v) if weighted else 1.0
    return out
