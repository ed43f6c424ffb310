"""draw_graph, as scanpy's tools/_draw_graph.py: ForceAtlas2 through cuGraph on the GPU,
scanpy's own path everywhere else."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from anndata import AnnData

from .._core import logg
from .._core.adata import actualize_view
from .._core.arrays import placement
from .._settings import resolve_device

FA2_ITERATIONS = 500  # scanpy's fa2_positions default


def draw_graph(
    adata: AnnData,
    layout: str = "fa",
    *,
    init_pos: str | bool | None = None,
    root: int | None = None,
    random_state: Any = 0,
    n_jobs: int | None = None,
    adjacency=None,
    key_added_ext: str | None = None,
    neighbors_key: str | None = None,
    obsp: str | None = None,
    copy: bool = False,
    device: Literal["auto", "gpu", "cpu"] | None = None,
    **kwds,
) -> AnnData | None:
    """Force-directed graph drawing, as :func:`scanpy.tl.draw_graph`.

    ``layout="fa"`` (ForceAtlas2) on the GPU (``device``, default ``gpusc.settings.device``)
    runs cuGraph's ``force_atlas2`` when cuGraph is installed (it needs cudf:
    ``gpusc[rapids-cu13]`` or ``rapids-cu12`` with cugraph), with scanpy's ForceAtlas2
    settings (no hub dissuasion, Barnes-Hut θ = 1.2, scaling 2, gravity 1, ``maxiter`` or
    ``iterations`` in ``kwds``, default 500) and scanpy's start (``init_pos`` or uniform
    random positions from ``random_state``). Every other case is :func:`scanpy.tl.draw_graph`
    itself, with these arguments: without the ``fa2-modified`` package scanpy falls back to
    igraph's ``"fr"`` layout, with its warning, and writes ``X_draw_graph_fr``.

    Parameters
    ----------
    adata, layout, init_pos, root, random_state, n_jobs, adjacency, key_added_ext,
    neighbors_key, obsp, copy, **kwds
        As :func:`scanpy.tl.draw_graph`.
    device
        ``"auto"``, ``"gpu"`` or ``"cpu"``; ``None``: ``gpusc.settings.device``.

    Returns
    -------
    ``None``, or the new AnnData with ``copy=True``. Sets:

    ``obsm['X_draw_graph_' + (key_added_ext or layout)]`` : numpy.ndarray, float64 (n_obs, 2)
        Coordinates of the layout (``layout`` as run: ``"fr"`` where scanpy fell back).
    ``uns['draw_graph']`` : dict
        ``params``: ``layout``, ``random_state``, as scanpy.
    """
    import scanpy as sc

    func = "draw_graph"
    if not isinstance(adata, AnnData):
        raise TypeError(f"{func}: expected an AnnData, got {type(adata).__name__}")
    where = resolve_device(device)
    if where == "gpu" and layout == "fa" and not (isinstance(init_pos, str) and init_pos == "paga") \
            and init_pos is not True and _cugraph_available():
        return _draw_fa_device(adata, init_pos, random_state, adjacency, key_added_ext,
                               neighbors_key, obsp, copy, kwds)
    return sc.tl.draw_graph(adata, layout, init_pos=init_pos, root=root,
                            random_state=random_state, n_jobs=n_jobs, adjacency=adjacency,
                            key_added_ext=key_added_ext, neighbors_key=neighbors_key, obsp=obsp,
                            copy=copy, **kwds)


def _cugraph_available() -> bool:
    try:
        import cudf  # noqa: F401
        import cugraph  # noqa: F401
    except ImportError:
        return False
    return True


def _draw_fa_device(adata, init_pos, random_state, adjacency, key_added_ext, neighbors_key,
                    obsp, copy, kwds):
    import cudf
    import cugraph
    import cupy as cp
    from scipy import sparse

    func = "draw_graph"
    if adjacency is None:
        adjacency = _graph(adata, obsp, neighbors_key, func)
    if placement(adjacency) == "device":
        adjacency = adjacency.get()  # synchronize!
    adjacency = sparse.coo_matrix(adjacency)
    n = adjacency.shape[0]
    if isinstance(init_pos, str) and init_pos in adata.obsm:
        init_coords = np.asarray(adata.obsm[init_pos])[:, :2]
    else:  # scanpy's start: numpy's global generator seeded with random_state
        np.random.seed(random_state)
        init_coords = np.random.random((n, 2))
    iterations = kwds.get("maxiter", kwds.get("iterations", FA2_ITERATIONS))
    start = logg.info(f"drawing single-cell graph using layout {'fa'!r}")

    keep = adjacency.row != adjacency.col
    edges = cudf.DataFrame({"src": cp.asarray(adjacency.row[keep].astype(np.int32)),
                            "dst": cp.asarray(adjacency.col[keep].astype(np.int32)),
                            "weight": cp.asarray(adjacency.data[keep].astype(np.float32))})
    graph = cugraph.Graph(directed=False)
    graph.from_cudf_edgelist(edges, source="src", destination="dst", edge_attr="weight",
                             renumber=False)
    pos_list = cudf.DataFrame({"vertex": cp.arange(n, dtype=np.int32),
                               "x": cp.asarray(init_coords[:, 0].astype(np.float32)),
                               "y": cp.asarray(init_coords[:, 1].astype(np.float32))})
    result = cugraph.force_atlas2(graph, max_iter=int(iterations), pos_list=pos_list,
                                  outbound_attraction_distribution=False, lin_log_mode=False,
                                  prevent_overlapping=False, edge_weight_influence=1.0,
                                  jitter_tolerance=1.0, barnes_hut_optimize=True,
                                  barnes_hut_theta=1.2, scaling_ratio=2.0,
                                  strong_gravity_mode=False, gravity=1.0)
    result = result.sort_values("vertex")
    positions = np.column_stack([result["x"].to_numpy(), result["y"].to_numpy()]).astype(np.float64)  # synchronize!

    if copy:
        adata = adata.copy()
    actualize_view(adata)
    adata.uns["draw_graph"] = {"params": {"layout": "fa", "random_state": random_state}}
    key_added = f"X_draw_graph_{key_added_ext or 'fa'}"
    adata.obsm[key_added] = positions
    logg.info("    finished", time=start,
              deep=f"added\n    {key_added!r}, graph_drawing coordinates (adata.obsm)")
    return adata if copy else None


def _graph(adata, obsp, neighbors_key, func):
    """scanpy's _choose_graph: obsp[obsp], or the connectivities of the neighbors entry."""
    if obsp is not None and neighbors_key is not None:
        raise ValueError(f"{func}: You can't specify both obsp, neighbors_key. Please select only one.")
    if obsp is not None:
        return adata.obsp[obsp]
    key = "neighbors" if neighbors_key is None else neighbors_key
    if key not in adata.uns:
        raise KeyError(f"{func}: No neighbors found in adata.uns[{key!r}]; run pp.neighbors first")
    ckey = adata.uns[key].get("connectivities_key", "connectivities")
    return adata.obsp[ckey]
