"""pp.neighbors against scikit-learn's exact brute force and scanpy's graph code (the oracles)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from scanpy.neighbors import _connectivity as sc_connectivity  # its jaccard: scanpy 1.12 only
from scanpy.neighbors._connectivity import gauss as sc_gauss
from scanpy.neighbors._connectivity import umap as sc_umap
from scipy import sparse
from sklearn.neighbors import NearestNeighbors

import gpusc
from conftest import read_only
from gpusc._kernels import topk
from gpusc._kernels.topk import knn_host
from gpusc._settings import resolve_device

METRICS = ["euclidean", "sqeuclidean", "cosine", "manhattan"]
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]
CONNECTIVITY_METHODS = ["umap", "gauss", pytest.param("jaccard", marks=pytest.mark.scanpy_112(
    "scanpy 1.11's neighbors has no method='jaccard' (only umap and gauss)"))]
PRECOMPUTED_112 = pytest.mark.scanpy_112("scanpy 1.11's neighbors has no distances= argument")


def blobs(n=1500, dim=20, centers=6, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=8, size=(centers, dim))
    labels = rng.integers(centers, size=n)
    return (means[labels] + rng.normal(size=(n, dim))).astype(dtype)


def sklearn_knn(x, k, metric):
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(x)
    dist, idx = nn.kneighbors(x)
    return idx, dist


def direct_knn(x, k, metric):
    """Exact kNN from SciPy's directly computed (not expanded) distances."""
    from scipy.spatial.distance import cdist

    d = cdist(x, x, metric={"manhattan": "cityblock"}.get(metric, metric))
    np.fill_diagonal(d, -1)  # each point first
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d, idx, axis=1)
    dist[:, 0] = 0
    return idx, dist


def sklearn_float32_tolerance(metric):
    """scikit-learn returns float32 distances for float32 input (pbmc3k's X_pca and data made
    from it); ours are exact float64. Measured on pbmc3k: at most 8.7e-8 relative (its float32
    rounding) for euclidean and manhattan (sqeuclidean comes back in float64: 1.7e-14), and
    5.6e-7 absolute for cosine, whose 1 − cos cancels in float32 (7.6e-6 relative at the
    smallest distances). About ten times those."""
    return {"rtol": 1e-6, "atol": 5e-6 if metric == "cosine" else 0.0}


def compare_sets(idx, dist, ref_idx, ref_dist, *, rtol, atol):
    """Identical neighbour sets except where the k-th distance is tied with the (k+1)-th."""
    assert idx.shape == ref_idx.shape
    n = idx.shape[0]
    np.testing.assert_array_equal(idx[:, 0], np.arange(n))  # each point first
    np.testing.assert_array_equal(dist[:, 0], 0)
    assert (np.diff(dist, axis=1) >= 0).all()  # sorted by distance
    # distances agree position by position (sorted lists), ties or not, within the oracle's
    # own rounding (the callers state it); our distances are exact float64
    np.testing.assert_allclose(dist[:, 1:], ref_dist[:, 1:], rtol=rtol, atol=atol)
    differ = [i for i in range(n) if set(idx[i]) != set(ref_idx[i])]
    kth = dist[:, -1]
    # a differing row must be a tie at the boundary: the swapped points lie at the k-th distance
    for i in differ:
        swapped = set(idx[i]) ^ set(ref_idx[i])
        assert all(np.isclose(np.where(idx[i] == j, dist[i], 0).sum() or
                              np.where(ref_idx[i] == j, ref_dist[i], 0).sum(), kth[i],
                              rtol=1e-5) for j in swapped), f"row {i} differs beyond a tie"
    return len(differ)


# ---------------------------------------------------------------- the kNN itself

@pytest.mark.parametrize("metric", METRICS)
def test_knn_matches_sklearn_on_pbmc3k_pca(pbmc_pca, metric):
    k = 15
    idx, dist, _ = knn_host(pbmc_pca, k, metric)
    ref_idx, ref_dist = sklearn_knn(pbmc_pca, k, metric)
    ties = compare_sets(idx, dist, ref_idx, ref_dist, **sklearn_float32_tolerance(metric))
    assert ties <= 3, f"{ties} rows differ (ties)"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", METRICS)
def test_knn_matches_sklearn_on_blobs(metric, dtype):
    x = blobs(dtype=dtype)
    idx, dist, _ = knn_host(x, 10, metric)
    ref_idx, ref_dist = sklearn_knn(x.astype(np.float64), 10, metric)
    # scikit-learn's float64 expansion ‖a‖² + ‖b‖² − 2ab (cosine: 1 − a·b/‖a‖‖b‖) measured at
    # most 2.3e-13 relative here (cosine; 1.2e-13 sqeuclidean); about ten times that
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=2e-12, atol=0) == 0


