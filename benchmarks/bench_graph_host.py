"""The host work of tl.umap's and tl.leiden's GPU paths on a synthetic 1M-node kNN graph.

"Host work" is what the GPU paths do on the CPU around their device calls: reading and
checking the graph in obsp, umap's canonical float32 CSR and weak-edge cut, the start's
noise and scaling, leiden's canonical CSR, relabelling by size, the modularity written to
uns, writing obs/obsm/uns. The device calls are stubbed, so this runs without a GPU:

  umap   graph_to_device          returns the host arrays (the real one copies them over)
         spectral_init_device     returns fixed coordinates (the real one: the connectivity
                                  test (kernels/umap.cu's umap_link) and cupyx's eigsh)
         optimize_layout_device_csr  returns a copy of the start (the real one: heads, tails,
                                  epochs per sample and the epochs on the device)
  leiden _gpu_partition           scatters fixed labels by vertex, as the real one does with
                                  pylibcugraph's; the real one also sends the graph and tests
                                  its symmetry on the device (device_symmetry)

The graph: n cells on a ring, in random order; each cell's 14 neighbours drawn at random
from the 40 cells within 20 ring places, at distances |offset| + U(0, 1), plus itself at 0
(scanpy's kNN includes the cell); then gpusc's pp.neighbors host code makes the
connectivities from that kNN (umap-learn's memberships and fuzzy union): float32 CSR,
symmetric, ~23 stored entries per row (pbmc3k's scanpy graph: 23.6), connected. Every timed
call gets a fresh AnnData whose obsp matrix is a new CSR object over the same arrays (no
cached canonical flag, as after reading an .h5ad). The fixed leiden labels: 40 clusters of
ring segments, numbered by a member's vertex id (as pylibcugraph numbers them).

Per step: one warm-up call (numba compilation), then the best of --repeats. The budget of
the issue is umap_total + leiden_total under 1 s. --before also times the scipy steps the
paths ran before (one call each; slow).

    python benchmarks/bench_graph_host.py [--cells 1000000] [--repeats 5] [--before] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import anndata as ad
import numba
import numpy as np
import pandas as pd
from scipy import sparse

import gpusc
from gpusc._bench import git_state, load_average, machine, versions
from gpusc._kernels import connectivity as _conn
from gpusc._kernels import umap as _kumap
from gpusc.tl import _leiden, _umap

ROOT = Path(__file__).resolve().parents[1]
K = 15
WINDOW = 20
N_CLUSTERS = 40


def ring_knn(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kNN indices (n, K) int64, distances (n, K) float32, ring position -> cell)."""
    rng = np.random.default_rng(seed)
    offsets = np.r_[np.arange(-WINDOW, 0), np.arange(1, WINDOW + 1)].astype(np.int64)
    picked = rng.permuted(np.broadcast_to(offsets, (n, offsets.size)), axis=1)[:, :K - 1]
    dist = np.abs(picked) + rng.random(picked.shape, dtype=np.float32)
    order = np.argsort(dist, axis=1)
    picked, dist = np.take_along_axis(picked, order, 1), np.take_along_axis(dist, order, 1)
    cell_at = rng.permutation(n)
    idx = np.empty((n, K), np.int64)
    dists = np.zeros((n, K), np.float32)
    idx[cell_at, 0] = cell_at
    idx[cell_at, 1:] = cell_at[(np.arange(n)[:, None] + picked) % n]
    dists[cell_at, 1:] = dist
    return idx, dists, cell_at


