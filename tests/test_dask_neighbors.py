"""After PCA on a dask-backed AnnData (issue 11, item 4): neighbors, umap, leiden and louvain
read X_pca (in memory) and never compute X; a dask X_pca is searched one block of query
rows per dask task (one per worker of a dask.distributed or dask-cuda cluster), and every
row gets the list of a search of all rows. Oracles: scikit-learn's brute force (through
test_pp_neighbors' helpers) and gpusc's in-memory neighbors, which test_pp_neighbors holds
to scanpy."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from _dask import as_dask, count_computes
from test_pp_neighbors import blobs, compare_sets, sklearn_knn

import gpusc
from gpusc._kernels import topk

distributed = pytest.importorskip("distributed")


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "manhattan"])
def test_host_search_of_a_block_of_rows_equals_that_block_of_a_search_of_all(metric):
    x = blobs(n=900, dim=16, seed=4)
    idx, dist, _ = topk.knn_host(x, 12, metric)
    for rows in [(0, 256), (256, 900), (899, 900)]:
        block_idx, block_dist, _ = topk.knn_host(x, 12, metric, query_rows=rows)
        np.testing.assert_array_equal(block_idx, idx[rows[0]:rows[1]])
        np.testing.assert_array_equal(block_dist, dist[rows[0]:rows[1]])
    ref_idx, ref_dist = sklearn_knn(x.astype(np.float64), 12, metric)
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0


def _with_pca(n=1000, dim=20, chunks="uneven", seed=0):
    x = blobs(n=n, dim=dim, seed=seed)
    a = ad.AnnData(np.zeros((n, 80), np.float32))  # more than 50 genes: X_pca is searched, not X
    a.obsm["X_pca"] = as_dask(x, chunks) if chunks else x
    return a


def _same_graph(a, b):
    assert a.obsp["distances"].nnz > 0
    for key in ("distances", "connectivities"):
        assert (a.obsp[key] != b.obsp[key]).nnz == 0, key
    assert a.uns["neighbors"]["params"] == b.uns["neighbors"]["params"]


@pytest.mark.parametrize("chunks", ["uneven", "empty"])
def test_neighbors_of_a_dask_representation_equal_in_memory(chunks):
    lazy, eager = _with_pca(chunks=chunks), _with_pca(chunks=None)
    gpusc.pp.neighbors(lazy, n_neighbors=15, device="cpu")
    gpusc.pp.neighbors(eager, n_neighbors=15, device="cpu")
    _same_graph(lazy, eager)


def test_neighbors_on_a_distributed_cluster_equal_in_memory():
    lazy, eager = _with_pca(n=1500, chunks="uneven"), _with_pca(n=1500, chunks=None)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        with distributed.get_task_stream(client) as stream:
            gpusc.pp.neighbors(lazy, n_neighbors=10, metric="cosine", device="cpu")
    # the query blocks ran as tasks of the cluster (which worker takes which is the scheduler's
    # choice: data locality may put them all on the worker holding the references)
    searches = [t for t in stream.data if "knn_host" in str(t["key"])]
    assert len(searches) == len(lazy.obsm["X_pca"].chunks[0])
    gpusc.pp.neighbors(eager, n_neighbors=10, metric="cosine", device="cpu")
    _same_graph(lazy, eager)


def test_graph_steps_never_compute_a_dask_x():
    # a dask X (sparse counts) next to an in-memory X_pca: neighbors, umap, leiden and louvain
    # read only X_pca and the graph (80 genes: more than 50, so X_pca and not X is searched), so
    # X is never computed; results equal those with X in memory
    rng = np.random.default_rng(0)
    counts = sp.random(600, 80, density=0.1, format="csr", dtype=np.float32, random_state=rng)
    pcs = blobs(n=600, dim=10, seed=1)
    lazy, eager = ad.AnnData(as_dask(counts)), ad.AnnData(counts)
    for a in (lazy, eager):
        a.obsm["X_pca"] = pcs.copy()
    with count_computes() as c:
        gpusc.pp.neighbors(lazy, device="cpu")
        gpusc.tl.umap(lazy, device="cpu")
        gpusc.tl.leiden(lazy, flavor="igraph", n_iterations=2)
        gpusc.tl.louvain(lazy, flavor="igraph")
    assert c.computes == 0
    gpusc.pp.neighbors(eager, device="cpu")
    gpusc.tl.umap(eager, device="cpu")
    gpusc.tl.leiden(eager, flavor="igraph", n_iterations=2)
    gpusc.tl.louvain(eager, flavor="igraph")
    _same_graph(lazy, eager)
    np.testing.assert_array_equal(lazy.obsm["X_umap"], eager.obsm["X_umap"])
    assert (lazy.obs["leiden"] == eager.obs["leiden"]).all()
    assert (lazy.obs["louvain"] == eager.obs["louvain"]).all()


@pytest.mark.gpu
def test_neighbors_on_a_local_cuda_cluster_equal_one_gpu():
    dask_cuda = pytest.importorskip("dask_cuda", reason="dask-cuda (the rapids extra) is not installed")
    lazy, eager = _with_pca(n=20_000, dim=50, chunks="uneven"), _with_pca(n=20_000, dim=50, chunks=None)
    with dask_cuda.LocalCUDACluster() as cluster, distributed.Client(cluster):
        gpusc.pp.neighbors(lazy, device="gpu")
    gpusc.pp.neighbors(eager, device="gpu")
    _same_graph(lazy, eager)