def test_knn_float32_pass_falls_back_to_float64_for_close_candidates():
    # far from the origin, with neighbours 1e-3 apart: float32 products cannot tell them
    # apart, so rows must be redone in float64 and still match exact search (scikit-learn's
    # expansion is itself off by ~1e-6 here, so the oracle is SciPy's direct cdist)
    rng = np.random.default_rng(3)
    x = 1000 + rng.normal(scale=1e-3, size=(400, 8))
    x[:, 0] += 50 * rng.integers(3, size=400)
    idx, dist, _ = knn_host(x, 6, "euclidean")
    ref_idx, ref_dist = direct_knn(x, 6, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-12) == 0


def test_knn_duplicates_put_each_point_first():
    x = np.repeat(blobs(n=50, dim=5), 30, axis=0)  # 30 copies of each point: more than k + margin
    idx, dist, _ = knn_host(x, 5, "euclidean")
    np.testing.assert_array_equal(idx[:, 0], np.arange(len(x)))
    np.testing.assert_array_equal(dist, 0)
    assert (idx // 30 == np.arange(len(x))[:, None] // 30).all()  # neighbours are copies


def test_knn_is_deterministic():
    x = blobs(n=800)
    a = knn_host(x, 12, "cosine")
    b = knn_host(x, 12, "cosine")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---------------------------------------------------------------- the device's TF32 pass, on the host

def test_round_tf32_is_nearest_with_ties_away_from_zero():
    rng = np.random.default_rng(0)
    v = rng.normal(size=20000) * 10.0 ** rng.integers(-20, 20, size=20000)
    ties = [1 + 2**-11, -(1 + 2**-11), 1 + 3 * 2**-11, 2**-11 * (1 + 2**-11), 7.0]
    v = np.concatenate([v, ties]).astype(np.float32)
    m, e = np.frexp(np.abs(v.astype(np.float64)))  # |v| = m 2^e, m in [0.5, 1): 11 bits kept
    expected = np.sign(v) * np.floor(m * 2.0**11 + 0.5) * 2.0 ** (e - 11.0)
    np.testing.assert_array_equal(topk.round_tf32(v), expected.astype(np.float32))
    assert topk.round_tf32(np.float32([1 + 2**-11]))[0] == np.float32(1 + 2**-10)


def _exact_keys(x, code):
    from scipy.spatial.distance import cdist

    if code == topk.METRICS["cosine"]:
        return 2 * cdist(x, x, "cosine")
    return cdist(x, x, "sqeuclidean")


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_tf32_error_bound_holds_for_every_pair(pbmc_pca, metric):
    # Every key a TF32 pass can produce (rows rounded to TF32, products summed in FP32)
    # lies within error_bound of the exact squared distance, with the span of the pair's own
    # lengths (the tightest form; certify uses it with a longer reference length).
    code = topk.METRICS[metric]
    x = pbmc_pca[:800].astype(np.float64)
    v = topk.round_tf32(topk._gemm_vectors(x, code).astype(np.float32))
    norms = (v.astype(np.float64) ** 2).sum(axis=1)
    keys = norms[:, None] + norms[None, :] - 2 * (v @ v.T).astype(np.float64)
    lengths = np.sqrt(norms)
    bound = topk.error_bound(lengths[:, None], lengths[None, :], x.shape[1], "tf32",
                             keys.max(axis=1)[:, None])
    exact = _exact_keys(x, code)
    assert (np.abs(exact - keys) <= bound).all()
    # ...and, at a list's real worst key, well below the gap a margin of 16 leaves between
    # the 15th and the 31st neighbour (pbmc3k: 8% of it for euclidean, 4% for cosine)
    ordered = np.sort(exact, axis=1)
    worst = ordered[:, 15 + topk.DEVICE_MARGIN - 1]
    bound = topk.error_bound(lengths, lengths.max(), x.shape[1], "tf32", worst)
    assert np.median(bound) < 0.15 * np.median(worst - ordered[:, 14])


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "sqeuclidean"])
def test_tf32_first_pass_is_exact_and_certifies_most_rows(pbmc_pca, metric):
    idx, dist, _ = knn_host(pbmc_pca, 15, metric, first_pass="tf32")
    ref_idx, ref_dist = sklearn_knn(pbmc_pca, 15, metric)
    assert compare_sets(idx, dist, ref_idx, ref_dist, **sklearn_float32_tolerance(metric)) <= 3
    n = len(pbmc_pca)
    n_cand = topk.n_candidates(15, n, topk.DEVICE_MARGIN)  # the device's list length
    _, _, certified = topk._host_pass(pbmc_pca.astype(np.float64), np.arange(n), 15, n_cand,
                                      topk.METRICS[metric], "tf32", 128, 2048)
    assert certified.mean() > 0.95, f"TF32 pass certifies only {certified.mean():.1%} of rows"


