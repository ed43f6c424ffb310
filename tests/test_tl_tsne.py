"""tl.tsne against scanpy 1.12's tl.tsne (scikit-learn's Barnes-Hut TSNE) on 400 pbmc3k cells
(X_pca of scanpy's own preprocessing).

Barnes-Hut t-SNE amplifies rounding: the same input affinities up to the last bits (our exact
kNN distances against sklearn's) give a different layout of the same quality, so the oracle
is scanpy's quality: trustworthiness (sklearn, 15 neighbours, on X_pca) and the KL divergence
of each embedding from one shared P (sklearn's affinities from the exact kNN).

sklearn's optimiser runs on one OpenMP thread here (threadpoolctl), for scanpy and for us: on
the shared 2-core test machine its two spinning threads took 5x longer (16.6 s against 3.2 s).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import scanpy as sc
from scipy import sparse
from scipy.spatial.distance import pdist, squareform
from sklearn.manifold import trustworthiness
from threadpoolctl import threadpool_limits

from conftest import SCANPY_112

import gpusc
from gpusc.tl._tsne import N_JOBS_WARNING, knn_distance_graph

N_CELLS = 400


@pytest.fixture(scope="module")
def cells(pbmc_graph):
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(pbmc_graph.n_obs, N_CELLS, replace=False))
    return pbmc_graph[keep].copy()


@pytest.fixture(autouse=True)
def one_openmp_thread():
    with threadpool_limits(1, user_api="openmp"):
        yield


@pytest.fixture(scope="module")
def scanpy_tsne(cells):
    with threadpool_limits(1, user_api="openmp"):
        return sc.tl.tsne(cells, copy=True)


@pytest.fixture(scope="module")
def ours(cells):
    with threadpool_limits(1, user_api="openmp"):
        return gpusc.tl.tsne(cells, copy=True, device="cpu")


def kl_divergence(x, embedding, perplexity=30.0):
    """KL(P || Q): P is sklearn's affinities from the exact kNN of x (as both runs build it),
    Q the Student-t similarities of the embedding over all pairs."""
    from sklearn.manifold._t_sne import _joint_probabilities_nn

    k = min(x.shape[0] - 1, int(3 * perplexity + 1))
    d = squareform(pdist(x.astype(np.float64), "sqeuclidean"))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1)[:, :k]
    rows = np.repeat(np.arange(x.shape[0]), k)
    graph = sparse.csr_matrix((np.take_along_axis(d, idx, axis=1).ravel(), (rows, idx.ravel())),
                              shape=d.shape)
    p = _joint_probabilities_nn(graph, perplexity, 0).toarray()
    q = 1.0 / (1.0 + squareform(pdist(embedding.astype(np.float64), "sqeuclidean")))
    np.fill_diagonal(q, 0.0)
    q /= q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-300))))


def _params(adata) -> dict:
    """uns['tsne']['params']; scanpy 1.11 does not record n_components (1.12 does, as gpusc)."""
    params = dict(adata.uns["tsne"]["params"])
    if not SCANPY_112:
        params.pop("n_components", None)
    return params


def test_quality_as_scanpy(cells, scanpy_tsne, ours):
    x = cells.obsm["X_pca"]
    emb, ref = ours.obsm["X_tsne"], scanpy_tsne.obsm["X_tsne"]
    assert emb.shape == ref.shape == (N_CELLS, 2) and emb.dtype == np.float32
    # measured (400 cells, seed 0): trustworthiness 0.9288 ours, 0.9282 scanpy; KL 0.6933 ours,
    # 0.6887 scanpy (+0.7%: another local optimum from affinities equal but for the last
    # bits). 0.005 and 2% allow that, not a worse layout.
    assert trustworthiness(x, emb, n_neighbors=15) >= trustworthiness(x, ref, n_neighbors=15) - 0.005
    assert kl_divergence(x, emb) <= kl_divergence(x, ref) * 1.02
    assert _params(ours) == _params(scanpy_tsne)


def test_same_seed_same_result(cells, ours):
    again = gpusc.tl.tsne(cells, copy=True, device="cpu")
    np.testing.assert_array_equal(again.obsm["X_tsne"], ours.obsm["X_tsne"])


def test_knn_graph_is_sklearns(cells):
    """The precomputed graph gives sklearn's own kNN step the exact neighbours and distances."""
    from sklearn.neighbors import NearestNeighbors

    x = cells.obsm["X_pca"]
    graph = knn_distance_graph(x, 91, "euclidean")
    ours = NearestNeighbors(n_neighbors=91, metric="precomputed").fit(graph).kneighbors_graph(mode="distance")
    ref = NearestNeighbors(n_neighbors=91).fit(x).kneighbors_graph(mode="distance")
    assert (ours != 0).sum() == (ref != 0).sum() == N_CELLS * 91
    np.testing.assert_array_equal((ours != 0).toarray(), (ref != 0).toarray())
    np.testing.assert_allclose(ours.toarray(), ref.toarray(), rtol=1e-5, atol=1e-5)