def synthetic_graph(n: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The connectivities and the fixed cluster labels (one per cell)."""
    idx, dists, cell_at = ring_knn(n)
    vals, _, _ = _conn.umap_memberships_host(idx, dists)
    graph = _conn.fuzzy_union_host(idx, vals, n)
    segment = np.arange(n) * N_CLUSTERS // n  # ring segments
    name = cell_at[np.searchsorted(segment, np.arange(N_CLUSTERS))]  # a member's vertex id
    labels = np.empty(n, np.int64)
    labels[cell_at] = name[segment]
    return graph, labels


def fresh(graph: sparse.csr_matrix) -> ad.AnnData:
    """An AnnData over the same arrays, its obsp matrix a new CSR object (no cached flags)."""
    adata = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(graph.shape[0]).astype(str)))
    adata.obsp["connectivities"] = sparse.csr_matrix((graph.data, graph.indices, graph.indptr),
                                                     shape=graph.shape)
    adata.uns["neighbors"] = {"connectivities_key": "connectivities", "distances_key": "distances",
                              "params": {"n_neighbors": K, "method": "umap"}}
    return adata


def stub_device(labels: np.ndarray, n_components: int = 2) -> None:
    """Replace the device calls as the module docstring says (this process only)."""
    n = labels.size
    coords = np.random.default_rng(1).normal(size=(n, n_components))
    vertices = np.arange(n)
    _umap.resolve_device = _leiden.resolve_device = lambda device=None: "gpu"
    sys.modules["pylibcugraph"] = types.ModuleType("pylibcugraph")
    _kumap.graph_to_device = lambda g: _kumap.DeviceGraph(g.indptr, g.indices, g.data, g.shape[0])
    _kumap.spectral_init_device = lambda graph, dim: coords.copy()
    _kumap.optimize_layout_device_csr = lambda start, graph, *args: np.array(start)

    def partition(func, graph, resolution, random_state, use_weights, n_iterations):
        out = np.empty(graph.shape[0], np.int64)
        out[vertices] = labels
        return out

    _leiden._gpu_partition = partition


def best(fn, make, repeats: int) -> dict:
    fn(make())
    times = []
    for _ in range(repeats):
        x = make()
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return {"seconds": times, "best": min(times)}


def before_steps(graph: sparse.csr_matrix, labels: np.ndarray) -> dict:
    """The scipy/pandas steps the GPU paths ran before, one call each (seconds)."""
    from scipy.sparse.csgraph import connected_components

    out = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        out[name] = time.perf_counter() - start
        print(f"  before {name:34s} {out[name]:8.3f} s", flush=True)
        return result

    g = fresh(graph).obsp["connectivities"]
    coo = timed("umap_coo_copy_sum_duplicates", lambda: _sum_dup(sparse.coo_matrix(g, copy=True)))
    timed("umap_cut_eliminate_zeros", lambda: _old_cut(coo))
    timed("umap_connected_components", lambda: connected_components(coo))
    timed("umap_epochs_per_sample", lambda: _kumap.epochs_per_sample(coo.data, 200))
    a = sparse.csr_matrix(g, dtype=np.float32)
    timed("leiden_symmetry_test", lambda: (a != a.T).nnz)
    timed("leiden_setdiag_eliminate_sort", lambda: (a.setdiag(0), a.eliminate_zeros(), a.sort_indices()))
    timed("leiden_by_size_np_unique", lambda: np.unique(labels, return_index=True, return_inverse=True,
                                                        return_counts=True))
    timed("leiden_modularity_coo_pandas", lambda: _old_modularity(g, labels))
    return out


def _sum_dup(coo):
    coo.sum_duplicates()
    return coo.astype(np.float32)


def _old_cut(coo):
    cut = coo.data.max() / 200.0
    coo.data[coo.data < cut] = 0.0
    coo.eliminate_zeros()


def _old_modularity(adjacency, labels):
    a = sparse.coo_matrix(adjacency)
    a.sum_duplicates()
    keep = a.data != 0
    rows, cols, data = a.row[keep], a.col[keep], np.ones(int(keep.sum()))
    codes = pd.factorize(np.asarray(labels))[0]
    k = codes.max() + 1
    inside = data[codes[rows] == codes[cols]].sum()
    k_out = np.bincount(codes[rows], weights=data, minlength=k)
    k_in = np.bincount(codes[cols], weights=data, minlength=k)
    return inside / data.sum() - (k_out * k_in).sum() / data.sum() ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / f"benchmarks/results/cpu-dev-graph-host-{args.cells // 1000}k.json"

    start = time.perf_counter()
    graph, labels = synthetic_graph(args.cells)
    build_seconds = time.perf_counter() - start
    n = graph.shape[0]
    print(f"graph: {n:,} nodes, {graph.nnz / n:.2f} stored per row, built in {build_seconds:.1f} s", flush=True)
    load_before = load_average()
    before = before_steps(graph, labels) if args.before else None
    stub_device(labels)

    codes = _leiden._by_size(labels)
    adata_for_store = fresh(graph)
    rs = np.random.RandomState(0)
    coords = np.random.default_rng(1).normal(size=(n, 2))
    steps = {
        "umap_layout_graph": (lambda a: _umap.layout_graph(a.obsp["connectivities"], None)),
        "umap_noisy_scale_start": (lambda a: _umap._noisy_scale(coords, rs)),
        "leiden_canonical_csr": (lambda a: _leiden._canonical_csr(a.obsp["connectivities"])),
        "leiden_by_size": (lambda a: _leiden._by_size(labels)),
        "leiden_modularity_unweighted": (lambda a: _leiden.modularity(a.obsp["connectivities"], codes,
                                                                     weighted=False)),
        "leiden_modularity_weighted": (lambda a: _leiden.modularity(a.obsp["connectivities"], codes)),
        "leiden_store_obs": (lambda a: _leiden._store(adata_for_store, "leiden", codes, None, None)),
        "umap_total": (lambda a: gpusc.tl.umap(a)),
        "leiden_total": (lambda a: gpusc.tl.leiden(a)),
        "louvain_total": (lambda a: gpusc.tl.louvain(a)),
    }
    rows = {}
    for name, fn in steps.items():
        rows[name] = best(fn, lambda: fresh(graph), args.repeats)
        print(f"{name:32s} {rows[name]['best']:8.3f} s", flush=True)
    total = rows["umap_total"]["best"] + rows["leiden_total"]["best"]
    print(f"{'umap_total + leiden_total':32s} {total:8.3f} s (budget 1 s)")

    record = {
        "benchmark": "graph-host", "device": "cpu", "machine": machine(False), "versions": versions(),
        "git": git_state(), "repeats": args.repeats, "numba_threads": numba.get_num_threads(),
        "load_average_before": load_before, "load_average_after": load_average(),
        "data": {"description": f"{n:,}-node synthetic kNN graph: a ring in random order, 14 neighbours "
                                f"drawn from the {2 * WINDOW} nearest ring places, connectivities by "
                                "gpusc's pp.neighbors host code (umap-learn's memberships, fuzzy union)",
                 "n_nodes": n, "nnz": int(graph.nnz), "stored_per_row": graph.nnz / n,
                 "n_clusters_stubbed": N_CLUSTERS, "build_seconds": build_seconds},
        "method": "one warm-up call, then the best of repeats; each call on a fresh AnnData (obsp a new CSR "
                  "object over the same arrays, no cached canonical flag); AnnData making not timed",
        "device_calls_stubbed": {
            "umap": "graph_to_device (returns the host arrays), spectral_init_device (fixed coordinates; "
                    "the real one runs the connectivity test and eigsh on the device), "
                    "optimize_layout_device_csr (a copy of the start)",
            "leiden": "_gpu_partition (scatters fixed labels by vertex; the real one sends the graph, tests "
                      "its symmetry on the device and runs pylibcugraph)"},
        "steps": rows, "total_umap_plus_leiden": total, "budget_seconds": 1.0,
        "before_scipy_steps_seconds": before,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