def with_outliers(x, scale=10.0, fraction=0.001, seed=0):
    """x with a ``fraction`` of its rows (at least 3) moved along their own direction from the
    mean out to ``scale`` times the median distance from the mean."""
    rng = np.random.default_rng(seed)
    centre = x.mean(axis=0, dtype=np.float64)
    lengths = np.linalg.norm(x - centre, axis=1)
    rows = rng.choice(len(x), max(3, round(fraction * len(x))), replace=False)
    out = x.astype(np.float64)
    out[rows] = centre + (out[rows] - centre) * (scale * np.median(lengths) / lengths[rows])[:, None]
    return out.astype(x.dtype)


# Certified fractions with 0.1% of the cells at 10x the median norm (k = 15, the host's
# margin of 8): measured with the per-row bound, and with the global-norm bound it replaced
# (span = the row's length + the longest row's, for every row), on the same candidates.
#   pbmc3k X_pca (3 of 2,638 cells)  tf32:    per row 0.9996, global 0.9530
#   blobs 3,000 x 30 (3 cells)        tf32:    per row 0.9960, global 0.0007
#   blobs 3,000 x 30                  float32: per row 1.0000, global 0.9957
# pbmc3k's cells already reach 3x the median norm, so its float32 pass certifies every row
# either way; the rows left over are the outliers themselves and near-ties.
@pytest.mark.parametrize(("data", "first_pass", "at_least"), [
    ("pbmc3k", "tf32", 0.99), ("blobs", "tf32", 0.99), ("blobs", "float32", 0.999)])
def test_far_outliers_leave_other_rows_certified(pbmc_pca, data, first_pass, at_least):
    x = with_outliers(pbmc_pca if data == "pbmc3k" else blobs(n=3000, dim=30, seed=1))
    idx, dist, certified = knn_host(x, 15, "euclidean", first_pass=first_pass)
    ref_idx, ref_dist = sklearn_knn(x, 15, "euclidean")  # float32 x: measured 8.7e-8 relative
    assert compare_sets(idx, dist, ref_idx, ref_dist, **sklearn_float32_tolerance("euclidean")) <= 3
    assert certified >= at_least, f"the {first_pass} pass certifies only {certified:.2%} of rows"


@pytest.mark.parametrize("precision", ["tf32", "float32"])
def test_certified_rows_are_exact_where_the_first_pass_is_wrong(precision):
    # Far from the origin with neighbours 1e-3 apart, the reduced-precision candidates are
    # wrong for about two thirds of the rows; every row certify() accepts must be exact.
    rng = np.random.default_rng(3)
    x = 1000 + rng.normal(scale=1e-3, size=(400, 8))
    x[:, 0] += 50 * rng.integers(3, size=400)
    n, k = len(x), 6
    n_cand = topk.n_candidates(k, n, topk.DEVICE_MARGIN)
    _, dist, certified = topk._host_pass(x, np.arange(n), k, n_cand, topk.METRICS["euclidean"],
                                         precision, 128, 2048)
    _, ref_dist = direct_knn(x, k, "euclidean")
    exact = np.isclose(dist, ref_dist, rtol=1e-12, atol=0).all(axis=1)
    assert (~exact).sum() > 200 and certified.sum() > 50  # measured (tf32, float32): 260, 264 wrong; 84, 136 certified
    assert exact[certified].all()