def test_bad_input_leaves_adata_unchanged(cells):
    adata = cells.copy()
    with pytest.raises(KeyError, match="use_rep='nope'"):
        gpusc.tl.tsne(adata, use_rep="nope")
    with pytest.raises(ValueError, match="n_pcs=60"):
        gpusc.tl.tsne(adata, n_pcs=60)
    with pytest.raises(ValueError, match=re.escape("'n_components' should be inferior to 4")):
        gpusc.tl.tsne(adata, n_components=4)
    with pytest.raises(ValueError, match="metric='chebyshev'"):
        gpusc.tl.tsne(adata, metric="chebyshev")
    assert "X_tsne" not in adata.obsm and "tsne" not in adata.uns


def test_n_jobs_warning_as_scanpy(cells):
    adata = cells[:60].copy()
    with pytest.warns(UserWarning, match=re.escape(N_JOBS_WARNING)):
        gpusc.tl.tsne(adata, n_jobs=2, perplexity=5, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.tl.tsne(adata, n_jobs=2, perplexity=5, copy=True)
    assert _params(adata) == _params(ref)


@pytest.mark.gpu
def test_device_quality_as_scanpy(cells, scanpy_tsne):
    """cuML's TSNE where installed, else gpusc's own (kernels/tsne.cu). KL to 3%, not the host
    tests' 2%: the device's rounding (CUDA's exp, cuFFT) leads t-SNE's chaotic steps to another
    local optimum than the host twin's; the grid method's KL on another 400-cell sample of
    pbmc3k (own preprocessing) was +1.3% to +2.6% of sklearn's in three runs (float32 or
    float64 FFTs, 3 or 5 nodes per unit)."""
    x = cells.obsm["X_pca"]
    out = gpusc.tl.tsne(cells, copy=True, device="gpu")
    assert trustworthiness(x, out.obsm["X_tsne"], n_neighbors=15) >= \
        trustworthiness(x, scanpy_tsne.obsm["X_tsne"], n_neighbors=15) - 0.01
    assert kl_divergence(x, out.obsm["X_tsne"]) <= kl_divergence(x, scanpy_tsne.obsm["X_tsne"]) * 1.03
    again = gpusc.tl.tsne(cells, copy=True, device="gpu")
    np.testing.assert_array_equal(again.obsm["X_tsne"], out.obsm["X_tsne"])


def test_grid_method_quality_as_scanpy(cells, scanpy_tsne):
    """The device t-SNE's method (tl.tsne on a GPU without cuML) in its host twin: exact kNN,
    sklearn's affinities and optimiser phases, the repulsion from an FFT-convolved grid (gpusc
    /_kernels/tsne.py), from sklearn's PCA start: scanpy's quality. Measured (400 cells, seed
    0): trustworthiness 0.9279 ours, 0.9282 scanpy; KL 0.6889 ours, 0.6887 scanpy. KL to 3%
    (test_quality_as_scanpy: 2%): on another 400-cell sample the method's KL was +1.3% to
    +2.6% of sklearn's over three runs whose rounding differed (t-SNE's steps amplify it into
    another local optimum), so a machine whose FFTs round differently may land there too. It
    takes ~50 s here: 1,000 steps, each with seven FFTs of a grid of up to ~400 x 400 on the
    host (on the device, microseconds each)."""
    from gpusc._kernels import tsne as ktsne
    from gpusc.tl._tsne import pca_start

    x = cells.obsm["X_pca"]
    emb = ktsne.embed(x, pca_start(x, 2, 0), perplexity=30.0, early_exaggeration=12.0,
                      learning_rate=1000.0, metric="euclidean")
    ref = scanpy_tsne.obsm["X_tsne"]
    assert emb.shape == (N_CELLS, 2) and emb.dtype == np.float32
    assert trustworthiness(x, emb, n_neighbors=15) >= trustworthiness(x, ref, n_neighbors=15) - 0.005
    assert kl_divergence(x, emb) <= kl_divergence(x, ref) * 1.03