def test_rerank_refuses_candidates_whose_keys_are_not_theirs(pbmc_pca):
    # A candidate pass that pairs keys with the wrong indices must not certify a row, even
    # when its worst key (the certification threshold) is right.
    x = pbmc_pca[:500].astype(np.float64)
    n, n_cand, dim = len(x), 31, x.shape[1]
    exact = _exact_keys(x, topk.METRICS["euclidean"])
    np.fill_diagonal(exact, -1)
    cand_idx = np.ascontiguousarray(np.argsort(exact, axis=1, kind="stable")[:, :n_cand])  # as knn_host's
    np.fill_diagonal(exact, 0)
    cand_key = np.take_along_axis(exact, cand_idx, axis=1)
    rows, worst = np.arange(n), cand_key[:, -1]
    lengths = np.linalg.norm(topk._gemm_vectors(x, 0), axis=1)
    err = topk.candidate_bound(lengths, rows, cand_idx, dim, "float64", worst)

    def certified(keys):
        *_, kth_key = topk._rerank_host(x, rows, keys, cand_idx, 15, 0, err)
        return topk.certify(kth_key, worst, lengths, lengths.max(), dim, "float64", 0)

    assert certified(cand_key).all()
    swapped = cand_key.copy()
    swapped[:, [3, 7]] = swapped[:, [7, 3]]  # two keys trade places; the worst stays last
    differs = np.abs(cand_key[:, 3] - cand_key[:, 7]) > 1e-9
    assert differs.sum() > 400
    assert not certified(swapped)[differs].any()


# ---------------------------------------------------------------- the AnnData function

def anndata_with_pca(x):
    adata = ad.AnnData(np.zeros((x.shape[0], 60), np.float32))
    adata.obsm["X_pca"] = x
    return adata


def sklearn_scanpy(adata, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.pp.neighbors(adata, transformer="sklearn", copy=True, **kw)


def assert_csr_close(ours, ref, *, rtol, atol=0.0):
    """The same sparsity pattern and |ours − ref| <= atol + rtol · max |ref|."""
    assert isinstance(ours, sparse.csr_matrix)
    assert ours.shape == ref.shape
    assert ours.nnz == ref.nnz
    np.testing.assert_array_equal((ours != 0).toarray(), (ref != 0).toarray())
    diff = abs(ours - ref)
    scale = abs(ref).max()
    assert diff.max() <= atol + rtol * scale, f"max abs difference {diff.max()}"


def _umap_rtol(device: str) -> float:
    """umap connectivities' tolerance. On the host 1e-6 (measured 1.2e-7). On the GPU 1e-5,
    umap-learn's own SMOOTH_K_TOLERANCE: each cell's sigma is a binary search that stops once
    the membership sum is within 1e-5 of log2(k), and CUDA's expf rounds differently from the
    host's, so the search may stop at another sigma inside that window (measured on an H200:
    2.1e-6 to 3.2e-6 of the largest connectivity)."""
    return 1e-5 if device == "gpu" else 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", CONNECTIVITY_METHODS)
@pytest.mark.parametrize("metric", METRICS)
def test_neighbors_equals_scanpy_sklearn(metric, method, device):
    x = blobs(n=600, dim=15, dtype=np.float64)
    ours = anndata_with_pca(x)
    gpusc.pp.neighbors(ours, n_neighbors=12, metric=metric, method=method, device=device)
    ref = sklearn_scanpy(anndata_with_pca(x), n_neighbors=12, metric=metric, method=method)
    assert ours.uns["neighbors"] == ref.uns["neighbors"]
    d, rd = ours.obsp["distances"], ref.obsp["distances"]
    assert (d.getnnz(axis=1) == 11).all()
    assert_csr_close(d, rd, rtol=5e-13)  # float64 oracle: measured 4.3e-14 of the largest
    assert d.dtype == np.float64
    c, rc = ours.obsp["connectivities"], ref.obsp["connectivities"]
    assert c.dtype == rc.dtype
    # measured: umap 1.2e-7, one float32 step at 1 (umap-learn's numba and ours sum the
    # memberships in another order); gauss 1.1e-13 (float64); jaccard 0 (counts)
    assert_csr_close(c, rc, rtol=_umap_rtol(device) if method == "umap" else 1e-12)


@pytest.mark.parametrize("method", CONNECTIVITY_METHODS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_connectivities_from_the_same_knn(pbmc_pca, dtype, device, method):
    """umap/gauss/jaccard connectivities equal scanpy's computed from our own kNN arrays."""
    x = pbmc_pca.astype(dtype)
    adata = anndata_with_pca(x)
    k = 15
    idx, dist, _ = knn_host(x, k, "euclidean")
    n = x.shape[0]
    gpusc.pp.neighbors(adata, n_neighbors=k, method=method, key_added=method, device=device)
    ours = adata.obsp[f"{method}_connectivities"]
    if method == "umap":
        ref = sc_umap(idx, dist, n_obs=n, n_neighbors=k)
    elif method == "gauss":
        ref = sc_gauss(adata.obsp[f"{method}_distances"].copy(), k, knn=True)  # it sorts in place
    else:
        ref = sc_connectivity.jaccard(idx, n_obs=n, n_neighbors=k)
    # measured: umap 1.2e-7 (float32 sums in another order, as above); gauss, jaccard 0
    assert_csr_close(ours, ref.tocsr(), rtol=_umap_rtol(device) if method == "umap" else 1e-12)
    np.testing.assert_array_equal(adata.obsp[f"{method}_distances"].indices, idx[:, 1:].ravel())


def test_key_added_copy_n_pcs_and_use_rep():
    x = blobs(n=300, dim=30)
    adata = anndata_with_pca(x)
    adata.obsm["X_other"] = x[:, ::-1].copy()
    before = adata.copy()
    out = gpusc.pp.neighbors(adata, n_neighbors=8, n_pcs=10, key_added="nb", copy=True)
    assert out is not adata
    assert not adata.obsp and "nb" not in adata.uns  # the input is untouched
    np.testing.assert_array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])
    ref = sklearn_scanpy(anndata_with_pca(x), n_neighbors=8, n_pcs=10, key_added="nb")
    assert out.uns["nb"] == ref.uns["nb"]
    assert set(out.obsp) == {"nb_distances", "nb_connectivities"}
    # float32 x: scikit-learn's float32 distances against our exact ones, measured 6.8e-8 of
    # the largest; the umap memberships built on them 3.5e-6 (its σ search stops within 1e-5
    # of log2 k, so a last-bit change of a distance can stop it a step apart): 2.9x margin
    assert_csr_close(out.obsp["nb_distances"], ref.obsp["nb_distances"], rtol=1e-6)
    assert_csr_close(out.obsp["nb_connectivities"], ref.obsp["nb_connectivities"], rtol=1e-5)

    assert gpusc.pp.neighbors(adata, n_neighbors=8, use_rep="X_other") is None
    ref = sklearn_scanpy(anndata_with_pca(x), n_neighbors=8, use_rep="X_pca")
    assert adata.uns["neighbors"]["params"]["use_rep"] == "X_other"
    assert_csr_close(adata.obsp["distances"], ref.obsp["distances"], rtol=1e-6)  # measured 5.7e-8


def test_small_x_is_used_directly_and_n_pcs_zero():
    x = blobs(n=200, dim=12)
    ours = ad.AnnData(x)
    gpusc.pp.neighbors(ours, n_neighbors=6)
    ref = sklearn_scanpy(ad.AnnData(x), n_neighbors=6)
    # float32 X, as in test_key_added_copy_n_pcs_and_use_rep: measured 6.5e-8 and 4.2e-6
    assert_csr_close(ours.obsp["distances"], ref.obsp["distances"], rtol=1e-6)
    assert_csr_close(ours.obsp["connectivities"], ref.obsp["connectivities"], rtol=1e-5)
    sp = ad.AnnData(sparse.csr_matrix(x))
    gpusc.pp.neighbors(sp, n_neighbors=6, n_pcs=0)
    assert sp.uns["neighbors"]["params"]["n_pcs"] == 0
    assert_csr_close(sp.obsp["distances"], ref.obsp["distances"], rtol=1e-6)


def test_many_genes_without_pca(monkeypatch):
    adata = ad.AnnData(np.random.default_rng(0).poisson(1, (100, 80)).astype(np.float32))
    monkeypatch.delattr(gpusc.pp, "pca", raising=False)
    with pytest.raises(ValueError, match="run pp.pca first"):
        gpusc.pp.neighbors(adata)
    assert not adata.obsp and not adata.uns and not adata.obsm


# ---------------------------------------------------------------- precomputed distances

@pytest.fixture(scope="module")
def pbmc_distances(pbmc_pca):
    """Distance matrices of 800 pbmc3k cells, as users pass them to neighbors(distances=)."""
    from scipy.spatial.distance import cdist

    x = pbmc_pca[:800].astype(np.float64)
    dense = cdist(x, x)
    # scikit-learn's kNN graph: 30 per row in neighbour order (rows not sorted by column)
    knn30 = NearestNeighbors(n_neighbors=30).fit(x).kneighbors_graph(mode="distance")
    ragged = knn30.copy()
    ragged.data[np.random.default_rng(0).random(ragged.nnz) < 0.1] = 0  # ~3 of 30 dropped per row
    ragged.eliminate_zeros()
    matrices = {"dense": dense, "dense-float32": dense.astype(np.float32), "knn30": knn30,
                "knn30-sorted-float32": knn30.astype(np.float32).sorted_indices(), "ragged": ragged}
    return {name: read_only(m) for name, m in matrices.items()}  # shared: neighbors must not write


def with_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [(w.category, str(w.message)) for w in caught if not issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("method", CONNECTIVITY_METHODS)
@pytest.mark.parametrize("kind", ["dense", "dense-float32", "knn30", "knn30-sorted-float32", "ragged"])
@PRECOMPUTED_112
def test_precomputed_distances_equal_scanpy(pbmc_distances, kind, method):
    d = pbmc_distances[kind]
    before = d.copy()
    ours, ref = ad.AnnData(np.zeros((800, 3), np.float32)), ad.AnnData(np.zeros((800, 3), np.float32))
    ours_warned = with_warnings(lambda: gpusc.pp.neighbors(ours, distances=d, method=method))
    # scanpy 1.12 zeroes a dense input's diagonal in place: it gets a copy (ours gets the
    # fixture's read-only matrix, so a write would raise)
    ref_warned = with_warnings(lambda: sc.pp.neighbors(ref, distances=d.copy(), method=method))
    assert (abs(d - before) if sparse.issparse(d) else np.abs(d - before)).max() == 0  # input as it was
    # scanpy's own warning (the one for ragged rows) inside ours
    assert [c for c, _ in ours_warned] == [c for c, _ in ref_warned]
    assert all(r in o for (_, o), (_, r) in zip(ours_warned, ref_warned, strict=True))
    assert ours.uns["neighbors"] == ref.uns["neighbors"]
    assert ours.uns["neighbors"]["params"]["metric"] is None  # stored as given
    dist, ref_dist = ours.obsp["distances"], ref.obsp["distances"]
    assert type(dist) is type(ref_dist) and dist.dtype == ref_dist.dtype
    if sparse.issparse(dist):
        np.testing.assert_array_equal(dist.indptr, ref_dist.indptr)
        np.testing.assert_array_equal(dist.indices, ref_dist.indices)
        np.testing.assert_array_equal(dist.data, ref_dist.data)
    else:
        np.testing.assert_array_equal(dist, ref_dist)
    conn, ref_conn = ours.obsp["connectivities"], ref.obsp["connectivities"]
    assert type(conn) is type(ref_conn) and conn.dtype == ref_conn.dtype
    if sparse.issparse(conn):
        # measured: umap 1.2e-7 (one float32 step at 1: umap-learn's and our numba sums),
        # gauss on float32 input 1.8e-7 (float32 arithmetic in another order), else 0
        assert_csr_close(conn, ref_conn, rtol=4e-7)
    else:
        np.testing.assert_array_equal(conn, ref_conn)  # dense gauss: the same NumPy expressions


@PRECOMPUTED_112
def test_precomputed_distances_warn_of_ignored_parameters(pbmc_distances):
    d = pbmc_distances["knn30"]
    ours, ref = ad.AnnData(np.zeros((800, 3), np.float32)), ad.AnnData(np.zeros((800, 3), np.float32))
    kw = {"distances": d, "n_neighbors": 10, "n_pcs": 20, "metric": "cosine"}
    with pytest.warns(UserWarning, match=r"Parameter\(s\) ignored if `distances` is given: \{'n_pcs'\}"):
        gpusc.pp.neighbors(ours, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(ref, **kw)
    assert ours.uns["neighbors"] == ref.uns["neighbors"]  # n_pcs stored, metric only stored
    # knn=False and a random state are ignored too (the state is stored as 0), as scanpy does
    kw = {"distances": d, "knn": False, "random_state": 7, "use_rep": "X_pca", "key_added": "pre"}
    with pytest.warns(UserWarning, match="ignored if `distances` is given") as record:
        gpusc.pp.neighbors(ours, **kw)
    assert all(name in str(record[0].message) for name in ("knn", "random_state", "use_rep"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(ref, **kw)
    assert ours.uns["pre"] == ref.uns["pre"] and ours.uns["pre"]["params"]["random_state"] == 0
    assert_csr_close(ours.obsp["pre_connectivities"], ref.obsp["pre_connectivities"], rtol=4e-7)


def test_precomputed_distances_copy_and_csr_array(pbmc_distances):
    adata = ad.AnnData(np.zeros((800, 3), np.float32))
    out = gpusc.pp.neighbors(adata, distances=pbmc_distances["knn30"], copy=True)
    assert out is not adata and not adata.obsp and not adata.uns  # scanpy 1.12 writes into adata too
    # a csr_array (scanpy 1.12 fails on one: AttributeError, no getnnz) gives the same graph
    gpusc.pp.neighbors(adata, distances=sparse.csr_array(pbmc_distances["knn30"]))
    assert isinstance(adata.obsp["distances"], sparse.csr_array)
    assert (adata.obsp["distances"] != out.obsp["distances"]).nnz == 0
    assert (adata.obsp["connectivities"] != out.obsp["connectivities"]).nnz == 0


@pytest.mark.parametrize(("change", "kwargs", "error", "match"), [
    (lambda d: d[:, :-1], {}, ValueError, r"distances has shape \(800, 799\)"),
    (lambda d: d[:-1], {}, ValueError, r"shape \(799, 800\)"),
    (lambda d: np.where(np.eye(800, k=1, dtype=bool), np.nan, d), {}, ValueError, "NaN"),
    (lambda d: sparse.csr_matrix(np.where(np.eye(800, k=1, dtype=bool), np.inf, d)), {}, ValueError, "inf"),
    (lambda d: -d, {}, ValueError, "negative"),
    (lambda d: np.full(d.shape, "x"), {}, TypeError, "dtype"),
    (lambda d: d, {"metric": lambda a, b: 0.0}, TypeError, "`metric` must be a string if `distances` is given"),
    (lambda d: d, {"n_neighbors": 800}, ValueError, "n_neighbors=800"),
    (lambda d: d, {"method": "rapids"}, ValueError, "method='rapids'"),
    (lambda d: sparse.csr_matrix(np.where(d < np.sort(d, axis=1)[:, [8]], d, 0)), {}, ValueError,
     "fewer than n_neighbors − 1 = 14"),
])
def test_precomputed_distances_bad_input_leaves_adata_unchanged(pbmc_distances, change, kwargs, error, match):
    adata = ad.AnnData(np.zeros((800, 3), np.float32))
    with pytest.raises(error, match=match):
        gpusc.pp.neighbors(adata, distances=change(pbmc_distances["dense"]), **kwargs)
    assert not adata.obsp and not adata.uns


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"n_neighbors": 200}, ValueError, "n_neighbors=200"),
    ({"n_neighbors": 100}, ValueError, "n_neighbors=100"),
    ({"n_neighbors": 1}, ValueError, "n_neighbors=1"),
    ({"n_neighbors": 0}, ValueError, "n_neighbors=0"),
    ({"n_neighbors": 5.5}, TypeError, "n_neighbors"),
    ({"use_rep": "X_missing"}, KeyError, "use_rep='X_missing'"),
    ({"n_pcs": 40}, ValueError, "n_pcs=40"),
    ({"metric": "chebyshev"}, ValueError, "metric='chebyshev'"),
    ({"metric_kwds": {"p": 3}}, ValueError, "metric_kwds"),
    ({"algorithm": "kd_tree"}, ValueError, "algorithm='kd_tree'"),
    ({"algorithm": "cagra", "device": "cpu"}, ValueError, "algorithm='cagra'"),
    ({"method": "rapids"}, ValueError, "method='rapids'"),
    ({"knn": False}, NotImplementedError, "knn=False"),
    ({"transformer": "pynndescent"}, ValueError, "transformer="),
    ({"device": "tpu"}, ValueError, "device"),
])
def test_bad_arguments_leave_adata_unchanged(kwargs, error, match):
    adata = anndata_with_pca(blobs(n=100, dim=30))
    before = adata.copy()
    with pytest.raises(error, match=match):
        gpusc.pp.neighbors(adata, **kwargs)
    assert not adata.obsp and not adata.uns
    np.testing.assert_array_equal(adata.obsm["X_pca"], before.obsm["X_pca"])


def test_nan_in_representation():
    x = blobs(n=100, dim=30)
    x[7, 3] = np.nan
    adata = anndata_with_pca(x)
    with pytest.raises(ValueError, match="NaN"):
        gpusc.pp.neighbors(adata)
    assert not adata.obsp and not adata.uns


def test_ann_algorithms_name_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuvs(name, *args, **kwargs):
        if name.startswith("cuvs"):
            raise ImportError("No module named 'cuvs'")
        return real_import(name, *args, **kwargs)

    from gpusc.pp import _neighbors

    monkeypatch.setattr(builtins, "__import__", no_cuvs)
    with pytest.raises(ImportError, match="rapids-cu13"):
        _neighbors._cuvs_knn(blobs(n=50, dim=4), 5, "euclidean", "cagra")


# ---------------------------------------------------------------- settings

def test_settings_device(monkeypatch):
    from gpusc import _settings

    assert gpusc.settings.device == "auto"
    with pytest.raises(ValueError, match="auto"):
        gpusc.settings.device = "cuda"
    monkeypatch.setattr(_settings, "gpu_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="device='gpu'"):
        resolve_device("gpu")
    monkeypatch.setattr(gpusc.settings, "_device", "cpu")
    assert resolve_device(None) == "cpu"
    monkeypatch.setattr(_settings, "gpu_available", lambda: True)
    assert resolve_device("auto") == "gpu"
    assert resolve_device(None) == "cpu"  # settings.device = "cpu" wins over auto-detection


# ---------------------------------------------------------------- GPU twins

@pytest.mark.gpu
@pytest.mark.parametrize("metric", METRICS)
def test_device_knn_matches_host(pbmc_pca, metric):
    from gpusc._kernels.topk import knn_device

    idx, dist, _ = knn_device(pbmc_pca, 15, metric)
    ref_idx, ref_dist = sklearn_knn(pbmc_pca, 15, metric)
    assert compare_sets(idx, dist, ref_idx, ref_dist, **sklearn_float32_tolerance(metric)) <= 3
    host_idx, host_dist, _ = knn_host(pbmc_pca, 15, metric)
    np.testing.assert_allclose(dist, host_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("n, dim, k", [(1037, 13, 15), (300, 64, 48), (20, 7, 15), (700, 65, 10)])
def test_device_knn_fused_pass_shapes(n, dim, k):
    # rows that fill no whole block (256) or chunk (64), features that fill no k8 step,
    # the longest list (K = 64), fewer rows than K, and one dimension past the fused pass
    from gpusc._kernels.topk import knn_device

    x = blobs(n=n, dim=dim, seed=n)
    idx, dist, _ = knn_device(x, k, "euclidean")
    ref_idx, ref_dist = direct_knn(x.astype(np.float64), k, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-9) == 0
    tile_idx, tile_dist, _ = knn_device(x, k, "euclidean", fused=False)
    np.testing.assert_array_equal(tile_dist, dist)


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_device_fused_lists_are_the_smallest_tf32_keys(pbmc_pca, metric):
    import cupy as cp

    code = topk.METRICS[metric]
    n = len(pbmc_pca)
    n_cand = topk.n_candidates(15, n, topk.DEVICE_MARGIN)
    x = cp.asarray(pbmc_pca)
    cand_key, cand_idx, _ = topk._fused_candidates(x, n_cand, code)
    key, idx = cand_key.get(), cand_idx.get()
    again = topk._fused_candidates(x, n_cand, code)
    np.testing.assert_array_equal(again[0].get(), key)  # deterministic
    np.testing.assert_array_equal(again[1].get(), idx)
    assert (np.diff(key, axis=1) >= 0).all()
    # the exact keys of the TF32-rounded rows: the fused keys differ by the FP32
    # accumulation of 50 products only (about 3e-5 of the largest squared norm)
    v = topk.round_tf32(topk._gemm_vectors(pbmc_pca.astype(np.float64), code).astype(np.float32))
    v64 = v.astype(np.float64)
    norms = (v64 ** 2).sum(axis=1)
    rounded_keys = norms[:, None] + norms[None, :] - 2 * v64 @ v64.T
    np.testing.assert_allclose(key, np.take_along_axis(rounded_keys, idx, axis=1),
                               rtol=0, atol=1e-4 * norms.max())
    expected = np.argsort(rounded_keys, axis=1, kind="stable")[:, :n_cand]
    shared = np.mean([np.intersect1d(a, b).size for a, b in zip(idx, expected, strict=True)])
    assert shared / n_cand > 0.99  # the rest: near-ties at the list's end
    *_, certified = topk._device_pass(x, cp.arange(n), 15, n_cand, code, "tf32", 8192, 8192)
    assert float(certified.mean()) > 0.95


@pytest.mark.gpu
def test_device_knn_float32_fallback_and_duplicates():
    from gpusc._kernels.topk import knn_device

    rng = np.random.default_rng(3)
    x = 1000 + rng.normal(scale=1e-3, size=(400, 8))
    x[:, 0] += 50 * rng.integers(3, size=400)
    idx, dist, _ = knn_device(x, 6, "euclidean")
    ref_idx, ref_dist = direct_knn(x, 6, "euclidean")
    assert compare_sets(idx, dist, ref_idx, ref_dist, rtol=1e-9, atol=1e-12) == 0
    dup = np.repeat(blobs(n=50, dim=5), 30, axis=0)
    idx, dist, _ = knn_device(dup, 5, "euclidean")
    np.testing.assert_array_equal(idx[:, 0], np.arange(len(dup)))
    np.testing.assert_array_equal(dist, 0)
